"""Speed of the recurrent / mixture-of-experts / vision half of the zoo (issue 3).

Same method as ``engine_speed.py`` (median over interleaved repeats, graph capture excluded),
ratio of ``Backtrace.explain`` to one forward+backward (gradient x input) pass of the same model
and batch. Target (issue 3): default mode at most 3x.

* ``moe``: a small OLMoE causal LM (transformers, random weights; 4 layers, hidden 128,
  8 experts, top-2), batch 4 x 128 tokens, explaining the next-token logit. The baseline is the
  model with transformers' own sparse "eager" expert dispatch; explain() runs the export-time
  routed-experts op (rules/moe.py: each expert on its routed tokens, in the recording and in
  the walk).
* ``lstm``: the seed's Embedding(64) + LSTM(100) next-word model, batch 64 x 32 tokens.
* ``unet``: the test U-Net (base width 16) on 1x64x64, batch 8.

    .venv/bin/python benchmarks/zoo_speed.py [--only moe,lstm,unet] [--repeats 5] [--clock cpu --threads 1]

On a machine shared with other jobs, wall-clock ratios swing with the load; ``--clock cpu
--threads 1`` gives stable ratios of the work done.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import zoo_models as zm  # noqa: E402
from engine_speed import Case, report, run_case  # noqa: E402



def moe_forward_backward(model, x, task):
    """Gradient x input for a causal LM: the gradient of the last position's top logit with
    respect to the input embeddings, times the embeddings (one forward, one backward)."""
    emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=x["attention_mask"]).logits[:, -1]
    logits.gather(-1, logits.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


def _moe():
    model = zm.moe_causal_lm(vocab=1000, hidden=128, layers=4, experts=8, top_k=2)
    # the baseline's expert dispatch: transformers' "eager" loop over the hit experts (its default
    # for a config built in code is "grouped_mm", whose CPU fallback is ~10x slower backwards)
    model.config._experts_implementation = "eager"
    ids = zm.token_batch(4, 128, 1000, pad_last=16, left=True, seed=1)
    return model, {"input_ids": ids, "attention_mask": (ids != zm.PAD).long()}


def _lstm():
    torch.manual_seed(0)
    return zm.LSTMNextWord(vocab=5000), zm.token_batch(64, 32, 5000, pad_last=8, left=True)


def _lstm_baseline(model, x, task):
    emb = model.embedding(x).detach().requires_grad_(True)
    out, _ = model.lstm(emb)
    y = model.fc(model.dropout(out[:, -1]))
    y.gather(-1, y.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


def _unet():
    torch.manual_seed(0)
    return zm.UNet(base=16), zm.blob_images(8, size=64)


CASES = {
    "moe": Case("OLMoE 4L h128 8 experts top-2, batch 4x128 tokens", _moe, "generation", repeats=3,
                modes=("default", "contrastive"), baseline=moe_forward_backward),
    "lstm": Case("LSTM(100) next-word, batch 64x32 tokens", _lstm, "multiclass-classification", repeats=3,
                 modes=("default", "contrastive"), baseline=_lstm_baseline),
    "unet": Case("U-Net base 16, 1x64x64, batch 8", _unet, "binary-segmentation", repeats=3,
                 modes=("default", "contrastive")),
}


def main(argv: list[str] | None = None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="wall: perf_counter; cpu: process CPU time (as engine_speed.py)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the run")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock")
    rows = []
    for key in args.only.split(","):
        rows.append(run_case(CASES[key.strip()], args.repeats, (args.threads,), captum=False))
        print(report(rows[-1:], args.clock, args.threads).splitlines()[4], flush=True)
    print()
    print(report(rows, args.clock, args.threads))
    return rows


if __name__ == "__main__":
    main()
