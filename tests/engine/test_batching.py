import pytest

from glmpool.engine import AdmissionError, PromptTooLongError, SamplingParams

QUERIES = ["你好", "我喜欢吃橘子，你呢？", "hello there, how are you?", "what is the time", "橘子",
           "a much longer question about the model server and its many requests and answers"]
GREEDY = SamplingParams(do_sample=False, max_new_tokens=24)


def run(batch, until_empty=True):
    """Step the batch to the end; return {key: (token ids, final event)}."""
    out = {}
    while len(batch):
        for event in batch.step():
            tokens, _ = out.get(event.key, ([], None))
            out[event.key] = (tokens + [event.token_id], event)
    return out


@pytest.fixture(scope="module")
def alone(tiny_engine):
    results = {}
    for q in QUERIES:
        batch = tiny_engine.batcher(max_batch=1)
        batch.add(q, q, None, GREEDY)
        results[q] = run(batch)[q]
    return results


def test_batched_greedy_equals_alone(tiny_engine, alone):
    batch = tiny_engine.batcher(max_batch=8)
    for q in QUERIES:
        batch.add(q, q, None, GREEDY)
    together = run(batch)
    for q in QUERIES:
        assert together[q][0] == alone[q][0]
        assert together[q][1].text == alone[q][1].text


def test_prefill_groups_are_bounded_and_change_nothing(tiny_engine, alone, monkeypatch):
    from glmpool.engine import generate

    monkeypatch.setattr(generate, "PREFILL_TOKENS", 40)  # at most 40 padded prompt tokens per pass
    passes = []
    forward = tiny_engine.model.forward
    monkeypatch.setattr(tiny_engine.model, "forward", lambda tokens, *a, **k: (passes.append(tokens.shape),
                                                                                forward(tokens, *a, **k))[1])
    batch = tiny_engine.batcher(max_batch=8)
    for q in QUERIES:
        batch.add(q, q, None, GREEDY)
    together = run(batch)
    prefills = [shape for shape in passes if shape[1] > 1]
    assert len(prefills) > 1 and all(b * t <= 40 or b == 1 for b, t in prefills)
    assert sum(b for b, _ in prefills) == len(QUERIES)
    for q in QUERIES:
        assert together[q][0] == alone[q][0]


def test_sequences_join_midway_and_leave(tiny_engine, alone):
    batch = tiny_engine.batcher(max_batch=8)
    short = SamplingParams(do_sample=False, max_new_tokens=5)
    batch.add("short", QUERIES[0], None, short)
    tokens = {}
    joined = iter(QUERIES[1:])
    steps = 0
    while len(batch):
        for event in batch.step():
            tokens.setdefault(event.key, []).append(event.token_id)
            if event.finished:
                assert event.key not in batch.keys()  # retired at once
        steps += 1
        q = next(joined, None)
        if q is not None:
            batch.add(q, q, None, GREEDY)  # one new sequence joins after every step
    assert tokens["short"] == alone[QUERIES[0]][0][:5]
    for q in QUERIES[1:]:
        assert tokens[q] == alone[q][0], q


def test_each_sequence_keeps_its_own_sampling(tiny_engine, alone):
    batch = tiny_engine.batcher(max_batch=4)
    batch.add("greedy", QUERIES[1], None, GREEDY)
    batch.add("s1", QUERIES[1], None, SamplingParams(seed=5, max_new_tokens=24, temperature=2.0, top_p=1.0))
    batch.add("s2", QUERIES[1], None, SamplingParams(seed=5, max_new_tokens=24, temperature=2.0, top_p=1.0))
    out = run(batch)
    assert out["greedy"][0] == alone[QUERIES[1]][0]
    assert out["s1"][0] == out["s2"][0]  # same seed, same draws, whatever else is in the batch
    assert out["s1"][0] != out["greedy"][0]


def test_a_sampled_sequence_draws_the_same_tokens_alone_and_among_others(tiny_dir):
    """Sampled rows sharing a top_k are filtered together, but each with its own temperature, top_p and
    generator: next to greedy and differently sampled neighbours, a sequence draws what it draws alone."""
    from glmpool.engine import load
    engine = load(tiny_dir, progress=False, matmul="onednn")  # its logits are batch-invariant bit for bit
    mine = SamplingParams(seed=5, max_new_tokens=24, temperature=2.0, top_p=0.9, top_k=20)
    batch = engine.batcher(max_batch=1)
    batch.add("me", QUERIES[1], None, mine)
    alone = run(batch)["me"][0]
    batch = engine.batcher(max_batch=4)
    batch.add("greedy", QUERIES[0], None, GREEDY)
    batch.add("hot", QUERIES[2], None, SamplingParams(seed=6, max_new_tokens=30, temperature=5.0, top_p=1.0,
                                                      top_k=20))
    batch.add("me", QUERIES[1], None, mine)
    batch.add("whole vocabulary", QUERIES[3], None, SamplingParams(seed=7, max_new_tokens=10, top_k=0))
    assert run(batch)["me"][0] == alone


def test_admission_is_bounded(tiny_engine):
    batch = tiny_engine.batcher(max_batch=2, max_kv_tokens=100)
    params = SamplingParams(do_sample=False, max_new_tokens=30)
    batch.add("a", "hi", None, params)
    assert batch.has_room(5, params)
    batch.add("b", "hi", None, params)
    assert not batch.has_room(5, params)
    with pytest.raises(AdmissionError):
        batch.add("c", "hi", None, params)
    batch.cancel("b")
    assert batch.has_room(5, params)
    # a budget that a single request could never fit is a permanent error, not "retry later"
    with pytest.raises(PromptTooLongError):
        batch.add("d", "hi", None, SamplingParams(max_new_tokens=200))
    budget = tiny_engine.batcher(max_batch=8, max_kv_tokens=60)
    budget.add("x", "hi", None, params)
    with pytest.raises(AdmissionError):
        budget.add("y", "hi", None, params)  # two worst cases do not fit the token budget


@pytest.mark.parametrize("shared_cache", [False, True])
def test_cancel_stops_and_frees(tiny_engine, alone, shared_cache):
    batch = tiny_engine.batcher(max_batch=2, shared_cache=shared_cache)
    batch.add("a", "hello", None, GREEDY)
    batch.add("b", QUERIES[1], None, GREEDY)
    batch.step()
    batch.step()
    event = batch.cancel("a")  # in a shared cache, b moves into a's slot
    assert event.finished and event.finish_reason == "cancelled" and event.generated_tokens == 2
    assert batch.keys() == ["b"]
    assert run(batch)["b"][0] == alone[QUERIES[1]][0][2:]
    assert batch.cancel("missing") is None


def test_bad_sampling_parameters_are_rejected():
    for bad in (dict(top_p=0), dict(top_p=float("nan")), dict(temperature=-1), dict(max_length=0),
                dict(max_new_tokens=-5), dict(do_sample="yes"), dict(top_k=1.5), dict(seed=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_argmax_is_torchs_first_maximum_ties_included():
    import torch
    from glmpool.engine.generate import argmax
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        rows, vocab = 1 + trial % 5, [3, 1023, 1024, 1025, 4097, 130528][trial % 6]
        high = 3 if trial % 2 else 10 ** 6  # few distinct values: many ties, across and inside chunks
        logits = torch.randint(-3, high, (rows, vocab), generator=g).float()
        assert torch.equal(argmax(logits), logits.argmax(-1)), (rows, vocab, high)


@pytest.mark.parametrize("isa", [256, 0])
def test_greedy_kernel_gives_torchs_first_maximum_or_leaves_the_row_to_torch(isa, monkeypatch):
    """row_kernel.greedy (greedy.c, AVX2 and plain C) answers only where torch's sum of the row is surely
    finite, and then with torch's argmax: ties, -0.0 against 0.0, any length; NaN, inf and logits large
    enough that a sum could overflow leave the rows to torch (None)."""
    import math
    import torch
    from glmpool.engine import row_kernel
    if not row_kernel.available():
        pytest.skip("glmpool's CPU kernels are not built")
    monkeypatch.setattr(row_kernel.library(), "isa", min(isa, row_kernel.library().isa))
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        rows, vocab = 1 + trial % 5, [1, 7, 8, 31, 33, 1025, 130528][trial % 7]
        logits = torch.randint(-3, 3 if trial % 2 else 10 ** 6, (rows, vocab), generator=g).float()
        if trial % 3 == 0:  # zeros of both signs as the maximum
            logits = torch.where(torch.rand(rows, vocab, generator=g) < 0.5, -logits.abs(), 0.0)
        assert row_kernel.greedy(logits) == logits.argmax(-1).tolist(), (rows, vocab)
    vocab = 130528
    for bad in (math.nan, math.inf, -math.inf, 2 * torch.finfo(torch.float32).max / (2 * vocab)):
        logits = torch.randn(3, vocab, generator=g)
        logits[2, vocab - 1] = bad
        assert row_kernel.greedy(logits) is None, bad
    logits[2, vocab - 1] = torch.finfo(torch.float32).max / (2 * vocab)  # no sum of the row can overflow
    assert row_kernel.greedy(logits) == [*logits[:2].argmax(-1).tolist(), vocab - 1]


def test_sampling_filters_like_transformers():
    """temperature -> top-k -> top-p as transformers' warpers define them (sorted ascending, drop the
    tokens whose cumulative probability is <= 1 - top_p)."""
    import torch
    from glmpool.engine.generate import candidates
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        logits = torch.randn(1000, generator=g) * (1 + trial % 5)
        params = SamplingParams(temperature=0.5 + trial % 3 * 0.4, top_k=[0, 5, 50][trial % 3],
                                top_p=[0.3, 0.7, 0.95, 1.0][trial % 4])
        scores = logits / params.temperature
        if params.top_k:
            scores = scores.masked_fill(scores < torch.topk(scores, params.top_k).values[-1], -float("inf"))
        ascending, order = torch.sort(scores)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[-1] = False
        expected = set(order[~drop & torch.isfinite(ascending)].tolist())
        indices, probs = candidates(logits[None], [params])
        assert set(indices[probs > 0].tolist()) == expected


def test_top_k_of_finds_torchs_top_k_in_the_chunks_with_the_largest_maxima():
    import torch
    from glmpool.engine.generate import top_k_of
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1, 30):
        scores = torch.randn(16, 130528, generator=g) * scale  # no ties: the very same result
        for k in (1, 50, 200):
            got, expected = top_k_of(scores, k), torch.topk(scores, k)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (scale, k)
    tied = (torch.randn(4, 130528, generator=g) * 3).round()  # many ties: the same values, a valid choice
    values, indices = top_k_of(tied, 50)
    assert torch.equal(values, torch.topk(tied, 50).values) and torch.equal(tied.gather(1, indices), values)
    assert all(len(set(row.tolist())) == 50 for row in indices)
    odd = torch.randn(2, 1001, generator=g)  # no power-of-two chunk divides it: torch.topk itself
    assert torch.equal(top_k_of(odd, 5)[1], torch.topk(odd, 5).indices)
    infinite = torch.randn(1, 130528, generator=g)
    infinite[0, [7, 99_000]] = float("inf")
    assert top_k_of(infinite, 3)[1][0, :2].tolist() in ([7, 99_000], [99_000, 7])


def test_streamed_text_never_shows_a_cut_character_and_stays_per_event(tiny_engine, monkeypatch):
    """Each event's text is its own step's answer, even when read after later steps; a character spelled
    over several byte tokens shows only when complete; an answer cut by the length limit inside a character
    ends before it."""
    from glmpool.engine import generate
    from glmpool.engine.tokenizer import process_response

    tokenizer = tiny_engine.tokenizer
    clef = tokenizer.encode("𝄞")[1:]  # four byte-fallback pieces, after the word-start piece
    script = tokenizer.encode("ab") + clef + tokenizer.encode("c") + clef[:2]
    batch = tiny_engine.batcher(max_batch=1)
    batch.add_prompt("k", tokenizer.build_prompt("q", []), SamplingParams(do_sample=False, max_new_tokens=len(script)))
    monkeypatch.setattr(generate, "next_tokens",
                        lambda logits, params, generators: [script[len(batch.running["k"].generated)]])
    events = []
    while len(batch):
        events += batch.step()
    assert [e.token_id for e in events] == script

    expected, shown = [], ""
    for n in range(1, len(script) + 1):  # what a client would have seen after each token
        text = tokenizer.decode(script[:n])
        if text and not text.endswith("\ufffd"):
            shown = process_response(text)
        expected.append(shown)
    assert [e.text for e in reversed(events)][::-1] == expected  # read newest first: snapshots, not the latest
    assert "𝄞" in expected[len(script) - 3] and not any(t.endswith("\ufffd") for t in expected)
    assert events[-1].finish_reason == "length" and events[-1].text == process_response(tokenizer.decode(script[:-2]))


@pytest.fixture(params=["kernel", "torch"])
def slab_attention(request, tiny_engine, monkeypatch):
    """A KV slab's decode attention: glmpool's CPU kernel where built, or torch's padded one (the GPU's)."""
    from glmpool.engine import model
    if request.param == "kernel" and not tiny_engine.model.attention_kernel:
        pytest.skip("glmpool's CPU kernels are not built here")
    monkeypatch.setattr(tiny_engine.model, "attention_kernel", request.param == "kernel")
    return model.KernelDecode if request.param == "kernel" else model.PaddedDecode


def test_a_shared_cache_decodes_like_separate_caches(tiny_engine, alone, slab_attention):
    """One KV slab for the batch, decode attention by glmpool's kernel or padded to the longest sequence
    (the GPU's layout), forced on the CPU: sequences join after every step and leave early (the last
    slot's sequence then moves into the freed one), and every answer is what the sequence produces alone."""
    batch = tiny_engine.batcher(max_batch=8, shared_cache=True)
    batched_steps = []
    init = slab_attention.__init__
    def record(self, slab, lengths, *args):  # sequences per call (torch's: per group of sequences)
        init(self, slab, lengths, *args)
        batched_steps.append(len(lengths) // len(getattr(self, "groups", [lengths])))
    tokens = {}
    joined = iter(QUERIES[1:])
    batch.add("short", QUERIES[0], None, SamplingParams(do_sample=False, max_new_tokens=3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slab_attention, "__init__", record)
        while len(batch):
            for event in batch.step():
                tokens.setdefault(event.key, []).append(event.token_id)
            q = next(joined, None)
            if q is not None:
                batch.add(q, q, None, GREEDY)
    assert max(batched_steps) == len(QUERIES) - 1  # that path ran, for the whole batch at once
    assert tokens["short"] == alone[QUERIES[0]][0][:3]
    for q in QUERIES[1:]:
        assert tokens[q] == alone[q][0], q
    assert batch.slab.occupants == []


def test_a_shared_cache_slot_reused_after_nan_holds_no_stale_values(tiny_engine, alone, slab_attention):
    """Padding gets probability 0, and 0 x NaN is NaN: a slot must not hand its former occupant's values
    (here poisoned) to the next."""
    import torch
    batch = tiny_engine.batcher(max_batch=2, shared_cache=True)
    for q in QUERIES[4:6]:  # prompts longer than the next two, answers as long
        batch.add(q, q, None, SamplingParams(do_sample=False, max_new_tokens=40))
    run(batch)
    capacity = batch.slab.capacity
    with torch.inference_mode():
        for layer in batch.slab.layers:
            layer.fill_(float("nan"))
    for q in QUERIES[1:3]:  # of different lengths: the shorter one's attention is padded
        batch.add(q, q, None, GREEDY)
    out = run(batch)
    assert [out[q][0] for q in QUERIES[1:3]] == [alone[q][0] for q in QUERIES[1:3]]
    assert batch.slab.capacity == capacity  # the same slot, not a fresh slab


def test_a_shared_cache_stays_within_the_kv_budget(tiny_engine):
    """A slab holds slots x the longest worst case; admission counts it so, and the slab never outgrows
    the budget while sequences of different lengths come and go."""
    import random
    from glmpool.engine.model import round_up
    long, short = SamplingParams(do_sample=False, max_new_tokens=120), SamplingParams(do_sample=False, max_new_tokens=8)
    prompt = len(tiny_engine.tokenizer.build_prompt("hi", []))
    budget = 2 * round_up(prompt + 120) + 10  # a slab of two slots, one long: doubling its capacity would not fit
    batch = tiny_engine.batcher(max_batch=6, max_kv_tokens=budget, shared_cache=True)
    batch.add("long", "hi", None, long)
    assert batch.has_room(prompt, short)
    batch.add("s0", "hi", None, short)
    assert not batch.has_room(prompt, short)
    rng = random.Random(0)
    largest, added = 0, 1
    while len(batch):
        batch.step()
        if batch.slab.layers:
            largest = max(largest, batch.slab.slots * batch.slab.capacity)
        params = rng.choice([short, short, long])
        if added < 30 and batch.has_room(prompt, params):
            added += 1
            batch.add(f"r{added}", "hi", None, params)
    assert added == 30 and 0 < largest <= budget


def test_the_padding_probe_refuses_attention_that_changes_with_neighbours(monkeypatch):
    """padded_attention_exact compares a sequence's attention alone and among longer neighbours: a
    difference in the last bit of any output makes it refuse (then each sequence keeps its own cache)."""
    import torch
    from glmpool.engine import model
    from glmpool.engine.config import ModelConfig
    config = ModelConfig(vocab_size=1000, hidden_size=128, num_layers=2, num_attention_heads=2, inner_hidden_size=512)
    attend = model.PaddedDecode.attend_rotated
    nudged = lambda self, *a: (lambda out: out if len(self.rows) == 1 else out * (1 + 2 ** -20))(attend(self, *a))
    monkeypatch.setattr(model.PaddedDecode, "attend_rotated", nudged)
    assert not model.padded_attention_exact(config, torch.float32, torch.device("cpu"))
