"""Random-weight ChatGLM-6B checkpoints in THUDM's exact on-disk layout, for tests and smoke runs.

The tokenizer is a SentencePiece model trained on the spot on generated Chinese and English text,
re-laid out like the real `ice_text.model`: `<unk> <s> </s> <pad>` at 0-3, `<n>` at 4, `▁` at 5, the
text pieces, then the special block `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`,
then `<|tab|>`, `<|blank_2|>`..`<|blank_80|>` and the 256 byte pieces. A vocabulary larger than the
trained pieces is padded with UNUSED pieces (never produced by encoding), so even the real
130528-entry shape can be built. Weights are deterministic in the seed and scaled so the output is
peaked and depends on the prompt (default initialisation makes a model that repeats two tokens).
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .tokenizer import MAX_BLANK_LENGTH, TAB_TOKEN, blank_token

log = logging.getLogger(__name__)

SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
FIXED_PIECES = 6 + len(SPECIAL_PIECES) + 1 + (MAX_BLANK_LENGTH - 1) + 256
TINY_VERSION = 3

_HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"
          "里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老"
          "从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给"
          "等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先"
          "山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何"
          "更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南"
          "度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传"
          "近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极"
          "令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似"
          "斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段"
          "终乐切级克精哪官示冷域读橘吗啊吧")
_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by"
          " word but not what all were we when your can said there use an each which she do how their if will up"
          " other about out many then them these so some her would make like him into time has look two more write"
          " go see number no way could people my than first water been call who oil its now find long down day did"
          " get come made may part model server request answer question hello world python torch chat glm pool").split()


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            if rng.random() < 0.55:
                parts.append("".join(rng.choice(_HANZI) for _ in range(rng.randint(1, 6))) + rng.choice("，。？！、：；"))
            else:
                parts.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5))) + rng.choice(",.?!:; "))
        if rng.random() < 0.2:
            parts.append("<n>" + str(rng.randint(0, 99999)))
        out.append("".join(parts))
    return out


# --- minimal protocol-buffer wire format, enough to re-lay out SentencePiece's ModelProto pieces ---

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, raw value bytes or int, encoded field bytes) of one message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value, data[start:pos]


def _piece_message(piece: str, score: float, kind: int) -> bytes:
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _parse_piece(message: bytes) -> tuple[str, float, int]:
    piece, score, kind = "", 0.0, NORMAL
    for number, _, value, _ in _fields(message):
        if number == 1:
            piece = value.decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            kind = value
    return piece, score, kind


def train_ice_text_model(vocab_size: int, seed: int = 0) -> bytes:
    """A SentencePiece model with ChatGLM's piece layout and `vocab_size` pieces in all."""
    import sentencepiece

    text_pieces = vocab_size - FIXED_PIECES
    if text_pieces < 32:
        raise ValueError(f"vocab must be at least {FIXED_PIECES + 32} (the special and byte pieces take {FIXED_PIECES})")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)), model_writer=buffer, model_type="unigram",
        vocab_size=min(text_pieces, 1500) + 4 + 1 + 256, hard_vocab_limit=False, byte_fallback=True,
        user_defined_symbols=["<n>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=0.9999,
        num_threads=1, seed_sentencepiece_size=100000, minloglevel=2)
    trained, rest = [], []
    for number, _, value, encoded in _fields(buffer.getvalue()):
        if number == 1:
            trained.append(_parse_piece(value))
        else:
            rest.append(encoded)
    normal = [(p, s) for p, s, kind in trained if kind == NORMAL and p != "\u2581"]
    space_score = next((s for p, s, kind in trained if p == "\u2581"), min(s for _, s in normal) - 1.0)
    normal = normal[:text_pieces]
    padding = [(f"<unused_text_{i}>", 0.0, UNUSED) for i in range(text_pieces - len(normal))]
    pieces = ([("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL), ("<pad>", 0.0, CONTROL),
               ("<n>", 0.0, USER_DEFINED), ("\u2581", space_score, NORMAL)]
              + [(p, s, NORMAL) for p, s in normal] + padding
              + [(p, 0.0, CONTROL) for p in SPECIAL_PIECES]
              + [(TAB_TOKEN, 0.0, USER_DEFINED)]
              + [(blank_token(n), 0.0, USER_DEFINED) for n in range(2, MAX_BLANK_LENGTH + 1)]
              + [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)])
    assert len(pieces) == vocab_size
    return b"".join(_piece_message(*p) for p in pieces) + b"".join(rest)


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """THUDM-named fp32 tensors; scales chosen so that greedy output is stable and prompt-dependent.

    The layer outputs must be large: the reference adds them to the normalised input scaled by
    sqrt(2 * 28) whatever the depth, which would otherwise drown them and repeat one token forever.
    """
    g = torch.Generator().manual_seed(seed)
    H, inner = config.hidden_size, config.inner_hidden_size

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"transformer.word_embeddings.weight": normal(config.vocab_size, H, std=4.0 / H ** 0.5)}
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": normal(H, std=0.5, mean=1.0),
            p + "input_layernorm.bias": normal(H, std=0.2),
            p + "attention.query_key_value.weight": normal(3 * H, H, std=4.0 / H ** 0.5),
            p + "attention.query_key_value.bias": normal(3 * H, std=0.2),
            p + "attention.dense.weight": normal(H, H, std=8.0 / H ** 0.5),
            p + "attention.dense.bias": normal(H, std=0.1),
            p + "post_attention_layernorm.weight": normal(H, std=0.5, mean=1.0),
            p + "post_attention_layernorm.bias": normal(H, std=0.2),
            p + "mlp.dense_h_to_4h.weight": normal(inner, H, std=3.0 / H ** 0.5),
            p + "mlp.dense_h_to_4h.bias": normal(inner, std=0.1),
            p + "mlp.dense_4h_to_h.weight": normal(H, inner, std=8.0 / inner ** 0.5),
            p + "mlp.dense_4h_to_h.bias": normal(H, std=0.1),
        })
        rotary_dim = config.head_dim // 2
        sd[p + "attention.rotary_emb.inv_freq"] = (
            1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).half()
    sd["transformer.final_layernorm.weight"] = normal(H, std=0.5, mean=1.0)
    sd["transformer.final_layernorm.bias"] = normal(H, std=0.2)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"]
    return sd


def save_state_dict(sd: dict[str, torch.Tensor], out: Path, shards: int, safetensors: bool) -> None:
    names = list(sd)
    per_shard = -(-len(names) // shards)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map, total = {}, 0
    for index, group in enumerate(groups, 1):
        filename = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{index:05d}-of-{len(groups):05d}.{ext}"
        # Each tensor its own storage: torch.save would otherwise write tied tensors once for the shard.
        part = {name: sd[name].clone().contiguous() for name in group}
        if safetensors:
            from safetensors.torch import save_file
            save_file(part, str(out / filename), metadata={"format": "pt"})
        else:
            torch.save(part, out / filename)
        weight_map.update({name: filename for name in group})
        total += sum(t.numel() * t.element_size() for t in part.values())
    if len(groups) > 1:
        index_name = f"{stem}.{ext}.index.json"
        (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))


def write_tiny_checkpoint(path: str | Path, layers: int = 2, hidden: int = 64, heads: int = 4,
                          inner: int | None = None, vocab: int = 1024, seed: int = 0, safetensors: bool = False,
                          quantize: int | str | None = None, max_sequence_length: int = 2048, shards: int = 1,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Write a deterministic random-weight checkpoint in THUDM's layout into `path`; return it.

    quantize: 4, 8, "4-qe" or "8-qe" writes it pre-quantized, as THUDM's -int4 / -int4-qe checkpoints.
    Written beside `path` first and moved into it when whole: a failure leaves no partial checkpoint.
    """
    from .linear.thudm import parse_quantize
    bits, embeddings = parse_quantize(quantize)
    if hidden % (heads * 4):
        raise ValueError("hidden must be a multiple of 4 * heads (2D rotary halves of each head)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_checkpoint(staging, layers, hidden, heads, inner, vocab, seed, safetensors, bits, embeddings,
                          max_sequence_length, shards, dtype)
        out.mkdir(exist_ok=True)
        for file in staging.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_checkpoint(out: Path, layers: int, hidden: int, heads: int, inner: int | None, vocab: int, seed: int,
                      safetensors: bool, bits: int | None, embeddings: bool, max_sequence_length: int, shards: int,
                      dtype: torch.dtype) -> None:
    model_file = train_ice_text_model(vocab, seed)
    (out / "ice_text.model").write_bytes(model_file)
    base = vocab - FIXED_PIECES + 6  # id of [MASK]
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                         inner_hidden_size=inner or 4 * hidden, max_sequence_length=max_sequence_length,
                         mask_token_id=base, gmask_token_id=base + 1, bos_token_id=base + 4, eos_token_id=base + 5,
                         pad_token_id=3, quantization_bit=bits or 0,
                         quantization_embeddings=embeddings, torch_dtype=str(dtype).removeprefix("torch."))
    raw_config = config.to_dict()
    sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("inv_freq") else v
          for k, v in random_state_dict(config, seed).items()}
    if bits:
        from .linear.thudm import quantize_state_dict
        sd = quantize_state_dict(sd, bits, embeddings)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "glmpool/tiny-random", "remove_space": False, "do_lower_case": False,
        "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "mask_token": "[MASK]",
        "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>", "num_image_tokens": 0,
        "tokenizer_class": "ChatGLMTokenizer"}, indent=2) + "\n")
    save_state_dict(sd, out, shards, safetensors)


def cached_tiny_checkpoint(cache_dir: Path) -> Path:
    """The `tiny-random` model, built once into the cache (atomically, so parallel workers agree)."""
    target = cache_dir / f"tiny-random-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=cache_dir))
    try:
        write_tiny_checkpoint(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the tiny-random checkpoint in %s", target)
    return target
