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


# ----------------------------------------------------------------------------- anchoring (issue 10)


def _rehash(folder: Path, rel: str, *, inputs_too: bool = True) -> dict:
    """What a forger with write access does: re-hash ``rel`` in the manifest (and in the report's
    inputs, and recompute the report id) so that the folder verifies on its own."""
    from governance.archive import manifest_bytes, report_id_for

    mpath = folder / "governance/manifest.json"
    manifest = json.loads(mpath.read_text())
    digest = sha256_file(folder / rel)
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry["sha256"], entry["size"] = digest, (folder / rel).stat().st_size
    if inputs_too and rel in manifest["inputs"]["input_files"]:
        manifest["inputs"]["input_files"][rel] = digest
        inputs = manifest["inputs"]
        manifest["report_id"] = report_id_for(manifest["run_id"], inputs["model_id"], inputs["model_sha256"],
                                              inputs["input_files"])
    mpath.write_bytes(manifest_bytes(manifest))
    return manifest


def test_the_manifest_hash_is_recorded_as_a_run_tag(published, tracking):
    import mlflow

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v3"]
    tag = client.get_run(rid).data.tags["governance.manifest_sha256"]
    assert tag == sha256_file(client.download_artifacts(rid, "governance/manifest.json"))
    # the report wrote this manifest (an approval since would have re-issued and chained it)
    written = sha256_file(published.out_v3 / "governance/manifest.json")
    manifest = json.loads(open(client.download_artifacts(rid, "governance/manifest.json")).read())
    assert tag == written or manifest.get("previous_manifest_sha256")
    res = _verify("--run-id", rid)
    assert res.exit_code == 0, res.output
    assert "matches run tag governance.manifest_sha256" in res.output
    manifest = json.loads((published.out_v3 / "governance/manifest.json").read_text())
    assert manifest["report_id"].startswith("GR-")


def test_an_edited_output_with_a_rehashed_manifest_is_caught_only_by_the_anchor(published, folder):
    """The attack: change one file, re-hash the manifest to match. The model card is no input of
    the report, so nothing inside the folder contradicts the forgery; the anchor does."""
    card = folder / "governance/model_card/model_card.md"
    card.write_text(card.read_text().replace("Model Risk Lab", "Somebody Else"))
    _rehash(folder, "governance/model_card/model_card.md")
    unanchored = _verify(str(folder))
    assert unanchored.exit_code == 0 and "NOT ANCHORED" in unanchored.output  # said, not hidden
    genuine = sha256_file(published.out_v2 / "governance/manifest.json")
    res = _verify(str(folder), "--expect-sha256", genuine)
    assert res.exit_code == 1
    assert "ANCHOR: governance/manifest.json" in res.output and genuine in res.output
    assert _verify(str(published.out_v2), "--expect-sha256", genuine).exit_code == 0


def test_a_rehashed_input_contradicts_the_report_it_claims(folder):
    """Changing an input (stability.json) and re-hashing files, inputs and report id still leaves
    the report itself (the PDF's attached evidence, the HTML's report id) pointing elsewhere."""
    target = folder / "governance/explanations/stability.json"
    doc = json.loads(target.read_text())
    doc["stability"] = 0.999
    target.write_text(json.dumps(doc))
    _rehash(folder, "governance/explanations/stability.json")
    res = _verify(str(folder))
    assert res.exit_code == 1
    assert "INCONSISTENT: governance/reports/audit_report.pdf (attached evidence is of report" in res.output
    assert "INCONSISTENT: governance/explanations/stability.json (differs from the copy attached" in res.output
    assert "INCONSISTENT: governance/reports/audit_report.html (does not carry report id" in res.output


def test_a_file_rehashed_in_files_only_contradicts_the_inputs(folder):
    target = folder / "governance/config.yaml"
    target.write_text(target.read_text() + "\n# edited\n")
    _rehash(folder, "governance/config.yaml", inputs_too=False)
    res = _verify(str(folder))
    assert res.exit_code == 1
    assert "INCONSISTENT: governance/config.yaml (its hash in files differs from the one the report was made" \
           in res.output
    # and a file slipped into the list of files without being an input of the report
    extra = folder / "governance/explanations/extra.json"
    extra.write_text("{}")
    manifest = json.loads((folder / "governance/manifest.json").read_text())
    manifest["files"].append({"path": "governance/explanations/extra.json", "sha256": sha256_file(extra), "size": 2})
    (folder / "governance/manifest.json").write_text(json.dumps(manifest))
    assert "listed in files but not among the report's inputs" in _verify(str(folder)).output


def test_verify_run_fails_on_a_forged_manifest_logged_to_the_run(published, tracking, tmp_path):
    """The same attack on the tracking server: a changed file and its re-hashed manifest logged
    over the run's artifacts. The run tag (outside the artifacts) names the forgery."""
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v3"]
    root = Path(local_file_uri_to_path(client.get_run(rid).info.artifact_uri))
    saved = {rel: (root / rel).read_bytes() for rel in ("governance/model_card/model_card.json",
                                                       "governance/manifest.json")}
    copy = tmp_path / "copy"
    shutil.copytree(root / "governance", copy / "governance")
    card = copy / "governance/model_card/model_card.json"
    card.write_text(card.read_text().replace("apache-2.0", "proprietary"))
    _rehash(copy, "governance/model_card/model_card.json")
    client.log_artifact(rid, str(card), "governance/model_card")
    client.log_artifact(rid, str(copy / "governance/manifest.json"), "governance")
    try:
        res = _verify("--run-id", rid)
        assert res.exit_code == 1
        assert "ANCHOR: governance/manifest.json" in res.output and "run tag governance.manifest_sha256" in res.output
    finally:
        for rel, data in saved.items():
            (root / rel).write_bytes(data)
    assert _verify("--run-id", rid).exit_code == 0


def test_every_form_of_a_downloaded_copy_is_accepted(published, tmp_path):
    """PATH may be the governance folder (under any name), a folder holding it, its manifest.json,
    or a zip / tar of either."""
    genuine = sha256_file(published.out_v2 / "governance/manifest.json")
    renamed = tmp_path / "evidence-of-v2"
    shutil.copytree(published.out_v2 / "governance", renamed)
    zipped_folder = tmp_path / "governance-only.zip"
    with zipfile.ZipFile(zipped_folder, "w") as zf:  # the folder's content at the top of the archive
        for p in sorted(renamed.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(renamed).as_posix())
    tarred = tmp_path / "root.tar"
    with tarfile.open(tarred, "w") as tf:
        tf.add(published.out_v2, arcname="download")
    for path in (published.out_v2, published.out_v2 / "governance", renamed, renamed / "manifest.json",
                 zipped_folder, tarred):
        res = _verify(str(path), "--expect-sha256", genuine)
        assert res.exit_code == 0, (path, res.output)
    res = _verify(str(renamed / "manifest.json"), "--expect-sha256", "0" * 64)
    assert res.exit_code == 1 and "ANCHOR" in res.output


def test_verify_exit_codes_and_argument_errors(tmp_path):
    res = _verify(str(tmp_path / "absent"))
    assert res.exit_code == 2 and res.output.startswith("error: ") and "does not exist" in res.output
    res = _verify("--run-id", "x", "--expect-sha256", "0" * 64)
    assert res.exit_code == 2 and "--expect-sha256 is for a PATH" in res.output
    assert "Traceback" not in res.output
