"""Models come from the standard Hugging Face cache (its variables honoured), or from ./.cache where the
original server kept them, before anything is downloaded; `glmpool pull` prepares them."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest

from pooltools import ENV, GLMPOOL, wait_for

REPO = "THUDM/chatglm-6b"
MAIN, TAGGED = "a" * 40, "b" * 40


def fake_hub_cache(hub, tiny_dir):
    """`hub` laid out as huggingface_hub caches THUDM/chatglm-6b: main and the tag v1, two snapshots."""
    model = hub / "models--THUDM--chatglm-6b"
    (model / "refs").mkdir(parents=True)
    for ref, commit in (("main", MAIN), ("v1", TAGGED)):
        (model / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_dir, model / "snapshots" / commit)
    return model / "snapshots"


def offline(tmp_path, **variables):
    env = {k: v for k, v in ENV.items() if not k.startswith(("HF_", "XDG_CACHE", "GLMPOOL_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home"), **variables}


def pull(*args, env, cwd):
    return subprocess.run(GLMPOOL + ["pull", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd)


@pytest.mark.parametrize("variable,hub", [("HF_HOME", "hf/hub"), ("HF_HUB_CACHE", "hubcache"),
                                          ("XDG_CACHE_HOME", "xdg/huggingface/hub")])
def test_pull_finds_the_standard_cache_through_its_variables(tmp_path, tiny_dir, variable, hub):
    snapshots = fake_hub_cache(tmp_path / hub, tiny_dir)
    env = offline(tmp_path, **{variable: str(tmp_path / hub.split("/")[0])})
    found = pull(REPO, env=env, cwd=tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == str(snapshots / MAIN), found.stderr
    if variable == "HF_HOME":  # the revision a deployment pins, from its config file
        by_config = tmp_path / "glmpool.toml"
        by_config.write_text(f'model = "{REPO}"\nrevision = "v1"\n')
        pinned = pull("--config", str(by_config), env=env, cwd=tmp_path)
        assert pinned.stdout.strip() == str(snapshots / TAGGED), pinned.stderr


def test_the_original_servers_dot_cache_is_used_and_an_incomplete_snapshot_is_not(tmp_path, tiny_dir):
    snapshots = fake_hub_cache(tmp_path / "work" / ".cache", tiny_dir)
    interrupted = fake_hub_cache(tmp_path / "hf" / "hub", tiny_dir)
    (interrupted / MAIN / "pytorch_model.bin").unlink()  # a download cut short in the standard cache
    env = offline(tmp_path, HF_HOME=str(tmp_path / "hf"))
    found = pull(REPO, env=env, cwd=tmp_path / "work")
    assert found.returncode == 0 and found.stdout.strip() == str(snapshots / MAIN), found.stderr
    # --cache-dir replaces every default place; not finding the model there is one line, no traceback.
    elsewhere = pull(REPO, "--cache-dir", str(tmp_path / "other"), env=env, cwd=tmp_path / "work")
    assert elsewhere.returncode == 1 and "Traceback" not in elsewhere.stderr, elsewhere.stderr
    assert elsewhere.stderr.strip().splitlines()[-1].startswith("glmpool pull: cannot download THUDM/chatglm-6b")
    assert f"not in {tmp_path / 'other'}:" in elsewhere.stderr


def test_serve_loads_the_model_from_the_standard_cache(tmp_path, tiny_dir):
    fake_hub_cache(tmp_path / "hf" / "hub", tiny_dir)
    env = offline(tmp_path, HF_HOME=str(tmp_path / "hf"), GLMPOOL_DIR=str(tmp_path / "spool"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(GLMPOOL + ["--model", REPO, "--gpus", "cpu", "--worker-threads", "1"],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        wait_for(lambda: "Running..." in log.read_text() or serve.poll() is not None, 90, "Running...")
        assert serve.poll() is None, log.read_text()
        asked = subprocess.run(GLMPOOL + ["ask", "你好", "--param", "max_new_tokens=4"], capture_output=True,
                               text=True, timeout=60, env=env, cwd=tmp_path)
        assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
        assert subprocess.run(GLMPOOL + ["quit"], env=env, timeout=30).returncode == 0
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            import os
            import signal
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.bin"))  # nothing downloaded


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr,bars", [(io.StringIO, False), (Terminal, True)])
def test_download_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, stderr, bars):
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from glmpool.engine import checkpoint
    seen = []

    def snapshot_download(repo_id, local_files_only=False, **options):
        if local_files_only:
            raise huggingface_hub.utils.LocalEntryNotFoundError("not cached")
        seen.append(not are_progress_bars_disabled())
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(sys, "stderr", stderr())
    try:
        assert checkpoint.download(REPO, cache_dir=tmp_path / "cache") == tmp_path
    finally:
        enable_progress_bars()
    assert seen == [bars]  # the journal or a log file gets no bars
