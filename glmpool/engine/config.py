"""ModelConfig: the hyper-parameters of a ChatGLM-6B checkpoint, read from THUDM's config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    torch_dtype: str | None = None  # how the checkpoint stores its floats ("float16" for THUDM's)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if values.get("inner_hidden_size") is None:
            values["inner_hidden_size"] = 4 * values.get("hidden_size", cls.hidden_size)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        """THUDM's config.json keys, so a written checkpoint loads in the reference code too."""
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        raw.update(
            architectures=["ChatGLMModel"],
            model_type="chatglm",
            use_cache=True,
            pre_seq_len=None,
            prefix_projection=False,
        )
        return raw
