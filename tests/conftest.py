"""Fixtures shared by the three groups of tests: engine/ (the engine library), pool/ (the pool's modules in
process) and system/ (real pools, commands and units in processes)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pooltools, for every group

LONG_TOKENS = 1500  # ~1.5 s of generation here: long enough to catch mid-way on a faster machine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A small random checkpoint in THUDM's layout (single pytorch_model.bin, fp16 tensors)."""
    from glmpool.engine.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from glmpool.engine import load
    return load(tiny_dir, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    from glmpool.engine.tiny import cached_tiny_checkpoint
    path = tmp_path_factory.mktemp("cache")
    cached_tiny_checkpoint(path)  # built once, before workers race for it
    return path


@pytest.fixture(scope="session")
def long_body(cache_dir):
    """A request answered with LONG_TOKENS tokens: the tiny model ends most answers early, at random
    lengths, so candidates are tried here, greedily, as a worker runs them (one thread; batching does
    not change greedy tokens). Searching keeps the tests valid whatever the tiny model's weights."""
    import torch

    from glmpool.engine import SamplingParams, load
    body = {"max_new_tokens": LONG_TOKENS, "max_length": 2048, "do_sample": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = load("tiny-random", cache_dir=cache_dir, progress=False)
        for first in range(0, 96, 12):
            batch = engine.batcher(max_batch=12)
            for n in range(first, first + 12):
                query = f"please answer at length, take {n}"
                batch.add(query, query, [], SamplingParams(**body))
            while len(batch):
                for event in batch.step():
                    if event.finish_reason == "length":
                        return {"query": event.key, **body}
    finally:
        torch.set_num_threads(threads)
    pytest.fail(f"no candidate question makes the tiny model answer with {LONG_TOKENS} tokens")
