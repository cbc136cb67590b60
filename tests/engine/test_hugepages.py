"""Weights moved onto transparent huge pages at load (glmpool.engine.hugepages)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmpool.engine import hugepages, load

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not THP.is_file() or "[never]" in THP.read_text() or tuple(map(int, re.findall(r"\d+", os.uname().release)[:2])) < (6, 1),
    reason="needs Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not set to never")


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`."""
    for mapping in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(x, 16) for x in mapping.split(" ", 1)[0].split("-"))
        if start <= address < end:
            return int(re.search(r"AnonHugePages:\s+(\d+) kB", mapping)[1]) * 1024
    raise LookupError(hex(address))


def test_advise_moves_whole_huge_pages_of_a_filled_tensor_and_keeps_its_values():
    tensor = torch.randn(3 * hugepages.HUGE_PAGE // 4 + 1000)  # a little over 3 huge pages of floats
    expected = tensor.clone()
    address = tensor.data_ptr()
    first_whole_page = -(-address // hugepages.HUGE_PAGE) * hugepages.HUGE_PAGE
    if "[madvise]" in THP.read_text() and not os.environ.get("THP_MEM_ALLOC_ENABLE"):
        assert huge_bytes_at(first_whole_page) == 0  # torch's allocator left it on 4 KB pages
    moved = hugepages.advise(address, tensor.numel() * 4)
    assert moved >= 2 * hugepages.HUGE_PAGE and moved % hugepages.HUGE_PAGE == 0
    assert huge_bytes_at(first_whole_page) >= hugepages.HUGE_PAGE
    assert torch.equal(tensor, expected)
    assert hugepages.advise(address, hugepages.HUGE_PAGE // 2) == 0  # no whole huge page in the span


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory):
    from glmpool.engine.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("wide-vocab") / "ckpt", layers=1, vocab=8192, hidden=256)


@pytest.mark.parametrize("matmul", ["reference", "onednn"])
def test_load_puts_a_cpu_models_large_weights_on_huge_pages(wide_vocab_dir, matmul):
    engine = load(wide_vocab_dir, progress=False, matmul=matmul)
    embeddings = engine.model.word_embeddings  # a packed method keeps its lookup table as `table`
    table = embeddings.table if hasattr(embeddings, "table") else embeddings.weight  # vocab x hidden fp32: 8 MB
    assert table.numel() * 4 >= 3 * hugepages.HUGE_PAGE
    assert huge_bytes_at(table.data_ptr() + hugepages.HUGE_PAGE) > 0


def test_a_worker_lets_torch_allocate_on_huge_pages_from_the_start():
    # What worker.main sets before torch is imported: a fresh 8 MB tensor is on huge pages at once.
    probe = ("import torch, re, pathlib; t = torch.ones(2 << 20); a = t.data_ptr() + (2 << 20);"
             "m = [s for s in re.split(r'\\n(?=[0-9a-f]+-)', pathlib.Path('/proc/self/smaps').read_text())"
             " if int(s.split('-')[0], 16) <= a < int(s.split('-')[1].split()[0], 16)][0];"
             "print(re.search(r'AnonHugePages:\\s+(\\d+)', m)[1])")
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert int(out.stdout) > 0, out.stderr


FAULTS_CHILD = """
import resource, sys, torch
from glmpool.engine import hugepages
if sys.argv[1] == "reuse":
    assert hugepages.reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16, 130528).fill_(1.0)  # a batch-16 step's logits, allocated once before counting
before = faults()
for _ in range(20):
    torch.empty(16, 130528).fill_(1.0)
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    """With THP_MEM_ALLOC_ENABLE=1 (as in a worker), every 8 MB tensor is mapped afresh and faulted in;
    after reuse_freed_memory() the heap hands the same pages back."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    faults = {how: int(subprocess.run([sys.executable, "-c", FAULTS_CHILD, how], env=env, capture_output=True,
                                      text=True, timeout=120, check=True).stdout)
              for how in ("as-is", "reuse")}
    assert faults["reuse"] * 10 < faults["as-is"], faults  # e.g. 0-509 against ~10000 here
