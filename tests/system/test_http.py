"""`glmpool http` against a real pool (tiny model), with the official `openai` client."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from pooltools import Gateway, Pool, json_request, meta, outcome, wait_for  # noqa: E402

from glmpool import gateway as gw  # noqa: E402
from glmpool import spool  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A pool and two gateways on one directory."""
    root = tmp_path_factory.mktemp("spool")
    pool = Pool(root, tmp_path_factory.mktemp("cache"), "--gpus", "cpu")
    gateways = [Gateway(root, name="gateway-a"), Gateway(root, name="gateway-b")]
    try:
        pool.start()
        for gateway in gateways:
            gateway.start()
        pool.wait_running(180)
        yield root, pool, gateways
    finally:
        for process in gateways + [pool]:
            process.kill()


def leftovers(root: Path) -> list[str]:
    """Files of requests still in requests/ (locks and the liveness probe are the pool's own)."""
    requests = root / "requests"
    return sorted(str(p.relative_to(requests)) for p in requests.rglob("*")
                  if p.is_file() and p.parent.name != ".locks" and not p.name.startswith(".probe-"))


def clean(root: Path) -> None:
    wait_for(lambda: not leftovers(root), 30, "requests/ emptied")


def direct(root: Path, rid: str, body: dict) -> tuple[str, dict]:
    """The same request written straight into the spool: the answer and its .meta."""
    json_request(root, rid, body)
    kind, text = outcome(root, rid)
    assert kind == "back", text
    info = meta(root, rid)
    for suffix in (".back", ".meta"):
        (root / "requests" / f"{rid}{suffix}").unlink()
    return text, info


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# --- the mapping, no processes -------------------------------------------------------------------------

def test_messages_map_onto_query_and_history():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "text", "text": "b"}]}, {"role": "user", "content": "c"}]
    assert gw.to_conversation(messages) == ("c", [["Be brief.\n\na", "b"]])
    assert gw.to_conversation([{"role": "developer", "content": "S"}, {"role": "user", "content": "q"}]) == \
        ("S\n\nq", [])
    for wrong, why in [([], "non-empty"), ([{"role": "assistant", "content": "x"}], "begin with a user"),
                       ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "in a row"),
                       ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                         {"role": "user", "content": "z"}], "before the first user"),
                       ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
                       ([{"role": "tool", "content": "x"}], "not supported"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text content")]:
        with pytest.raises(gw.APIError, match=why):
            gw.to_conversation(wrong)


def test_parameters_map_or_are_refused():
    assert gw.to_parameters({"max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 3, "user": "u",
                             "unknown_field": 1, "stop": None, "n": 1}) == \
        {"max_new_tokens": 5, "do_sample": False, "top_p": 0.5, "seed": 3}
    assert gw.to_parameters({"max_completion_tokens": 7, "temperature": 0.5}) == \
        {"max_new_tokens": 7, "temperature": 0.5, "do_sample": True}
    for body, why in [({"n": 2}, "n must be 1"), ({"stop": ["x"]}, "stop"), ({"temperature": 3}, "temperature"),
                      ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                      ({"top_p": 0}, "top_p"), ({"tools": [{}]}, "tools"), ({"presence_penalty": 1}, "presence"),
                      ({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"response_format": "json"}, "response_format")]:
        with pytest.raises(gw.APIError, match=why):
            gw.to_parameters(body)


def test_settled_holds_back_what_the_pool_may_still_change():
    assert gw.settled("你好,") == "你好"  # "," becomes "，" if a CJK character follows
    assert gw.settled("abc[[训练") == "abc"  # may become 2023年
    assert gw.settled("abc[x") == "abc[x"
    assert gw.settled("好，世界") == "好，世界"


class ScriptedExchange:
    """What EventStream reads from an Exchange, with the pool's side scripted."""
    id, created, model = "chatcmpl-x", 1, "m"

    def __init__(self, events):
        self.events = events

    async def follow(self, deadline):
        for event in self.events:
            yield event


def sse(stream: "gw.EventStream") -> list:
    async def collect():
        return [item async for item in stream.events()]
    out = []
    for item in asyncio.run(collect()):
        if isinstance(item, gw.APIError):
            out.append(item.status)
        elif item.startswith(b"data: {"):
            out.append(json.loads(item[6:]))
        else:
            out.append(item.decode())
    return out


def test_event_stream_order_hold_back_and_keep_alive(tmp_path):
    import argparse

    from glmpool import config
    gateway = gw.Gateway(config.resolve(argparse.Namespace(dir=str(tmp_path)), environ={}))
    done = ("done", "你好，世界!", {"finish_reason": "stop", "prompt_tokens": 3, "generated_tokens": 4})
    script = [("idle",), ("idle",), ("partial", "你好,"), ("partial", "你好，世界"), done]
    long_ago = time.monotonic() - gw.HEADERS_WAIT_SECONDS - 1  # the status line has waited long enough
    out = sse(gw.EventStream(gateway, ScriptedExchange(script), time.monotonic() + 60, long_ago, True))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and out[0]["usage"] is None
    assert out[1] == ": waiting\n\n"  # idle once the stream has begun: a comment that keeps proxies awake
    assert [o["choices"][0]["delta"].get("content") for o in out[2:5]] == ["你好", "，世界", "!"]
    assert out[5]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert out[6]["choices"] == [] and out[6]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                             "total_tokens": 7}
    assert out[7:] == ["data: [DONE]\n\n"]
    # Recently started: idle waits without a status line, and an error before any text is a plain status.
    now = time.monotonic()
    script = [("idle",), ("error", gw.APIError(400, "bad"))]
    assert sse(gw.EventStream(gateway, ScriptedExchange(script), now + 60, now, False)) == [400]


def test_results_are_found_without_inotify_too(tmp_path, monkeypatch):
    """On NFS another host's writes make no inotify event here: the periodic scan finds them."""
    fake_heartbeat(tmp_path)
    monkeypatch.setattr(gw.DirWatch, "fileno", lambda self: None)

    async def run():
        watched = gw.Spool(tmp_path, "test", poll_interval=0.05)
        watched.start()
        try:
            watched.waiters["r1"] = asyncio.Event()
            waiting = asyncio.ensure_future(watched.wait("r1", 30))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            spool.atomic_write(tmp_path / "requests" / "r1.partial", "x")
            assert await waiting
            assert not await watched.wait("r1", 0.2)  # nothing new since
            (tmp_path / "flags" / ".hosts" / "fake.1.json").unlink()
            assert await watched.wait("r1", 30)  # no live pool: every waiter is woken to see it
        finally:
            watched.close()
    asyncio.run(run())


# --- against the pool ----------------------------------------------------------------------------------

def test_chat_completion_is_what_the_spool_answers(served):
    root, _, (gateway, _) = served
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    reply = gateway.client().chat.completions.create(model="anything", messages=messages, max_tokens=6,
                                                     temperature=0, user="someone", extra_body={"x_unknown": 1})
    text, info = direct(root, "direct-1", {"query": "second", "history": [["You are terse.\n\nfirst", "ok"]],
                                           "max_new_tokens": 6, "do_sample": False})
    assert reply.object == "chat.completion" and reply.model == "tiny-random"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == info["finish_reason"] == "length"
    assert reply.usage.prompt_tokens == info["prompt_tokens"] > 0
    assert reply.usage.completion_tokens == info["generated_tokens"] == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    clean(root)


def test_finish_reason_is_how_the_answer_ended(served):
    root, _, (gateway, _) = served
    client, seen = gateway.client(), {}
    for seed in range(24):  # random weights: some seeds end the answer early, most run to max_tokens
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "tell me"}],
                                               max_tokens=40, temperature=1.0, top_p=1.0, seed=seed)
        reason, tokens = reply.choices[0].finish_reason, reply.usage.completion_tokens
        assert (reason, tokens == 40) in (("length", True), ("stop", False)), (seed, reason, tokens)
        seen[reason] = seed
        if len(seen) == 2:
            break
    assert set(seen) == {"stop", "length"}, seen
    clean(root)


def test_streaming_as_the_openai_client_parses_it(served):
    root, _, (gateway, _) = served
    client = gateway.client()
    messages = [{"role": "user", "content": "stream this"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, final, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in content)
    assert final.choices[0].finish_reason == "length" and not final.choices[0].delta.content
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    plain = list(client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0,
                                                stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    clean(root)


def test_a_client_that_leaves_has_its_request_cancelled(served):
    root, pool, (gateway, _) = served
    client = gateway.client()
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "long"}],
                                            max_tokens=1900, temperature=0, stream=True)
    first = next(stream)
    wait_for(lambda: (root / "requests" / f"{first.id}.partial").exists(), 60, "generation under way")
    stream.close()
    wait_for(lambda: f"request {first.id} failed: the request was cancelled" in pool.output(), 60, "the cancel")
    # The same for a client that gives up waiting for a whole answer.
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "long"}], "max_tokens": 1900, "temperature": 0}),
        {"Content-Type": "application/json"})
    partial = wait_for(lambda: next((root / "requests").glob("*.partial"), None), 60, "generation under way")
    connection.close()
    wait_for(lambda: f"request {partial.stem} failed: the request was cancelled" in pool.output(), 60, "the cancel")
    clean(root)


def test_a_stopped_gateway_finishes_what_it_streams(served):
    root, _, _ = served
    gateway = Gateway(root, name="gateway-stopped").start()
    try:
        stream = gateway.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "long"}], max_tokens=300, temperature=0, stream=True)
        first = next(stream)
        gateway.process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in rest)
        assert gateway.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it was sent
        clean(root)
    finally:
        gateway.kill()


def test_errors_come_back_as_the_openai_client_expects(served):
    root, _, (gateway, _) = served
    client = gateway.client()
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="must begin with a user message"):
        client.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])
    # The pool's own validation (.error): its sentence, 400, and the request's files gone.
    with pytest.raises(openai.BadRequestError, match="prompt") as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 3000}])
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="prompt"):
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 3000}],
                                            stream=True))
    clean(root)


def test_models_health_metrics_from_the_pool(served):
    _, _, (gateway, _) = served
    assert [m.id for m in gateway.client().models.list()] == ["tiny-random"]
    assert gateway.client().models.retrieve("tiny-random").owned_by == "glmpool"
    status, text = get(gateway.url + "/health")
    assert status == 200 and json.loads(text)["pools"][0]["model"] == "tiny-random"
    status, text = get(gateway.url + "/metrics")
    assert status == 200 and 'glmpool_http_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert "glmpool_http_live_pools 1.0" in text


def test_two_gateways_on_one_directory(served):
    root, _, gateways = served
    results, failures = {}, []

    def ask(i: int) -> None:
        try:
            client = gateways[i % 2].client()
            messages = [{"role": "user", "content": f"question {i}"}]
            if i % 3 == 0:
                chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                                             temperature=0, stream=True))
                results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                reply = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
                results[i] = reply.choices[0].message.content
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append((i, error))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures and len(results) == 8
    for i in (0, 1):  # each the spool's answer to the same request
        text, _ = direct(root, f"twin-{i}", {"query": f"question {i}", "max_new_tokens": 12, "do_sample": False})
        assert results[i] == text
    clean(root)


# --- without a pool: 503, 429, timeouts, keys, body size ----------------------------------------------

def fake_heartbeat(root: Path, age: float = 0.0) -> Path:
    hosts = root / "flags" / ".hosts"
    hosts.mkdir(parents=True, exist_ok=True)
    beat = hosts / "fake.1.json"
    beat.write_text(json.dumps({"status": "running", "host": "fake", "pid": 1, "model": "fake-model",
                                "started": time.time(), "queue": {"pending": 0, "in_progress": 0}}))
    os.utime(beat, (time.time() - age, time.time() - age))
    return beat


def test_no_pool_queue_limit_timeout_keys_and_body_size(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one a line\nsecret-1\n\nsecret-2\n")
    gateway = Gateway(tmp_path, "--http-queue-limit", "2", "--http-max-body", "4000",
                      "--http-api-keys-file", str(keys))
    impatient = Gateway(tmp_path, "--http-timeout", "1", name="gateway-impatient")
    try:
        gateway.start()
        impatient.start()
        client = gateway.client(api_key="secret-2")
        question = [{"role": "user", "content": "x"}]
        # No pool: 503 at once, /health says so; a stale heartbeat is no pool either.
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=question)
        assert caught.value.status_code == 503 and "no live glmpool pool" in str(caught.value)
        assert get(gateway.url + "/health")[0] == 503
        fake_heartbeat(tmp_path, age=60)
        time.sleep(gw.LIVE_CACHE_SECONDS)
        assert get(gateway.url + "/health")[0] == 503
        beat = fake_heartbeat(tmp_path)
        wait_for(lambda: get(gateway.url + "/health")[0] == 200, 10, "the heartbeat seen")
        assert [m.id for m in client.models.list()] == ["fake-model"]
        # Keys.
        for wrong in ("secret-3", "secret-1x"):
            with pytest.raises(openai.AuthenticationError):
                gateway.client(api_key=wrong).chat.completions.create(model="m", messages=question)
        # A pool that never answers: after http_timeout, 504 and the request withdrawn.
        with pytest.raises(openai.APIStatusError) as caught:
            impatient.client().chat.completions.create(model="m", messages=question)
        assert caught.value.status_code == 504
        assert leftovers(tmp_path) == []
        # A pool that stops while a request waits: 503, and the request withdrawn.
        failures = []

        def ask():
            try:
                client.chat.completions.create(model="m", messages=question)
            except openai.APIStatusError as error:
                failures.append(error.status_code)
        thread = threading.Thread(target=ask)
        thread.start()
        wait_for(lambda: leftovers(tmp_path), 30, "the request written")
        beat.unlink()
        thread.join(60)
        assert failures == [503] and leftovers(tmp_path) == []
        beat = fake_heartbeat(tmp_path)
        wait_for(lambda: get(gateway.url + "/health")[0] == 200, 10, "the heartbeat seen")
        # Two requests waiting unclaimed: the third is refused with Retry-After.
        for rid in ("w1", "w2"):
            json_request(tmp_path, rid, {"query": "waiting"})
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=question)
        assert int(caught.value.response.headers["retry-after"]) >= 1
        # Too large a body.
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y" * 5000}])
        assert caught.value.status_code == 413
        beat.unlink()
        time.sleep(gw.LIVE_CACHE_SECONDS)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=question)
    finally:
        gateway.kill()
        impatient.kill()
