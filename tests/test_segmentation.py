"""Segmentation (a tiny U-Net) and box regression (a tiny CNN) through the stage with the real
engine, on synthetic shapes whose mask and box are known: the relevance of the predicted mask /
box concentrates on the object (its share of |relevance| inside the true box is several times
the box's area share), default and contrastive modes conserve the seed where the model has no
biases, the documents do not depend on the batch size, per-sample predictions are mask class
shares / box outputs, a real sqlite MLflow store holds the run, and the CLI's ``explain`` +
``report`` produce a PDF naming the task and the regions. A task that cannot fit the output fails
with one ``error:`` line and logs nothing."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from explain_fixtures import artifact_paths
from report_fixtures import use_store
from seg_fixtures import shapes, train_boxnet, train_unet
from test_stage import assert_close

from governance.errors import InputError
from governance.pipeline import explain_model

N_VALID = 48
PIXELS = [f"r{r}c{c}" for r in range(16) for c in range(16)]
CONFIG = {"modality": "image", "image": {"scale": 255, "grid": [16, 16]}, "modes": ["default", "contrastive"],
          "primary_mode": "default", "aggregation": {"n_bootstrap": 10, "sample_size": 32},
          "quality": {"enabled": False}, "cpu_threads": 1}


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("shapes")
    x, masks, cls, boxes = shapes(240, seed=0)
    unet = train_unet(x, masks, epochs=12)
    boxnet = train_boxnet(x, boxes, epochs=30)
    xv, mv, cv, bv = shapes(N_VALID, seed=1)
    np.savez(base / "valid.npz", x=xv, y=cv)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with use_store(uri):
        mlflow.set_experiment("shapes")
    return {"unet": unet, "boxnet": boxnet, "data": base / "valid.npz", "masks": mv, "boxes": bv, "x": xv,
            "base": base, "uri": uri}


def _download(rid: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path))


def _pixel_relevance(local: pd.DataFrame) -> np.ndarray:
    """(n, 16, 16) relevance per pixel (a 16x16 grid makes every region one pixel)."""
    return local[PIXELS].to_numpy(np.float64).reshape(-1, 16, 16)


def _in_box(boxes: np.ndarray) -> np.ndarray:
    """(n, 16, 16) true boxes as pixel masks."""
    out = np.zeros((len(boxes), 16, 16), dtype=bool)
    for i, b in enumerate(np.rint(boxes * 16).astype(int)):
        out[i, b[1]:b[3], b[0]:b[2]] = True
    return out


def _box_shares(rel: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the share of |relevance| inside the true box, and the box's share of the image."""
    a = np.abs(rel)
    a = a / a.sum((1, 2), keepdims=True)
    inside = _in_box(boxes)
    return (a * inside).sum((1, 2)), inside.mean((1, 2))


def _model_output(model: Any, x: np.ndarray) -> Any:
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32) / 255.0)[:, None])


def test_the_predicted_mask_explains_the_object_and_is_logged(shapes_run) -> None:
    with use_store(shapes_run["uri"]):
        res = explain_model(shapes_run["unet"], shapes_run["data"], quiet=True, experiment_name="shapes",
                            config={**CONFIG, "quality": {"enabled": True, "n_samples": 8}})
        rid = res.run_id
        paths = artifact_paths(rid)
        local = pd.read_parquet(_download(rid, "governance/explanations/local_relevance.parquet"))
        codes = pd.read_parquet(_download(rid, "governance/explanations/reason_codes.parquet"))
        heat = _download(rid, "governance/explanations/heatmaps")
        ex = np.load(_download(rid, "governance/explanations/examples/images.npz"), allow_pickle=False)
        tags = mlflow.MlflowClient().get_run(rid).data.tags
    gi = res.global_importance
    # the task was inferred from the (N, 3, 16, 16) output at the input's size, and says so
    assert tags["governance.task"] == "segmentation" and gi["task"] == "segmentation"
    assert tags["governance.task_source"].startswith("inferred from output (per-pixel scores (N, 3, 16, 16)")
    # per-sample predictions: the mask's class shares, its size and dominant class (the object's class)
    pred = _model_output(shapes_run["unet"], shapes_run["x"]).argmax(1).numpy()
    for c in range(3):
        np.testing.assert_allclose(local[f"mask_share_{c}"], (pred == c).mean((1, 2)), atol=1e-6)
    assert (local["mask_pixels"] == (pred > 0).sum((1, 2))).all()
    assert (local["prediction"] == local["target"]).mean() > 0.8  # the dominant class is mostly the object's
    # the relevance of the mask lies on the object: share inside the true box >> its area
    inside, area = _box_shares(_pixel_relevance(local), shapes_run["boxes"])
    assert inside.mean() > 0.6 and (inside / area).min() > 2.0 and (inside / area).mean() > 4.0
    top = codes["supporting_1"].str.extract(r"r(\d+)c(\d+)").astype(int).to_numpy()
    box_px = _in_box(shapes_run["boxes"])
    assert np.mean([box_px[i, r, c] for i, (r, c) in enumerate(top)]) > 0.9  # reason code 1: on the object
    # heatmaps per dominant class of the mask; no misclassified examples (no class decision to compare)
    assert {"mean.npy", "class_1.npy", "class_2.npy"} <= {p.name for p in heat.iterdir()}
    assert "misclassified" not in set(ex["kinds"].tolist())
    block = gi["image"]["task"]
    assert block["name"] == "segmentation" and block["background_class"] == 0
    assert abs(sum(v for k, v in block["mean_prediction"].items() if k.startswith("mask_share")) - 1) < 1e-6
    assert "quality: ground_truth" in block["skipped"] and "misclassified examples" in block["skipped"]
    assert gi["features"][0]["feature"] in PIXELS and "direction" in gi["features"][0]
    assert "governance/explanations/global_importance.json" in paths
    # quality: measured on the summed mask scores (regression), ground-truth drivers skipped
    q = res.quality
    assert "governance/explanations/quality.json" in paths and q["parameters"]["task"] == "regression"
    assert "ground_truth_recall" not in q["metrics"] and not q["errors"]
    assert q["methods"]["backtrace_default"]["delta_auc"] > 0  # removing relevant pixels first hurts the mask more


def test_the_box_relevance_lies_in_the_true_box(shapes_run) -> None:
    with use_store(shapes_run["uri"]):
        res = explain_model(shapes_run["boxnet"], shapes_run["data"], quiet=True, experiment_name="shapes",
                            config={**CONFIG, "task": "box-regression"})
        rid = res.run_id
        local = pd.read_parquet(_download(rid, "governance/explanations/local_relevance.parquet"))
        heat = _download(rid, "governance/explanations/heatmaps")
        tags = mlflow.MlflowClient().get_run(rid).data.tags
    assert tags["governance.task"] == "box-regression" and tags["governance.task_source"] == "config"
    out = _model_output(shapes_run["boxnet"], shapes_run["x"]).numpy()
    assert "prediction" not in local.columns  # no class label that means nothing
    for i in range(4):
        np.testing.assert_allclose(local[f"box_{i}"], out[:, i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(local["score"], out.sum(1), rtol=1e-5)
    assert np.abs(out - shapes_run["boxes"]).mean() * 16 < 1.0  # the regressor finds the squares (< 1 px)
    inside, area = _box_shares(_pixel_relevance(local), shapes_run["boxes"])
    assert inside.mean() > 0.45 and (inside / area).mean() > 2.5
    assert sorted(p.name for p in heat.iterdir() if p.suffix == ".npy") == ["mean.npy"]  # one global map
    assert res.global_importance["image"]["task"]["mean_prediction"].keys() == {"box_0", "box_1", "box_2", "box_3"}


def _without_biases(model: torch.nn.Module) -> torch.nn.Module:
    nb = copy.deepcopy(model)
    with torch.no_grad():
        for m in nb.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return nb


@pytest.mark.parametrize("kind", ["segmentation", "box-regression"])
def test_default_and_contrastive_conserve_the_seed_without_biases(shapes_run, kind: str) -> None:
    model = _without_biases(shapes_run["unet" if kind == "segmentation" else "boxnet"])
    with use_store(shapes_run["uri"]):
        for mode in ("default", "contrastive"):
            res = explain_model(model, shapes_run["data"], quiet=True, experiment_name="shapes",
                                config={**CONFIG, "task": kind, "modes": [mode], "primary_mode": mode})
            local = pd.read_parquet(_download(res.run_id, "governance/explanations/local_relevance.parquet"))
            total = _pixel_relevance(local).sum((1, 2))
            if kind == "segmentation":  # 100 x the predicted class's score over the mask (+/- parts: the same)
                seed = 100.0 * local["score"] * local["mask_pixels"]
            else:  # 100 y on each box output; contrastive R+ - R- = 100 (y - (1 - y))
                seed = 100.0 * (local["score"] if mode == "default" else 2 * local["score"] - 4)
            np.testing.assert_allclose(total, seed, rtol=1e-3, atol=1e-3, err_msg=f"{kind} {mode}")


def _docs(res: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"gi": res.global_importance, "stab": res.stability}, default=float))


def test_documents_do_not_depend_on_the_batch_size(shapes_run) -> None:
    cfg = {**CONFIG, "image": {"scale": 255, "grid": [4, 4]}}
    ref = explain_model(shapes_run["unet"], shapes_run["data"], log=False, quiet=True, config=cfg, batch_size=48)
    other = explain_model(shapes_run["unet"], shapes_run["data"], log=False, quiet=True, config=cfg, batch_size=7)
    assert_close(_docs(ref), _docs(other), 1e-7)


def test_a_task_that_does_not_fit_the_output_fails_in_one_line(shapes_run, tmp_path: Path) -> None:
    cases = [(shapes_run["boxnet"], "segmentation", "task segmentation (config) expects per-pixel class scores"),
             (shapes_run["unet"], "box-regression", "task box-regression (config) expects box coordinates (N, 4)")]
    with use_store(shapes_run["uri"]):
        before = len(mlflow.search_runs(search_all_experiments=True))
        for model, task, message in cases:
            with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
                explain_model(model, shapes_run["data"], quiet=True, experiment_name="shapes",
                              config={**CONFIG, "task": task})
        frame = pd.DataFrame({"a": [0.1, 0.2], "b": [0.3, 0.4]})
        frame.to_parquet(tmp_path / "t.parquet")
        with pytest.raises(InputError, match="task segmentation .* explains images: set modality: image"):
            explain_model(torch.nn.Linear(2, 4), tmp_path / "t.parquet", quiet=True, experiment_name="shapes",
                          config={"task": "segmentation", "quality": {"enabled": False}})
        assert len(mlflow.search_runs(search_all_experiments=True)) == before  # no run, no artifacts


def test_cli_explains_a_logged_unet_and_the_pdf_names_the_task_and_regions(shapes_run, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from governance.cli import main

    example = (shapes_run["x"][:2].astype(np.float32) / 255.0)[:, None]
    with use_store(shapes_run["uri"]):
        with mlflow.start_run(run_name="train-unet"):
            info = mlflow.pytorch.log_model(shapes_run["unet"], name="unet", input_example=example,
                                            pip_requirements=["torch"])
        args = ["explain", "--model-uri", info.model_uri, "--data", str(shapes_run["data"]), "--modality", "image",
                "--experiment-name", "shapes", "--quiet", "--modes", "default", "--primary-mode", "default",
                "--set", "image.scale=255", "--set", "image.grid=[4, 4]", "--set", "quality.enabled=false",
                "--set", "aggregation.n_bootstrap=10"]
        bad = CliRunner().invoke(main, args + ["--task", "box-regression"])
        assert bad.exit_code == 1
        assert bad.stderr.strip().splitlines()[-1].startswith("error: task box-regression (config) expects box")
        assert "Traceback" not in bad.stderr
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        rid = res.stdout.strip().splitlines()[-1]
        rep = CliRunner().invoke(main, ["report", "--run-id", rid, "--output-dir", str(tmp_path)])
        assert rep.exit_code == 0, rep.output
        top = mlflow.MlflowClient().get_run(rid).data.tags["governance.top_feature"]
    pdf = tmp_path / "governance" / "reports" / "audit_report.pdf"
    text = subprocess.run(["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True).stdout
    flat = " ".join(text.split())
    assert "segmentation (inferred from output" in flat
    assert "segmentation: the predicted mask" in flat and "mask's dominant class 1" in flat
    assert top in flat and "Skipped (does not apply to this task)" in flat


def test_an_exported_graph_and_the_module_give_the_same_mask_relevance(shapes_run) -> None:
    """The mask is appended as ATen ops to an exported (pt2) graph and after the forward of a module
    copy: the same relevance, the same layer names as the model's own."""
    from governance.backtrace import Backtrace
    from governance.stage.output_tasks import output_task

    x = torch.from_numpy(shapes_run["x"][:8].astype(np.float32) / 255.0)[:, None]
    seg = output_task("segmentation")
    graph = torch.export.export(shapes_run["unet"], (x,)).module()
    a = Backtrace(seg.wrap(shapes_run["unet"], None)).explain(x, mode="default", task="regression")
    b = Backtrace(seg.wrap(graph, None)).explain(x, mode="default", task="regression")
    assert torch.equal(a.output, b.output) and torch.allclose(a.input_relevance, b.input_relevance, atol=1e-5)
    assert sorted(a.layer_relevance) == sorted(b.layer_relevance) and "up" in a.layer_relevance
    pred = a.output.ne(0).any(1)  # seeded pixels: the predicted non-background mask
    assert torch.equal(pred, _model_output(shapes_run["unet"], shapes_run["x"][:8]).argmax(1).ne(0))


def test_a_one_channel_mask_is_thresholded_once_for_probabilities_or_logits() -> None:
    from governance.stage.output_tasks import output_task

    seg = output_task("segmentation", {"background_class": None})
    logits = np.array([[[[-1.0, 0.5], [2.0, -0.1]]]], dtype=np.float32)
    assert seg.threshold(logits) == 0.0 and seg.threshold(1 / (1 + np.exp(-logits))) == 0.5
    decided = seg.decide(torch.from_numpy(logits), 1, 0.0)
    assert decided.columns["mask_share_1"].tolist() == [0.5] and decided.predictions.tolist() == [1]
    assert decided.columns["mask_pixels"].tolist() == [2] and decided.scores.tolist() == [1.25]
    masked = seg.wrap(torch.nn.Identity(), 0.0)(torch.from_numpy(logits))
    assert masked.flatten().tolist() == [0.0, 0.5, 2.0, 0.0]


def test_quality_measures_the_mask_the_stage_calibrated(tmp_path: Path) -> None:
    """A one-channel probability mask: the stage decides threshold 0.5 on its probe batch, and the
    quality metrics' summed output masks with that same threshold (not the logits' 0)."""
    from governance.config import config_from_dict
    from governance.modality import get_modality
    from governance.stage.batch import Explainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    x = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "v.npz", x=x, y=np.zeros(6, dtype=np.int64))
    cfg = config_from_dict({**CONFIG, "task": "segmentation", "image": {"grid": [4, 4], "background_class": None}})
    modality = get_modality(cfg)
    table = modality.open(tmp_path / "v.npz")
    plan = modality.plan(table, type("H", (), {"model": model, "uri": None})())
    batch = next(iter(modality.batches(table, plan, 6)))
    table.close()
    Explainer.from_config(model, cfg).calibrate(modality, batch)
    q_model, extra = modality.quality_setup(model)
    xt = torch.from_numpy(batch.inputs)
    with torch.no_grad():
        y = model(xt)
        want = (y * (y > 0.5)).reshape(6, -1).sum(1, keepdim=True)
        assert torch.allclose(q_model(xt), want) and not torch.allclose(want, y.reshape(6, -1).sum(1, keepdim=True))
    assert extra["task"] == "regression"
