"""Everything a report needs, read from an MLflow run's artifacts and the registry.

:func:`load_run_evidence` downloads the run's ``governance/`` folder, parses every artifact the
explanation stage writes (see docs/contracts.md) and gathers the MLflow metadata around it: the
registered model version, its signature and requirements, the training run's metrics and
datasets, the previous audited version. Missing pieces stay ``None`` so the report can say
"not provided" instead of guessing.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from governance.archive import OUTPUT_DIRS, ROOT, sha256_file, tree_sha256
from governance.errors import EXIT_CONTRACT
from governance.report.options import ReportError

EXPLANATIONS = f"{ROOT}/explanations"
#: Run tags the report step itself sets; they are not inputs (re-rendering must give the same bytes).
REPORT_OWN_TAGS = ("governance.status", "governance.report_id", "governance.manifest_sha256")


@dataclass
class ModelFacts:
    """The model under review, as MLflow knows it."""

    uri: str | None = None
    name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    model_id: str | None = None
    source: str | None = None
    source_run_id: str | None = None
    description: str | None = None
    version_tags: dict[str, str] = field(default_factory=dict)
    signature_inputs: str | None = None
    signature_outputs: str | None = None
    flavors: list[str] = field(default_factory=list)
    torch_version: str | None = None
    pytorch_format: str | None = None
    mlflow_version: str | None = None
    created: str | None = None
    artifact_sha256: str | None = None
    artifact_files: int = 0
    requirements: list[str] = field(default_factory=list)
    architecture: dict[str, Any] | None = None
    architecture_note: str | None = None
    training_metrics: dict[str, float] = field(default_factory=dict)
    training_params: dict[str, str] = field(default_factory=dict)
    training_datasets: list[dict[str, Any]] = field(default_factory=list)
    local_path: Path | None = None


@dataclass
class PreviousAudit:
    """The last audited version of the same registered model (for the change log)."""

    version: str
    run_id: str | None
    global_importance: dict[str, Any] | None
    training_metrics: dict[str, float]
    run_metrics: dict[str, float]


@dataclass
class RunEvidence:
    """A run's governance artifacts and MLflow metadata, parsed."""

    run_id: str
    run_name: str | None
    experiment_id: str
    experiment_name: str | None
    tracking_uri: str
    start_time_ms: int
    parent_run_id: str | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    datasets: list[dict[str, Any]]
    config: dict[str, Any]
    config_text: str | None
    global_importance: dict[str, Any]
    global_importance_table: pd.DataFrame | None
    layer_ranking: dict[str, Any] | None
    local_relevance: pd.DataFrame | None
    reason_codes: pd.DataFrame | None
    stability: dict[str, Any] | None
    quality: dict[str, Any] | None
    gates: dict[str, Any] | None
    validation: dict[str, Any] | None
    environment: dict[str, Any] | None
    plots: dict[str, bytes]
    image_examples: dict[str, Any] | None
    text_examples: list[dict[str, Any]] | None
    input_files: dict[str, str]
    model: ModelFacts
    previous: PreviousAudit | None
    approvals: list[dict[str, Any]]
    root: Path
    #: ``governance/drift/drift.json`` when a comparison was logged into the run (``compare``)
    drift: dict[str, Any] | None = None
    drift_plot: bytes | None = None

    @property
    def start_time(self) -> datetime:
        """The run's start time (UTC), the only clock the report uses."""
        return datetime.fromtimestamp(self.start_time_ms / 1000.0, tz=timezone.utc)


def _read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ReportError(f"{path.name} is not valid JSON: {exc}") from exc


def parquet_parts(path: Path) -> list[Path]:
    """The parquet file(s) of a per-sample output: the file itself, or the part files of a folder
    with that name (as Spark writes it; bookkeeping files such as ``_SUCCESS`` skipped), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*.parquet")
                  if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts))


def _read_parquet(path: Path) -> pd.DataFrame | None:
    """A parquet table (a file or a folder of parts), or None when absent."""
    parts = parquet_parts(path)
    if not parts:
        return None
    if len(parts) == 1:
        return pd.read_parquet(parts[0])
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


#: Rows of local_relevance.parquet read for the distribution views (evenly spaced, deterministic).
MAX_LOCAL_ROWS = 50_000
#: Features (by rank) whose local relevance columns are read when the L1 norm is stored.
MAX_LOCAL_FEATURES = 40
_META_COLUMNS = ("sample_id", "id", "sample", "row", "index", "prediction", "predicted", "predicted_class",
                 "pred", "label", "score", "relevance_l1")


def _read_local_relevance(path: Path, ranked_features: list[str]) -> pd.DataFrame | None:
    """Local relevance, bounded: at most ``MAX_LOCAL_ROWS`` evenly spaced rows; when the file
    stores each row's L1 norm (``relevance_l1``) only the top ``MAX_LOCAL_FEATURES`` features."""
    paths = parquet_parts(path)
    if not paths:
        return None
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(p) for p in paths]
    names = files[0].schema_arrow.names
    if "relevance_l1" in names:
        wanted = [c for c in names if c in _META_COLUMNS]
        for f in ranked_features[:MAX_LOCAL_FEATURES]:
            for cand in (f, f"relevance_{f}"):
                if cand in names and cand not in wanted:
                    wanted.append(cand)
                    break
    else:
        wanted = names
    n = sum(pf.metadata.num_rows for pf in files)
    step = max(1, -(-n // MAX_LOCAL_ROWS))
    parts, seen = [], 0
    for batch in (b for pf in files for b in pf.iter_batches(columns=wanted, batch_size=65536)):
        frame = batch.to_pandas()
        import numpy as np

        parts.append(frame.iloc[np.nonzero(np.arange(seen, seen + len(frame)) % step == 0)[0]])
        seen += len(frame)
    if not parts:
        return pd.DataFrame(columns=wanted)
    out = pd.concat(parts, ignore_index=True)
    out.attrs["n_rows_total"] = n
    return out


def _dataset_inputs(run) -> list[dict[str, Any]]:
    """The run's dataset inputs as plain dicts, sorted."""
    out = []
    for di in getattr(run.inputs, "dataset_inputs", None) or []:
        ds = di.dataset
        tags = {t.key: t.value for t in (di.tags or [])}
        try:
            profile = json.loads(ds.profile) if ds.profile else {}
        except ValueError:
            profile = {}
        try:
            source = json.loads(ds.source) if ds.source else {}
        except ValueError:
            source = {"uri": ds.source}
        out.append(
            {
                "name": ds.name,
                "digest": ds.digest,
                "source_type": ds.source_type,
                "source": source,
                "context": tags.get("mlflow.data.context"),
                "rows": profile.get("num_rows"),
                "elements": profile.get("num_elements"),
            }
        )
    return sorted(out, key=lambda d: (str(d["context"]), str(d["name"]), str(d["digest"])))


#: Where the explanation stage records each input's hashes when it reads the data.
DATASETS_JSON = f"{ROOT}/data_quality/datasets.json"
NOT_RECORDED = "not recorded at explain time"


def merge_datasets(logged: list[dict[str, Any]], recorded: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run's inputs, one row each, with the SHA-256 ``explain`` took when it read them.

    ``logged``: the MLflow dataset inputs; ``recorded``: datasets.json (``{"datasets": [...]}``).
    An entry of datasets.json is matched to an MLflow input by its ``mlflow_digest``; an input
    without a recorded hash keeps ``sha256`` None (the report says "not recorded at explain
    time"): a hash is never computed at report time, when the file may have changed.
    """
    entries = [e for e in ((recorded or {}).get("datasets") or []) if isinstance(e, dict)]
    used: set[int] = set()
    out = []
    for ds in logged:
        row = dict(ds, sha256=None, files=None, role=ds.get("context"))
        for i, e in enumerate(entries):
            if i not in used and e.get("mlflow_digest") and e.get("mlflow_digest") == ds.get("digest"):
                used.add(i)
                row.update(sha256=e.get("sha256"), files=e.get("files"), role=e.get("role") or ds.get("context"),
                           recorded_source=e.get("source"), rows=ds.get("rows") or e.get("n_rows"))
                break
        out.append(row)
    for i, e in enumerate(entries):
        if i not in used:  # recorded by explain but not (or no longer) an MLflow input of the run
            out.append({"name": e.get("name"), "digest": e.get("mlflow_digest"), "source_type": None,
                        "source": {"uri": e.get("source")} if e.get("source") else {}, "context": e.get("role"),
                        "role": e.get("role"), "rows": e.get("n_rows"), "elements": None,
                        "sha256": e.get("sha256"), "files": e.get("files"), "recorded_source": e.get("source")})
    return out


def _parse_model_uri(uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, version, alias) of a ``models:/name/version`` or ``models:/name@alias`` URI."""
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri or "")
    if m:
        return m.group(1), m.group(2), None
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri or "")
    if m:
        return m.group(1), None, m.group(2)
    return None, None, None


def resolve_model_version(client, uri: str | None):
    """The registry ModelVersion behind a model URI, or None when it is not registered."""
    from mlflow.exceptions import MlflowException

    if not uri:
        return None
    name, version, alias = _parse_model_uri(uri)
    try:
        if name and version:
            return client.get_model_version(name, version)
        if name and alias:
            return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    m = re.fullmatch(r"runs:/([0-9a-f]+)/.+", uri)
    if m:
        try:
            hits = client.search_model_versions(f"run_id = '{m.group(1)}'")
        except MlflowException:
            hits = []
        if len(hits) == 1:
            return hits[0]
        return None
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", uri)
    if m:
        try:
            hits = client.search_model_versions(f"source = '{uri}'")
        except MlflowException:
            hits = []
        if hits:
            return sorted(hits, key=lambda v: int(v.version))[-1]
    return None


def load_model_facts(client, uri: str | None, *, with_architecture: bool, layer_types: dict[str, str],
                     workdir: Path, architecture: dict[str, Any] | None = None,
                     allow_pickle: bool = False) -> ModelFacts:
    """Registry, logged-model and artifact facts for ``uri`` (each missing piece left empty).

    The architecture comes from ``architecture`` (the summary the explanation stage recorded).
    Only without one is the model loaded to summarise it, and a pickled model (whose loading
    runs code it carries) only when ``allow_pickle`` is set; otherwise the facts say why not.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    facts = ModelFacts(uri=uri)
    if not uri:
        return facts
    mv = resolve_model_version(client, uri)
    download_uri = uri
    if mv is not None:
        facts.name, facts.version = mv.name, str(mv.version)
        facts.aliases = sorted(mv.aliases or [])
        facts.source = mv.source
        facts.source_run_id = mv.run_id
        facts.description = mv.description or None
        facts.version_tags = dict(sorted((mv.tags or {}).items()))
        facts.model_id = getattr(mv, "model_id", None)
        if not facts.model_id and mv.source and re.fullmatch(r"models:/m-[0-9a-f]+", mv.source):
            facts.model_id = mv.source.split("/")[-1]
        download_uri = f"models:/{mv.name}/{mv.version}"
    elif re.fullmatch(r"models:/m-[0-9a-f]+", uri):
        facts.model_id = uri.split("/")[-1]
    try:
        local = Path(mlflow.artifacts.download_artifacts(download_uri, dst_path=str(workdir / "model")))
    except (MlflowException, OSError) as exc:
        facts.architecture_note = f"model artifacts not readable: {exc}"
        return facts
    facts.local_path = local
    facts.artifact_sha256, facts.artifact_files = tree_sha256(local, exclude=("registered_model_meta",))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    facts.model_id = facts.model_id or mlmodel.get("model_id")
    facts.flavors = sorted((mlmodel.get("flavors") or {}).keys())
    pt = (mlmodel.get("flavors") or {}).get("pytorch") or {}
    facts.torch_version = pt.get("pytorch_version")
    data_dir = local / str(pt.get("model_data") or "data")
    names = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    if any(n.endswith(".pt2") for n in names):
        facts.pytorch_format = "pt2 (torch.export program)"
    elif any(n.endswith((".pth", ".pt")) for n in names):
        facts.pytorch_format = "pickle (torch.save of the module)"
    hf = (mlmodel.get("flavors") or {}).get("transformers")
    if isinstance(hf, dict) and not pt:  # a transformers-flavour model: its weights' format
        weights = local / str(hf.get("model_binary") or "model")
        safe = weights.is_dir() and any(weights.glob("*.safetensors"))
        facts.pytorch_format = ("transformers, safetensors weights" if safe else
                                "transformers, pickled weights (.bin)" if weights.is_dir() else
                                "transformers, weights not logged (a Hugging Face repository reference)")
    facts.mlflow_version = mlmodel.get("mlflow_version")
    facts.created = mlmodel.get("utc_time_created")
    sig = mlmodel.get("signature") or {}
    facts.signature_inputs = _signature_text(sig.get("inputs"))
    facts.signature_outputs = _signature_text(sig.get("outputs"))
    req = local / "requirements.txt"
    if req.is_file():
        facts.requirements = [ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if facts.source_run_id is None and facts.model_id:
        try:
            facts.source_run_id = client.get_logged_model(facts.model_id).source_run_id
        except (MlflowException, AttributeError):
            pass
    if facts.source_run_id:
        try:
            src = client.get_run(facts.source_run_id)
            facts.training_metrics = dict(sorted(src.data.metrics.items()))
            facts.training_params = dict(sorted(src.data.params.items()))
            facts.training_datasets = _dataset_inputs(src)
        except MlflowException:
            pass
    if with_architecture and architecture is not None:
        facts.architecture = architecture  # recorded by the explanation stage
    elif with_architecture and not (facts.pytorch_format or "").startswith("pt2") and not allow_pickle:
        stored = ("stored as a pickle" if facts.pytorch_format else "not in a format recognised as pt2 "
                  "(it may be a pickle)")
        facts.architecture_note = (
            f"the model is {stored} and no architecture summary was recorded; loading it to summarise it could "
            "run code it carries, so it was not loaded (pass --allow-pickle to load it anyway, or log the model "
            "in pt2 format and explain it again)")
    elif with_architecture:
        from governance.model_summary import logged_model_summary  # the torch side, not the report's

        try:
            facts.architecture = logged_model_summary(str(local), layer_types)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported, not fatal
            facts.architecture_note = f"the model could not be loaded to summarise it ({type(exc).__name__}: {exc})"
    else:
        facts.architecture_note = "disabled in the configuration (report.model_architecture: false)"
    return facts


def _signature_text(spec: Any) -> str | None:
    """A one-line text of an MLflow signature spec."""
    if not spec:
        return None
    try:
        items = json.loads(spec) if isinstance(spec, str) else spec
    except ValueError:
        return str(spec)
    parts = []
    for item in items:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        label = item.get("name") or ""
        if item.get("type") == "tensor":
            ts = item.get("tensor-spec") or {}
            parts.append(f"{label} tensor {ts.get('dtype')} {tuple(ts.get('shape') or ())}".strip())
        else:
            parts.append(f"{label} {item.get('type')}".strip())
    return "; ".join(parts)


def find_governance_run(client, name: str, version: str) -> str | None:
    """The governance run of a model version: its latest explanation (tag
    ``governance.explained_run_id``, else ``governance.run_id``), else a tag search."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        return None
    for key in ("governance.explained_run_id", "governance.run_id"):
        rid = (mv.tags or {}).get(key)
        if rid:
            return rid
    candidates = {f"models:/{name}/{version}"}
    if mv.source:
        candidates.add(mv.source)
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        for uri in sorted(candidates):
            runs = client.search_runs(exps, filter_string=f"tags.`governance.model_uri` = '{uri}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                return runs[0].info.run_id
    except MlflowException:
        return None
    return None


def find_previous_audit(client, facts: ModelFacts) -> PreviousAudit | None:
    """The most recent audited version of the same model older than this one, if any."""
    from mlflow.exceptions import MlflowException

    if not (facts.name and facts.version):
        return None
    try:
        versions = client.search_model_versions(f"name = '{facts.name}'")
    except MlflowException:
        return None
    current = int(facts.version)
    audited = [
        v for v in versions
        if int(v.version) < current and ((v.tags or {}).get("governance.audited") == "true" or "audited" in (v.aliases or []))
    ]
    if not audited:
        return None
    prev = max(audited, key=lambda v: int(v.version))
    rid = find_governance_run(client, prev.name, str(prev.version))
    gi = None
    run_metrics: dict[str, float] = {}
    if rid:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                p = client.download_artifacts(rid, f"{EXPLANATIONS}/global_importance.json", tmp)
                gi = json.loads(Path(p).read_text())
            run_metrics = dict(client.get_run(rid).data.metrics)
        except (MlflowException, OSError, ValueError):
            gi = None
    training: dict[str, float] = {}
    if prev.run_id:
        try:
            training = dict(client.get_run(prev.run_id).data.metrics)
        except MlflowException:
            pass
    return PreviousAudit(str(prev.version), rid, gi, training, run_metrics)


def _load_examples(expl: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """Example inputs with relevance: ``examples/images.npz`` and ``examples/texts.json``."""
    images = None
    npz = expl / "examples" / "images.npz"
    if npz.is_file():
        import numpy as np

        with np.load(io.BytesIO(npz.read_bytes()), allow_pickle=False) as data:
            images = {k: data[k] for k in data.files}
        if "inputs" not in images or "relevance" not in images:
            raise ReportError("examples/images.npz needs arrays 'inputs' and 'relevance'")
    texts = _read_json(expl / "examples" / "texts.json")
    if texts is not None and not isinstance(texts, list):
        raise ReportError("examples/texts.json must be a list of {tokens, relevance, ...} objects")
    return images, texts


class ContractFailed(ReportError):
    """The run has no explanation because its data broke the contract (exit 2, as for explain)."""

    exit_code = EXIT_CONTRACT


def _no_explanation(run_id: str, tags: dict[str, str], art: Path) -> None:
    """Raise the error that says why a run has no explanation: its contract failed, it failed
    otherwise, or explain never ran on it."""
    validation = _read_json(art / ROOT / "data_quality" / "validation_result.json")
    if isinstance(validation, dict) and validation.get("success") is False:
        failures = validation.get("failures") or []
        named = "; ".join(f"{f.get('expectation')} on {f.get('column') or 'the table'}"
                          + (f" ({f['detail']})" if f.get("detail") else "") for f in failures[:5] if isinstance(f, dict))
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        source = validation.get("contract_source") or tags.get("governance.contract_source") or "the data contract"
        raise ContractFailed(
            f"run {run_id} has no explanation: its data broke the contract ({source})"
            + (f": {named}{more}" if named else "")
            + "; fix the data or the contract and run `mlflow-governance explain` again")
    if tags.get("governance.status") == "failed":
        raise ReportError(f"run {run_id} has no explanation: the explanation stage failed on it "
                          "(tag governance.status=failed); run `mlflow-governance explain` again")
    raise ReportError(f"run {run_id} has no {EXPLANATIONS}/ artifacts; run `mlflow-governance explain` on it first")


def load_run_evidence(run_id: str, *, tracking_uri: str | None = None, config_override: dict[str, Any] | None = None,
                      with_architecture: bool = True, workdir: Path,
                      allow_pickle: bool = False) -> RunEvidence:
    """Read a run's governance artifacts and metadata into ``workdir`` (the caller's folder, which
    the caller removes); raise :class:`ReportError` when unusable."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ReportError(f"run {run_id!r} not found in tracking store {uri}") from exc
    workdir = Path(workdir)
    art = workdir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    try:
        client.download_artifacts(run_id, ROOT, str(art))
    except (MlflowException, OSError):
        pass
    expl = art / EXPLANATIONS
    if not expl.is_dir():
        _no_explanation(run_id, run.data.tags, art)
    gi = _read_json(expl / "global_importance.json")
    if not gi or not gi.get("features"):
        raise ReportError(
            f"run {run_id} has no {EXPLANATIONS}/global_importance.json with features; "
            "run `mlflow-governance explain` on it first"
        )
    g = art / ROOT
    config_text = (g / "config.yaml").read_text() if (g / "config.yaml").is_file() else None
    config = yaml.safe_load(config_text) if config_text else {}
    config = config or {}
    if config_override:
        for key in ("report", "model_card", "reason_codes"):
            if config_override.get(key):
                config[key] = config_override[key]
    plots = {}
    if (expl / "plots").is_dir():
        for p in sorted((expl / "plots").glob("*.png")):
            plots[p.name] = p.read_bytes()
    images, texts = _load_examples(expl)
    # Every input file the report reads, with its hash (goes into the manifest's inputs).
    input_files = {}
    for p in sorted(x for x in g.rglob("*") if x.is_file()):
        rel = p.relative_to(art).as_posix()
        if rel.split("/")[1] in OUTPUT_DIRS or rel.endswith("manifest.json"):
            continue
        input_files[rel] = sha256_file(p)
    layer_ranking = _read_json(expl / "layer_ranking.json")
    layer_types = {}
    for row in (layer_ranking or {}).get("layers", []):
        if isinstance(row, dict) and row.get("type"):
            layer_types[str(row.get("module"))] = str(row["type"])
    model_uri = run.data.tags.get("governance.model_uri")
    opts_arch = (config.get("report") or {}).get("model_architecture", True)
    facts = load_model_facts(client, model_uri, with_architecture=with_architecture and opts_arch is not False,
                             layer_types=layer_types, workdir=workdir,
                             architecture=_read_json(expl / "model_summary.json"), allow_pickle=allow_pickle)
    datasets = merge_datasets(_dataset_inputs(run), _read_json(art / DATASETS_JSON))
    approvals_doc = _read_json(g / "reports" / "approvals.json")
    exp = client.get_experiment(run.info.experiment_id)
    return RunEvidence(
        run_id=run_id,
        run_name=run.info.run_name,
        experiment_id=run.info.experiment_id,
        experiment_name=exp.name if exp else None,
        tracking_uri=uri,
        start_time_ms=int(run.info.start_time or 0),
        parent_run_id=run.data.tags.get("mlflow.parentRunId"),
        tags={k: v for k, v in sorted(run.data.tags.items())
              if not k.startswith("mlflow.") and k not in REPORT_OWN_TAGS},
        params=dict(sorted(run.data.params.items())),
        metrics=dict(sorted(run.data.metrics.items())),
        datasets=datasets,
        config=config,
        config_text=config_text,
        global_importance=gi,
        global_importance_table=_read_parquet(expl / "global_importance.parquet"),
        layer_ranking=layer_ranking,
        local_relevance=_read_local_relevance(
            expl / "local_relevance.parquet",
            [str(f["feature"]) for f in sorted(gi["features"], key=lambda f: f.get("rank", 0))]),
        reason_codes=_read_parquet(expl / "reason_codes.parquet"),
        stability=_read_json(expl / "stability.json"),
        quality=_read_json(expl / "quality.json"),
        gates=_read_json(expl / "gates.json"),
        validation=_read_json(g / "data_quality" / "validation_result.json"),
        environment=_read_json(g / "environment.json"),
        plots=plots,
        image_examples=images,
        text_examples=texts,
        input_files=input_files,
        model=facts,
        previous=find_previous_audit(client, facts),
        approvals=list((approvals_doc or {}).get("entries", [])),
        root=art,
        drift=_read_json(g / "drift" / "drift.json"),
        drift_plot=(g / "drift" / "drift.png").read_bytes() if (g / "drift" / "drift.png").is_file() else None,
    )
