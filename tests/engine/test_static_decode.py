"""The GPU path's generation (engine/static_decode.py) on CPU tensors: one graph per bucket, compiled ==
eager, one host synchronisation a step, mixed lengths at the cost of uniform ones, chunked prefill, short
prompts prefilled in one pass, sampling on the device that a batch does not change and that no top_k
compiles again. The checks themselves live in bench/static_decode.py
(also run by `python bench/static_decode.py --cpu-dry-run`)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from glmpool.engine import SamplingParams, load
from glmpool.engine.generate import INVALID_SCORE_TOKEN
from glmpool.engine.static_decode import (StaticBatcher, attention_mask, batch_buckets, sample_tokens, uniform,
                                          visible)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checks():
    spec = importlib.util.spec_from_file_location("glmpool_bench_static_decode", REPO / "bench" / "static_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from glmpool.engine.tiny import write_tiny_checkpoint
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny256") / "ckpt", seed=1, max_sequence_length=256),
                progress=False)


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1]


def test_every_bucket_is_one_graph(engine, checks):
    found = checks.check_fullgraph(engine.batcher(2, static=True, compile=False))
    assert found == {"buckets": 2, "graph_breaks": 0}


def test_bfloat16_steps_are_one_graph_and_decode(tmp_path, checks):
    from glmpool.engine.tiny import write_tiny_checkpoint
    engine = load(write_tiny_checkpoint(tmp_path / "ckpt", seed=1, max_sequence_length=128), dtype="bfloat16",
                  progress=False)
    batcher = engine.batcher(1, static=True, compile=False)
    assert checks.check_fullgraph(batcher) == {"buckets": 1, "graph_breaks": 0}
    tokens = checks.run(batcher, [checks.prompt(batcher, 20)])[0]
    assert len(tokens) == checks.GREEDY.max_new_tokens or tokens[-1] == engine.config.eos_token_id


def test_a_graph_break_is_caught(engine, checks, monkeypatch):
    batcher = engine.batcher(1, static=True, compile=False)
    decode = batcher.decode
    monkeypatch.setattr(batcher, "decode", lambda *args: decode(*args) + int(args[0].sum()))  # a host read
    with pytest.raises(AssertionError, match="breaks"):
        checks.check_fullgraph(batcher)


def test_compiled_steps_give_the_eager_tokens(engine, checks):
    found = checks.check_compiled_matches_eager(engine, backend="aot_eager")
    assert found["tokens"] == 24 and found["graphs"] >= 2


def test_greedy_tokens_as_the_cpu_path(engine, checks):
    static = engine.batcher(3, static=True, compile=False)
    prompts = [checks.prompt(static, n, seed) for seed, n in enumerate((9, 30, 5))]
    assert checks.run(static, prompts) == checks.run(engine.batcher(3, static=False), prompts)


def test_one_host_synchronisation_a_step(engine, checks):
    assert checks.check_host_syncs(engine)["host_syncs"] == 1
    # the counter sees both kinds of wait: a scalar read, and a copy to the host as read_back makes it
    counter = checks.OperatorCounter()
    with torch.inference_mode(), counter:
        x = torch.arange(3.0)
        x.sum().item(), x.to("cpu", copy=True)
    assert sum(counter.waits.values()) == 2, counter.waits


def test_mixed_lengths_cost_what_uniform_ones_do(tiny_engine, checks):
    # the case: one sequence of 2,000 tokens among 63 of 100 reads 16 blocks of 128 positions and
    # the others one each (spans of the longest row's bucket read 2,048 positions for every row: 8x)
    found = checks.check_mixed_lengths(tiny_engine, batch=64, short=100, long=2000)
    assert found["operator_ratio"] == 1.0
    assert (found["uniform_blocks"], found["mixed_blocks"]) == (64, 63 + 16)
    # padding rows read one block: 3 sequences in a batch bucket of 4
    assert checks.count_decode_step(tiny_engine, [100, 300, 5], max_batch=4)[1] == 1 + 3 + 1 + 1


def test_attention_mask_lists_the_blocks_each_row_attends():
    capacity = 300  # 301 columns: blocks of 128, 128 and 45
    write_at = torch.tensor([0, 126, 127, 128, 255, 299, 300])  # the last: a padding row (scratch column)
    mask = attention_mask(write_at, capacity)
    columns = torch.arange(capacity + 1)
    wanted = (columns <= write_at[:, None]) & (write_at[:, None] < capacity)
    wanted[-1, -1] = True
    assert torch.equal(create_mask(mask.mask_mod, 7, 1, 1, capacity + 1)[:, 0, 0], wanted)
    whole = [set(row[0, 0, :n].tolist()) for row, n in zip(mask.full_kv_indices, mask.full_kv_num_blocks.flatten())]
    partial = [set(row[0, 0, :n].tolist()) for row, n in zip(mask.kv_indices, mask.kv_num_blocks.flatten())]
    assert whole == [set(), set(), {0}, {0}, {0, 1}, {0, 1}, set()]
    assert partial == [{0}, {0}, set(), {1}, set(), {2}, {2}]
    for row, blocks in enumerate(whole):  # whole blocks: every column attended
        assert all(bool(wanted[row, b * 128:(b + 1) * 128].all()) for b in blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: what CUDA runs
def test_compiled_attention_reads_what_the_mask_says(tmp_path, monkeypatch, dtype):
    """Inductor's own FlexAttention kernel (C++ here) against a masked SDPA, keys and values past each row's
    length made huge: reading a block it should skip, or skipping one it should read, shows."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, not fetched from a cache
    capacity, generator = 300, torch.Generator().manual_seed(0)
    write_at = torch.tensor([0, 127, 128, 200, 299, 300])
    q = torch.randn(6, 2, 1, 16, generator=generator)
    keys, values = (torch.randn(6, 2, capacity + 1, 16, generator=generator) for _ in range(2))
    columns = torch.arange(capacity + 1)
    wanted = visible(columns, write_at[:, None], capacity)[:, None, None, :]
    keys.masked_fill_(~wanted[:, :, 0, :, None], 30.0)
    values.masked_fill_(~wanted[:, :, 0, :, None], 1e4)
    attend = torch.compile(lambda q, k, v, write_at: flex_attention(
        q, k, v, block_mask=attention_mask(write_at, capacity), scale=2.0), fullgraph=True, dynamic=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=wanted, scale=2.0)
    got = attend(*(t.to(dtype) for t in (q, keys, values)), write_at)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))


def test_long_prompts_delay_a_stream_by_a_chunk_a_step(engine, checks):
    found = checks.check_prefill_burst(engine, chunk=16, prompts=2, prompt_tokens=50)
    assert found["largest_step_work"] <= found["budget"] and found["steps_with_prompts"] >= 6


def test_a_burst_of_short_prompts_is_prefilled_in_one_pass(engine, checks):
    found = checks.check_prefill_packing(engine, prompts=8)
    assert found["operators_8_prompts"] < 2 * found["operators_one_prompt"]  # one at a time: 8x


def test_prompts_prefilled_together_give_their_tokens_alone(engine, checks):
    together = StaticBatcher(engine.model, engine.tokenizer, 5, compile=False)
    prompts = [checks.prompt(together, n, seed) for seed, n in enumerate((7, 20, 3, 12))]
    prompts.append(checks.prompt(together, 9, 9) + [33, 44, 55])  # tokens after <sop>: attended causally
    for key, ids in enumerate(prompts):
        together.add_prompt(key, ids, checks.GREEDY)
    first = together.step()
    assert len(first) == len(prompts)  # all five in the first step
    got = {event.key: [event.token_id] for event in first}
    while len(together):
        for event in together.step():
            got[event.key].append(event.token_id)
    alone = [checks.run(StaticBatcher(engine.model, engine.tokenizer, 1, compile=False), [ids])[0] for ids in prompts]
    assert [got[key] for key in range(len(prompts))] == alone
    assert got == checks.run(engine.batcher(5, static=False), prompts)


def test_a_prompt_cancelled_while_prefilled_with_others(engine, checks):
    """Prompts packed in one pass that spans two steps (a long prompt took most of the first); one of
    them is cancelled in between, so the last slot's prompt moves into its slot mid-pass."""
    def batcher():
        return StaticBatcher(engine.model, engine.tokenizer, 4, compile=False, prefill_chunk=16)
    prompts = [checks.prompt(batcher(), 24, 1)] + [checks.prompt(batcher(), 4, seed) for seed in (2, 3, 4)]
    alone = [checks.run(batcher(), [ids])[0] for ids in prompts]
    packed = batcher()
    for key, ids in enumerate(prompts):
        packed.add_prompt(key, ids, checks.GREEDY)
    while 0 not in packed.running:
        packed.step()
    job = packed.prefilling[1]
    assert [s.key for s in job.sequences] == [1, 2, 3] and packed.prefilling[3] is job
    # the step that finished the long prompt (its last 72 quarter token-layers) ran the first of 2 layers
    assert packed.stats.prefill_cost == 72 + 4 * 12 and job.next_piece is not None
    assert packed.cancel(1).finish_reason == "cancelled" and job.sequences[2].cache.slot == 1
    got = {0: [packed.running[0].generated[0]]}
    while len(packed):
        for event in packed.step():
            got.setdefault(event.key, []).append(event.token_id)
    assert got == {0: alone[0], 2: alone[2], 3: alone[3]}


def test_chunked_prefill_gives_the_tokens_of_a_whole_one(engine, checks):
    whole = StaticBatcher(engine.model, engine.tokenizer, 1, compile=False, prefill_chunk=512)
    chunked = StaticBatcher(engine.model, engine.tokenizer, 1, compile=False, prefill_chunk=7)
    prompts = [checks.prompt(whole, 40, 3)]
    assert checks.run(chunked, prompts) == checks.run(whole, prompts)


def test_a_sequence_draws_the_same_tokens_alone_or_batched(engine, checks):
    mine = SamplingParams(do_sample=True, seed=11, top_k=5, top_p=0.9, temperature=0.8, max_new_tokens=10)
    alone = StaticBatcher(engine.model, engine.tokenizer, 1, compile=False)
    ids = checks.prompt(alone, 12, 7)
    expected = checks.run(alone, [ids], mine)[0]
    batch = StaticBatcher(engine.model, engine.tokenizer, 4, compile=False)
    others = [(SamplingParams(do_sample=True, seed=1, top_k=0, top_p=1.0, max_new_tokens=6), 30),
              (SamplingParams(do_sample=False, max_new_tokens=3), 5),
              (SamplingParams(do_sample=True, seed=2, temperature=2.0, max_new_tokens=20), 70)]
    for key, (params, length) in enumerate(others, 1):
        batch.add_prompt(key, checks.prompt(batch, length, key), params)
    batch.step()
    batch.add_prompt(0, ids, mine)  # joins a running batch, in a slot that others leave and fill
    got = []
    while len(batch):
        got += [e.token_id for e in batch.step() if e.key == 0]
        if 1 in batch.running:
            batch.cancel(1)
    assert got == expected


def test_no_compilation_while_serving_any_top_k(engine, checks):
    """After warm_up, a batch mixing top_k 50, 100 and 0 (the whole vocabulary) and a greedy request, joining
    and leaving, compiles nothing; each request draws the tokens it draws alone."""
    params = [SamplingParams(do_sample=True, seed=seed, top_k=top_k, top_p=1.0, temperature=1.5, max_new_tokens=n)
              for seed, top_k, n in ((1, 50, 6), (2, 100, 9), (3, 0, 4), (4, 100, 5))]
    params.append(SamplingParams(do_sample=False, max_new_tokens=7))
    batcher = StaticBatcher(engine.model, engine.tokenizer, 3, compile=True, backend="eager", capacity=64)
    prompts = [checks.prompt(batcher, n, seed) for seed, n in enumerate((9, 14, 5, 20, 7))]
    batcher.warm_up()
    with torch.compiler.set_stance("fail_on_recompile"):
        batched = checks.run(batcher, prompts, params)
    alone = [checks.run(StaticBatcher(engine.model, engine.tokenizer, 1, compile=False, capacity=64), [ids], [p])[0]
             for ids, p in zip(prompts, params)]
    assert [batched[key] for key in range(len(prompts))] == alone


def test_a_reused_slot_forgets_its_former_occupant(engine, checks):
    batcher = StaticBatcher(engine.model, engine.tokenizer, 2, compile=False)
    ids = checks.prompt(batcher, 20, 5)
    expected = checks.run(batcher, [ids])[0]
    for layer in batcher.cache.layers:
        layer.fill_(math.nan)  # what a stale slot may hold
    assert checks.run(batcher, [ids])[0] == expected
    assert not batcher.occupants and not len(batcher)


def test_device_sampling():
    vocab = 50
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits[4, 3] = math.nan
    greedy = torch.tensor([True, False, False, False, False, True])
    rows = [greedy, torch.tensor([1.0] * 6), torch.tensor([vocab, 1, vocab, 2, vocab, vocab]),
            torch.tensor([math.inf] * 6), torch.arange(6), torch.zeros(6, dtype=torch.long)]
    tokens = sample_tokens(logits, *rows, vocab)
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax() and tokens[5] == logits[5].argmax()
    assert tokens[3] in logits[3].topk(2).indices and tokens[4] == INVALID_SCORE_TOKEN
    # draws follow the distribution: two equal logits, the rest impossible
    two = torch.full((1, vocab), -1e4)  # (an infinite logit would make the row invalid)
    two[0, [7, 9]] = 0.0
    seven = sum(int(sample_tokens(two, torch.tensor([False]), torch.tensor([1.0]), torch.tensor([vocab]),
                                  torch.tensor([math.inf]), torch.tensor([5]), torch.tensor([n]), 8)[0] == 7)
                for n in range(400))
    assert 150 < seven < 250
    numbers = uniform(torch.full((4096,), 2 ** 62 + 5), torch.arange(4096))
    assert 0.0 <= float(numbers.min()) and float(numbers.max()) < 1.0 and abs(float(numbers.mean()) - 0.5) < 0.02


def test_warm_up_runs_every_bucket_writing_only_the_scratch_column(engine):
    batcher = engine.batcher(2, static=True, compile=False)
    assert batcher.warm_up() >= 0.0
    assert batcher.stats.graphs == {1, 2}
    assert all(int(layer[..., :batcher.cache.capacity, :].count_nonzero()) == 0 for layer in batcher.cache.layers)


def test_kv_budget_sizes_the_static_cache(engine):
    batcher = engine.batcher(8, 600, static=True, compile=False)  # 2 sequences of the 256-token window
    assert (batcher.cache.slots, batcher.cache.capacity, batcher.max_batch) == (2, 256, 2)
    small = engine.batcher(8, 100, static=True, compile=False)  # one slot of 100 tokens
    assert (small.cache.slots, small.cache.capacity) == (1, 100)
    from glmpool.engine import PromptTooLongError
    with pytest.raises(PromptTooLongError):
        small.add_prompt(0, list(range(10, 60)), SamplingParams(max_length=200))


def test_a_torch_without_the_block_masks_decodes_step_by_step(engine, monkeypatch, caplog):
    """A GPU worker on an older torch (FlexAttention's block lists without seq_lengths / compute_q_blocks)
    still serves, eagerly, and says why."""
    from torch.nn.attention.flex_attention import BlockMask
    from glmpool.engine.generate import Batcher
    assert isinstance(engine.batcher(2, static=True, compile=False), StaticBatcher)
    monkeypatch.setattr(BlockMask, "from_kv_blocks", classmethod(lambda cls, kv_num_blocks, kv_indices: None))
    batcher = engine.batcher(2, static=True, compile=False)
    assert type(batcher) is Batcher
    assert "compute_q_blocks" in caplog.text
