"""`glmpool http`: an OpenAI-compatible HTTP gateway onto the spool (`pip install 'glmpool[http]'`).

One more client of the spool, and stateless: each chat completion becomes `requests/<id>.json` (the id
chosen here), is answered from `.partial`, `.meta`, `.back` or `.error`, and its files are removed once
delivered. A client that leaves, or outlives `http_timeout`, has its request withdrawn (an unclaimed input
is deleted) or cancelled (`.cancel`), and the gateway cleans up after the pool's answer. Several gateways
may share a directory, on any host that mounts it.

Every open request waits on one inotify watch of `requests/` (glmpool.watch), which wakes only the
request a file belongs to, so one process holds hundreds of streams; one scan of `requests/` every
`poll_interval` finds what inotify cannot see (results written by another NFS host) for all of them.
File I/O runs on the event loop: a few small reads per event.

The OpenAI request is mapped as docs/http.md documents; what cannot be mapped is a 400 that says why.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import notify, spool
from .watch import DirWatch

log = logging.getLogger("glmpool.http")

SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer API's name for a system message
RESULT_SUFFIXES = (".partial", ".back", ".error")  # .meta is written before .back: no event needed
LIVE_CACHE_SECONDS = 0.5  # heartbeats are read at most this often (they change once a second)
RETRY_AFTER_SECONDS = 2
HEADERS_WAIT_SECONDS = 10.0  # a stream's status line waits at most this long for the first text
CLEANUP_SECONDS = 30.0  # after a cancel, how long to wait for the pool's answer before leaving it
# Characters the pool's text may still change: THUDM's post-processing (engine/tokenizer.py
# process_response) makes an ASCII mark full-width once a CJK character follows it, and replaces the
# placeholder below. A stream holds them back until what follows is known.
UNSETTLED_MARKS = ",!:;?"
PLACEHOLDER = "[[训练时间]]"


class APIError(Exception):
    """An answer in the OpenAI error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# --- the OpenAI request -> a spool request ------------------------------------------------------------

def message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(text, str) for text in texts):
            return "".join(texts)
        raise bad(f"messages[{index}]: only text content parts are supported (ChatGLM-6B reads text only)",
                  f"messages[{index}].content")
    raise bad(f"messages[{index}] needs its content as a string or a list of text parts", f"messages[{index}].content")


def to_conversation(messages) -> tuple[str, list]:
    """(query, history) of ChatGLM-6B from OpenAI messages. ChatGLM-6B has no system role: the system
    messages, which must come first, are put before the first user message (a blank line between), so
    the prompt of every turn of a conversation starts the same way."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    system, turns = [], []  # turns: [role, text], alternating user and assistant
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if turns:
                raise bad(f"messages[{i}]: a {role} message is taken only before the first user message "
                          "(ChatGLM-6B has no system role; glmpool puts that text before the first question)",
                          "messages")
            system.append(message_text(message, i))
        elif role in ("user", "assistant"):
            if message.get("tool_calls") or message.get("function_call"):
                raise bad(f"messages[{i}]: tool calls are not supported by ChatGLM-6B", "messages")
            if not turns and role == "assistant":
                raise bad(f"messages[{i}]: the conversation must begin with a user message "
                          "(after any system messages): ChatGLM-6B's history is [question, answer] pairs", "messages")
            if turns and turns[-1][0] == role:
                raise bad(f"messages[{i}]: two {role} messages in a row cannot be mapped onto ChatGLM-6B's "
                          "[question, answer] pairs; join them into one", "messages")
            turns.append([role, message_text(message, i)])
        else:
            raise bad(f"messages[{i}]: role {role!r} is not supported (system, developer, user and assistant are)",
                      "messages")
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must be the user's: it is the question answered", "messages")
    if system:
        turns[0][1] = "\n".join(system) + "\n\n" + turns[0][1]
    history = [[turns[k][1], turns[k + 1][1]] for k in range(0, len(turns) - 1, 2)]
    return turns[-1][1], history


def number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise bad(f"{key} must be {kind} from {low} to {high}, got {value!r}", key)
    return value


def to_parameters(body: dict) -> dict:
    """The spool's generation parameters from an OpenAI body; what glmpool cannot honour is a 400."""
    params = {}
    if body.get("n") not in (None, 1):
        raise bad("n must be 1: glmpool answers with one choice (send several requests instead)", "n")
    if body.get("stop") not in (None, "", []):
        raise bad("stop sequences are not supported: ChatGLM-6B ends its answers itself", "stop")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and functions are not supported by ChatGLM-6B", "tools")
    response_format = body.get("response_format") or {"type": "text"}
    if not isinstance(response_format, dict) or response_format.get("type", "text") != "text":
        raise bad("only the text response_format is supported", "response_format")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    for key in ("frequency_penalty", "presence_penalty"):
        if number(body, key, -2, 2):
            raise bad(f"{key} is not supported (only 0)", key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, 1, 2 ** 31, integer=True)
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    temperature = number(body, "temperature", 0, 2)
    if temperature == 0:
        params["do_sample"] = False  # greedy
    elif temperature is not None:
        params["temperature"] = temperature
        params["do_sample"] = True
    top_p = number(body, "top_p", 0, 1)
    if top_p is not None:
        if top_p == 0:
            raise bad("top_p must be above 0", "top_p")
        params["top_p"] = top_p
    seed = number(body, "seed", -2 ** 63, 2 ** 63 - 1, integer=True)
    if seed is not None:
        params["seed"] = seed
    return params


def settled(text: str) -> str:
    """The part of a .partial text that the final answer keeps as it is."""
    for n in range(min(len(PLACEHOLDER) - 1, len(text)), 0, -1):
        if PLACEHOLDER.startswith(text[-n:]):
            text = text[:-n]
            break
    return text[:-1] if text.endswith(tuple(UNSETTLED_MARKS)) else text


# --- the spool, seen from the gateway ---------------------------------------------------------------

class Spool:
    def __init__(self, root: Path, host_id: str, poll_interval: float):
        self.requests = root / "requests"
        self.flags = root / "flags"
        self.host_id = host_id  # probes the spool's clock under the supervisor's name on this host: no new file
        self.poll_interval = poll_interval
        self.waiters: dict[str, asyncio.Event] = {}
        self.watch: DirWatch | None = None
        self.scanning: asyncio.Task | None = None
        self.seen: dict[str, tuple] = {}  # result file -> (inode, mtime, size) at the last scan
        self._live: tuple[float, list[dict]] = (-LIVE_CACHE_SECONDS, [])

    def start(self) -> None:
        self.requests.mkdir(parents=True, exist_ok=True)
        self.watch = DirWatch(self.requests, suffixes=RESULT_SUFFIXES)
        if self.watch.fileno() is not None:
            asyncio.get_running_loop().add_reader(self.watch.fileno(), self.on_events)
        self.scanning = asyncio.get_running_loop().create_task(self.scan_forever())

    def close(self) -> None:
        if self.scanning is not None:
            self.scanning.cancel()
        if self.watch is not None and self.watch.fileno() is not None:
            asyncio.get_running_loop().remove_reader(self.watch.fileno())
            self.watch.close()

    async def scan_forever(self) -> None:
        """Every poll_interval, one look at requests/ for every open request together: what inotify
        cannot see (another NFS host's writes), and pools that stopped (every waiter then looks)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.waiters:
                continue
            if not self.live_pools():
                self.wake_all()
                continue
            seen = {}
            try:
                with os.scandir(self.requests) as entries:
                    for entry in entries:
                        parts = spool.split_name(entry.name)
                        if parts and parts[1] in RESULT_SUFFIXES and parts[0] in self.waiters:
                            info = entry.stat(follow_symlinks=False)
                            seen[entry.name] = (info.st_ino, info.st_mtime_ns, info.st_size)
                            if self.seen.get(entry.name) != seen[entry.name]:
                                self.waiters[parts[0]].set()
            except OSError as error:
                if isinstance(error, FileNotFoundError):
                    self.requests.mkdir(parents=True, exist_ok=True)  # deleted: as the supervisor does
                    self.watch.rearm()
                self.wake_all()
            self.seen = seen

    def wake_all(self) -> None:
        for event in self.waiters.values():
            event.set()

    def on_events(self) -> None:
        names = self.watch.names()
        if names is None:  # events lost or the directory replaced: everyone looks
            self.wake_all()
            return
        for name in names:
            parts = spool.split_name(name)
            event = self.waiters.get(parts[0]) if parts else None
            if event is not None:
                event.set()

    async def wait(self, request_id: str, timeout: float) -> bool:
        """Until a result file of `request_id` changed (True) or `timeout` passed (False)."""
        event = self.waiters[request_id]
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            event.clear()

    def live_pools(self) -> list[dict]:
        """The status of every supervisor whose heartbeat is fresh by the spool's own clock and which
        takes requests (starting or running), as the supervisors judge each other's."""
        now = time.monotonic()
        if now - self._live[0] < LIVE_CACHE_SECONDS:
            return self._live[1]
        pools = []
        for beat in spool.live_heartbeats(self.flags, self.host_id):
            try:
                status = json.loads(beat.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(status, dict) and status.get("status") in ("starting", "running"):
                pools.append(status)
        self._live = (now, pools)
        return pools

    def waiting(self, limit: int) -> int:
        """Unclaimed requests in requests/, counted up to `limit` (a deep queue is not scanned whole)."""
        count = 0
        with os.scandir(self.requests) as entries:
            for entry in entries:
                if entry.name.endswith((".json", ".request")) and not entry.name.startswith("."):
                    count += 1
                    if count >= limit:
                        break
        return count

    def submit(self, request_id: str, text: str) -> None:
        # No fsync: if this host crashes, the client's connection goes with it and the request is moot.
        try:
            spool.atomic_write(self.path(request_id, ".json"), text, sync=False)
        except FileNotFoundError:  # requests/ deleted: recreated and watched again, as the supervisor does
            self.requests.mkdir(parents=True, exist_ok=True)
            self.watch.rearm()
            spool.atomic_write(self.path(request_id, ".json"), text, sync=False)

    def path(self, request_id: str, suffix: str) -> Path:
        return self.requests / f"{request_id}{suffix}"

    def read(self, request_id: str, suffix: str) -> str | None:
        try:
            return self.path(request_id, suffix).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def remove_results(self, request_id: str) -> None:
        for suffix in (".back", ".meta", ".partial", ".error", ".cancel"):
            spool.remove(self.path(request_id, suffix))

    def remove_failed_input(self, request_id: str) -> bool:
        """The input the pool keeps in failed/ after an .error: ours, and its client has the error."""
        try:
            os.unlink(self.requests / "failed" / f"{request_id}.json")
            return True
        except FileNotFoundError:
            return False


class Exchange:
    """One chat completion on the spool: written, followed, delivered or withdrawn, and cleaned up."""

    def __init__(self, gateway: "Gateway", body: dict, model: str):
        self.gateway, self.spool = gateway, gateway.spool
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.finished = False
        self.spool.waiters[self.id] = asyncio.Event()  # before the file exists: no event can be missed
        try:
            self.spool.submit(self.id, json.dumps(body, ensure_ascii=False) + "\n")
        except BaseException:
            self.spool.waiters.pop(self.id)
            raise

    async def follow(self, deadline: float):
        """("partial", text) as the answer grows, ("idle",) after HEADERS_WAIT_SECONDS without news,
        then ("done", text, meta) or ("error", APIError)."""
        shown = None
        while True:
            back = self.spool.read(self.id, ".back")
            if back is not None:
                meta = self.spool.read(self.id, ".meta")
                try:
                    meta = json.loads(meta) if meta else {}
                except ValueError:
                    meta = {}
                self.finish()
                yield "done", back, meta
                return
            error = self.spool.read(self.id, ".error")
            if error is not None:
                self.finish(failed=True)
                yield "error", error_of(error)
                return
            partial = self.spool.read(self.id, ".partial")
            if partial is not None and partial != shown:
                shown = partial
                yield "partial", partial
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.abandon("timed out")
                yield "error", APIError(504, f"no answer within {self.gateway.settings.http_timeout:g} s; "
                                              "the request was cancelled", "timeout")
                return
            if not self.spool.live_pools():  # cached: costs nothing while answers come
                self.abandon("no live pool")
                yield "error", no_pool_error(self.gateway.root)
                return
            if not await self.spool.wait(self.id, min(remaining, HEADERS_WAIT_SECONDS)):
                yield ("idle",)

    def finish(self, failed: bool = False) -> None:
        """The answer is read: remove every file of the request (after an .error, also its input, which
        the pool moves into failed/ just after writing the .error)."""
        self.finished = True
        self.spool.remove_results(self.id)
        if failed:
            self.gateway.later(self.clean_up())
        else:
            self.spool.waiters.pop(self.id, None)

    def abandon(self, why: str) -> None:
        """The client is gone or out of time: withdraw the request, or cancel it and clean up once the pool
        has answered."""
        if self.finished:
            return
        self.finished = True
        self.gateway.metrics.abandoned.labels(why).inc()
        try:
            os.unlink(self.spool.path(self.id, ".json"))  # not claimed yet: no pool has seen it
            self.spool.waiters.pop(self.id, None)
            return
        except FileNotFoundError:
            pass
        log.info("%s: %s, cancelling", self.id, why)
        try:
            spool.touch(self.spool.requests, f"{self.id}.cancel")
        except OSError as error:
            log.warning("cannot cancel %s: %s", self.id, error.strerror)
        self.gateway.later(self.clean_up(cancelled=True))

    async def clean_up(self, cancelled: bool = False) -> None:
        """After a cancel, wait for the pool's answer and remove it; after an .error, remove the input
        from failed/ once the pool has moved it there."""
        deadline = time.monotonic() + CLEANUP_SECONDS
        try:
            failed = True
            while cancelled:
                failed = self.spool.read(self.id, ".error") is not None
                if failed or self.spool.read(self.id, ".back") is not None:
                    self.spool.remove_results(self.id)
                    break
                if time.monotonic() > deadline:
                    log.warning("%s: no answer to its cancel within %.0f s; its files are left",
                                self.id, CLEANUP_SECONDS)
                    return
                await self.spool.wait(self.id, CLEANUP_SECONDS)
            while failed and not self.spool.remove_failed_input(self.id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            self.spool.waiters.pop(self.id, None)


def error_of(text: str) -> APIError:
    """An .error as the client sees it: the pool's sentence; 504 for a deadline, else 400."""
    sentence, _, detail = text.partition("\n")
    try:
        reason = json.loads(detail).get("reason")
    except (ValueError, AttributeError):
        reason = None
    if reason == "timeout":
        return APIError(504, sentence, "timeout")
    return APIError(400, sentence)


def no_pool_error(root: Path) -> APIError:
    return APIError(503, f"no live glmpool pool serves {root} (no fresh heartbeat in flags/.hosts)",
                    "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


# --- HTTP ---------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glmpool_http_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.open_streams = Gauge("glmpool_http_open_streams", "streaming responses open now", registry=r)
        self.in_flight = Gauge("glmpool_http_in_flight", "non-streaming chat completions waiting now", registry=r)
        self.first_token = Histogram("glmpool_http_first_token_seconds", "time from a request to its first text",
                                     buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.duration = Histogram("glmpool_http_completion_seconds", "time from a request to its last byte",
                                  buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.tokens = Counter("glmpool_http_tokens", "tokens of answered requests, by kind", ["kind"], registry=r)
        self.abandoned = Counter("glmpool_http_abandoned", "requests withdrawn or cancelled, by why", ["why"],
                                 registry=r)
        self.live_pools = Gauge("glmpool_http_live_pools", "supervisors with a fresh heartbeat", registry=r)


class Keys:
    """Bearer tokens from a file (one a line; blank lines and # comments skipped), re-read when it changes."""

    def __init__(self, path: str):
        self.path, self.stamp, self.digests = Path(path), None, []
        self.reload()

    def reload(self) -> None:
        info = os.stat(self.path)
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != self.stamp:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
            self.stamp = stamp

    def allows(self, header: str | None) -> bool:
        try:
            self.reload()
        except OSError as error:  # keep the keys we have
            log.warning("cannot read the API keys file %s: %s", self.path, error.strerror)
        scheme, _, token = (header or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = False
        for key in self.digests:  # every key compared, in constant time: nothing leaks which one came close
            found |= hmac.compare_digest(digest, key)
        return found and scheme.lower() == "bearer"


class Gateway:
    def __init__(self, settings):
        self.settings = settings
        self.root = Path(settings.dir).resolve()
        self.spool = Spool(self.root, settings.host_id, settings.poll_interval)
        self.keys = Keys(settings.http_api_keys_file) if settings.http_api_keys_file else None
        self.metrics = Metrics()
        self.tasks: set[asyncio.Task] = set()

    def later(self, coroutine) -> None:
        """Run a clean-up in the background, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.spool.start()
        try:
            yield
        finally:
            if self.tasks:  # cancels of streams cut by the stop: give the pool a moment to answer them
                await asyncio.wait(list(self.tasks), timeout=5)
            self.spool.close()

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_page, methods=["GET"])]
        return Starlette(routes=routes, lifespan=self.lifespan)

    def authorize(self, request: Request) -> None:
        if self.keys is not None and not self.keys.allows(request.headers.get("authorization")):
            raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    def pools(self) -> list[dict]:
        pools = self.spool.live_pools()
        if not pools:
            raise no_pool_error(self.root)
        return pools

    async def read_body(self, request: Request) -> dict:
        limit = self.settings.http_max_body
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is over the {limit}-byte limit")
        if length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as error:
            raise bad(f"the request body is not valid JSON: {str(error)[:100]}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    async def chat_completions(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            self.authorize(request)
            body = await self.read_body(request)
            query, history = to_conversation(body.get("messages"))
            params = to_parameters(body)
            stream = body.get("stream") is True
            options = body.get("stream_options") or {}
            include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
            pools = self.pools()
            limit = self.settings.http_queue_limit
            if limit and self.spool.waiting(limit) >= limit:
                raise APIError(429, f"{limit} or more requests are waiting for the pool; retry later",
                               "rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            spool_body = {"query": query, "history": history, **params, "timeout": self.settings.http_timeout}
            exchange = Exchange(self, spool_body, pools[0].get("model") or "glmpool")
        except APIError as error:
            return self.count(request, error.response())
        except OSError as error:
            failure = APIError(500, f"cannot write to the spool: {error.strerror}", "server_error")
            return self.count(request, failure.response())
        deadline = started + self.settings.http_timeout
        if stream:  # counted in metrics once its status is known
            return EventStream(self, exchange, deadline, started, include_usage)
        self.metrics.in_flight.inc()
        try:
            return self.count(request, await self.answer(request, exchange, deadline, started))
        finally:
            self.metrics.in_flight.dec()

    async def answer(self, request: Request, exchange: Exchange, deadline: float, started: float) -> Response:
        """The whole answer at once; a client that disconnects meanwhile has its request withdrawn."""
        async def outcome():
            async for event in exchange.follow(deadline):
                if event[0] in ("done", "error"):
                    return event
        waiting = asyncio.ensure_future(outcome())
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
                exchange.abandon("disconnected")
        if not waiting.done() or waiting.cancelled():
            return Response(status_code=499)  # nobody reads it
        event = waiting.result()
        if event[0] == "error":
            return event[1].response()
        _, text, meta = event
        self.metrics.duration.observe(time.monotonic() - started)
        return JSONResponse({
            "id": exchange.id, "object": "chat.completion", "created": exchange.created, "model": exchange.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(meta)}],
            "usage": self.usage(meta)})

    def usage(self, meta: dict) -> dict | None:
        prompt, completion = meta.get("prompt_tokens"), meta.get("generated_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("completion").inc(completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def count(self, request: Request, response: Response) -> Response:
        self.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
            pools = self.pools()
        except APIError as error:
            return error.response()
        return JSONResponse({"object": "list", "data": model_list(pools)})

    async def model(self, request: Request) -> Response:
        try:
            self.authorize(request)
            pools = self.pools()
        except APIError as error:
            return error.response()
        for entry in model_list(pools):
            if entry["id"] == request.path_params["model"]:
                return JSONResponse(entry)
        return APIError(404, f"this pool serves no model {request.path_params['model']!r}", param="model").response()

    async def health(self, request: Request) -> Response:
        pools = self.spool.live_pools()
        summary = [{key: pool.get(key) for key in ("host", "pid", "status", "model", "queue")} for pool in pools]
        return JSONResponse({"status": "ok" if pools else "unavailable", "dir": str(self.root), "pools": summary},
                            200 if pools else 503)

    async def metrics_page(self, request: Request) -> Response:
        self.metrics.live_pools.set(len(self.spool.live_pools()))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_list(pools: list[dict]) -> list[dict]:
    first_started: dict[str, float] = {}
    for pool in pools:
        model = str(pool.get("model"))
        first_started[model] = min(first_started.get(model, float("inf")), pool.get("started") or 0)
    return [{"id": model, "object": "model", "created": int(started), "owned_by": "glmpool"}
            for model, started in sorted(first_started.items())]


def finish_reason(meta: dict) -> str:
    return "length" if meta.get("finish_reason") == "length" else "stop"


async def disconnected(receive) -> None:
    """Returns when the client has closed the connection (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A chat completion as Server-Sent Events, in the chunks the OpenAI clients parse: a role chunk, the
    text as it grows, a chunk with finish_reason, the usage chunk if asked for, then `data: [DONE]`.
    The status line waits for the first text (at most HEADERS_WAIT_SECONDS): an error before it, such as
    the pool refusing the request, is then a plain HTTP error that the clients raise as such."""

    media_type = "text/event-stream"

    def __init__(self, gateway: Gateway, exchange: Exchange, deadline: float, started: float, include_usage: bool):
        self.status_code, self.background = 200, None  # no body: Response.__init__ would add a content-length
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gateway, self.exchange, self.deadline, self.started = gateway, exchange, deadline, started
        self.include_usage = include_usage

    def chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        exchange = self.exchange
        data = {"id": exchange.id, "object": "chat.completion.chunk", "created": exchange.created,
                "model": exchange.model, "system_fingerprint": None,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
        if self.include_usage:
            data["usage"] = usage
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    async def events(self):
        """bytes to send; an APIError when the request failed before anything was sent."""
        sent, begun = "", False
        async for event in self.exchange.follow(self.deadline):
            if event[0] == "error":
                yield event[1] if not begun else \
                    b"data: " + json.dumps(event[1].body(), ensure_ascii=False).encode() + b"\n\n"
                return
            if event[0] == "idle" and begun:
                yield b": waiting\n\n"  # an SSE comment, which clients skip: idle proxies do not cut the stream
                continue
            text = settled(event[1]) if event[0] == "partial" else event[1] if event[0] == "done" else sent
            if not begun and (text or event[0] == "done" or time.monotonic() - self.started > HEADERS_WAIT_SECONDS):
                begun = True
                yield self.chunk({"role": "assistant", "content": ""})
            if len(text) > len(sent) and text.startswith(sent):
                if not sent:
                    self.gateway.metrics.first_token.observe(time.monotonic() - self.started)
                yield self.chunk({"content": text[len(sent):]})
                sent = text
            if event[0] == "done":
                if not text.startswith(sent):  # not expected: settled() holds back what can change
                    log.warning("%s: the answer does not continue what was streamed", self.exchange.id)
                meta = event[2]
                yield self.chunk({}, finish_reason(meta))
                usage = self.gateway.usage(meta)
                if self.include_usage:
                    yield self.chunk(None, usage=usage)
                yield b"data: [DONE]\n\n"
                self.gateway.metrics.duration.observe(time.monotonic() - self.started)

    async def __call__(self, scope, receive, send) -> None:
        self.gateway.metrics.open_streams.inc()
        events = self.events()
        status = 200

        async def produce():
            nonlocal status
            begun = False
            async for data in events:
                if isinstance(data, APIError):
                    status = data.status
                    await data.response()(scope, receive, send)
                    return
                if not begun:
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                    begun = True
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        producing = asyncio.ensure_future(produce())
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({producing, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not producing.done():
                producing.cancel()
                await asyncio.wait({producing})
            await events.aclose()
            self.exchange.abandon("disconnected")  # nothing once the answer was read
            self.gateway.metrics.open_streams.dec()
            self.gateway.metrics.requests.labels(scope["path"], str(status)).inc()
        if producing.done() and not producing.cancelled() and producing.exception() is not None \
                and not isinstance(producing.exception(), OSError):  # OSError: the client went away
            raise producing.exception()


# --- running it ---------------------------------------------------------------------------------------

class Server(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        addresses = [sock.getsockname() for server in getattr(self, "servers", []) for sock in server.sockets]
        for address in addresses:
            host, port = address[:2]
            log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        notify.ready(f"listening on {', '.join(f'{a[0]}:{a[1]}' for a in addresses)}")


def serve(settings) -> int:
    os.umask(settings.umask)
    try:
        gateway = Gateway(settings)
    except OSError as error:
        log.error("cannot read the API keys file %s: %s", settings.http_api_keys_file, error.strerror)
        return 2
    log.info("OpenAI-compatible gateway onto %s", gateway.root)
    config = uvicorn.Config(gateway.app(), host=settings.http_host, port=settings.http_port, log_config=None,
                            access_log=False, server_header=False, lifespan="on", timeout_graceful_shutdown=10)
    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's, when it cannot listen (it has logged why)
        return 2
    return 0 if server.started else 2
