"""Settings of `glmpool serve`: one declaration each, driving flags, GLMPOOL_* variables and the TOML file.

Precedence: command-line flags > environment (GLMPOOL_<NAME>) > config file > defaults. The config file
is `--config FILE`, else $GLMPOOL_CONFIG, else /etc/glmpool/glmpool.toml when it exists. Unknown keys
in the file are errors.
"""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .engine.linear import registry

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

DEFAULT_CONFIG_FILE = Path("/etc/glmpool/glmpool.toml")


class ConfigError(Exception):
    """A setting has a bad value or the config file is unreadable; str() is a one-line message."""


def _octal(text: Any) -> int:
    return int(str(text), 8)


def _log_level(text: Any) -> str:
    level = str(text).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("use DEBUG, INFO, WARNING or ERROR")
    return level


def _choice(*allowed: Any) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        for option in allowed:
            if str(value) == str(option):
                return option
        raise ValueError("use one of " + ", ".join(map(str, allowed)))
    return parse


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    commands: tuple[str, ...] = ("serve",)  # the commands taking it as a flag; the file may hold any setting


BOTH = ("serve", "http")
SETTINGS = [
    Setting("model", str, "THUDM/chatglm-6b-int4",
            "hub id (THUDM/chatglm-6b, -int4, -int4-qe), checkpoint directory, or tiny-random", "ID|DIR"),
    Setting("gpus", str, "", "workers: CUDA indices '0,1' (counted in CUDA_VISIBLE_DEVICES when set), 'cpu' "
                             "entries ('cpu,cpu'), or 'all' (default: every visible GPU, else one cpu worker)", "LIST"),
    Setting("quantize", _choice(*registry.QUANTIZE_CHOICES), None,
            "quantize weights at load to 4 or 8 bits; -qe: the embeddings (= output projection) too", "BITS"),
    Setting("matmul", _choice(*registry.MATMULS), registry.DEFAULT_MATMUL, registry.matmul_help(), "KIND"),
    Setting("dtype", _choice("float16", "bfloat16", "float32"), None,
            "compute dtype (default float16 on GPUs, float32 on cpu)", "DTYPE"),
    Setting("dir", str, ".", "spool root; requests/ and flags/ are created in it", "DIR", commands=BOTH),
    Setting("cache_dir", str, str(Path.home() / ".cache" / "glmpool"), "where models are downloaded/built", "DIR"),
    Setting("host_id", str, socket.gethostname(), "this host's identity in claims and status", "NAME", commands=BOTH),
    Setting("max_batch", int, 16, "sequences one worker generates together (16 measured best on CPU: 8 loses "
                                  "40%% of the throughput, 64 adds little and slows every request; see README "
                                  "Throughput; GPUs may profit from 32-64)", "N"),
    Setting("compile", _choice("on", "off"), "on",
            "GPU workers: compile the decode step with torch.compile and replay it as CUDA graphs, one per batch "
            "and attention-span bucket, compiled while the worker loads ('off': run it eagerly, for debugging or "
            "where compiling fails; cpu workers never compile)", "on|off"),
    Setting("worker_threads", int, 0, "CPU threads of each worker's torch (0: the usable cores shared out "
                                      "among cpu workers; torch's own default on GPU workers)", "N"),
    Setting("kv_cache_gb", float, None, "KV-cache budget per worker in GiB (default: sized from free memory)", "GIB"),
    Setting("max_length", int, 2048, "default max_length (prompt + answer tokens) of a request", "N"),
    Setting("request_timeout", float, 0.0, "default per-request deadline in seconds (0: none)", "S"),
    Setting("partial_seconds", float, 0.25,
            "rewrite a request's .partial at most this often (seconds; the first token is written at once)", "S"),
    Setting("partial_tokens", int, 1, "... and at most every N generated tokens (0: no .partial files)", "N"),
    Setting("poll_interval", float, 0.5, "seconds between directory scans (inotify wakes earlier locally)", "S",
            commands=BOTH),
    Setting("lease_seconds", float, 60.0, "a claim not renewed for this long is taken over by another host", "S"),
    Setting("grace_seconds", float, 300.0, "on stop, how long in-flight generations may finish", "S"),
    Setting("heartbeat_timeout", float, 120.0, "a busy worker silent this long is killed and restarted", "S"),
    Setting("load_timeout", float, 3600.0, "a worker still loading the model (download included) after this "
            "long is killed and counted as a failed start (0: wait forever)", "S"),
    Setting("umask", _octal, 0o022, "umask for files created in the spool (octal)", "OCTAL", commands=BOTH),
    Setting("log_level", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", "LEVEL", commands=BOTH),
    Setting("log_format", _choice("plain", "json"), "plain", "plain lines or JSON lines (journald)", "FORMAT",
            commands=BOTH),
    Setting("metrics_file", str, "", "Prometheus textfile to rewrite every few seconds", "FILE"),
    Setting("metrics_port", int, 0, "serve the same metrics on 127.0.0.1:PORT (0: off)", "PORT"),
    # `glmpool http`, the OpenAI-compatible gateway (glmpool/gateway.py)
    Setting("http_host", str, "127.0.0.1", "address the gateway listens on", "ADDR", commands=("http",)),
    Setting("http_port", int, 8000, "port the gateway listens on (0: any free port, logged)", "PORT",
            commands=("http",)),
    Setting("http_api_keys_file", str, "", "file of accepted API keys, one a line, sent as `Authorization: "
            "Bearer KEY` (re-read when it changes; empty: no keys asked)", "FILE", commands=("http",)),
    Setting("http_max_body", int, 1 << 20, "largest request body in bytes (413 beyond)", "BYTES",
            commands=("http",)),
    Setting("http_queue_limit", int, 256, "at most N requests wait unclaimed in requests/; beyond, new ones "
            "are answered 429 with Retry-After (0: no limit)", "N", commands=("http",)),
    Setting("http_timeout", float, 600.0, "a chat completion not answered within this many seconds is "
            "cancelled and answered 504", "S", commands=("http",)),
]
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    model: str
    gpus: str
    quantize: int | str | None
    matmul: str
    dtype: str | None
    dir: str
    cache_dir: str
    host_id: str
    max_batch: int
    compile: str
    worker_threads: int
    kv_cache_gb: float | None
    max_length: int
    request_timeout: float
    partial_seconds: float
    partial_tokens: int
    poll_interval: float
    lease_seconds: float
    grace_seconds: float
    heartbeat_timeout: float
    load_timeout: float
    umask: int
    log_level: str
    log_format: str
    metrics_file: str
    metrics_port: int
    http_host: str
    http_port: int
    http_api_keys_file: str
    http_max_body: int
    http_queue_limit: int
    http_timeout: float
    sources: dict = field(default_factory=dict, compare=False)  # setting -> where its value came from


assert [f.name for f in fields(Config)][:-1] == [s.name for s in SETTINGS], "Config and SETTINGS disagree"


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    parser.add_argument("--config", metavar="FILE", help=f"TOML config file (default {DEFAULT_CONFIG_FILE} if present)")
    for s in SETTINGS:
        if command not in s.commands:
            continue
        default = "" if s.default is None else f" (default: {s.default if s.name != 'umask' else oct(s.default)})"
        parser.add_argument("--" + s.name.replace("_", "-"), dest=s.name, metavar=s.metavar,
                            default=argparse.SUPPRESS, help=s.help + default + f"; env GLMPOOL_{s.name.upper()}")


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    if raw is None or raw == "" and setting.default is None:
        return None
    try:
        return setting.parse(raw)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{origin}: bad value {raw!r} for {setting.name}: {error}") from None


def read_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    unknown = sorted(set(raw) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return raw


def resolve(args: argparse.Namespace | None = None, environ: dict | None = None) -> Config:
    """Merge defaults, the config file, GLMPOOL_* variables and flags (in rising precedence)."""
    flags = vars(args) if args is not None else {}
    environ = os.environ if environ is None else environ
    config_file = flags.get("config") or environ.get("GLMPOOL_CONFIG")
    if not config_file and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    from_file = read_file(Path(config_file)) if config_file else {}
    values, sources = {}, {}
    for s in SETTINGS:
        value, source = s.default, "default"
        if s.name in from_file:
            value, source = _parse(s, from_file[s.name], f"config file {config_file}"), f"file {config_file}"
        env_name = "GLMPOOL_" + s.name.upper()
        if env_name in environ:
            value, source = _parse(s, environ[env_name], env_name), "env"
        if s.name in flags:
            value, source = _parse(s, flags[s.name], "--" + s.name.replace("_", "-")), "flag"
        values[s.name], sources[s.name] = value, source
    return Config(**values, sources=sources)
