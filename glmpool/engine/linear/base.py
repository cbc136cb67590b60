"""The interface every way of multiplying a weight implements (shaped after vLLM's linear methods), and
the only code that reads registry.py: method_class() and choose().

Two kinds, as the registry has: a WeightMethod packs a float weight once at load and multiplies by it (one
instance per matrix, carried in the model by layers.py's modules); a QuantizedRoute multiplies by a
matrix stored in THUDM's int8/int4 format (quantized.py), chosen per call, holding no state of its own.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable, ClassVar

import torch

from . import registry

log = logging.getLogger(__name__)


class LinearMethod:
    """One way of computing x @ W^T (+ bias). `name` is its registry entry."""

    name: ClassVar[str] = ""

    @classmethod
    def usable(cls, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it runs, and computes what it should, on `device` for activations of `dtype`, on this
        CPU and torch build (kernels built, instruction sets, the load-time probes)."""
        raise NotImplementedError

    @classmethod
    def batch_invariant(cls) -> bool:
        """Whether it promises, here, that a row gets the same bits alone and among any other rows."""
        return False


class WeightMethod(LinearMethod):
    """A float weight packed once at load (from the checkpoint's tensor, as stored) into the layout its
    kernel reads; the packed form is all that is kept of it."""

    table_dtype: ClassVar[torch.dtype | None] = None  # a tied embedding's lookup table, if not as loaded

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ W^T + bias [..., out]."""
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        """A plain copy of the weight as packed (e.g. to quantize it, or to check it)."""
        raise NotImplementedError

    def held_tensors(self) -> tuple[torch.Tensor, ...]:
        """The packed weight where it is an ordinary tensor (for hugepages.weights_on_huge_pages)."""
        return ()

    @classmethod
    def packing_bytes(cls, out_features: int, in_features: int) -> int:
        """Memory packing a matrix of this shape holds besides the stored and the packed weight (the peak)."""
        return 0


class QuantizedRoute(LinearMethod):
    """A way of multiplying by a matrix stored in THUDM's int8/int4 format (quantized.QuantizedMatrix),
    chosen per call: the first route in registry.QUANTIZED_ORDER that takes the call. Stateless: the
    matrix holds the weight (and the layout a route gave it in place at load)."""

    scaled: ClassVar[bool] = False  # apply() applies the row scales itself; else the matrix does, after
    biased: ClassVar[bool] = False  # apply() takes the bias and adds it itself

    @classmethod
    def takes(cls, matrix, rows: int, tokens: int, device: torch.device) -> bool:
        """Whether it multiplies `rows` input rows, `tokens` of them per sequence, by `matrix` here."""
        raise NotImplementedError

    @classmethod
    def apply(cls, matrix, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] -> x2 @ W^T [M, N] (with unit scales unless `scaled`; no bias unless `biased`, which takes
        it as a third argument)."""
        raise NotImplementedError


OUTLIER = 1000.0  # the largest |activation| a kernel trial feeds: ChatGLM's outlier channels reach hundreds


def probe_activations(rows: int, features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 [rows, features] like ChatGLM's hidden states: randn, except a few outlier channels (one in 256,
    at least two) whose values reach +-OUTLIER; kernels are tried on these, since randn alone never
    reaches the magnitudes where a product leaves fp16's range."""
    generator = generator or torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    channels = torch.randperm(features, generator=generator)[:max(2, features // 256)]
    magnitudes = OUTLIER * (0.2 + 0.8 * torch.rand(rows, len(channels), generator=generator))
    signs = torch.randint(0, 2, (rows, len(channels)), generator=generator) * 2 - 1
    x[:, channels] = magnitudes * signs
    x[:, channels[0]] = OUTLIER  # the extreme itself, in every row
    return x


def scaling_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a unit-scale kernel's sums are scaled: fp16 cannot hold them (|q| up to 127 times the true
    |y|: a row whose largest |W| is 0.1 overflows once |y| passes ~64), bf16 and fp32 can."""
    return torch.float32 if dtype == torch.float16 else dtype


def apply_row_scales(unscaled: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """A unit-scale kernel's [M, N] sums -> sums x row scales (+ bias) in `dtype`, computed in scale's dtype
    (see scaling_dtype) and rounded to `dtype` once."""
    out = unscaled.to(scale.dtype)
    out = torch.addcmul(bias.to(scale.dtype), out, scale) if bias is not None else out * scale
    return out.to(dtype)


def kernel_check(kind: str, probe: Callable[[torch.Generator], bool]) -> bool:
    """Run `probe` (does torch's CPU `kind` kernel compute what we expect?), warning when it does not."""
    try:
        ok = probe(torch.Generator().manual_seed(0))
    except (RuntimeError, AttributeError) as error:
        log.warning("torch's CPU %s kernel is unavailable (%s); %s uses dequantize + matmul", kind, error, kind)
        return False
    if not ok:
        log.warning("torch's CPU %s kernel does not give the expected results; %s uses dequantize + matmul",
                    kind, kind)
    return ok


_constants: dict[tuple, torch.Tensor] = {}


def unit_scales(kind: str, shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Shared read-only tensors: ones [N] (int8 kernel), or (scale 1, zero 0) pairs [G, N, 2] (int4)."""
    key = (kind, shape, str(device), dtype)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = torch.ones(shape, dtype=dtype, device=device)
        if kind == "int4":
            tensor[..., 1] = 0
        _constants[key] = tensor
    return tensor


INT4_GROUP_SIZES = (256, 128, 64, 32)  # allowed by the int4 kernels, CPU and CUDA (all groups share the row scale)


def int4_unit_groups(in_features: int, rows: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """The int4 kernels' group size along K (the largest they take: all groups share the row scale) and
    unit (scale 1, zero 0) pairs [K / group, rows, 2]; the row scales are applied after the product."""
    group = next(g for g in INT4_GROUP_SIZES if in_features % g == 0)
    return group, unit_scales("int4", (in_features // group, rows, 2), device)


@functools.cache  # asked for every quantized product, to pick its route
def method_class(name: str) -> type[LinearMethod]:
    """The class that implements registry entry `name` (its module imported now)."""
    module, _, cls = registry.BY_NAME[name].implementation.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def choose(name: str, device: torch.device, dtype: torch.dtype) -> type[LinearMethod]:
    """Matmul method `name`, or the first usable one along its fallback chain (registry.fallbacks)."""
    for candidate in registry.fallbacks(name):
        method = method_class(candidate)
        if method.usable(device, dtype):
            if candidate != name and device.type == "cpu" and dtype == torch.float32:
                log.info("matmul %s cannot run here (kernel not built, CPU features, torch build, or a probe "
                         "found its promise broken); using %s", name, candidate)
            return method
    raise AssertionError("the last method of every chain is usable everywhere")
