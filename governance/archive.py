"""Integrity manifest of a run's governance evidence, and its verification.

``governance/manifest.json`` lists the SHA-256 and size of every file under ``governance/``
(except the manifest itself) together with the inputs the evidence was produced from: the model
URI and id, the dataset digest, the effective configuration and the package versions. It is
written last, after every other artifact, and contains no wall-clock time, so the same evidence
gives the same manifest bytes.

:func:`verify_path` re-checks a downloaded folder or a ``.zip`` / ``.tar[.gz|.bz2|.xz]`` archive;
:func:`verify_run` downloads a run's ``governance/`` folder and re-checks it. Verification
passes only when every listed file is present and unchanged and no file was added.
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
    """A manifest or archive cannot be read (missing manifest, unsafe archive, bad JSON)."""


@dataclass(frozen=True)
class Problem:
    """One verification finding: ``kind`` is changed, missing, added, unreadable or invalid."""

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

    @property
    def ok(self) -> bool:
        """True when every listed file is present and unchanged and nothing was added."""
        return not self.problems

    def summary(self) -> str:
        """A human-readable multi-line summary naming every problem."""
        if self.ok:
            return f"OK: {self.n_files} files verified against {MANIFEST_PATH} ({self.source})"
        lines = [f"FAILED: {len(self.problems)} problem(s) in {self.source}"]
        lines += [f"  {p}" for p in self.problems]
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


def build_manifest(
    artifact_root: str | os.PathLike[str],
    inputs: dict[str, Any],
    *,
    run_id: str | None = None,
    previous_manifest_sha256: str | None = None,
) -> dict[str, Any]:
    """The manifest document for ``artifact_root/governance`` (the manifest itself excluded).

    ``inputs`` should hold ``model_uri``, ``model_id``, ``dataset_digest``, ``config`` and
    ``package_versions``; it is stored as given (JSON-serialisable values only).
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


def _find_root(folder: Path) -> Path:
    """The folder that contains ``governance/manifest.json`` (accepts the governance folder too)."""
    if (folder / MANIFEST_PATH).is_file():
        return folder
    if folder.name == ROOT and (folder / MANIFEST_NAME).is_file():
        return folder.parent
    # An archive may wrap everything in one top-level folder.
    subdirs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_PATH).is_file():
        return subdirs[0]
    raise ArchiveError(f"no {MANIFEST_PATH} found in {folder}")


def verify_folder(folder: str | os.PathLike[str], source: str | None = None) -> VerificationResult:
    """Verify an extracted folder (the artifact root or its ``governance/`` folder)."""
    root = _find_root(Path(folder))
    result = VerificationResult(source=source or str(folder))
    manifest_file = root / MANIFEST_PATH
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        listed = {entry["path"]: entry for entry in manifest["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{MANIFEST_PATH} is not a valid manifest: {exc}") from exc
    result.manifest_sha256 = sha256_file(manifest_file)
    result.n_files = len(listed)
    present = {f"{ROOT}/{rel}" for rel in _list_files(root / ROOT)} - {MANIFEST_PATH}
    for path in sorted(listed):
        entry = listed[path]
        parts = PurePosixPath(path).parts
        if PurePosixPath(path).is_absolute() or ".." in parts or not parts or parts[0] != ROOT:
            result.problems.append(Problem("invalid", path, f"manifest entry outside {ROOT}/"))
            continue
        if path not in present:
            result.problems.append(Problem("missing", path, "listed in the manifest but absent"))
            continue
        try:
            digest = sha256_file(root / path)
        except OSError as exc:
            result.problems.append(Problem("unreadable", path, str(exc)))
            continue
        if digest != entry.get("sha256"):
            result.problems.append(
                Problem("changed", path, f"sha256 {digest[:16]}... != manifest {str(entry.get('sha256'))[:16]}...")
            )
        elif "size" in entry and (root / path).stat().st_size != entry["size"]:
            result.problems.append(Problem("changed", path, "size differs from the manifest"))
    for path in sorted(present - set(listed)):
        result.problems.append(Problem("added", path, "not listed in the manifest"))
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


def verify_path(path: str | os.PathLike[str]) -> VerificationResult:
    """Verify a downloaded folder or a ``.zip`` / ``.tar`` archive of a run's evidence."""
    p = Path(path)
    if p.is_dir():
        return verify_folder(p)
    if not p.exists():
        raise ArchiveError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="governance-verify-") as tmp:
        extract_archive(p, tmp)
        return verify_folder(tmp, source=str(path))


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
    """Download a run's ``governance/`` folder and verify it against its manifest."""
    with tempfile.TemporaryDirectory(prefix="governance-verify-") as tmp:
        download_governance(run_id, tmp, tracking_uri)
        if not (Path(tmp) / MANIFEST_PATH).is_file():
            raise ArchiveError(f"run {run_id} has no {MANIFEST_PATH}; run `mlflow-governance report` first")
        return verify_folder(tmp, source=f"run {run_id}")


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
    "Problem",
    "VerificationResult",
    "build_manifest",
    "download_governance",
    "extract_archive",
    "make_archive",
    "manifest_bytes",
    "package_versions",
    "sha256_bytes",
    "sha256_file",
    "tree_sha256",
    "verify_folder",
    "verify_path",
    "verify_run",
    "write_manifest",
]

