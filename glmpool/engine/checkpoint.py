"""Reading THUDM's checkpoint directories unchanged: config.json, sharded or single .bin or safetensors.

Nothing from the model directory is ever imported or executed: `.bin` files go through
`torch.load(weights_only=True)` and the `.py` files THUDM ships beside the weights are never read.
Tensors are read one shard at a time (memory-mapped where the format allows) and copied straight
into the model's preallocated parameters, so peak memory stays close to the final weights' size.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .config import ModelConfig
from .errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

HUB_FILES = ["*.json", "*.model", "*.bin", "*.safetensors"]  # never the remote code (*.py)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed exactly as the reference computes it


def resolve(model: str, cache_dir: str | Path = ".cache") -> Path:
    """A local checkpoint directory for `model`: a path, `tiny-random`, or a hub id (downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model == "tiny-random":
        from .tiny import cached_tiny_checkpoint
        return cached_tiny_checkpoint(Path(cache_dir))
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a hub id like THUDM/chatglm-6b")
    return download(model, Path(cache_dir))


def download(repo_id: str, cache_dir: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"cannot download {repo_id}: huggingface_hub is not installed") from error
    log.info("fetching %s into %s", repo_id, cache_dir)
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir), allow_patterns=HUB_FILES))
    except Exception as first_error:  # offline, unknown id, or network trouble: try the cache alone
        try:
            return Path(snapshot_download(repo_id, cache_dir=str(cache_dir), allow_patterns=HUB_FILES,
                                          local_files_only=True))
        except Exception:
            raise ModelNotFoundError(
                f"cannot download {repo_id} ({type(first_error).__name__}) and it is not in {cache_dir}: "
                f"pass a local checkpoint directory instead (--model /path/to/chatglm-6b), or "
                f"--model tiny-random for a smoke test") from None


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


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # old non-zip serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def iter_tensors(model_dir: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    files = shard_files(model_dir)
    for path in tqdm(files, desc="loading shards", unit="shard", disable=not progress or None, leave=False):
        shard = read_shard(path)
        for name in list(shard):
            yield name, shard.pop(name)
        del shard


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
    lm_head: torch.Tensor | None = None
    for raw_name, tensor in iter_tensors(model_dir, progress):
        name = internal_name(raw_name)
        if name is None:
            continue
        if name.startswith("lm_head."):
            if name == "lm_head.weight":
                lm_head = tensor
            continue
        target = targets.get(name)
        if target is None:
            log.warning("ignoring tensor %s: not part of ChatGLM-6B", raw_name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            mis_shaped.append(f"{raw_name} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
            continue
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(name)
    embedding = "word_embeddings.weight"
    if embedding in targets and embedding not in filled and lm_head is not None \
            and tuple(lm_head.shape) == tuple(targets[embedding].shape):
        with torch.no_grad():  # only the output copy was stored: the same matrix, tied
            targets[embedding].copy_(lm_head)
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
