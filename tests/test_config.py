import argparse

import pytest

from glmpool import config


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    toml = tmp_path / "glmpool.toml"
    toml.write_text('max_batch = 4\npoll_interval = 2.5\nmodel = "from-file"\numask = "0002"\n')
    env = {"GLMPOOL_MAX_BATCH": "6", "GLMPOOL_MODEL": "from-env"}
    settings = config.resolve(parse(["--config", str(toml), "--model", "from-flag"]), env)
    assert settings.model == "from-flag" and settings.sources["model"] == "flag"
    assert settings.max_batch == 6 and settings.sources["max_batch"] == "env"
    assert settings.poll_interval == 2.5 and settings.sources["poll_interval"].startswith("file")
    assert settings.umask == 0o002
    assert settings.grace_seconds == config.BY_NAME["grace_seconds"].default
    assert settings.sources["grace_seconds"] == "default"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("max_bacth = 4\n")
    with pytest.raises(config.ConfigError, match="unknown setting.*max_bacth"):
        config.resolve(parse(["--config", str(toml)]), {})
    with pytest.raises(config.ConfigError, match="GLMPOOL_MAX_BATCH"):
        config.resolve(parse([]), {"GLMPOOL_MAX_BATCH": "many"})
    with pytest.raises(config.ConfigError, match="quantize"):
        config.resolve(parse(["--quantize", "3"]), {})
    toml.write_text("max_batch = [\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.resolve(parse(["--config", str(toml)]), {})


def test_every_setting_has_a_flag_and_help():
    text = ""
    for command in ("serve", "http"):  # each command has the flags of its own settings
        parser = argparse.ArgumentParser()
        config.add_arguments(parser, command)
        text += parser.format_help()
    for setting in config.SETTINGS:
        assert "--" + setting.name.replace("_", "-") in text
        assert f"GLMPOOL_{setting.name.upper()}" in text


def test_matmul_choices_are_the_engines():
    """The setting and the engine name the same matmul kinds, from the registry (without importing torch)."""
    from glmpool.engine.linear.registry import MATMULS
    parse = config.BY_NAME["matmul"].parse
    assert [parse(kind) for kind in MATMULS] == list(MATMULS)
    assert config.BY_NAME["matmul"].default in MATMULS
    with pytest.raises(ValueError, match="use one of"):
        parse("mkl")
