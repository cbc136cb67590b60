"""Token choice of a sampled batch step (generate.next_tokens) on ChatGLM-6B's vocabulary, three ways:

    python bench/sampling.py [--batch 16] [--rounds 200]

- glmpool: every row sharing a top-k filtered in one pass, by the chunked top-k (generate.top_k_of);
- torch-topk: the same, with torch.topk over whole rows instead;
- per-row: the rows' top-k one row at a time (next_tokens called for each row).

Random logits [batch, 130528], the default sampling (top-k 50, top-p 0.7, temperature 0.95), a seeded
generator per row. The three alternate within each round; the table gives median milliseconds. Not a
test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

from glmpool.engine import generate
from glmpool.engine.generate import SamplingParams, next_tokens
from harness import interleaved

VOCAB = 130528


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    logits = torch.randn(args.batch, VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    params = [SamplingParams(do_sample=True, top_k=50, top_p=0.7, temperature=0.95)] * args.batch
    generators = [torch.Generator().manual_seed(row) for row in range(args.batch)]

    def per_row():
        return [next_tokens(logits[row:row + 1], params[:1], generators[row:row + 1])[0] for row in range(args.batch)]

    def torch_topk():
        with mock.patch.object(generate, "top_k_of", torch.topk):
            return next_tokens(logits, params, generators)

    ways = {"glmpool": lambda: next_tokens(logits, params, generators), "torch-topk": torch_topk, "per-row": per_row}
    times = interleaved(ways, args.rounds)
    print(f"token choice of {args.batch} sampled rows of {VOCAB} logits, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} rounds")
    for name, values in times.items():
        print(f"  {name:10s} {statistics.median(values) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
