"""The engine's front door: `load()` a checkpoint, then `chat`, `stream_chat` or a continuous `batcher`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch

from . import checkpoint, decode_attention, hugepages, row_kernel
from .config import ModelConfig
from .errors import CheckpointError, EngineError
from .generate import Batcher, SamplingParams
from .linear import base, layers, reference, registry
from .linear.quantized import prepare, quantize_model
from .linear.thudm import parse_quantize
from .model import ChatGLM, padded_attention_exact
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


def free_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on `device`: the GPU's free memory, or the host's available
    memory capped by its cgroup's limit (a systemd MemoryMax=, a container's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    available = psutil.virtual_memory().available
    room = cgroup_room()
    return available if room is None else min(available, room)


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup minus its processes' anonymous memory (page cache can
    be reclaimed), or None when there is no limit or none can be read. cgroup v2, or v1's controller."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_name, used_name = root / path.lstrip("/"), "memory.max", "anon"
        elif "memory" in controllers.split(","):
            base, limit_name, used_name = root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "total_rss"
        else:
            continue
        try:
            limit = (base / limit_name).read_text().strip()
            stat = dict(row.split() for row in (base / "memory.stat").read_text().splitlines())
            if limit != "max" and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number
                return max(0, int(limit) - int(stat.get(used_name, 0)))
        except (OSError, ValueError):
            continue
    return None


def check_memory(net: torch.nn.Module, device: torch.device, quantizing: bool,
                 method: type[base.WeightMethod] | None = None) -> None:
    """Refuse a model that cannot fit before allocating it: a host out of memory kills the process without
    a word (the kernel's OOM killer), where this says what is missing. `net` is still on the meta device.
    Counts the peak of the load: the weights, the packed copy of the tied output projection `method` makes,
    and what packing one matrix holds besides; the KV cache comes on top."""
    needed = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    if method is not None and method.name != "reference":
        floats = [m.weight for m in net.modules() if isinstance(m, (reference.Linear, reference.Embedding))]
        if isinstance(net.word_embeddings, reference.Embedding):  # its packed copy, for the output projection
            needed += net.word_embeddings.weight.numel() * (2 if method.table_dtype == torch.float16 else 4)
        needed += max((method.packing_bytes(*weight.shape) for weight in floats), default=0)
    free = free_memory(device)
    if needed > free:
        advice = ("quantizing at load time holds the whole model unquantized first: load a checkpoint stored "
                  "quantized (THUDM/chatglm-6b-int4) instead" if quantizing else
                  "load it quantized (int8 takes about half the memory of fp16, int4 a quarter)")
        raise EngineError(f"the model needs {needed / (1 << 30):.1f} GiB and "
                          f"{'the host' if device.type == 'cpu' else device} has {free / (1 << 30):.1f} GiB free: "
                          f"free some memory, or {advice}")


def static_path_missing() -> str | None:
    """What this torch lacks for static_decode (FlexAttention block masks built from block lists, as torch
    2.13 has them), or None."""
    import inspect
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return "FlexAttention"
    wanted = {"seq_lengths", "compute_q_blocks"}
    if not wanted <= inspect.signature(BlockMask.from_kv_blocks).parameters.keys():
        return "BlockMask.from_kv_blocks(seq_lengths=, compute_q_blocks=)"
    return None


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

    def default_kv_tokens(self, fraction: float = 0.8, sharing: int = 1, model_bytes: int | None = None) -> int:
        """How many KV-cache tokens fit in what the device has free now (a fraction of it). `sharing`
        processes holding this model on one device split it: each takes its part of what stays free once
        all their copies (`model_bytes` each; default: the registered parameters and buffers, which packed
        weights are not) are loaded. A copy loaded before this one measured is counted twice: on the safe side."""
        if model_bytes is None:
            model_bytes = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        room = free_memory(self.device) - (sharing - 1) * model_bytes
        return max(1, int(room * fraction / sharing) // self.kv_bytes_per_token())

    def batcher(self, max_batch: int = 16, max_kv_tokens: int | None = None, shared_cache: bool | None = None,
                static: bool | None = None, compile: bool = True, backend: str | None = None) -> Batcher:
        """static: the GPU path (static_decode.StaticBatcher: a static KV cache, compiled decode steps unless
        compile is False, sampling on the device, chunked prefill); None = on GPUs only. backend: torch.compile's
        (None: inductor; "eager"/"aot_eager" check the graphs without generating code)."""
        if static is None:
            static = self.device.type != "cpu"
        missing = static and static_path_missing()
        if missing:
            log.warning("the GPU path's static decode step needs %s (torch %s); decoding step by step instead",
                        missing, torch.__version__)
        elif static:
            from .static_decode import StaticBatcher
            return StaticBatcher(self.model, self.tokenizer, max_batch, max_kv_tokens, compile, backend)
        return Batcher(self.model, self.tokenizer, max_batch, max_kv_tokens, shared_cache)

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


def load(model: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         cache_dir: str | Path | None = None, quantize: int | str | None = None, progress: bool = True,
         matmul: str = "reference", revision: str | None = None,
         quantized_activations: str = registry.DEFAULT_QUANTIZED_ACTIVATIONS) -> Engine:
    """Load a ChatGLM-6B checkpoint (directory, hub id, or "tiny-random") into an Engine.

    quantize: 4, 8, "4-qe", "8-qe" (see thudm.parse_quantize), or None to run the checkpoint as stored.
    A pre-quantized checkpoint keeps its bits; "-qe" on one stored without quantized embeddings
    quantizes them at load.
    matmul: how the float weights are multiplied, one of linear/registry.py's MATMULS (each entry says
    what it is for); where it cannot run here, the first usable one along its fallback chain.
    quantized_activations: on the CPU, what quantized weights multiply (registry.QUANTIZED_ACTIVATIONS): "int8",
    the activations quantized per block of 32 and integer products; "bf16", torch's weight-only kernels' bits.
    """
    if matmul not in registry.MATMULS:
        raise EngineError(f"unknown matmul {matmul!r}: use one of {', '.join(registry.MATMULS)}")
    if quantized_activations not in registry.QUANTIZED_ACTIVATIONS:
        raise EngineError(f"unknown quantized_activations {quantized_activations!r}: use one of "
                          + ", ".join(registry.QUANTIZED_ACTIVATIONS))
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    bits, embeddings = parse_quantize(quantize)
    model_dir = checkpoint.resolve(str(model), cache_dir, revision, progress)
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
    method = base.choose(matmul, device, dtype)
    with torch.device("meta"):
        net = ChatGLM(config)
    # fp16 weights from an fp16 checkpoint: read them as fp16, never holding an fp32 copy of the model; and
    # matrices about to be quantized stay as stored until then (the values are the same, the peak half).
    stored_half = config.torch_dtype == "float16"
    half_weights = method.table_dtype == torch.float16
    net = net.to(torch.float16 if (half_weights and not bits) or (quantize_layers and stored_half) else dtype)
    if stored_bits:
        quantize_model(net, stored_bits, embeddings=stored_embeddings, empty=True)
    check_memory(net, load_device, quantizing=quantize_layers or quantize_embeddings, method=method)
    net = net.to_empty(device=load_device)
    net._rotary = None
    checkpoint.load_weights(net, model_dir, progress)
    if quantize_layers or quantize_embeddings:
        quantize_model(net, bits, layers=quantize_layers, embeddings=quantize_embeddings)
        net = net.to(device, dtype)  # what was not quantized (norms, biases, embeddings) in the model's dtype
    prepare(net, quantized_activations)
    if method.name != "reference":
        layers.pack_model(net, method)
    net.eval().requires_grad_(False)
    if device.type == "cpu":
        hugepages.weights_on_huge_pages(net)
    net.attention_kernel = decode_attention.usable(net.dtype, device, config.head_dim)
    if device.type == "cuda" and net.dtype in (torch.float16, torch.bfloat16):
        net.use_fp32_pointwise()  # THUDM's numerics on a GPU
    if device.type == "cpu" and net.dtype == torch.float32 and matmul != "reference" and row_kernel.available():
        net.use_gelu_kernel()  # batch-invariant like the rest, its own rounding
    if device.type == "cpu" and matmul != "reference":  # batch-invariant: so must be the decode attention
        net.slab_is_exact = net.attention_kernel or padded_attention_exact(config, net.dtype, device)
        log.info("decode attention: %s", "glmpool's kernel, one KV slab for the batch" if net.attention_kernel
                 else "one KV slab for the batch (padding checked exact)" if net.slab_is_exact
                 else "per sequence (padding would change results here)")
    quantized = f", int{bits}" + ("-qe" if embeddings or stored_embeddings else "") if bits else ""
    log.info("loaded %s (%d layers, hidden %d%s) on %s as %s", model, config.num_layers, config.hidden_size,
             quantized, device, str(dtype).removeprefix("torch."))
    return Engine(net, tokenizer, str(model))
