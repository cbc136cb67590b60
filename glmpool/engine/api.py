"""The engine's front door: `load()` a checkpoint, then `chat`, `stream_chat` or a continuous `batcher`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch

from . import checkpoint, fbgemm, onednn
from .config import ModelConfig
from .errors import CheckpointError, EngineError
from .generate import Batcher, SamplingParams
from .model import ChatGLM
from .tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device} requested but CUDA is not available here "
                          f"(no GPU, no driver, or a CPU-only torch build)")
    return device


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise EngineError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16") from None


class Engine:
    def __init__(self, model: ChatGLM, tokenizer: ChatGLMTokenizer, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return c.num_layers * 2 * c.hidden_size * torch.tensor([], dtype=self.model.dtype).element_size()

    def default_kv_tokens(self, fraction: float = 0.8) -> int:
        """How many KV-cache tokens fit in what the device has free now (a fraction of it)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            import psutil
            free = psutil.virtual_memory().available
        return max(1, int(free * fraction) // self.kv_bytes_per_token())

    def batcher(self, max_batch: int = 16, max_kv_tokens: int | None = None) -> Batcher:
        return Batcher(self.model, self.tokenizer, max_batch, max_kv_tokens)

    def stream_chat(self, query: str, history: list | None = None, max_length: int = 2048,
                    do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
                    **params) -> Iterator[tuple[str, list]]:
        """Yield (answer so far, history including this turn) after every generated token."""
        history = list(history or [])
        sampling = SamplingParams(do_sample=do_sample, top_p=top_p, temperature=temperature,
                                  max_length=max_length, **params)
        batch = Batcher(self.model, self.tokenizer, max_batch=1)
        batch.add("chat", query, history, sampling)
        while len(batch):
            for event in batch.step():
                yield event.text, history + [(query, event.text)]

    def chat(self, query: str, history: list | None = None, max_length: int = 2048, do_sample: bool = True,
             top_p: float = 0.7, temperature: float = 0.95, **params) -> tuple[str, list]:
        response, new_history = "", list(history or []) + [(query, "")]
        for response, new_history in self.stream_chat(query, history, max_length, do_sample, top_p,
                                                      temperature, **params):
            pass
        return response, new_history


MATMULS = ("reference", "onednn", "fbgemm-fp16")


def load(model: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         cache_dir: str | Path = ".cache", quantize: int | str | None = None, progress: bool = True,
         matmul: str = "reference") -> Engine:
    """Load a ChatGLM-6B checkpoint (directory, hub id, or "tiny-random") into an Engine.

    quantize: 4, 8, "4-qe", "8-qe" (see quantize.parse_quantize), or None to run the checkpoint as stored.
    A pre-quantized checkpoint keeps its bits; "-qe" on one stored without quantized embeddings
    quantizes them at load.
    matmul (fp32 on the CPU; elsewhere it changes nothing): "reference" multiplies a single sequence with
    F.linear exactly as THUDM's code does, so greedy output is bit-identical to theirs; "onednn" packs the
    weights for oneDNN (see onednn.py): faster, and a sequence's numbers do not depend on what it is
    batched with, but they are rounded differently from the reference's; "fbgemm-fp16" keeps the weights
    in fp16 (exact for THUDM's fp16 checkpoints) and does fp32 arithmetic (see fbgemm.py): half the memory,
    faster still, batch-invariant too.
    """
    if matmul not in MATMULS:
        raise EngineError(f"unknown matmul {matmul!r}: use one of {', '.join(MATMULS)}")
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    from .quantize import parse_quantize, prepare, quantize_model
    bits, embeddings = parse_quantize(quantize)
    model_dir = checkpoint.resolve(str(model), cache_dir)
    config = checkpoint.read_config(model_dir)
    if not (model_dir / "ice_text.model").is_file():
        raise CheckpointError(f"{model_dir}: no ice_text.model (the tokenizer)")
    tokenizer = ChatGLMTokenizer.from_dir(model_dir)
    stored_bits = config.quantization_bit or None
    stored_embeddings = bool(stored_bits and config.quantization_embeddings)
    if stored_bits and bits and bits != stored_bits:
        raise EngineError(f"{model_dir} is stored quantized to {stored_bits} bits; it cannot be loaded as {bits}-bit")
    bits = bits or stored_bits
    quantize_layers = bool(bits and not stored_bits)
    quantize_embeddings = embeddings and not stored_embeddings
    if str(model) == "tiny-random":
        log.warning("model tiny-random has random weights: its answers are noise (for tests and smoke runs)")

    # Quantizing at load time works on the host, one matrix at a time, so a GPU never holds the fp copy.
    load_device = torch.device("cpu") if quantize_layers or quantize_embeddings else device
    half_weights = matmul == "fbgemm-fp16" and fbgemm.usable(device, dtype)
    if matmul == "fbgemm-fp16" and not half_weights and device.type == "cpu" and dtype == torch.float32:
        log.warning("matmul fbgemm-fp16: this torch has no FBGEMM (not an x86 build?); using onednn")
        matmul = "onednn"
    with torch.device("meta"):
        net = ChatGLM(config)
    # fp16 weights from an fp16 checkpoint: read them as fp16, never holding an fp32 copy of the model.
    net = net.to(torch.float16 if half_weights and not bits else dtype)
    if stored_bits:
        quantize_model(net, stored_bits, embeddings=stored_embeddings, empty=True)
    net = net.to_empty(device=load_device)
    net._rotary = None
    checkpoint.load_weights(net, model_dir, progress)
    if quantize_layers or quantize_embeddings:
        quantize_model(net, bits, layers=quantize_layers, embeddings=quantize_embeddings)
        net = net.to(device)
    prepare(net)
    if half_weights:
        fbgemm.pack_model(net)
    elif matmul == "onednn" and onednn.usable(device, dtype):
        onednn.pack_model(net)
    net.eval().requires_grad_(False)
    quantized = f", int{bits}" + ("-qe" if embeddings or stored_embeddings else "") if bits else ""
    log.info("loaded %s (%d layers, hidden %d%s) on %s as %s", model, config.num_layers, config.hidden_size,
             quantized, device, str(dtype).removeprefix("torch."))
    return Engine(net, tokenizer, str(model))
