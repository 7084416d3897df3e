"""The image modality with the real engine on a CNN trained on planted evidence: 16x16 noise
whose class is decided by a 4x4 patch in the top-right region (r0c3 of a 4x4 grid). The patch's
region ranks first in every mode, the fixed-region (shortcut) flag is raised, and every image
artifact is logged to a real sqlite MLflow store and loads. A class folder of PNGs, an ``.npz``
and a parquet of encoded bytes give the same documents at any batch size. Bad images (corrupt,
wrong channels) fail the contract (exit 2) naming the problem and log no explanation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from explain_fixtures import artifact_paths
from image_fixtures import planted_images, train_cnn, write_folder
from report_fixtures import use_store
from test_stage import assert_close

from governance.errors import ContractError
from governance.pipeline import explain_model
from governance.validation import ContractViolation

N_VALID = 96
CONFIG = {"task": "multiclass-classification", "modality": "image", "image": {"scale": 255, "grid": [4, 4]},
          "aggregation": {"n_bootstrap": 20, "sample_size": 64}, "quality": {"enabled": False}, "cpu_threads": 1}
CONTRACT_ONLY = {"governance/config.yaml", "governance/data_quality/validation_result.json",
                 "governance/data_quality/datasets.json"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("images")
    model = train_cnn(*planted_images(200, seed=0), epochs=8)
    x, y = planted_images(N_VALID, seed=1)
    folder = write_folder(base / "folder", x, y)
    order = np.lexsort((np.arange(len(y)), y))  # the folder's reading order: by class, then file name
    np.savez(base / "valid.npz", x=x[order], y=y[order])
    frame = pd.DataFrame({"image": [(folder / str(int(y[i])) / f"{i:04d}.png").read_bytes() for i in order],
                          "label": y[order]})
    frame.to_parquet(base / "valid.parquet", index=False)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with use_store(uri):
        mlflow.set_experiment("images")
    return {"model": model, "x": x, "y": y, "folder": folder, "base": base, "uri": uri}


def _download(rid: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path))


def test_planted_patch_ranks_first_and_raises_the_fixed_region_flag(planted) -> None:
    with use_store(planted["uri"]):
        res = explain_model(planted["model"], planted["folder"], quiet=True, experiment_name="images",
                            config={**CONFIG, "quality": {"enabled": True, "n_samples": 16}})
        rid = res.run_id
        paths = artifact_paths(rid)
        gi = json.loads(_download(rid, "governance/explanations/global_importance.json").read_text())
        heat = _download(rid, "governance/explanations/heatmaps")
        ex = np.load(_download(rid, "governance/explanations/examples/images.npz"), allow_pickle=False)
        local = pd.read_parquet(_download(rid, "governance/explanations/local_relevance.parquet"))
        codes = pd.read_parquet(_download(rid, "governance/explanations/reason_codes.parquet"))
        tags = mlflow.MlflowClient().get_run(rid).data.tags
    assert gi["modality"] == "image" and gi["n_samples"] == N_VALID
    assert gi["features"][0]["feature"] == "r0c3"
    for mode, doc in gi["modes"].items():  # every mode finds the planted region first
        assert doc["features"][0]["feature"] == "r0c3", mode
    assert all(f["value_relevance_correlation"] is None for f in gi["features"])
    block = gi["image"]
    assert block["fixed_region"] is True and block["fixed_region_name"] == "r0c3"
    assert block["leading_region"] == "r0c3" and block["classes"] == ["0", "1"]
    assert 0 < block["border_share"] < 1 and block["top_pixels"] == 0.05
    assert block["top_pixel_share"] > 0.05  # relevance is concentrated (uniform would give 5%)
    mean = np.load(heat / "mean.npy", allow_pickle=False)
    assert mean.shape == (16, 16) and abs(mean.sum() - 1) < 1e-9
    assert mean[0:4, 12:16].sum() > 4 * 16 / 256  # the patch's 16 pixels hold over 4x their area share
    assert {"mean.npy", "mean.png", "class_0.npy", "class_1.npy", "class_0.png", "class_1.png",
            "index.json"} <= {p.name for p in heat.iterdir()}
    assert (heat / "mean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ex["inputs"].shape[1:] == (1, 16, 16) and ex["relevance"].shape[1:] == (16, 16)
    assert {"confident", "borderline"} <= set(ex["kinds"].tolist())
    assert list(local.columns[:6]) == ["sample_id", "prediction", "score", "target", "relevance_l1", "r0c0"]
    assert len(local) == N_VALID and local.shape[1] == 5 + 16
    white = (local["prediction"] == 1).to_numpy()  # decided by the white patch: it leads their reason codes
    assert codes["sample_id"].tolist() == local["sample_id"].tolist()
    assert (codes.loc[white, "supporting_1"] == "r0c3").mean() > 0.9
    assert "governance/explanations/quality.json" in paths
    assert res.quality["modality"] == "image" and res.quality_note is None
    assert res.quality["metrics"]["morf_auc"]["parameters"]["patch_size"] == 4  # patch flipping by region
    assert tags["governance.status"] == "explained" and tags["governance.top_feature"] == "r0c3"
    planted["run_id"] = rid


def test_the_report_shows_the_heatmaps_and_raises_the_shortcut_flag(planted, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from governance.cli import main

    if "run_id" not in planted:
        pytest.skip("needs the planted run of the previous test")
    with use_store(planted["uri"]):
        result = CliRunner().invoke(main, ["report", "--run-id", planted["run_id"], "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "governance" / "reports" / "audit_report.html").read_text()
    assert (tmp_path / "governance" / "reports" / "audit_report.pdf").is_file()
    assert "Images: where the relevance lies" in html and "YES: r0c3" in html
    assert "Image region r0c3 holds a large share of the relevance" in html
    assert html.count('alt="Mean share of |relevance| per pixel') == 3  # all samples and both classes
    assert "Example " in html  # the example overlays of examples/images.npz
    card = (tmp_path / "governance" / "model_card" / "model_card.md").read_text()
    assert "Image region r0c3 holds a large share of the relevance" in card  # the card's caveats carry it


def _docs(res: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"gi": res.global_importance, "stab": res.stability}, default=float))


def test_every_image_source_and_batch_size_gives_the_same_documents(planted) -> None:
    ref = explain_model(planted["model"], planted["folder"], log=False, quiet=True, config=CONFIG, batch_size=96)
    for data, batch in ((planted["folder"], 7), (planted["base"] / "valid.npz", 32),
                        (planted["base"] / "valid.parquet", 50)):
        cfg = {**CONFIG, "target_column": "label"} if str(data).endswith("parquet") else CONFIG
        res = explain_model(planted["model"], data, log=False, quiet=True, config=cfg, batch_size=batch)
        assert res.validation.success, res.validation.message
        # convolution kernels round float32 differently for other batch shapes: equal to ~1e-10
        got, want = _docs(res), _docs(ref)
        if data != planted["folder"]:  # only a class folder names its classes
            assert got["gi"]["image"].pop("classes") is None and want["gi"]["image"].pop("classes") == ["0", "1"]
        assert_close(got, want, tol=1e-7, where=f"{data} batch {batch}")


def _fails(planted: dict[str, Any], data: Path, config: dict[str, Any] | None = None) -> tuple[str, set[str]]:
    with use_store(planted["uri"]):
        rid = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("images").experiment_id).info.run_id
        with pytest.raises(ContractViolation) as info:
            explain_model(planted["model"], data, run_id=rid, quiet=True, config=config or CONFIG)
        paths = artifact_paths(rid)
        status = mlflow.MlflowClient().get_run(rid).data.tags["governance.status"]
    assert isinstance(info.value, ContractError) and info.value.exit_code == 2 and status == "failed"
    return str(info.value), paths


def test_a_corrupt_image_fails_the_contract_naming_the_file(planted, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "corrupt", planted["x"][:20], planted["y"][:20])
    (folder / "1" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    message, paths = _fails(planted, folder)
    assert "\n" not in message.strip() or message.count("\n") < 5
    assert "expect_column_values_to_be_null on column 'decode_error'" in message
    assert "1/0003.png: not a decodable image" in message
    assert paths == CONTRACT_ONLY


def test_wrong_channels_fail_the_contract_and_a_configured_mode_converts(planted, tmp_path: Path) -> None:
    from PIL import Image

    rgb = tmp_path / "rgb"
    for i, (img, label) in enumerate(zip(planted["x"][:20], planted["y"][:20])):
        (rgb / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(img[..., None], 3, axis=2)).save(rgb / str(int(label)) / f"{i:04d}.png")
    message, paths = _fails(planted, rgb)
    assert "expect_column_values_to_be_in_set on column 'channels'" in message and "3" in message
    assert paths == CONTRACT_ONLY
    converted = explain_model(planted["model"], rgb, log=False, quiet=True,
                              config={**CONFIG, "image": {**CONFIG["image"], "mode": "L"}})
    direct = explain_model(planted["model"], write_folder(tmp_path / "grey", planted["x"][:20], planted["y"][:20]),
                           log=False, quiet=True, config=CONFIG)
    got, want = _docs(converted), _docs(direct)
    assert got["gi"]["image"].pop("preprocessing")["mode"] == "L"
    want["gi"]["image"].pop("preprocessing")
    assert_close(got, want, tol=1e-7)


def test_out_of_range_arrays_and_bad_options_fail_clearly(planted, tmp_path: Path) -> None:
    from governance.config import ConfigError

    np.savez(tmp_path / "hot.npz", x=planted["x"][:20].astype(np.float32) * 4, y=planted["y"][:20])
    message, _ = _fails(planted, tmp_path / "hot.npz", {**CONFIG, "image": {"grid": [4, 4], "scale": 255,
                                                                            "pixel_range": [0, 255]}})
    assert "pixel_max" in message
    with pytest.raises(ConfigError, match=r"image.grid: must be two positive integers"):
        explain_model(planted["model"], planted["folder"], log=False, quiet=True,
                      config={**CONFIG, "image": {"grid": [0, 4]}})
    with pytest.raises(ConfigError, match=r"image: unknown key\(s\) \['sizes'\]"):
        explain_model(planted["model"], planted["folder"], log=False, quiet=True,
                      config={**CONFIG, "image": {"sizes": [8, 8]}})
