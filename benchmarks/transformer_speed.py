"""Speed of the attention / transformer half of the zoo (issue 3), and of explain_generation.

The MiniLM and LLaMA rows are the cases of ``engine_speed.py`` (where issue 14's targets are
checked); this script runs them alone and adds ``generation``: ``explain_generation`` on the
LLaMA, prompt 64 tokens, 8 new tokens, batch 2, time per generated token against one
forward+backward of the model at the final length (the capture of the one graph all steps
share is excluded, as everywhere).

* ``minilm``: all-MiniLM-L6-v2 (real weights, 6 layers, hidden 384, SDPA attention) + mean
  pooling + a linear head, batch 8 x 128 tokens (two samples padded by 32). Baseline: gradient
  of the top class with respect to the word embeddings, times the embeddings.
* ``llama``: a small LLaMA (4 layers, hidden 256, 8 heads / 4 key-value heads, SwiGLU 688,
  vocabulary 1000, SDPA), batch 2 x 256 tokens, explaining the next-token logit. Baseline:
  gradient of the last position's top logit with respect to the input embeddings.

    .venv/bin/python benchmarks/transformer_speed.py [--only minilm,llama,generation] [--repeats 3]
        [--clock wall|cpu] [--threads N]

``--clock cpu`` times with the process CPU clock (use it with ``--threads 1``): on a shared,
oversubscribed machine the wall clock of either side swings by 10x between repeats, while the
CPU time of a single-threaded run measures the work done.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from engine_speed import CASES, CaseResult, lm_forward_backward, report, run_case, timed  # noqa: E402
from models import small_llama  # noqa: E402

from governance.backtrace import Backtrace  # noqa: E402


def generation_row(repeats: int = 3, prompt: int = 64, new: int = 8, batch: int = 2,
                   clock: str = "cpu") -> str:
    """explain_generation: time per generated token vs one forward+backward at full length."""
    model = small_llama()
    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(2))
    bt = Backtrace(model)
    full = torch.randint(3, 1000, (batch, prompt + new - 1), generator=torch.Generator().manual_seed(3))
    x_full = {"input_ids": full, "attention_mask": torch.ones_like(full)}
    fns = {"fwd+bwd": lambda: lm_forward_backward(model, x_full, "generation")}
    for mode in ("default", "contrastive"):
        fns[mode] = (lambda m: lambda: bt.explain_generation(ids, max_new_tokens=new, mode=m))(mode)
    med = timed(fns, repeats)  # the warm-up captures the shared graph
    ci = 0 if clock == "wall" else 1
    base = med["fwd+bwd"][ci]
    per_token = {k: med[k][ci] / new / base for k in ("default", "contrastive")}
    return (f"| explain_generation per token (LLaMA 4L h256, prompt {prompt} + {new} new, batch {batch}) | "
            f"{base * 1000:.1f} | {per_token['default']:.2f} | - | {per_token['contrastive']:.2f} | - |")


def main(argv: list[str] | None = None) -> list[CaseResult]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="minilm,llama,generation")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    rows, extra = [], []
    for key in args.only.split(","):
        key = key.strip()
        if key == "generation":
            extra.append(generation_row(args.repeats or 3, clock=args.clock))
            print(extra[-1], flush=True)
        else:
            rows.append(run_case(CASES[key], args.repeats, (args.threads,), captum=False))
            print(report(rows[-1:], args.clock, args.threads).splitlines()[4], flush=True)
    print()
    table = report(rows, args.clock, args.threads) if rows else "| model | fwd+bwd (ms) | default | signed | contrastive | - |\n|---|---|---|---|---|---|"
    print(table.split("\n\nPeak")[0])
    for line in extra:
        print(line)
    return rows


if __name__ == "__main__":
    main()
