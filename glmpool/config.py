"""Settings of `glmpool serve` (and of the client commands): one declaration each, driving flags,
GLMPOOL_* variables, the TOML file and the help.

Precedence: command-line flags > environment (GLMPOOL_<NAME>) > config file > defaults. The config file
is `--config FILE`, else $GLMPOOL_CONFIG, else /etc/glmpool/glmpool.toml when it exists. Every value is
checked strictly (its type in TOML, its bounds wherever it comes from); unknown keys in the file are
errors that name the nearest known one.
"""
from __future__ import annotations

import argparse
import difflib
import math
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


# Parsers: a TOML value arrives typed, a flag or variable as text; each returns the value or raises
# ValueError with what is expected.

def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError("expected a whole number") from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        return _bounded(value, low, high)
    return parse


def _number(low: float, above: bool = False) -> Callable[[Any], float]:
    """A finite number >= low (> low when `above`)."""
    def parse(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError("expected a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        if above and value <= low:
            raise ValueError(f"must be above {low:g}")
        return _bounded(float(value), low, None)
    return parse


def _bounded(value, low, high):
    if value < low or (high is not None and value > high):
        raise ValueError(f"must be at least {low:g}" if high is None else f"must be {low:g}-{high:g}")
    return value


def _octal(value: Any) -> int:
    if not isinstance(value, str):  # a TOML number does not keep its radix: 18 or 0o22?
        raise ValueError('expected octal digits in a string, like "0022"')
    try:
        mask = int(value.strip(), 8)
    except ValueError:
        raise ValueError('expected octal digits, like "0022"') from None
    if not 0 <= mask <= 0o777:
        raise ValueError("must be at most 0777")
    return mask


def _log_level(value: Any) -> str:
    level = _text(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("use DEBUG, INFO, WARNING or ERROR")
    return level


def _choice(*allowed: Any) -> Callable[[Any], Any]:
    """One of `allowed`; a TOML value must have the option's own type (4, not 4.0 or true)."""
    def parse(value: Any) -> Any:
        for option in allowed:
            same = type(value) is type(option) and value == option
            if same or (isinstance(value, str) and value == str(option)):
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
    show: Callable[[Any], str] = str  # a value as written in a flag or the file

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "GLMPOOL_" + self.name.upper()


BOTH = ("serve", "http")
CLIENTS = ("ask", "chat", "status", "quit")  # they find the spool as serve does
SETTINGS = [
    Setting("model", _text, "THUDM/chatglm-6b-int4",
            "hub id (THUDM/chatglm-6b, -int4, -int4-qe), checkpoint directory, or tiny-random", "ID|DIR"),
    Setting("revision", _text, None, "the hub revision (branch, tag or commit) to use: pin the one a "
            "deployment was tested with (default: main)", "REV", commands=("serve", "pull")),
    Setting("gpus", _text, "", "workers: CUDA indices '0,1' (counted in CUDA_VISIBLE_DEVICES when set), 'cpu' "
                               "entries ('cpu,cpu'), or 'all' (default: every visible GPU, else one cpu worker)",
            "LIST"),
    Setting("quantize", _choice(*registry.QUANTIZE_CHOICES), None,
            "quantize weights at load to 4 or 8 bits; -qe: the embeddings (= output projection) too",
            "{" + ",".join(map(str, registry.QUANTIZE_CHOICES)) + "}"),
    Setting("matmul", _choice(*registry.MATMULS), registry.DEFAULT_MATMUL, registry.matmul_help(), "KIND"),
    Setting("quantized_activations", _choice(*registry.QUANTIZED_ACTIVATIONS),
            registry.DEFAULT_QUANTIZED_ACTIVATIONS, registry.quantized_activations_help(),
            "|".join(registry.QUANTIZED_ACTIVATIONS)),
    Setting("dtype", _choice("float16", "bfloat16", "float32"), None,
            "compute dtype (default float16 on GPUs, float32 on cpu)", "DTYPE"),
    Setting("dir", _text, ".", "spool root; requests/ and flags/ are created in it", "DIR",
            commands=BOTH + CLIENTS),
    Setting("cache_dir", _text, None, "where hub models are downloaded, instead of the standard Hugging Face "
            "cache (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub; a model the original "
            "server cached under ./.cache is found too)", "DIR", commands=("serve", "pull")),
    Setting("host_id", _text, socket.gethostname(), "this host's identity in claims and status", "NAME",
            commands=BOTH),
    Setting("max_batch", _integer(1), 16, "sequences one worker generates together (16 keeps every answer "
            "streaming at about reading speed on CPU workers with most of the batching gain; see "
            "docs/benchmarks.md; GPUs may profit from 32-64)", "N"),
    Setting("compile", _choice("on", "off"), "on",
            "GPU workers: compile the decode step with torch.compile and replay it as CUDA graphs, one per batch "
            "bucket, compiled while the worker loads ('off': run it eagerly, for debugging or where compiling "
            "fails; cpu workers never compile)", "on|off"),
    Setting("worker_threads", _integer(0), 0, "CPU threads of each worker's torch (0: the usable cores shared "
            "out among cpu workers; torch's own default on GPU workers)", "N"),
    Setting("kv_cache_gb", _number(0.0, above=True), None,
            "KV-cache budget per worker in GiB (default: sized from free memory)", "GIB"),
    Setting("max_length", _integer(1), 2048, "default max_length (prompt + answer tokens) of a request", "N"),
    Setting("request_timeout", _number(0.0), 0.0, "default per-request deadline in seconds (0: none)", "S"),
    Setting("partial_seconds", _number(0.0), 0.25,
            "rewrite a request's .partial at most this often (seconds; the first token is written at once)", "S"),
    Setting("partial_tokens", _integer(0), 1, "... and at most every N generated tokens (0: no .partial files)",
            "N"),
    Setting("poll_interval", _number(0.0, above=True), 0.5,
            "seconds between directory scans (inotify wakes earlier locally)", "S", commands=BOTH),
    Setting("lease_seconds", _number(0.0, above=True), 60.0,
            "a claim not renewed for this long is taken over by another host", "S"),
    Setting("grace_seconds", _number(0.0), 300.0, "on stop, how long in-flight generations may finish", "S"),
    Setting("heartbeat_timeout", _number(0.0, above=True), 120.0,
            "a busy worker silent this long is killed and restarted", "S"),
    Setting("load_timeout", _number(0.0), 3600.0, "a worker still loading the model (download included) "
            "after this long is killed and counted as a failed start (0: wait forever)", "S"),
    Setting("umask", _octal, 0o022, "umask for files created in the spool (octal)", "OCTAL", commands=BOTH,
            show=lambda value: f"{value:04o}"),
    Setting("log_level", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", "LEVEL", commands=BOTH),
    Setting("log_format", _choice("plain", "json"), "plain",
            "plain lines or JSON lines (one object per line, tracebacks included)", "FORMAT", commands=BOTH),
    Setting("metrics_file", _text, "", "Prometheus textfile to rewrite every few seconds", "FILE"),
    Setting("metrics_port", _integer(0, 65535), 0, "serve the same metrics on 127.0.0.1:PORT (0: off)", "PORT"),
    # `glmpool http`, the OpenAI-compatible gateway (glmpool/gateway.py)
    Setting("http_host", _text, "127.0.0.1", "address the gateway listens on", "ADDR", commands=("http",)),
    Setting("http_port", _integer(0, 65535), 8000, "port the gateway listens on (0: any free port, logged)", "PORT",
            commands=("http",)),
    Setting("http_api_keys_file", _text, "", "file of accepted API keys, one a line, sent as `Authorization: "
            "Bearer KEY` (re-read when it changes; empty: no keys asked)", "FILE", commands=("http",)),
    Setting("http_max_body", _integer(1), 1 << 20, "largest request body in bytes (413 beyond)", "BYTES",
            commands=("http",)),
    Setting("http_queue_limit", _integer(0), 256, "at most N requests wait unclaimed in requests/; beyond, new "
            "ones are answered 429 with Retry-After (0: no limit)", "N", commands=("http",)),
    Setting("http_timeout", _number(0.0, above=True), 600.0, "a chat completion not answered within this many "
            "seconds is cancelled and answered 504", "S", commands=("http",)),
]
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    model: str
    revision: str | None
    gpus: str
    quantize: int | str | None
    matmul: str
    quantized_activations: str
    dtype: str | None
    dir: str
    cache_dir: str | None
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
    """--config and a flag for each setting `command` takes, with its default and variable."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML config file (default: $GLMPOOL_CONFIG, else {DEFAULT_CONFIG_FILE} if present)")
    for s in SETTINGS:
        if command not in s.commands:
            continue
        default = "" if s.default in (None, "") or "(default" in s.help else f" (default: {s.show(s.default)})"
        parser.add_argument(s.flag, dest=s.name, metavar=s.metavar, default=argparse.SUPPRESS,
                            help=f"{s.help}{default}; env {s.env}")


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    if raw is None or (raw == "" and setting.default is None):
        return None
    try:
        return setting.parse(raw)
    except ValueError as error:
        raise ConfigError(f"{origin}: bad value {raw!r} for {setting.name}: {error}") from None


def nearest(name: str) -> str:
    """ ' (did you mean X?)' for the known setting closest to a misspelt one, or ''."""
    close = difflib.get_close_matches(name.lower().replace("-", "_"), BY_NAME, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}{nearest(unknown[0])}"
                          + (f", and {', '.join(unknown[1:])}" if unknown[1:] else ""))
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
        if s.env in environ:
            value, source = _parse(s, environ[s.env], s.env), "env"
        if s.name in flags:
            value, source = _parse(s, flags[s.name], s.flag), "flag"
        values[s.name], sources[s.name] = value, source
    return Config(**values, sources=sources)
