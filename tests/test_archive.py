"""The manifest and `verify`: a run, a downloaded folder, zip and tar archives; tampering is named."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from governance.archive import ArchiveError, make_archive, sha256_file, verify_path
from governance.cli import main

PDF = "governance/reports/audit_report.pdf"


@pytest.fixture
def folder(published, tmp_path) -> Path:
    """A fresh copy of the evidence folder written by `report --output-dir`."""
    dest = tmp_path / "download"
    shutil.copytree(published.out_v2, dest)
    return dest


def _verify(*args: str):
    return CliRunner().invoke(main, ["verify", *args])


def test_manifest_lists_every_file_and_the_inputs(published):
    root = published.out_v2
    manifest = json.loads((root / "governance/manifest.json").read_text())
    files = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(root).as_posix() for p in (root / "governance").rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"governance/manifest.json"}
    for path, entry in files.items():
        assert entry["sha256"] == sha256_file(root / path)
        assert entry["size"] == (root / path).stat().st_size
    assert {PDF, "governance/model_card/model_card.json", "governance/explanations/global_importance.json",
            "governance/config.yaml"} <= set(files)
    inputs = manifest["inputs"]
    assert inputs["model_uri"] == "models:/credit-risk/2"
    assert inputs["model_id"].startswith("m-")
    assert inputs["dataset_digest"]
    assert inputs["config"]["report"]["sample_decisions"]["n"] == 5
    assert inputs["package_versions"]["mlflow-governance"]
    assert len(inputs["model_sha256"]) == 64
    assert "created" not in json.dumps(manifest)  # no wall-clock time


def test_verify_passes_on_a_fresh_run_and_folder(published, tracking):
    res = _verify("--run-id", tracking.explain_run_ids["v2"])
    assert res.exit_code == 0, res.output
    assert "OK:" in res.output
    assert _verify(str(published.out_v2)).exit_code == 0
    assert _verify(str(published.out_v2 / "governance")).exit_code == 0  # the governance folder itself


def test_verify_fails_naming_a_changed_byte(folder):
    target = folder / PDF
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    res = _verify(str(folder))
    assert res.exit_code == 1
    assert f"CHANGED: {PDF}" in res.output


def test_verify_fails_naming_a_deleted_file(folder):
    (folder / "governance/explanations/layer_ranking.json").unlink()
    res = _verify(str(folder))
    assert res.exit_code == 1
    assert "MISSING: governance/explanations/layer_ranking.json" in res.output


def test_verify_fails_naming_an_added_file(folder):
    (folder / "governance/reports/extra.txt").write_text("added later")
    res = _verify(str(folder))
    assert res.exit_code == 1
    assert "ADDED: governance/reports/extra.txt" in res.output


def test_verify_names_every_problem_at_once(folder):
    (folder / "governance/model_card/model_card.md").write_text("edited")
    (folder / "governance/config.yaml").unlink()
    (folder / "governance/new.bin").write_bytes(b"\0")
    result = verify_path(folder)
    assert not result.ok
    kinds = {(p.kind, p.path) for p in result.problems}
    assert kinds == {("changed", "governance/model_card/model_card.md"), ("missing", "governance/config.yaml"),
                     ("added", "governance/new.bin")}


def test_verify_zip_and_tar_archives(published, tracking, tmp_path):
    zpath = make_archive(tracking.explain_run_ids["v2"], tmp_path / "evidence.zip")
    assert _verify(str(zpath)).exit_code == 0
    # a tampered copy of the zip
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "governance/config.yaml":
                data += b"\n# edited\n"
            dst.writestr(info, data)
    res = _verify(str(bad))
    assert res.exit_code == 1 and "CHANGED: governance/config.yaml" in res.output
    # a tar.gz of the downloaded folder, wrapped in one top-level directory
    tpath = tmp_path / "evidence.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(published.out_v2 / "governance", arcname="evidence-2026/governance")
    assert _verify(str(tpath)).exit_code == 0


def test_unsafe_or_unusable_inputs_fail_clearly(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ArchiveError, match="unsafe path"):
        verify_path(evil)
    res = _verify(str(tmp_path))  # a folder without a manifest
    assert res.exit_code == 2 and "no governance/manifest.json" in res.output
    assert _verify().exit_code == 2  # neither --run-id nor PATH


def test_verify_unknown_run(tracking):
    res = _verify("--run-id", "0123456789abcdef0123456789abcdef")
    assert res.exit_code == 2 and "not found" in res.output


def test_verify_run_names_a_file_added_to_the_run(published, tracking, tmp_path):
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v3"]
    extra = tmp_path / "note.txt"
    extra.write_text("added after the manifest")
    client.log_artifact(rid, str(extra), "governance/reports")
    try:
        res = _verify("--run-id", rid)
        assert res.exit_code == 1
        assert "ADDED: governance/reports/note.txt" in res.output
    finally:  # a local artifact store: remove the file again
        root = Path(local_file_uri_to_path(client.get_run(rid).info.artifact_uri))
        (root / "governance/reports/note.txt").unlink()
    assert _verify("--run-id", rid).exit_code == 0


def test_a_manifest_pointing_outside_the_evidence_is_rejected(folder):
    mpath = folder / "governance/manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"].append({"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1})
    mpath.write_text(json.dumps(manifest))
    res = _verify(str(folder))
    assert res.exit_code == 1 and "INVALID: ../../etc/passwd" in res.output
