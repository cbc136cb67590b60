"""HTTP gateway benchmark: what `glmpool http` adds to a request, and how many streams one process holds.

    python bench/gateway.py [--rounds 40] [--streams 200] [--max-tokens 16]

One pool (tiny-random model, one cpu worker) and one gateway on a fresh directory, in one run:
- time to first token, one request at a time, alternating: through the gateway (a streaming chat
  completion over a kept-alive HTTP/1.1 connection, timed until the first content chunk arrives) and
  written directly (`requests/<id>.json` written atomically, timed until its `.partial` appears, seen
  through inotify). Medians and p90 of --rounds each; the goal is at most 10 ms more at the median.
- --streams streaming requests opened at once through the one gateway process (asyncio clients, raw
  HTTP/1.1): how many complete, wall time, and the gateway's CPU time (user + system) per request.
The client runs on the same machine as the pool and the gateway, so all three share its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import select
import statistics
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pooltools import Gateway, Pool  # noqa: E402

from glmpool import spool  # noqa: E402
from glmpool.watch import DirWatch  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def direct_first_token(root: Path, watch: DirWatch, rid: str, body: dict) -> float:
    """Seconds from writing the request to its first .partial (or answer), seen through inotify."""
    requests = root / "requests"
    start = time.perf_counter()
    spool.atomic_write(requests / f"{rid}.json", json.dumps(body) + "\n", sync=False)
    targets = {f"{rid}.partial", f"{rid}.back", f"{rid}.error"}
    while True:
        names = watch.names()
        if names is None or targets & set(names):
            if any((requests / name).exists() for name in targets):
                elapsed = time.perf_counter() - start
                break
        select.select([watch.fileno()], [], [], 1.0)
    deadline = time.monotonic() + 60
    while not (requests / f"{rid}.back").exists() and not (requests / f"{rid}.error").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer to {rid}")
        time.sleep(0.005)
    for suffix in (".back", ".meta", ".partial", ".error"):
        spool.remove(requests / f"{rid}{suffix}")
    return elapsed


def request_bytes(host: str, port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def has_content(data: bytes) -> bool:
    """Whether these Server-Sent Events carry some answer text."""
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return True
    return False


async def stream(host: str, port: int, body: dict, connection=None) -> tuple[float, bool, tuple]:
    """(seconds to the first content chunk, completed with [DONE], the connection to reuse)."""
    reader, writer = connection or await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(request_bytes(host, port, body))
    await writer.drain()
    first, done = None, False
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(status.decode(errors="replace"))
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    while not done:  # chunked transfer encoding: a size line, then that many bytes
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            break
        data = await reader.readexactly(size + 2)
        if first is None and has_content(data):
            first = time.perf_counter() - start
        done = b"data: [DONE]" in data
    if done:  # the terminating chunk
        assert int((await reader.readline()).strip(), 16) == 0
        await reader.readline()
    return first, done, (reader, writer)


async def first_tokens(root: Path, url: str, rounds: int, max_tokens: int) -> tuple[list[float], list[float]]:
    """(direct, through the gateway) times to first token, alternating which goes first."""
    host, port = url.removeprefix("http://").split(":")
    watch = DirWatch(root / "requests", suffixes=(".partial", ".back", ".error"))
    connection, direct, through = None, [], []
    for i in range(rounds):
        query = f"question number {i}"
        spool_body = {"query": query, "max_new_tokens": max_tokens, "do_sample": False}
        http_body = {"model": "m", "messages": [{"role": "user", "content": query}], "max_tokens": max_tokens,
                     "temperature": 0, "stream": True}
        for kind in ("direct", "http") if i % 2 else ("http", "direct"):
            if kind == "direct":  # blocking: nothing else runs on this loop meanwhile
                direct.append(direct_first_token(root, watch, f"direct-{i}", spool_body))
            else:
                first, done, connection = await stream(host, int(port), http_body, connection)
                assert done and first is not None
                through.append(first)
    connection[1].close()
    watch.close()
    return direct, through


async def many_streams(url: str, count: int, max_tokens: int) -> tuple[int, float]:
    host, port = url.removeprefix("http://").split(":")

    async def one(i: int) -> bool:
        body = {"model": "m", "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        _, done, (_, writer) = await stream(host, int(port), body)
        writer.close()
        return done
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"  {len(errors)} streams failed, e.g. {errors[0]!r}")
    return sum(r is True for r in results), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    import psutil
    with tempfile.TemporaryDirectory(prefix="glmpool-http-bench-") as tmp:
        root = Path(tmp) / "spool"
        pool = Pool(root, Path(tmp) / "cache", "--gpus", "cpu", "--max-batch", "64").start()
        gateway = Gateway(root, "--http-queue-limit", "0")
        try:
            gateway.start()
            pool.wait_running(300)
            direct, through = asyncio.run(first_tokens(root, gateway.url, args.rounds, args.max_tokens))
            ms = lambda values, q: 1000 * percentile(values, q)  # noqa: E731
            print(f"time to first token, {args.rounds} requests each, one at a time:")
            print(f"  direct file:   median {ms(direct, 0.5):6.1f} ms   p90 {ms(direct, 0.9):6.1f} ms")
            print(f"  through http:  median {ms(through, 0.5):6.1f} ms   p90 {ms(through, 0.9):6.1f} ms")
            print(f"  added at the median: {1000 * (statistics.median(through) - statistics.median(direct)):.1f} ms")
            process = psutil.Process(gateway.process.pid)
            before = process.cpu_times()
            completed, wall = asyncio.run(many_streams(gateway.url, args.streams, args.max_tokens))
            after = process.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            print(f"{args.streams} concurrent streams through one gateway process ({args.max_tokens} tokens each): "
                  f"{completed} completed in {wall:.1f} s; gateway CPU {cpu:.2f} s, "
                  f"{1000 * cpu / args.streams:.2f} ms per request")
            left = [p.name for p in (root / "requests").iterdir() if p.is_file()]
            print(f"files left in requests/: {len(left)}")
            return 0 if completed == args.streams else 1
        finally:
            gateway.kill()
            pool.kill()


if __name__ == "__main__":
    sys.exit(main())
