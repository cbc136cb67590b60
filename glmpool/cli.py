"""The `glmpool` command: serve (the default), ask, status, quit, http, tiny-model, selftest."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .engine.linear import registry

COMMANDS = ("serve", "ask", "status", "quit", "http", "tiny-model", "selftest")


class Formatter(logging.Formatter):
    """The original server's console style: `[Info 2024-01-01 12:00:00]: message`."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.levelname.title()} {self.formatTime(record, '%Y-%m-%d %H:%M:%S')}]: {record.getMessage()}" + \
            (("\n" + self.formatException(record.exc_info)) if record.exc_info else "")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": record.created, "level": record.levelname.lower(), "logger": record.name,
                           "message": record.getMessage()}, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter() if fmt == "json" else Formatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    from . import config
    parser = argparse.ArgumentParser(prog="glmpool", description="Serve ChatGLM-6B through a shared directory of files.")
    parser.add_argument("--version", action="version", version=f"glmpool {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the pool (the default command)")
    config.add_arguments(serve)

    ask = sub.add_parser("ask", help="send a question and print the answer as it grows")
    ask.add_argument("question")
    ask.add_argument("--history", metavar="FILE", help="JSON [[question, answer], ...]")
    ask.add_argument("--dir", default=".", help="spool root (default: .)")
    ask.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    ask.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="generation parameter (max_length, max_new_tokens, top_p, temperature, do_sample, seed)")

    status = sub.add_parser("status", help="ask the running pool for its status")
    status.add_argument("--dir", default=".")
    status.add_argument("--json", action="store_true", help="print the raw status.back JSON")
    status.add_argument("--timeout", type=float, default=10.0)

    quit_ = sub.add_parser("quit", help="ask every supervisor on the directory to stop")
    quit_.add_argument("--dir", default=".")

    http_ = sub.add_parser("http", help="an OpenAI-compatible HTTP gateway onto the spool (extra: glmpool[http])")
    config.add_arguments(http_, "http")

    tiny = sub.add_parser("tiny-model", help="write a random-weight checkpoint in THUDM's layout")
    tiny.add_argument("path")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--inner", type=int, default=None, help="MLP width (default 4 * hidden)")
    tiny.add_argument("--vocab", type=int, default=1024)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shards", type=int, default=1)
    tiny.add_argument("--safetensors", action="store_true")
    tiny.add_argument("--quantize", choices=[str(q) for q in registry.QUANTIZE_CHOICES], default=None,
                      help="write it pre-quantized like THUDM's -int4 (-qe: embeddings too, like -int4-qe)")

    sub.add_parser("selftest", help="check this installation end to end with a tiny model", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    if argv[0] == "selftest":  # its own options: glmpool selftest --help
        from .selftest import main as run_selftest
        return run_selftest(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMAND_FUNCTIONS[args.command](args)
    except KeyboardInterrupt:
        return 130


def serve(args) -> int:
    from . import config
    from .supervisor import StartupError, Supervisor
    try:
        settings = config.resolve(args)
    except config.ConfigError as error:
        print(f"glmpool: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    supervisor = Supervisor(settings, echo=lambda line: print(line, flush=True))
    cleanup = install_hooks(supervisor, settings)
    try:
        return supervisor.run()
    except StartupError as error:
        logging.getLogger("glmpool").error("%s", error)
        return 2
    finally:
        cleanup()


def install_hooks(supervisor, settings):
    """systemd notifications and metrics, fed from the supervisor's ticks; returns the cleanup to run at exit."""
    from . import notify
    if notify.enabled():
        def tell_systemd(status: dict, event: str) -> None:
            if event == "ready":
                notify.ready("serving")
            elif event == "stopping":
                notify.stopping("finishing in-flight requests")
            else:
                queue = status.get("queue", {})
                notify.status(f"{status.get('status')}: {queue.get('in_progress', 0)} in progress, "
                              f"{queue.get('pending', 0)} pending, {status.get('served', 0)} served")
                notify.watchdog()
        supervisor.tick_hooks.append(tell_systemd)
    if settings.metrics_file or settings.metrics_port:
        from .metrics import Metrics
        metrics = Metrics(settings.metrics_file or None, settings.metrics_port or None)
        supervisor.tick_hooks.append(lambda status, event: metrics.update(status))
        return lambda: metrics.close(remove_file=True)  # no stale "up" numbers after a stop
    return lambda: None


def ask(args) -> int:
    from . import client
    history = None
    if args.history:
        try:
            history = json.loads(Path(args.history).read_text(encoding="utf-8") or "[]")
        except (OSError, ValueError) as error:
            print(f"glmpool ask: cannot read history {args.history}: {error}", file=sys.stderr)
            return 2
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    request_id = client.submit(args.dir, args.question, history, params=params or None)
    shown = 0

    def stream(text: str) -> None:
        nonlocal shown
        if text.startswith(text[:shown]) and len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    try:
        answer = client.wait(args.dir, request_id, args.timeout, on_partial=stream if sys.stdout.isatty() else None)
    except client.ClientError as error:
        print(f"\nglmpool ask: {error}" if shown else f"glmpool ask: {error}", file=sys.stderr)
        return 1
    print(answer[shown:] if answer.startswith(answer[:shown]) else "\n" + answer)
    return 0


def status(args) -> int:
    from . import client
    from .status import render_table
    try:
        result = client.status(args.dir, args.timeout)
    except client.ClientError as error:
        print(f"glmpool status: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, indent=1) if args.json else render_table(result))
    return 0


def quit_command(args) -> int:
    from . import client
    client.quit(args.dir)
    return 0


def http(args) -> int:
    from . import config
    try:
        settings = config.resolve(args)
    except config.ConfigError as error:
        print(f"glmpool http: {error}", file=sys.stderr)
        return 2
    try:
        from .gateway import serve as run_gateway
    except ImportError as error:
        print(f"glmpool http needs the http extra: pip install 'glmpool[http]' ({error})", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    return run_gateway(settings)


def tiny_model(args) -> int:
    from .engine import EngineError
    from .engine.tiny import write_tiny_checkpoint
    try:
        path = write_tiny_checkpoint(args.path, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                     inner=args.inner, vocab=args.vocab, seed=args.seed, shards=args.shards,
                                     safetensors=args.safetensors, quantize=args.quantize)
    except (ValueError, ImportError, EngineError) as error:
        print(f"glmpool tiny-model: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0



COMMAND_FUNCTIONS = {"serve": serve, "ask": ask, "status": status, "quit": quit_command, "http": http,
                     "tiny-model": tiny_model}
