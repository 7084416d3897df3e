"""Images/s and tokens/s of the explanation stage on the bundled examples, and their ratio to
plain inference, measured in one run (``benchmarks/explain_stage.py --modality image|text``).

``image``: the digits CNN on scikit-learn's 8x8 digits (``examples.digits``); ``text``: the
reviews classifier (all-MiniLM-L6-v2 + head, ``examples.reviews``); ``text-quality``: the
reviews example's bounded quality metrics (its ``quality:`` config) against the stage. The stage is
``explain_model`` without MLflow logging or quality metrics (contract, backtrace in the given
modes, aggregation, writers, heatmaps / word tables); inference is the same inputs through the
model under ``torch.no_grad`` in the same batches. Both clocks are process CPU seconds
(``time.process_time``), so a busy shared machine distorts the ratio less than wall time would.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _image(work: Path, modes: list[str], batch: int) -> dict[str, Any]:
    import torch

    from examples.digits.train import digits_split, train_cnn
    from governance.pipeline import explain_model

    xtr, ytr, xva, yva = digits_split(0)
    model = train_cnn(xtr, ytr, epochs=8)
    np.savez(work / "digits.npz", x=xva, y=yva)
    cfg = {"task": "multiclass-classification", "modality": "image", "modes": modes, "primary_mode": modes[0],
           "image": {"scale": 16, "grid": [4, 4], "pixel_range": [0, 16]}, "quality": {"enabled": False},
           "batch_size": batch, "cpu_threads": 1}
    x = torch.from_numpy(xva[:, None].astype(np.float32) / 16)
    return _measure(lambda: explain_model(model, work / "digits.npz", log=False, quiet=True, config=cfg),
                    lambda: [model(x[i:i + batch]) for i in range(0, len(x), batch)], len(xva), "images")


def _text(work: Path, modes: list[str], batch: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from examples.reviews.train import build_model, generate_reviews, minilm_path, train_head
    from governance.pipeline import explain_model

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = build_model()
    train_head(model, generate_reviews(200, 0), tok, epochs=60, seed=0)
    valid = generate_reviews(48, 1)
    valid.to_parquet(work / "reviews.parquet", index=False)
    cfg = {"task": "multiclass-classification", "modality": "text", "target_column": "label", "modes": modes,
           "primary_mode": modes[0], "text": {"tokenizer": minilm_path(), "max_length": 32, "min_count": 1},
           "quality": {"enabled": False}, "batch_size": batch, "cpu_threads": 1}
    enc = tok(valid["text"].tolist(), max_length=32, truncation=True, padding="max_length", return_tensors="pt")
    n_tokens = int(enc["attention_mask"].sum())
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return _measure(lambda: explain_model(model, work / "reviews.parquet", log=False, quiet=True, config=cfg),
                    lambda: [model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]) for i in range(0, len(ids), batch)],
                    n_tokens, "tokens")


def _text_quality(work: Path, modes: list[str], batch: int) -> dict[str, Any]:
    """The reviews example's bounded quality metrics (its governance.yaml ``quality:``) against the
    stage without them: CPU seconds of each and their ratio, in one run."""
    import torch
    import yaml
    from transformers import AutoTokenizer

    from examples.reviews.train import N_VALID, build_model, generate_reviews, minilm_path, train_head
    from governance.pipeline import explain_model

    root = Path(__file__).resolve().parents[1]
    bundled = yaml.safe_load((root / "examples" / "reviews" / "governance.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = build_model()
    train_head(model, generate_reviews(300, 0), tok, epochs=60, seed=0)
    generate_reviews(N_VALID, 1).to_parquet(work / "reviews.parquet", index=False)
    base = {**bundled, "text": {**bundled["text"], "tokenizer": minilm_path()}, "modes": modes,
            "primary_mode": modes[0], "cpu_threads": 1}
    torch.set_num_threads(1)
    off = {**base, "quality": {"enabled": False}}
    explain_model(model, work / "reviews.parquet", log=False, quiet=True, config=off)  # warm-up
    c = time.process_time()
    explain_model(model, work / "reviews.parquet", log=False, quiet=True, config=off)
    stage_s = time.process_time() - c
    c = time.process_time()
    res = explain_model(model, work / "reviews.parquet", log=False, quiet=True, config=base)
    with_q = time.process_time() - c
    return {"unit": "texts", "n": N_VALID, "stage_cpu_s": stage_s, "with_quality_cpu_s": with_q,
            "quality_cpu_s": with_q - stage_s, "quality_to_stage": (with_q - stage_s) / stage_s,
            "bounds": (res.quality or {}).get("bounds", [])}


def _measure(stage: Any, infer: Any, units: int, noun: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    stage()  # warm-up: imports, GX, the engine's graph capture
    c = time.process_time()
    stage()
    stage_s = time.process_time() - c
    with torch.no_grad():
        infer()
        c = time.process_time()
        infer()
        infer_s = time.process_time() - c
    return {"unit": noun, "n": units, "stage_cpu_s": stage_s, "inference_cpu_s": infer_s,
            f"stage_{noun}_per_s": units / stage_s, f"inference_{noun}_per_s": units / infer_s,
            "ratio_to_inference": infer_s / stage_s}


def run(modality: str, modes: list[str], batch: int = 64) -> dict[str, Any]:
    """Measure one modality (``image``, ``text``, or ``text-quality``: the reviews example's
    bounded quality metrics against the stage)."""
    fn = {"image": _image, "text": _text, "text-quality": _text_quality}[modality]
    with tempfile.TemporaryDirectory(prefix="bench-modality-") as tmp:
        return fn(Path(tmp), modes, batch)


def report(res: dict[str, Any], modality: str, modes: list[str]) -> str:
    """One printed line."""
    u = res["unit"]
    if "quality_cpu_s" in res:
        return (f"{modality} ({','.join(modes)}): stage CPU {res['stage_cpu_s']:.1f} s for {res['n']} {u}, bounded "
                f"quality metrics CPU {res['quality_cpu_s']:.1f} s | ratio quality/stage "
                f"{res['quality_to_stage']:.2f} | bounds: {'; '.join(res['bounds'])}")
    return (f"{modality} ({','.join(modes)}): stage {res[f'stage_{u}_per_s']:,.0f} {u}/s (CPU {res['stage_cpu_s']:.2f} s "
            f"for {res['n']:,} {u}) | inference {res[f'inference_{u}_per_s']:,.0f} {u}/s | ratio "
            f"{res['ratio_to_inference']:.4f}")
