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


# Every bad value the configuration audit found (issue 25), from each place a value can come from.
BAD_FILE_VALUES = [
    ("max_batch = 16.7", "max_batch", "whole number"),
    ("max_batch = true", "max_batch", "whole number"),
    ("max_batch = 0", "max_batch", "at least 1"),
    ("lease_seconds = true", "lease_seconds", "expected a number"),
    ("lease_seconds = 0", "lease_seconds", "above 0"),
    ("poll_interval = nan", "poll_interval", "finite"),
    ("grace_seconds = inf", "grace_seconds", "finite"),
    ("heartbeat_timeout = -1", "heartbeat_timeout", "above 0"),
    ("load_timeout = -5", "load_timeout", "at least 0"),
    ("kv_cache_gb = 0", "kv_cache_gb", "above 0"),
    ("metrics_port = 70000", "metrics_port", "0-65535"),
    ("metrics_port = 9464.0", "metrics_port", "whole number"),
    ("partial_tokens = -1", "partial_tokens", "at least 0"),
    ("model = 6", "model", "string"),
    ("dir = [\"/srv\"]", "dir", "string"),
    ("quantize = 4.0", "quantize", "use one of"),
    ("quantize = true", "quantize", "use one of"),
    ("umask = 18", "umask", "octal digits in a string"),
    ("umask = \"0999\"", "umask", "octal digits"),
    ("umask = \"01777\"", "umask", "at most 0777"),
    ("log_level = 10", "log_level", "string"),
    ("log_format = \"xml\"", "log_format", "use one of"),
]
BAD_ENV_VALUES = [
    ("GLMPOOL_MAX_BATCH", "-3", "at least 1"),
    ("GLMPOOL_MAX_BATCH", "16.7", "whole number"),
    ("GLMPOOL_POLL_INTERVAL", "nan", "finite"),
    ("GLMPOOL_POLL_INTERVAL", "0", "above 0"),
    ("GLMPOOL_LEASE_SECONDS", "-1", "above 0"),
    ("GLMPOOL_REQUEST_TIMEOUT", "-0.5", "at least 0"),
    ("GLMPOOL_WORKER_THREADS", "two", "whole number"),
    ("GLMPOOL_MAX_LENGTH", "0", "at least 1"),
    ("GLMPOOL_PARTIAL_SECONDS", "-inf", "finite"),
    ("GLMPOOL_UMASK", "8", "octal"),
]


@pytest.mark.parametrize("line,name,why", BAD_FILE_VALUES)
def test_every_bad_file_value_is_an_error(tmp_path, line, name, why):
    toml = tmp_path / "bad.toml"
    toml.write_text(line + "\n")
    with pytest.raises(config.ConfigError) as error:
        config.resolve(parse(["--config", str(toml)]), {})
    assert f"for {name}: " in str(error.value) and why in str(error.value) and str(toml) in str(error.value)


@pytest.mark.parametrize("variable,value,why", BAD_ENV_VALUES)
def test_every_bad_environment_value_is_an_error(variable, value, why):
    with pytest.raises(config.ConfigError, match=f"{variable}: bad value .*{why}"):
        config.resolve(parse([]), {variable: value})
    flag = "--" + variable.removeprefix("GLMPOOL_").lower().replace("_", "-")
    with pytest.raises(config.ConfigError, match=f"{flag}: bad value .*{why}"):  # the same as a flag
        config.resolve(parse([flag + "=" + value]), {})


def test_good_values_of_every_kind_pass(tmp_path):
    toml = tmp_path / "good.toml"
    toml.write_text('max_batch = 8\nlease_seconds = 30\npoll_interval = 0.1\nquantize = "4-qe"\n'
                    'umask = "0002"\nmetrics_port = 65535\nrevision = "v1.1.0"\nkv_cache_gb = 1\n')
    settings = config.resolve(parse(["--config", str(toml)]), {"GLMPOOL_QUANTIZE": "8"})
    assert (settings.max_batch, settings.lease_seconds, settings.poll_interval) == (8, 30.0, 0.1)
    assert settings.quantize == 8 and settings.umask == 0o002 and settings.revision == "v1.1.0"
    assert isinstance(settings.lease_seconds, float) and settings.kv_cache_gb == 1.0
    toml.write_text("quantize = 4\n")
    assert config.resolve(parse(["--config", str(toml)]), {}).quantize == 4


def test_an_unknown_key_names_the_nearest_setting(tmp_path):
    toml = tmp_path / "typo.toml"
    toml.write_text("max_bacth = 4\nlease_second = 2\n")
    with pytest.raises(config.ConfigError, match=r"unknown setting 'lease_second' \(did you mean lease_seconds\?\)"
                                                 r", and max_bacth"):
        config.resolve(parse(["--config", str(toml)]), {})
    toml.write_text("zzz = 1\n")
    with pytest.raises(config.ConfigError) as error:
        config.resolve(parse(["--config", str(toml)]), {})
    assert "did you mean" not in str(error.value)


def test_help_shows_each_default_once_as_written():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: ) " not in text and "(default: )" not in text
    assert "--umask OCTAL umask for files created in the spool (octal) (default: 0022)" in text
    assert "{4,8,4-qe,8-qe}" in text  # the metavar shows every choice
    assert text.count("(default: every visible GPU") == 1


def test_a_bad_setting_exits_2_before_anything_starts(tmp_path):
    from pooltools import glmpool
    toml = tmp_path / "glmpool.toml"
    toml.write_text(f'dir = "{tmp_path / "spool"}"\nmax_batch = 16.7\n')
    for command in (["serve"], ["ask", "hi"], ["chat"], ["status"], ["quit"], ["pull"], ["http"]):
        run = glmpool(*command, "--config", str(toml))
        assert run.returncode == 2, (command, run.stderr)
        assert "max_batch" in run.stderr and "Traceback" not in run.stderr and not run.stdout
    assert not (tmp_path / "spool").exists()  # nothing was created
