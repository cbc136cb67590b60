"""Reading THUDM's checkpoint directories unchanged: config.json, sharded or single .bin or safetensors.

Nothing from the model directory is ever imported or executed: `.bin` files go through
`torch.load(weights_only=True)` and the `.py` files THUDM ships beside the weights are never read.
Tensors are read one shard at a time (memory-mapped where the format allows) and copied straight
into the model's preallocated parameters, so peak memory stays close to the final weights' size.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .config import ModelConfig
from .errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

HUB_FILES = ["*.json", "*.model", "*.bin", "*.safetensors"]  # never the remote code (*.py)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed exactly as the reference computes it


# The original server's transformers cached hub models under ./.cache of its working directory (in the hub's
# layout): a model already there is used before anything is downloaded.
ORIGINAL_SERVER_CACHE = Path(".cache")


def resolve(model: str, cache_dir: str | Path | None = None, revision: str | None = None,
            progress: bool = True) -> Path:
    """A local checkpoint directory for `model`: a path, `tiny-random`, or a hub id (found in a cache, else
    downloaded). cache_dir replaces the standard Hugging Face cache (and glmpool's own, for tiny-random)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model == "tiny-random":
        from .tiny import cached_tiny_checkpoint
        return cached_tiny_checkpoint(Path(cache_dir) if cache_dir else own_cache_dir())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a hub id like THUDM/chatglm-6b")
    return download(model, cache_dir, revision, progress)


def own_cache_dir() -> Path:
    """glmpool's own cache (the tiny model): systemd's CacheDirectory= ($CACHE_DIRECTORY), else
    $XDG_CACHE_HOME/glmpool, else ~/.cache/glmpool."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmpool"


def cached(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path | None:
    """The complete snapshot of `repo_id` at `revision` in a hub cache (None: the standard one), or None."""
    from huggingface_hub import snapshot_download
    try:
        found = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES,
                                       local_files_only=True))
        shard_files(found)  # an interrupted download is not a checkpoint yet
    except Exception:  # absent, or incomplete: LocalEntryNotFoundError, CheckpointError, ...
        return None
    return found if (found / "config.json").is_file() else None


def download(repo_id: str, cache_dir: str | Path | None = None, revision: str | None = None,
             progress: bool = True) -> Path:
    """`repo_id` from the cache where it is complete (cache_dir, else the standard Hugging Face cache or the
    original server's ./.cache), else downloaded into cache_dir or the standard cache. Honours the hub's
    variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN, ...)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"cannot download {repo_id}: huggingface_hub is not installed") from error
    places = [cache_dir] if cache_dir else [None, ORIGINAL_SERVER_CACHE.resolve()]
    for place in places:
        found = cached(repo_id, revision, place)
        if found is not None:
            return found
    if not (progress and sys.stderr.isatty()):  # bars written to a log or the journal are noise
        disable_progress_bars()
    where = cache_dir or "the Hugging Face cache"
    log.info("downloading %s%s into %s", repo_id, f" at {revision}" if revision else "", where)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown id or revision, network trouble
        looked = str(cache_dir) if cache_dir else f"the Hugging Face cache or {ORIGINAL_SERVER_CACHE.resolve()}"
        raise ModelNotFoundError(
            f"cannot download {repo_id}{f' at {revision}' if revision else ''} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}) and it is not in {looked}: pass a local "
            f"checkpoint directory instead (--model /path/to/chatglm-6b), or --model tiny-random for a "
            f"smoke test") from None


def shard_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{model_dir}: shards listed in {index_name} are missing: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(f"{model_dir}: no weights found (pytorch_model*.bin or *.safetensors)")


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the file pages a memory-mapped tensor was read through, once it has been copied.

    Without this every page read stays resident until the whole shard is closed, and a single-file
    checkpoint would briefly cost twice its size. The mapping is private and never written, so the
    kernel simply re-reads the file if the range is ever touched again.
    """
    if _libc is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    whole_pages = (end - start) // mmap.PAGESIZE * mmap.PAGESIZE  # never past the tensor's last byte
    if whole_pages:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(whole_pages), 4)  # MADV_DONTNEED


def iter_tensors(model_dir: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, memory-mapped?) for every stored tensor, one shard open at a time."""
    files = shard_files(model_dir)
    for path in tqdm(files, desc="loading shards", unit="shard", disable=not progress or None, leave=False):
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name), False  # read one tensor at a time
            continue
        try:
            shard, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            shard, mapped = torch.load(path, map_location="cpu", weights_only=True), False
        for name in list(shard):
            yield name, shard.pop(name), mapped
        del shard


def copy_into(target: torch.Tensor, source: torch.Tensor, mapped: bool, chunk_bytes: int = 16 << 20) -> None:
    """target <- source (converting dtype); a memory-mapped source is released chunk by chunk."""
    rows = max(1, chunk_bytes // max(1, source[0].numel() * source.element_size())) if source.dim() else 1
    with torch.no_grad():
        if not mapped or source.dim() == 0:
            target.copy_(source)
            return
        for start in range(0, source.shape[0], rows):
            target[start:start + rows].copy_(source[start:start + rows])
            release_pages(source[start:start + rows])


def internal_name(name: str) -> str | None:
    """THUDM parameter name -> this model's, or None for tensors that carry nothing we need."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name in ("lm_head.weight", "lm_head.weight_scale"):
        return name  # tied to the word embeddings; checked, not stored twice
    return name.removeprefix("transformer.")


def load_weights(model: torch.nn.Module, model_dir: Path, progress: bool = True) -> None:
    """Copy every tensor of the checkpoint into `model`'s allocated parameters and buffers, in place."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    targets = {k: v for k, v in targets.items() if not k.startswith("_")}
    filled: set[str] = set()
    mis_shaped: list[str] = []
    lm_head: dict[str, torch.Tensor] = {}  # "weight" (and "weight_scale" when quantized) -> tensor
    for raw_name, tensor, mapped in iter_tensors(model_dir, progress):
        name = internal_name(raw_name)
        if name is None:
            continue
        if name.startswith("lm_head."):
            lm_head[name.removeprefix("lm_head.")] = tensor
            continue
        target = targets.get(name)
        if target is None:
            log.warning("ignoring tensor %s: not part of ChatGLM-6B", raw_name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            mis_shaped.append(f"{raw_name} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
            continue
        copy_into(target, tensor, mapped)
        filled.add(name)
    for part, tensor in lm_head.items():  # only the output copy was stored: it is the same matrix
        embedding = "word_embeddings." + part
        if embedding in targets and embedding not in filled and tuple(tensor.shape) == tuple(targets[embedding].shape):
            copy_into(targets[embedding], tensor, False)
            filled.add(embedding)
    missing = sorted(set(targets) - filled)
    if mis_shaped or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join("transformer." + m for m in missing[:8])
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        if mis_shaped:
            parts.append("mis-shaped " + ", ".join(mis_shaped[:8]))
        raise CheckpointError(f"{model_dir}: checkpoint does not match config.json: " + "; ".join(parts))


def read_config(model_dir: Path) -> ModelConfig:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{model_dir}: no config.json, not a ChatGLM-6B checkpoint directory")
    try:
        return ModelConfig.from_file(config_file)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{config_file}: unreadable ({error})") from None


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(os.path.getsize(f) for f in shard_files(model_dir))
