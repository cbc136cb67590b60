"""Compare with chatglm.cpp (C++/ggml) on the same checkpoint: convert, then time its decoding.

chatglm.cpp is never a glmpool dependency: install it in a separate venv, e.g.

    python -m venv /tmp/cppvenv && CMAKE_POLICY_VERSION_MINIMUM=3.5 /tmp/cppvenv/bin/pip install chatglm-cpp

Its own converter loads the model through transformers with THUDM's modeling code (trust_remote_code),
which our random checkpoints do not ship; this script writes its GGML file directly instead (ChatGLM-1
layout: magic, model type 1, config v2, the SentencePiece model, then the tensors with ggml's
f32 / f16 / q8_0 / q4_0 block encodings), from the project's environment:

    python bench/vs_chatglm_cpp.py convert CHECKPOINT_DIR OUT.bin --type q4_0
    /tmp/cppvenv/bin/python bench/vs_chatglm_cpp.py run OUT.bin [--prompt-tokens 32 --tokens 32]

`run` prints one JSON line: prompt ms and greedy decode tokens/s (stop token ignored).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
MEM_ALIGN = 16
BLOCK = 32  # values per q8_0 / q4_0 block


def _encode(tensor, kind: str) -> bytes:
    import torch

    tensor = tensor.float()
    if kind == "f32":
        return tensor.contiguous().numpy().tobytes()
    if kind == "f16":
        return tensor.half().contiguous().numpy().tobytes()
    blocks = tensor.reshape(-1, BLOCK)  # [blocks, 32] along each row
    if kind == "q8_0":  # fp16 d = absmax / 127, then 32 int8 round(x / d)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(blocks / d.clamp_min(1e-30)).clamp(-128, 127).to(torch.int8)
        return torch.cat((d.half().view(torch.int8), q), dim=1).numpy().tobytes()
    if kind == "q4_0":  # fp16 d = (value of largest magnitude) / -8; nibbles round(x / d) + 8, i and i+16 share a byte
        index = blocks.abs().argmax(dim=1, keepdim=True)
        d = torch.gather(blocks, 1, index) / -8
        q = (torch.round(blocks / d.masked_fill(d == 0, 1e-30)) + 8).clamp(0, 15).to(torch.uint8)
        packed = (q[:, :16] | (q[:, 16:] << 4)).view(torch.int8)
        return torch.cat((d.half().view(torch.int8), packed), dim=1).numpy().tobytes()
    raise ValueError(kind)


def convert(checkpoint: Path, out: Path, kind: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from glmpool.engine import checkpoint as ckpt
    from glmpool.engine.linear.thudm import dequantize_weight

    config = ckpt.read_config(checkpoint)
    sd = {}
    for name, tensor, _ in ckpt.iter_tensors(checkpoint, progress=False):
        sd[name] = tensor.clone()
    if config.quantization_bit:  # stored quantized: back to float first
        for name in [n for n in sd if n.endswith(".weight_scale")]:
            weight = name[:-len("_scale")]
            sd[weight] = dequantize_weight(sd[weight], sd.pop(name), config.quantization_bit)
    if config.inner_hidden_size != 4 * config.hidden_size:
        raise SystemExit("chatglm.cpp needs inner_hidden_size == 4 * hidden_size")
    matrix = kind
    names = [("transformer.word_embeddings.weight", matrix)]
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}."
        names += [(p + "input_layernorm.weight", "f32"), (p + "input_layernorm.bias", "f32"),
                  (p + "attention.query_key_value.weight", matrix), (p + "attention.query_key_value.bias", "f32"),
                  (p + "attention.dense.weight", matrix), (p + "attention.dense.bias", "f32"),
                  (p + "post_attention_layernorm.weight", "f32"), (p + "post_attention_layernorm.bias", "f32"),
                  (p + "mlp.dense_h_to_4h.weight", matrix), (p + "mlp.dense_h_to_4h.bias", "f32"),
                  (p + "mlp.dense_4h_to_h.weight", matrix), (p + "mlp.dense_4h_to_h.bias", "f32")]
    names += [("transformer.final_layernorm.weight", "f32"), ("transformer.final_layernorm.bias", "f32")]
    proto = (checkpoint / "ice_text.model").read_bytes()
    with open(out, "wb") as f:
        f.write(b"ggml")
        f.write(struct.pack("i", 1))  # model type: ChatGLM (the first)
        f.write(struct.pack("iiiiiiiififiii", 2, GGML_TYPES[kind], config.vocab_size, config.hidden_size,
                            config.num_attention_heads, config.num_attention_heads, config.num_layers,
                            config.inner_hidden_size, config.layernorm_epsilon, 0, 10000.0,
                            config.max_sequence_length, config.eos_token_id, config.pad_token_id))
        f.write(struct.pack("i", len(proto)))
        f.write(proto)
        for name, tensor_kind in names:
            tensor = sd[name]
            encoded = name.encode()
            f.write(struct.pack("i", len(encoded)) + encoded)
            f.write(struct.pack("i" * (2 + tensor.dim()), tensor.dim(), *tensor.shape, GGML_TYPES[tensor_kind]))
            f.seek((f.tell() + MEM_ALIGN - 1) // MEM_ALIGN * MEM_ALIGN)
            f.write(_encode(tensor, tensor_kind))
            del tensor
        del sd
    _ = torch  # imported for _encode


def run(model_file: Path, prompt_tokens: int, tokens: int, threads: int | None) -> dict:
    import random

    import chatglm_cpp

    pipeline = chatglm_cpp.Pipeline(str(model_file))
    config = pipeline.model.config
    rng = random.Random(0)
    ids = [rng.randrange(6, 1000) for _ in range(prompt_tokens - 2)]
    ids += pipeline.tokenizer.encode("", 8)[-2:]  # its [gMASK] <sop> suffix
    gen = chatglm_cpp._C.GenerationConfig(max_length=prompt_tokens + tokens + 8, max_new_tokens=tokens + 4,
                                          do_sample=False, top_k=1)
    n_ctx = len(ids)
    start = time.perf_counter()
    token = pipeline.model.generate_next_token(ids, None, gen, 0, n_ctx)
    prompt_s = time.perf_counter() - start
    ids.append(token)
    start = time.perf_counter()
    for _ in range(tokens):
        n_past = len(ids) - 1
        ids.append(pipeline.model.generate_next_token(ids, None, gen, n_past, n_ctx))
    decode_s = time.perf_counter() - start
    return {"file": str(model_file), "prompt_ms": prompt_s * 1e3, "tokens_per_s": tokens / decode_s,
            "eos": config.eos_token_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--type", choices=sorted(GGML_TYPES), default="q4_0")
    r = sub.add_parser("run")
    r.add_argument("model_file", type=Path)
    r.add_argument("--prompt-tokens", type=int, default=32)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.command == "convert":
        convert(args.checkpoint, args.out, args.type)
    else:
        print(json.dumps(run(args.model_file, args.prompt_tokens, args.tokens, args.threads)))


if __name__ == "__main__":
    main()
