import json
import subprocess
import sys

import pytest
import torch

from glmpool.engine import CheckpointError, ModelNotFoundError, PromptTooLongError, load
from glmpool.engine.model import prefix_attention_mask, prompt_positions
from glmpool.engine.tiny import write_tiny_checkpoint


def prompt_logits(engine, ids):
    """Logits after a whole sequence in one pass (no cache reuse)."""
    tok = engine.tokenizer
    position, block, context_length, _ = prompt_positions(ids, tok.bos_id, tok.mask_id, tok.gmask_id)
    with torch.inference_mode():
        return engine.model(torch.tensor([ids]), torch.tensor([[position, block]]),
                            [engine.model.new_cache(len(ids))], prefix_attention_mask(len(ids), context_length))[0]


def test_positions_as_thudm_builds_them():
    # ids: text 10 11, [gMASK]=2, <sop>=4, then two generated tokens
    position, block, context, mask = prompt_positions([10, 11, 2, 4, 7, 8], bos_id=4, mask_id=1, gmask_id=2)
    assert (context, mask) == (3, 2)
    assert position == [0, 1, 2, 2, 2, 2]
    assert block == [0, 0, 0, 1, 2, 3]
    # a literal [MASK] in the text does not move the mask position off the appended [gMASK]...
    position, _, _, mask = prompt_positions([10, 1, 11, 2, 4], bos_id=4, mask_id=1, gmask_id=2)
    assert mask == 3 and position[-1] == 3
    # ...and the first <sop>, even a literal one in the text, ends the context
    position, block, context, mask = prompt_positions([4, 10, 2, 4], bos_id=4, mask_id=1, gmask_id=2)
    assert (context, mask, position, block) == (0, 2, [2, 2, 2, 2], [1, 2, 3, 4])


@pytest.mark.parametrize("position_encoding_2d", [True, False])
def test_rotation_is_the_references_rotate_half_bit_for_bit(position_encoding_2d):
    """rotate() does all rotary parts of q and k in one pass with a pre-signed sin table; the reference
    rotates each part apart as x * cos + cat(-x2, x1) * sin. Same bits, with 2D positions and without."""
    import torch.nn.functional as F
    from glmpool.engine.config import ModelConfig
    from glmpool.engine.model import rotary_tables, rotate

    config = ModelConfig(vocab_size=100, hidden_size=64, num_layers=1, num_attention_heads=2, inner_hidden_size=256,
                         position_encoding_2d=position_encoding_2d)
    parts, d = (2 if position_encoding_2d else 1), config.head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, d, generator=g)  # [B, T, n, d]
    positions = torch.randint(0, 60, (3, parts, 5), generator=g)  # [B, parts, T]
    cos_table, signed_sin_table = rotary_tables(config, 60, torch.float32, "cpu")
    cos, sin = (F.embedding(positions, t).transpose(1, 2).reshape(3, 5, 1, -1) for t in (cos_table, signed_sin_table))

    rotary = d // parts
    sin_table = signed_sin_table.clone()
    sin_table[:, :rotary // 2].neg_()  # the plain sin
    expected = []
    for part in range(parts):
        xp = x[..., part * rotary:(part + 1) * rotary]
        c, s = (F.embedding(positions[:, part], t).unsqueeze(2) for t in (cos_table, sin_table))  # [B, T, 1, r]
        half = rotary // 2
        expected.append(xp * c + torch.cat((-xp[..., half:], xp[..., :half]), dim=-1) * s)
    assert torch.equal(rotate(x, cos, sin, parts), torch.cat(expected, dim=-1))


def test_prefix_mask():
    mask = prefix_attention_mask(4, 3)
    assert mask.tolist() == [[False, False, False, True]] * 3 + [[False] * 4]
    assert prefix_attention_mask(2, 2) is None


@pytest.mark.parametrize("layout", [dict(shards=3), dict(safetensors=True), dict(safetensors=True, shards=2)])
def test_every_layout_loads_to_identical_logits(tiny_dir, tiny_engine, tmp_path, layout):
    other = load(write_tiny_checkpoint(tmp_path / "ckpt", seed=1, **layout), progress=False)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert any(f.endswith("index.json") for f in files) == (layout.get("shards", 1) > 1)
    ids = tiny_engine.tokenizer.encode_prompt("橘子 and apples")
    assert torch.equal(prompt_logits(tiny_engine, ids), prompt_logits(other, ids))


def test_a_tiny_checkpoint_that_fails_to_write_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """As without numpy, which safetensors needs: exit 2 with the error, no half-written directory."""
    from glmpool.cli import main
    from glmpool.engine import tiny

    def fail(*args):
        raise ImportError("No module named 'numpy'")

    monkeypatch.setattr(tiny, "save_state_dict", fail)
    assert main(["tiny-model", str(tmp_path / "ckpt"), "--safetensors"]) == 2
    assert "numpy" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["tiny-model", str(tmp_path / "ckpt")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "pytorch_model.bin").is_file()


def test_tied_output_projection_kept_once(tiny_engine):
    names = [n for n, _ in tiny_engine.model.named_parameters()]
    assert "word_embeddings.weight" in names and not any("lm_head" in n for n in names)


def test_lm_head_only_checkpoint_loads(tiny_dir, tiny_engine, tmp_path):
    sd = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    del sd["transformer.word_embeddings.weight"]
    for f in ("config.json", "tokenizer_config.json", "ice_text.model"):
        (tmp_path / f).write_bytes((tiny_dir / f).read_bytes())
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ids = tiny_engine.tokenizer.encode_prompt("hello")
    assert torch.equal(prompt_logits(load(tmp_path, progress=False), ids), prompt_logits(tiny_engine, ids))


def test_kv_cache_decode_equals_full_recompute(tiny_engine):
    tok = tiny_engine.tokenizer
    prompt = tok.build_prompt("我喜欢吃橘子，你呢？", [("你好", "你好！")])
    batch = tiny_engine.batcher(max_batch=1)
    batch.add_prompt("s", prompt, __import__("glmpool.engine", fromlist=["SamplingParams"]).SamplingParams(
        do_sample=False, max_new_tokens=12))
    generated = []
    while len(batch):
        generated += [e.token_id for e in batch.step()]
    assert len(generated) == 12 or generated[-1] == tiny_engine.config.eos_token_id
    # the greedy token at every step equals the argmax of a full recompute of everything before it
    for n in range(len(generated)):
        logits = prompt_logits(tiny_engine, prompt + generated[:n])
        assert int(logits.argmax()) == generated[n]
    # and the logits themselves agree closely
    cache = tiny_engine.model.new_cache(8)
    full = prompt + generated
    tok_ = tiny_engine.tokenizer
    position, block, context_length, _ = prompt_positions(full, tok_.bos_id, tok_.mask_id, tok_.gmask_id)
    with torch.inference_mode():
        tiny_engine.model(torch.tensor([prompt]), torch.tensor([[position[:len(prompt)], block[:len(prompt)]]]),
                          [cache], prefix_attention_mask(len(prompt), context_length))
        for i in range(len(prompt), len(full)):
            step = tiny_engine.model(torch.tensor([[full[i]]]), torch.tensor([[[position[i]], [block[i]]]]), [cache])
    torch.testing.assert_close(step[0], prompt_logits(tiny_engine, full), rtol=1e-4, atol=1e-4)


def test_chat_and_stream_chat_agree(tiny_engine):
    history = [("你好", "你好，我是助手")]
    response, new_history = tiny_engine.chat("你喜欢橘子吗？", history, max_length=60, do_sample=False)
    partials = list(tiny_engine.stream_chat("你喜欢橘子吗？", history, max_length=60, do_sample=False))
    assert partials[-1][0] == response
    assert new_history == history + [("你喜欢橘子吗？", response)]
    assert partials[-1][1] == new_history
    assert all(response.startswith(p[0][:len(p[0]) // 2]) for p in partials)  # growing, not jumping


def test_answers_depend_on_the_prompt(tiny_engine):
    answers = {tiny_engine.chat(q, max_length=40, do_sample=False)[0] for q in ("你好", "hello", "橘子", "what?")}
    assert len(answers) == 4


def test_sampling_is_seeded(tiny_engine):
    a = tiny_engine.chat("hello", max_length=40, seed=7)[0]
    b = tiny_engine.chat("hello", max_length=40, seed=7)[0]
    c = [tiny_engine.chat("hello", max_length=40, seed=s)[0] for s in (1, 2, 3)]
    assert a == b and len(set(c + [a])) > 1


def test_too_long_prompt_is_a_clear_error(tiny_engine):
    with pytest.raises(PromptTooLongError, match="model window"):
        tiny_engine.chat("橘子" * 3000)
    with pytest.raises(PromptTooLongError, match="no room"):
        tiny_engine.chat("one two three four five", max_length=3)


def test_missing_and_misshaped_tensors_are_named(tiny_dir, tmp_path):
    sd = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    del sd["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    sd["transformer.layers.0.attention.dense.weight"] = torch.zeros(3, 3)
    for f in ("config.json", "tokenizer_config.json", "ice_text.model"):
        (tmp_path / f).write_bytes((tiny_dir / f).read_bytes())
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        load(tmp_path, progress=False)
    message = str(error.value)
    assert "transformer.layers.1.mlp.dense_4h_to_h.bias" in message
    assert "transformer.layers.0.attention.dense.weight (3, 3)" in message and "\n" not in message


def test_offline_hub_id_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as error:
        load("THUDM/chatglm-6b", cache_dir=tmp_path)
    assert "local checkpoint directory" in str(error.value) and "\n" not in str(error.value)


def test_model_directory_code_is_never_imported(tiny_dir, tmp_path):
    marker = tmp_path / "imported"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_dir.iterdir():
        (ckpt / f.name).symlink_to(f)
    for name in ("modeling_chatglm", "configuration_chatglm", "tokenization_chatglm", "quantization", "__init__"):
        (ckpt / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps(config))
    code = (f"import sys; from glmpool.engine import load; e = load({str(ckpt)!r}, progress=False); "
            f"e.chat('hi', max_length=20); "
            f"assert not any('chatglm' in m or m == 'quantization' for m in sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)
    assert not marker.exists()


PEAK_SCRIPT = """
import sys, torch
from glmpool.engine import load

def status(key):  # kB lines of /proc/self/status; VmHWM (unlike ru_maxrss) is not inherited over exec
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

from glmpool.engine.linear import fp16
fp16.PACK_SLICE_BYTES = 4 << 20  # scaled to this model's size as the default is to ChatGLM-6B's
torch.ones(1)  # settle the allocator before the baseline
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark from here
before = status("VmRSS")
engine = load(sys.argv[1], progress=False, matmul=sys.argv[2] if len(sys.argv) > 2 else "reference")
print(before, status("VmHWM"), status("VmRSS"))
"""


def usable_matmuls() -> list[str]:
    import torch
    from glmpool.engine.linear import base, registry
    cpu = torch.device("cpu")
    return [m for m in registry.MATMULS if base.method_class(m).usable(cpu, torch.float32)]


@pytest.mark.parametrize("matmul", usable_matmuls())
def test_peak_load_memory_stays_near_the_loaded_model(tmp_path_factory, matmul):
    """Packing works one matrix at a time from the checkpoint's tensors, so no method's load holds much more
    than what the loaded model then holds: the budget is the load's peak RSS (the kernel's high-water mark)
    against its RSS once loaded. An fp32 copy of the output projection made to pack it, for one, is 70%."""
    ckpt = tmp_path_factory.getbasetemp() / "peak-ckpt"
    if not ckpt.exists():  # the weights (fp16 on disk in 3 shards) big enough to dwarf allocator noise
        write_tiny_checkpoint(ckpt, layers=4, hidden=1024, heads=16, vocab=60000, shards=3)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt), matmul], capture_output=True, text=True,
                         timeout=300, check=True)
    before, peak, after = map(int, out.stdout.split())
    assert after - before > 300e6
    assert peak - before <= 1.1 * (after - before), f"peak {(peak - before) / (after - before):.2f}x the loaded model"


def test_quantizing_at_load_never_holds_the_model_in_fp32(tiny_dir, tiny_engine, monkeypatch):
    """An fp16 checkpoint quantized at load keeps its matrices in fp16 until each is quantized, so the load
    needs about the checkpoint's size, not twice as much (widened to fp32 first). Seen through the memory
    check, which counts what load() allocates: with room for 3/4 of the fp32 model, an fp32 load is refused
    and a quantizing one is not."""
    from glmpool.engine import EngineError, api

    fp32_bytes = sum(t.numel() * 4 for t in tiny_engine.model.parameters())
    monkeypatch.setattr(api, "free_memory", lambda device: fp32_bytes * 3 // 4)
    with pytest.raises(EngineError, match="needs"):
        load(tiny_dir, progress=False)
    load(tiny_dir, progress=False, quantize=8)
    load(tiny_dir, progress=False, quantize="4-qe")


def test_cgroup_room_reads_v2_and_v1_limits(tmp_path):
    from glmpool.engine.api import cgroup_room

    proc = tmp_path / "cgroup"
    v2 = tmp_path / "sys" / "system.slice" / "glmpool.service"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("8589934592\n")  # MemoryMax=8G
    (v2 / "memory.stat").write_text("anon 1073741824\nfile 5368709120\n")  # page cache does not count
    proc.write_text("0::/system.slice/glmpool.service\n")
    assert cgroup_room(proc, tmp_path / "sys") == 7 << 30
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_room(proc, tmp_path / "sys") is None

    v1 = tmp_path / "sys" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory.stat").write_text("cache 100\ntotal_rss 1073741824\n")
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_room(proc, tmp_path / "sys") == 3 << 30
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert cgroup_room(proc, tmp_path / "sys") is None
    assert cgroup_room(tmp_path / "missing", tmp_path / "sys") is None


def test_a_model_that_cannot_fit_is_refused_before_loading(tiny_dir, monkeypatch):
    from glmpool.engine import EngineError, api

    monkeypatch.setattr(api, "free_memory", lambda device: 0)  # the tiny model is smaller than 1 MiB
    with pytest.raises(EngineError, match=r"needs \d+\.\d GiB and the host has 0\.0 GiB free.*load it quantized"):
        load(tiny_dir, progress=False)
    with pytest.raises(EngineError, match="quantizing at load time.*stored quantized"):
        load(tiny_dir, progress=False, quantize=4)
