"""Integrity manifest of a run's governance evidence, and its verification.

``governance/manifest.json`` lists the SHA-256 and size of every file under ``governance/``
(except the manifest itself) together with the inputs the evidence was produced from: the model
URI, id and artifact hash, the datasets with the hashes taken when ``explain`` read them, the
effective configuration, the package versions, every input file's hash, and the report id
derived from them. It is written last and contains no wall-clock time, so the same evidence
gives the same manifest bytes.

A manifest alone can be re-hashed by whoever can write the folder, so it is anchored outside
it: the report step records the manifest's own SHA-256 as the run tag
``governance.manifest_sha256`` and ``approve`` records it on the model version. Verification
passes only when every listed file is present and unchanged, no file was added, the manifest's
parts agree with each other (inputs vs files, the report id, the evidence attached inside the
PDF) and, where an anchor is known, the manifest's own hash equals it.

:func:`verify_path` re-checks a downloaded folder, the manifest file or a ``.zip`` /
``.tar[.gz|.bz2|.xz]`` archive; :func:`verify_run` downloads a run's ``governance/`` folder and
re-checks it against the run's (and an approved version's) anchor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from governance.errors import GovernanceError

MANIFEST_NAME = "manifest.json"
ROOT = "governance"
MANIFEST_PATH = f"{ROOT}/{MANIFEST_NAME}"
MANIFEST_FORMAT = "mlflow-governance-manifest/1"
#: Run tag (and model-version tag) holding the SHA-256 of the manifest: the anchor.
MANIFEST_TAG = "governance.manifest_sha256"

#: Packages whose versions are recorded in the manifest (those that shape the evidence).
RECORDED_PACKAGES = (
    "mlflow-governance",
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "great-expectations",
    "jinja2",
    "weasyprint",
    "matplotlib",
    "pyyaml",
)


class ArchiveError(GovernanceError):
    """A manifest or archive cannot be read (missing manifest, unsafe archive, bad JSON): nothing
    could be verified (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One verification finding: ``kind`` is changed, missing, added, unreadable, invalid,
    inconsistent (the manifest's parts disagree) or anchor (the manifest is not the recorded one)."""

    kind: str
    path: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.upper()}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerificationResult:
    """The outcome of :func:`verify_path` / :func:`verify_run`."""

    source: str
    n_files: int = 0
    problems: list[Problem] = field(default_factory=list)
    manifest_sha256: str | None = None
    #: where the expected manifest hash came from (None: the manifest was not anchored)
    anchor: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every listed file is present and unchanged, nothing was added, the manifest
        is consistent and (when anchored) is the recorded one."""
        return not self.problems

    def summary(self) -> str:
        """A human-readable multi-line summary naming every problem."""
        if self.ok:
            anchored = (f"manifest sha256 {self.manifest_sha256} matches {self.anchor}" if self.anchor else
                        "NOT ANCHORED: nothing outside the folder confirmed the manifest itself (give "
                        "--expect-sha256 with the run's governance.manifest_sha256 tag, or --run-id)")
            lines = [f"OK: {self.n_files} files verified against {MANIFEST_PATH} ({self.source}); {anchored}"]
        else:
            lines = [f"FAILED: {len(self.problems)} problem(s) in {self.source}"]
            lines += [f"  {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def tree_sha256(root: str | os.PathLike[str], exclude: Iterable[str] = ()) -> tuple[str, int]:
    """One SHA-256 for a directory tree: hash of the sorted ``path\\0sha256\\n`` lines.

    Returns the digest and the number of files hashed. ``exclude`` holds relative POSIX paths
    (or file names) to leave out.
    """
    root = Path(root)
    skip = set(exclude)
    lines = []
    for rel in _list_files(root):
        if rel in skip or PurePosixPath(rel).name in skip:
            continue
        lines.append(f"{rel}\0{sha256_file(root / rel)}\n")
    return sha256_bytes("".join(lines).encode()), len(lines)


def package_versions(packages: Iterable[str] = RECORDED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` ("not installed" where absent), without importing them."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file below ``root``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            out.append(full.relative_to(root).as_posix())
    return sorted(out)


def report_id_for(run_id: str | None, model_id: str | None, model_sha256: str | None,
                  input_files: dict[str, str]) -> str:
    """The report id: a hash of the run, the model and every input file's hash (recomputable
    from a manifest's ``run_id`` and ``inputs``)."""
    basis = json.dumps({"run": run_id, "model": model_id, "model_sha256": model_sha256, "inputs": input_files},
                       sort_keys=True)
    return "GR-" + hashlib.sha256(basis.encode()).hexdigest()[:12].upper()


def build_manifest(
    artifact_root: str | os.PathLike[str],
    inputs: dict[str, Any],
    *,
    run_id: str | None = None,
    report_id: str | None = None,
    previous_manifest_sha256: str | None = None,
) -> dict[str, Any]:
    """The manifest document for ``artifact_root/governance`` (the manifest itself excluded).

    ``inputs`` should hold ``model_uri``, ``model_id``, ``model_sha256``, ``datasets``, ``config``,
    ``package_versions`` and ``input_files``; it is stored as given (JSON-serialisable values only).
    """
    base = Path(artifact_root) / ROOT
    if not base.is_dir():
        raise ArchiveError(f"no {ROOT}/ folder in {artifact_root}")
    files = []
    for rel in _list_files(base):
        if rel == MANIFEST_NAME:
            continue
        full = base / rel
        files.append({"path": f"{ROOT}/{rel}", "sha256": sha256_file(full), "size": full.stat().st_size})
    from governance import __version__

    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "algorithm": "sha256",
        "generator": {"name": "mlflow-governance", "version": __version__},
        "run_id": run_id,
        "inputs": inputs,
        "files": files,
    }
    if report_id:
        doc["report_id"] = report_id
    if previous_manifest_sha256:
        doc["previous_manifest_sha256"] = previous_manifest_sha256
    return doc


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical serialisation: sorted keys, two-space indent, UTF-8, trailing newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(artifact_root: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``governance/manifest.json`` under ``artifact_root`` and return its path."""
    path = Path(artifact_root) / MANIFEST_PATH
    path.write_bytes(manifest_bytes(manifest))
    return path


def locate_evidence(folder: str | os.PathLike[str]) -> Path:
    """The evidence folder (the one holding ``manifest.json``) inside ``folder``.

    Accepts the ``governance`` folder itself (whatever its name), a folder that contains it
    (an artifact root, or an archive's one top-level wrapper folder), or the manifest file.
    """
    p = Path(folder)
    if p.is_file():
        if p.name == MANIFEST_NAME:
            return p.parent
        raise ArchiveError(f"{folder} is not a {MANIFEST_NAME}, a folder or a zip or tar archive")
    candidates = [p, p / ROOT]
    subdirs = sorted(x for x in p.iterdir() if x.is_dir()) if p.is_dir() else []
    if len(subdirs) == 1:
        candidates += [subdirs[0], subdirs[0] / ROOT]
    for c in candidates:
        if (c / MANIFEST_NAME).is_file():
            return c
    raise ArchiveError(f"no {MANIFEST_PATH} found in {folder}")


def _comparable(value: Any) -> Any:
    """``value`` as it reads back from canonical JSON (dates and other objects as text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


#: Documents carried in the PDF's evidence attachment, and the file each one must equal.
ATTACHED_DOCUMENTS = {
    "global_importance": f"{ROOT}/explanations/global_importance.json",
    "layer_ranking": f"{ROOT}/explanations/layer_ranking.json",
    "validation_result": f"{ROOT}/data_quality/validation_result.json",
    "gates": f"{ROOT}/explanations/gates.json",
    "stability": f"{ROOT}/explanations/stability.json",
}
REPORT_PDF = f"{ROOT}/reports/audit_report.pdf"
REPORT_HTML = f"{ROOT}/reports/audit_report.html"
#: Folders the report itself writes; every other file under governance/ is an input of the report.
OUTPUT_DIRS = ("reports", "model_card")
EVIDENCE_ATTACHMENT = "governance_evidence.json"


def _pdf_evidence(pdf: Path) -> dict[str, Any] | None:
    """The evidence JSON attached to the report PDF (None when there is none)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        found = PdfReader(str(pdf)).attachments.get(EVIDENCE_ATTACHMENT)
    except (PyPdfError, OSError, ValueError) as exc:
        raise ValueError(f"the PDF cannot be read: {exc}") from exc
    if not found:
        return None
    return json.loads(found[0].decode("utf-8"))


def check_consistency(base: Path, manifest: dict[str, Any]) -> list[Problem]:
    """Problems between the manifest's own parts: its inputs vs its file list, the report id
    recomputed from its inputs, and the evidence attached inside the PDF vs the files.

    ``base`` is the evidence (governance) folder; only files whose hashes already matched the
    manifest are worth comparing, which :func:`verify_folder` ensures by calling this last.
    """
    problems: list[Problem] = []
    listed = {e["path"]: e.get("sha256") for e in manifest.get("files", [])}
    inputs = manifest.get("inputs") or {}
    input_files = inputs.get("input_files")
    if not isinstance(input_files, dict):
        return [Problem("inconsistent", MANIFEST_PATH, "inputs.input_files is missing")]
    for path, digest in sorted(input_files.items()):
        if path not in listed:
            problems.append(Problem("inconsistent", path, "an input of the report that the manifest does not list"))
        elif listed[path] != digest:
            problems.append(Problem("inconsistent", path, "its hash in files differs from the one the report "
                                                          "was made from (inputs.input_files)"))
    for path in sorted(listed):
        parts = PurePosixPath(path).parts
        if len(parts) > 2 and parts[1] in OUTPUT_DIRS or path in input_files:
            continue
        problems.append(Problem("inconsistent", path, "listed in files but not among the report's inputs"))
    recorded = manifest.get("report_id")
    if recorded is not None:
        expected = report_id_for(manifest.get("run_id"), inputs.get("model_id"), inputs.get("model_sha256"),
                                 input_files)
        if recorded != expected:
            problems.append(Problem("inconsistent", MANIFEST_PATH,
                                    f"report id {recorded} does not match its inputs ({expected})"))
    if REPORT_HTML in listed and recorded and recorded not in (base / "reports/audit_report.html").read_text(
            encoding="utf-8", errors="replace"):
        problems.append(Problem("inconsistent", REPORT_HTML, f"does not carry report id {recorded}"))
    if REPORT_PDF in listed:
        problems += _check_pdf(base, manifest, recorded)
    return problems


def _check_pdf(base: Path, manifest: dict[str, Any], recorded: str | None) -> list[Problem]:
    """The PDF's attached evidence against the manifest and the files it claims."""
    try:
        evidence = _pdf_evidence(base / "reports/audit_report.pdf")
    except ValueError as exc:
        return [Problem("inconsistent", REPORT_PDF, str(exc))]
    if evidence is None:
        return [Problem("inconsistent", REPORT_PDF, f"no {EVIDENCE_ATTACHMENT} attached")]
    out = []
    if recorded is not None and evidence.get("report_id") != recorded:
        out.append(Problem("inconsistent", REPORT_PDF, f"attached evidence is of report {evidence.get('report_id')},"
                                                       f" the manifest of {recorded}"))
    if evidence.get("run_id") != manifest.get("run_id"):
        out.append(Problem("inconsistent", REPORT_PDF, "attached evidence is of another run"))
    if "manifest_inputs" in evidence and _comparable(evidence["manifest_inputs"]) != _comparable(manifest.get("inputs")):
        out.append(Problem("inconsistent", REPORT_PDF, "attached inputs differ from the manifest's inputs"))
    for key, path in ATTACHED_DOCUMENTS.items():
        claimed = evidence.get(key)
        if claimed is None:
            continue
        file = base / PurePosixPath(path).relative_to(ROOT)
        try:
            actual = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
        except ValueError:
            actual = None
        if _comparable(claimed) != _comparable(actual):
            out.append(Problem("inconsistent", path, f"differs from the copy attached to {REPORT_PDF}"))
    return out


def verify_folder(folder: str | os.PathLike[str], source: str | None = None, *,
                  expected_sha256: str | None = None, anchor: str | None = None) -> VerificationResult:
    """Verify an extracted folder: every listed file, nothing added, the manifest's internal
    consistency, and (when ``expected_sha256`` is given) the manifest itself against that anchor.

    ``folder`` may be the governance folder, a folder holding it, or its manifest.json;
    ``anchor`` names where ``expected_sha256`` comes from (for the messages).
    """
    base = locate_evidence(folder)
    result = VerificationResult(source=source or str(folder))
    manifest_file = base / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        listed = {entry["path"]: entry for entry in manifest["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{MANIFEST_PATH} is not a valid manifest: {exc}") from exc
    result.manifest_sha256 = sha256_file(manifest_file)
    result.n_files = len(listed)
    if expected_sha256 is not None:
        result.anchor = anchor or "--expect-sha256"
        if result.manifest_sha256 != expected_sha256.strip().lower():
            result.problems.append(Problem(
                "anchor", MANIFEST_PATH, f"sha256 {result.manifest_sha256} != {expected_sha256.strip().lower()} "
                f"recorded in {result.anchor}: the manifest was replaced after the report was made"))
    present = {f"{ROOT}/{rel}" for rel in _list_files(base)} - {MANIFEST_PATH}
    for path in sorted(listed):
        entry = listed[path]
        parts = PurePosixPath(path).parts
        if PurePosixPath(path).is_absolute() or ".." in parts or not parts or parts[0] != ROOT:
            result.problems.append(Problem("invalid", path, f"manifest entry outside {ROOT}/"))
            continue
        local = base / PurePosixPath(path).relative_to(ROOT)
        if path not in present:
            result.problems.append(Problem("missing", path, "listed in the manifest but absent"))
            continue
        try:
            digest = sha256_file(local)
        except OSError as exc:
            result.problems.append(Problem("unreadable", path, str(exc)))
            continue
        if digest != entry.get("sha256"):
            result.problems.append(
                Problem("changed", path, f"sha256 {digest[:16]}... != manifest {str(entry.get('sha256'))[:16]}...")
            )
        elif "size" in entry and local.stat().st_size != entry["size"]:
            result.problems.append(Problem("changed", path, "size differs from the manifest"))
    for path in sorted(present - set(listed)):
        result.problems.append(Problem("added", path, "not listed in the manifest"))
    if not result.problems:  # hashes hold: are the manifest's parts consistent with each other?
        result.problems += check_consistency(base, manifest)
    return result


def _safe_members(names: Iterable[str]) -> None:
    """Refuse absolute paths and ``..`` in archive member names."""
    for name in names:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise ArchiveError(f"unsafe path in archive: {name!r}")


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a zip or tar archive into ``dest``, refusing absolute paths, ``..`` and links."""
    archive = str(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _safe_members(zf.namelist())
            zf.extractall(dest)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            _safe_members(m.name for m in members)
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise ArchiveError(f"archive member is not a regular file: {m.name!r}")
            tf.extractall(dest, filter="data")
        return
    raise ArchiveError(f"{archive} is neither a folder nor a zip or tar archive")


def verify_path(path: str | os.PathLike[str], expected_sha256: str | None = None) -> VerificationResult:
    """Verify a downloaded copy of a run's evidence: the ``governance`` folder, a folder holding
    it, its ``manifest.json``, or a ``.zip`` / ``.tar`` archive of either; with
    ``expected_sha256`` (the run's ``governance.manifest_sha256``) the manifest is anchored."""
    p = Path(path)
    if not p.exists():
        raise ArchiveError(f"{path} does not exist")
    if p.is_dir() or p.name == MANIFEST_NAME:
        return verify_folder(p, expected_sha256=expected_sha256)
    with tempfile.TemporaryDirectory(prefix="governance-verify-") as tmp:
        extract_archive(p, tmp)
        return verify_folder(tmp, source=str(path), expected_sha256=expected_sha256)


def download_governance(run_id: str, dest: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download a run's ``governance/`` artifacts into ``dest`` and return ``dest``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise ArchiveError(f"run {run_id!r} not found in tracking store {mlflow.get_tracking_uri()}") from exc
    try:
        client.download_artifacts(run_id, ROOT, str(dest))
    except (MlflowException, OSError) as exc:
        raise ArchiveError(f"run {run_id} has no {ROOT}/ artifacts: {exc}") from exc
    return Path(dest)


def verify_run(run_id: str, tracking_uri: str | None = None) -> VerificationResult:
    """Download a run's ``governance/`` folder and verify it against its manifest, the manifest
    against the run tag ``governance.manifest_sha256`` and, when the run's model version is
    approved on this run, against the hash recorded on the version at approval."""
    import mlflow

    from governance.registry import approved_manifest_anchor

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="governance-verify-") as tmp:
        download_governance(run_id, tmp, tracking_uri)
        if not (Path(tmp) / MANIFEST_PATH).is_file():
            raise ArchiveError(f"run {run_id} has no {MANIFEST_PATH}; run `mlflow-governance report` first")
        tags = client.get_run(run_id).data.tags
        tag = tags.get(MANIFEST_TAG)
        result = verify_folder(tmp, source=f"run {run_id}", expected_sha256=tag,
                               anchor=f"run tag {MANIFEST_TAG}" if tag else None)
        if tag is None:
            result.notes.append(f"run {run_id} has no {MANIFEST_TAG} tag (a report made before anchoring); "
                                "re-run `mlflow-governance report` to anchor it")
        version_anchor = approved_manifest_anchor(client, run_id, tags)
        if version_anchor is not None:
            label, digest = version_anchor
            if result.manifest_sha256 != digest:
                result.problems.append(Problem("anchor", MANIFEST_PATH, f"sha256 {result.manifest_sha256} != "
                                               f"{digest} recorded on {label} at approval"))
            else:
                result.anchor = f"{result.anchor} and {label}" if result.anchor else label
        return result


def make_archive(run_id: str, target: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download a run's evidence into a ``.zip`` (entries sorted, fixed timestamps)."""
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="governance-archive-") as tmp:
        download_governance(run_id, tmp, tracking_uri)
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in _list_files(Path(tmp)):
                info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, (Path(tmp) / rel).read_bytes())
    return target


__all__ = [
    "ArchiveError",
    "MANIFEST_PATH",
    "MANIFEST_TAG",
    "Problem",
    "VerificationResult",
    "build_manifest",
    "check_consistency",
    "download_governance",
    "extract_archive",
    "locate_evidence",
    "make_archive",
    "manifest_bytes",
    "package_versions",
    "report_id_for",
    "sha256_bytes",
    "sha256_file",
    "tree_sha256",
    "verify_folder",
    "verify_path",
    "verify_run",
    "write_manifest",
]

