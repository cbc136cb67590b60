"""The `glmpool` command: serve (the default), ask, chat, status, quit, pull, http, tiny-model, selftest."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from . import __version__
from .engine.linear import registry

COMMANDS = ("serve", "ask", "chat", "status", "quit", "pull", "http", "tiny-model", "selftest")
EXTEND_START_SECONDS = 120  # while workers load, systemd's start timeout is pushed this far ahead every second


def build_parser() -> argparse.ArgumentParser:
    from . import config
    parser = argparse.ArgumentParser(prog="glmpool", description="Serve ChatGLM-6B through a shared directory of files.")
    parser.add_argument("--version", action="version", version=f"glmpool {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the pool (the default command)")
    config.add_arguments(serve)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text + ". The spool is found as serve "
                                 "finds it: --dir, else $GLMPOOL_DIR, else the config file's dir.")
        config.add_arguments(command, name)
        return command

    ask = client_command("ask", "send a question and print the answer as it grows")
    ask.add_argument("question", help="the question; - reads it from standard input")
    ask.add_argument("--history", metavar="FILE", help="JSON [[question, answer], ...]")
    chat = client_command("chat", "an interactive conversation that keeps its history")
    for command in (ask, chat):
        command.add_argument("--timeout", type=float, default=600.0, metavar="S",
                             help="seconds to wait for an answer, then cancel it (default: 600)")
        command.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                             help="generation parameter (max_length, max_new_tokens, top_p, temperature, do_sample, "
                                  "seed)")
        command.add_argument("--keep", action="store_true",
                             help="leave the answer's files (.back, .meta) in requests/ instead of removing them")

    status = client_command("status", "ask the running pool for its status")
    status.add_argument("--json", action="store_true", help="print the raw status.back JSON")
    status.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the answer (default: 10)")
    client_command("quit", "ask every supervisor on the spool to stop (exit 1 when none is running)")

    pull = sub.add_parser("pull", help="download a model into the cache with progress, then exit",
                          description="Download a hub model (or build tiny-random) where serve will look for it.")
    pull.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                      help="hub id (default: the configured model)")
    config.add_arguments(pull, "pull")

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


def settings_of(args):
    """The resolved settings, or None after printing the configuration error (the command exits 2)."""
    from . import config
    try:
        return config.resolve(args)
    except config.ConfigError as error:
        print(f"glmpool {args.command or 'serve'}: {error}", file=sys.stderr)
        return None


def serve(args) -> int:
    from . import logs
    from .supervisor import StartupError, Supervisor
    settings = settings_of(args)
    if settings is None:
        return 2
    logs.setup(settings.log_level, settings.log_format)
    supervisor = Supervisor(settings)
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
            elif status.get("status") == "starting":  # downloading or loading: more time, while we live
                loading = [w["device"] for w in status.get("workers", []) if w.get("state") != "RUNNING"]
                notify.extend_timeout(EXTEND_START_SECONDS, f"starting: loading {settings.model} on "
                                                            f"{', '.join(loading) or 'no worker'}")
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


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


class Printer:
    """Prints an answer: streamed from .partial on a terminal, then the rest once it is complete."""

    def __init__(self):
        self.shown = ""

    def partial(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    @property
    def streaming(self):
        return self.partial if sys.stdout.isatty() else None

    def finish(self, answer: str) -> None:
        print(answer[len(self.shown):] if answer.startswith(self.shown) else "\n" + answer, flush=True)


def terminate_as_interrupt() -> None:
    """SIGTERM ends a waiting client as Ctrl-C does: its request is cancelled and its files removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def ask(args) -> int:
    from . import client
    settings = settings_of(args)
    if settings is None:
        return 2
    history = None
    if args.history:
        try:
            history = json.loads(Path(args.history).read_text(encoding="utf-8") or "[]")
        except (OSError, ValueError) as error:
            print(f"glmpool ask: cannot read history {args.history}: {error}", file=sys.stderr)
            return 2
    question = sys.stdin.read().rstrip("\n") if args.question == "-" else args.question
    terminate_as_interrupt()
    printer = Printer()
    try:
        answer = client.ask(settings.dir, question, history, parse_params(args.param) or None, args.timeout,
                            printer.streaming, keep=args.keep)
    except client.ClientError as error:
        print(f"\nglmpool ask: {error}" if printer.shown else f"glmpool ask: {error}", file=sys.stderr)
        return 1
    printer.finish(answer)
    return 0


def chat(args) -> int:
    """THUDM's console demo over the spool: 'clear' forgets the conversation, 'stop' or Ctrl-D ends it."""
    from . import client
    settings = settings_of(args)
    if settings is None:
        return 2
    try:
        import readline  # noqa: F401 (line editing and recall of earlier questions)
    except ImportError:
        pass
    terminate_as_interrupt()
    params = parse_params(args.param) or None
    history: list = []
    print("glmpool chat: type a question; 'clear' forgets the conversation, 'stop' ends it", flush=True)
    while True:
        try:
            query = input("\n用户：")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query.strip() == "stop":
            return 0
        if query.strip() == "clear":
            history = []
            continue
        if not query.strip():
            continue
        print("\nChatGLM-6B：", end="", flush=True)
        printer = Printer()
        try:
            answer = client.ask(settings.dir, query, history, params, args.timeout, printer.streaming, keep=args.keep)
        except client.ClientError as error:
            print(f"\nglmpool chat: {error}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # cancels this answer only
            print("\n(cancelled)", flush=True)
            continue
        printer.finish(answer)
        history.append([query, answer])


def status(args) -> int:
    from . import client
    from .status import render_table
    settings = settings_of(args)
    if settings is None:
        return 2
    try:
        result = client.status(settings.dir, args.timeout)
    except client.ClientError as error:
        print(f"glmpool status: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, indent=1) if args.json else render_table(result))
    return 0


def quit_command(args) -> int:
    from . import client
    settings = settings_of(args)
    if settings is None:
        return 2
    if not client.quit(settings.dir):
        print(f"glmpool quit: no pool is running on {Path(settings.dir).resolve()} (no supervisor heartbeat)",
              file=sys.stderr)
        return 1
    return 0


def pull(args) -> int:
    """Fetch the model where `serve` will find it (the download's progress on a terminal) and print its path."""
    from . import logs
    from .engine import EngineError
    from .engine.checkpoint import resolve
    settings = settings_of(args)
    if settings is None:
        return 2
    logs.setup(settings.log_level, settings.log_format)
    try:
        path = resolve(settings.model, settings.cache_dir, settings.revision, progress=True)
    except EngineError as error:
        print(f"glmpool pull: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def http(args) -> int:
    from . import logs
    settings = settings_of(args)
    if settings is None:
        return 2
    try:
        from .gateway import serve as run_gateway
    except ImportError as error:
        print(f"glmpool http needs the http extra: pip install 'glmpool[http]' ({error})", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
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


COMMAND_FUNCTIONS = {"serve": serve, "ask": ask, "chat": chat, "status": status, "quit": quit_command,
                     "pull": pull, "http": http, "tiny-model": tiny_model}
