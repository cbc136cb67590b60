"""A CPU model's weights moved onto 2 MB pages (Linux transparent huge pages).

Decoding streams every weight once per token. On 4 KB pages that is a TLB miss every 4 KB of it, and
the page walks cost the stream (docs/benchmarks.md: a row's product up to a quarter faster on 2 MB pages).
Linux backs memory with 2 MB pages only where a program asks when THP is set to "madvise" (a common
default): madvise(MADV_HUGEPAGE) asks, and madvise(MADV_COLLAPSE) (Linux 6.1+) moves memory that is
already filled, as loaded weights are. Where either is refused (an older kernel, THP off, no memory to
spare in 2 MB pieces) the weights stay where they are; nothing else changes.

A process that has torch put every tensor of 2 MB or more on huge pages (THP_MEM_ALLOC_ENABLE=1, as
glmpool's workers do, so weights load straight onto them) should also call reuse_freed_memory(): torch
frees such tensors back to the kernel, and each new one is faulted in again, 2 MB at a time.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def reuse_freed_memory() -> bool:
    """Have glibc serve allocations of up to 32 MB from its heap and keep freed memory there, so that
    activations reuse pages instead of faulting fresh ones in. With THP_MEM_ALLOC_ENABLE=1, torch aligns
    every tensor of 2 MB or more to 2 MB and advises it huge; glibc then maps and unmaps each one, and
    every step's logits and a prompt's activations are faulted in afresh. The price: the heap keeps its
    high-water mark.
    False where this is no glibc (nothing changes)."""
    mallopt = libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


@functools.cache
def libc_function(name: str, argtypes: tuple):
    """The C library's `name` on Linux (errno kept), or None."""
    if sys.platform != "linux":
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):  # not glibc: no such function
        return None
    function.argtypes = list(argtypes)
    return function


def advise(address: int, nbytes: int) -> int:
    """Move the whole 2 MB pages within [address, address + nbytes) onto huge pages; returns the bytes
    moved (0 where the kernel refused, or where the span holds no whole huge page)."""
    madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    length = (address + nbytes) // HUGE_PAGE * HUGE_PAGE - start
    if madvise is None or length <= 0:
        return 0
    if madvise(start, length, MADV_HUGEPAGE) != 0 or madvise(start, length, MADV_COLLAPSE) != 0:
        return 0
    return length


def _spans(model: nn.Module):
    """(address, bytes) of each tensor the model holds on the CPU, oneDNN's opaque packed ones included, and
    those a module holds outside its parameters and buffers and lists by a method `held_tensors()`."""
    for module in model.modules():
        held = getattr(module, "held_tensors", lambda: ())()
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False), *held):
            if tensor.device.type != "cpu":
                continue
            if tensor.is_mkldnn:
                try:
                    span = torch.ops.mkldnn.data_ptr(tensor), torch.ops.mkldnn._nbytes(tensor)
                except (AttributeError, RuntimeError):  # a torch without these accessors
                    continue
                yield span
            else:
                storage = tensor.untyped_storage()
                yield storage.data_ptr(), storage.nbytes()


def weights_on_huge_pages(model: nn.Module) -> int:
    """advise() every CPU tensor of `model` large enough to hold a huge page; returns the bytes moved.
    (FBGEMM's packed fp16 weights are opaque objects without an address: they stay as they are.)"""
    seen, moved = set(), 0
    for address, nbytes in _spans(model):
        if nbytes >= HUGE_PAGE and address not in seen:
            seen.add(address)
            moved += advise(address, nbytes)
    log.debug("weights on huge pages: %.0f MB", moved / 1e6)
    return moved
