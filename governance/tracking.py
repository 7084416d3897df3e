"""Everything that talks to MLflow: load models and logged datasets, pick the run, log artifacts,
metrics, tags and inputs, and tag registered model versions.

All logging goes through ``MlflowClient`` with an explicit run id, so the stage works the same
inside ``mlflow run`` (``MLFLOW_RUN_ID``), inside a notebook's active run, inside
``mlflow.models.evaluate`` and on its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from governance.errors import InputError
from governance.owner import ALIVE, DEAD, Owner
from governance.workdirs import make_owned_dir, owned_tempdir, remove_owned

ARTIFACT_ROOT = "governance"
TAG_PREFIX = "governance."


class ModelLoadError(InputError):
    """The model URI does not exist or is not a PyTorch (or transformers) model; the message names the URI."""


class PickleRefused(ModelLoadError):
    """The model is stored as a pickle and the caller did not opt in to loading it."""


PT2 = "pt2"
PICKLE = "pickle"
SAFETENSORS = "safetensors"
PYTORCH = "pytorch"
TRANSFORMERS = "transformers"
#: what a transformers-flavour task says about the model's output (``task_inference.ALIASES``)
_TRANSFORMERS_TASKS = {"text-classification": "classification", "sentiment-analysis": "classification"}
TASK_TAG = "governance.task"


@dataclass(frozen=True)
class ModelInputSpec:
    """One tensor the model's forward takes: its name, and dtype/shape when the model records them
    (``-1`` is a free dimension, e.g. the batch)."""

    name: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        """``name: float32 (-1, 5)`` (dtype and shape only when known)."""
        parts = [self.dtype or "", str(tuple(self.shape)) if self.shape is not None else ""]
        extra = " ".join(p for p in parts if p)
        return f"{self.name}: {extra}" if extra else self.name


@dataclass
class ModelHandle:
    """A loaded model and what is known about it: where it came from and what it carries.

    ``serialization`` is ``pt2`` or ``pickle`` (None for an in-memory module); ``allow_pickle`` says
    the caller opted in to loading a pickle (the stage records it as ``governance.allow_pickle``).
    ``feature_names`` are the column names of the MLflow signature's inputs when the signature names
    columns (``feature_names_source`` says where they came from). ``task_hint`` is a task read from
    the model's metadata (``task_hint_source`` says which); ``output_shape`` is the signature's
    output shape; ``inputs`` are the tensors the forward takes (more than one: a multi-input model).
    ``flavour`` is the MLflow flavour it was loaded from (``pytorch`` or ``transformers``);
    ``components`` the other components logged with a transformers-flavour model (``tokenizer``),
    loaded. Nothing here decides the task or the feature order: the stage does.
    """

    model: Any
    uri: str
    model_id: str | None = None
    source_run_id: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None
    serialization: str | None = None
    allow_pickle: bool = False
    feature_names: list[str] | None = None
    feature_names_source: str | None = None
    task_hint: str | None = None
    task_hint_source: str | None = None
    output_shape: tuple[int, ...] | None = None
    inputs: list[ModelInputSpec] | None = None
    flavour: str | None = None
    components: dict[str, Any] | None = None


def client() -> MlflowClient:
    """A client for the current tracking URI (``MLFLOW_TRACKING_URI`` is honoured)."""
    return MlflowClient()


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?/?$")


def _registered_version(uri: str) -> tuple[str | None, str | None]:
    m = _MODELS_URI.match(uri)
    if not m or m.group("name").startswith("m-") and not (m.group("version") or m.group("alias")):
        return None, None
    c = client()
    name = m.group("name")
    if m.group("alias"):
        mv = c.get_model_version_by_alias(name, m.group("alias"))
        return name, str(mv.version)
    version = m.group("version")
    if version is None or version == "latest":
        versions = c.search_model_versions(f"name='{name}'")
        if not versions:
            return name, None
        return name, str(max(int(v.version) for v in versions))
    return name, str(version)


def model_serialization(local_model_dir: str | Path) -> str:
    """``pt2`` or ``pickle``, read from a downloaded MLflow model's files without loading anything:
    the PyTorch flavour's ``model_data`` folder holds ``model.pt2`` (torch.export) or ``model.pth``
    (``torch.save``, a pickle). Raises :class:`ModelLoadError` when it holds neither."""
    import yaml

    root = Path(local_model_dir)
    try:
        meta = yaml.safe_load((root / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"{root}: no readable MLmodel file ({exc})") from exc
    flavour = (meta.get("flavors") or {}).get("pytorch") or {}
    data = root / str(flavour.get("model_data", "data"))
    if data.is_file():  # very old layout: model_data names the serialized file itself
        return PT2 if data.suffix == ".pt2" else PICKLE
    if (data / "model.pt2").is_file():
        return PT2
    if (data / "model.pth").is_file():
        return PICKLE
    raise ModelLoadError(f"{root}: the PyTorch flavour's {data.name}/ holds neither model.pt2 nor model.pth")


def pickle_refusal(model_uri: str) -> str:
    """Why a pickled model is not loaded and how to fix it (one line)."""
    return (f"model '{model_uri}' is stored as a pickle (torch.save): loading it runs any code the file "
            "contains. Log it as pt2 instead, mlflow.pytorch.log_model(model, name=..., input_example=x, "
            "serialization_format='pt2'), or, if you trust whoever wrote it, opt in with --allow-pickle "
            "(config allow_pickle: true)")


class _PicklePolicy:
    """MLflow's own switch (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``) for the duration of a load: off,
    MLflow also refuses a pt2 archive that carries pickled records."""

    KEY = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"

    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self.saved: str | None = None

    def __enter__(self) -> None:
        self.saved = os.environ.get(self.KEY)
        os.environ[self.KEY] = "true" if self.allow else "false"

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            os.environ.pop(self.KEY, None)
        else:
            os.environ[self.KEY] = self.saved


def load_model(model_uri: str, device: str = "cpu", *, allow_pickle: bool = False) -> ModelHandle:
    """Load a PyTorch- or transformers-flavour MLflow model from any model URI, refusing pickles
    unless opted in.

    Supports ``runs:/<id>/<path>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/m-<id>`` and local paths. The model is downloaded into a temporary folder (removed
    afterwards) and its serialization read from the files before anything is deserialized: a
    pickle raises :class:`PickleRefused` unless ``allow_pickle``; a pt2 archive is loaded with
    MLflow's pickle-free check on; a transformers-flavour model is loaded from its safetensors
    weights and its logged components (see :func:`_load_transformers`). Raises
    :class:`ModelLoadError` with the URI and the cause.
    """
    from mlflow.models import Model

    _check_local_model(model_uri)
    components: dict[str, Any] | None = None
    with owned_tempdir("governance-model-") as tmp:
        try:  # downloading runs nothing; the MLmodel file and the files are read before any load
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp))
            meta = Model.load(local)
        except Exception as exc:
            raise ModelLoadError(f"model URI '{model_uri}' could not be resolved: {_reason(exc)}") from exc
        flavours = meta.flavors or {}
        if PYTORCH in flavours:
            flavour = PYTORCH
            model, serialization = _load_pytorch(local, model_uri, allow_pickle)
        elif TRANSFORMERS in flavours:
            flavour = TRANSFORMERS
            model, serialization, components = _load_transformers(Path(local), flavours[TRANSFORMERS], model_uri,
                                                                  allow_pickle)
        else:
            raise ModelLoadError(f"model URI '{model_uri}' is not a PyTorch or transformers model "
                                 f"(flavours: {sorted(flavours)})")
    if device != "cpu" and hasattr(model, "to"):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' was asked for but torch sees no CUDA device; "
                                 "use --device cpu")
        model = model.to(device)
    try:
        model.eval()
    except Exception:  # an exported (pt2) GraphModule is already in inference form
        pass
    name = version = None
    try:
        name, version = _registered_version(model_uri)
    except Exception:
        name = version = None
    handle = ModelHandle(
        model=model, uri=model_uri, model_id=getattr(meta, "model_id", None),
        source_run_id=meta.run_id, registered_name=name, registered_version=version,
        serialization=serialization, allow_pickle=bool(allow_pickle), flavour=flavour, components=components,
    )
    if flavour == PYTORCH:
        read_signature(handle, meta.signature)
        handle.inputs = model_inputs(model, meta.signature)
    else:
        handle.inputs = tokenizer_inputs(model, (components or {}).get("tokenizer"))
    hint = task_hint(handle, meta.metadata)
    if hint is None and flavour == TRANSFORMERS:
        task = str(flavours[TRANSFORMERS].get("task") or "")
        if task in _TRANSFORMERS_TASKS:
            hint = _TRANSFORMERS_TASKS[task], f"transformers flavour task {task}"
    if hint is not None:
        handle.task_hint, handle.task_hint_source = hint
    return handle


def _load_pytorch(local: str, model_uri: str, allow_pickle: bool) -> tuple[Any, str]:
    """The PyTorch flavour's module and its serialization (pt2, or a pickle with the opt-in)."""
    import mlflow.pytorch

    serialization = model_serialization(local)
    if serialization == PICKLE and not allow_pickle:
        raise PickleRefused(pickle_refusal(model_uri))
    try:
        with _PicklePolicy(allow_pickle):
            return mlflow.pytorch.load_model(local), serialization
    except Exception as exc:
        if "pickle" in str(exc).lower() and not allow_pickle:
            raise PickleRefused(f"model '{model_uri}': its pt2 archive carries pickled records, and "
                                "loading them runs code; re-export it with torch.export or opt in "
                                "with --allow-pickle (config allow_pickle: true)") from exc
        raise ModelLoadError(f"model URI '{model_uri}' could not be loaded: {_reason(exc)}") from exc


#: weight files that ``torch.load`` unpickles (a transformers model saved without safetensors)
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _load_transformers(local: Path, conf: Mapping[str, Any], model_uri: str,
                       allow_pickle: bool) -> tuple[Any, str, dict[str, Any]]:
    """The torch module and the loaded components (``tokenizer``) of a transformers-flavour model,
    from its own files and offline (``local_files_only``): the class the flavour names
    (``pipeline_model_type``), weights from safetensors (pickled ``.bin`` weights only with the
    opt-in), eager attention (the engine walks plain matrix products), and never code shipped with
    the model (``trust_remote_code`` off: a model that needs it is refused)."""
    import json

    import transformers

    binary = local / str(conf.get("model_binary") or "model")
    if not binary.is_dir():
        repo = conf.get("source_model_name") or "?"
        raise ModelLoadError(f"transformers model '{model_uri}' was logged without its weights (it names the "
                             f"Hugging Face repository '{repo}'), which cannot be loaded offline; log it with "
                             "save_pretrained=True")
    try:
        config = json.loads((binary / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers model '{model_uri}': no readable {binary.name}/config.json ({exc})") from exc
    if conf.get("code") or config.get("auto_map"):
        raise ModelLoadError(f"transformers model '{model_uri}' needs code shipped with the model (custom "
                             "architecture): running it is not supported; log a model whose class transformers "
                             "ships")
    safe = any(binary.glob("*.safetensors"))
    if not safe:
        if not any(f.suffix in _PICKLED_WEIGHTS for f in binary.iterdir()):
            raise ModelLoadError(f"transformers model '{model_uri}': {binary.name}/ holds no weights")
        if not allow_pickle:
            raise PickleRefused(f"transformers model '{model_uri}' stores its weights as a pickle (.bin): loading "
                                "them runs any code the file contains. Save it with safetensors (the default of "
                                "save_pretrained), or, if you trust whoever wrote it, opt in with --allow-pickle "
                                "(config allow_pickle: true)")
    cls_name = conf.get("pipeline_model_type") or next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, str(cls_name), None) if cls_name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"transformers model '{model_uri}': model class '{cls_name}' is not one transformers "
                             f"{transformers.__version__} ships")
    try:
        model = cls.from_pretrained(str(binary), local_files_only=True, use_safetensors=safe, trust_remote_code=False,
                                    attn_implementation="eager")
    except Exception as exc:
        raise ModelLoadError(f"transformers model '{model_uri}' could not be loaded: {_reason(exc)}") from exc
    components: dict[str, Any] = {}
    if "tokenizer" in (conf.get("components") or []):
        components["tokenizer"] = _load_tokenizer_component(local / "components" / "tokenizer", model_uri)
    return model, SAFETENSORS if safe else PICKLE, components


def _load_tokenizer_component(folder: Path, model_uri: str) -> Any:
    """The tokenizer logged as a component of a transformers-flavour model (offline, fast)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True,
                                             trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"transformers model '{model_uri}': its tokenizer component could not be loaded: "
                             f"{_reason(exc)}") from exc


def tokenizer_inputs(model: Any, tokenizer: Any = None) -> list[ModelInputSpec]:
    """The tokenizer outputs a transformers model's forward takes, in the forward's order
    (``input_ids``, ``attention_mask``, ``token_type_ids`` where the tokenizer gives them)."""
    import inspect

    given = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        params = given
    return [ModelInputSpec(name=p, dtype="int64", shape=(-1, -1)) for p in params if p in given]


_HOW = ("give the folder that holds the model's MLmodel file (mlflow.pytorch.save_model), "
        "or a runs:/<run id>/<path> or models:/<name>/<version> URI")


def _check_local_model(model_uri: str) -> None:
    """A local path (no scheme, or file:) that is not an MLflow model folder: one line that says
    what it is instead (MLflow's own message for it is a list of download failures)."""
    from governance.sources import local_path

    path = local_path(model_uri)
    if path is None:
        return
    if not path.exists():
        raise ModelLoadError(f"model URI '{model_uri}' could not be resolved: there is no file or folder "
                             f"'{path}'; {_HOW}")
    if path.is_file():
        raise ModelLoadError(f"model URI '{model_uri}' is a file, not an MLflow model: log or save it with "
                             f"mlflow.pytorch and {_HOW}")
    if not (path / "MLmodel").is_file():
        raise ModelLoadError(f"model URI '{model_uri}' is a folder without an MLmodel file, not an MLflow "
                             f"model; {_HOW}")


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


def read_signature(handle: ModelHandle, signature: Any) -> None:
    """Feature names (named columns) and the output shape (one tensor output) of the signature."""
    if signature is None:
        return
    inputs = signature.inputs
    if inputs is not None and not inputs.is_tensor_spec() and inputs.has_input_names():
        handle.feature_names = [str(n) for n in inputs.input_names()]
        handle.feature_names_source = "model signature"
    outputs = signature.outputs
    if outputs is not None and outputs.is_tensor_spec() and len(outputs.inputs) == 1:
        handle.output_shape = tuple(int(d) for d in outputs.inputs[0].shape)


def model_inputs(model: Any, signature: Any = None) -> list[ModelInputSpec]:
    """The tensors ``model``'s forward takes, in order: names from the forward's parameters (an
    exported program keeps the original names), dtype and shape from the MLflow signature's tensor
    specs when it has them (their names win when set)."""
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
    except (TypeError, ValueError, AttributeError):
        names = []
    specs: list[Any] = []
    if signature is not None and signature.inputs is not None and signature.inputs.is_tensor_spec():
        specs = list(signature.inputs.inputs)
    n = len(specs) or len(names) or 1
    out = []
    for i in range(n):
        spec = specs[i] if i < len(specs) else None
        name = getattr(spec, "name", None) or (names[i] if i < len(names) else f"input_{i}")
        dtype = str(spec.type) if spec is not None else None
        shape = tuple(int(d) for d in spec.shape) if spec is not None else None
        out.append(ModelInputSpec(name=str(name), dtype=dtype, shape=shape))
    return out


def _registered_version_of(handle: ModelHandle) -> tuple[str | None, str | None]:
    """The registered version behind ``handle`` (from its URI, else the one created from its run)."""
    name, version = handle.registered_name, handle.registered_version
    if name and version:
        return name, version
    if not handle.source_run_id:
        return None, None
    try:
        found = client().search_model_versions(f"run_id='{handle.source_run_id}'")
    except Exception:
        return None, None
    if handle.model_id:
        found = [v for v in found if getattr(v, "model_id", None) in (None, handle.model_id)]
    if not found:
        return None, None
    mv = max(found, key=lambda v: int(v.version))
    return mv.name, str(mv.version)


def task_hint(handle: ModelHandle, metadata: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """A task recorded with the model, and where: the ``governance.task`` tag of the registered
    version, of the logged model, the ``governance.task`` key of the MLmodel metadata, or the tag
    of the run that logged the model (first found). The value is returned as recorded; the stage's
    :func:`governance.task_inference.infer_task` interprets it."""
    c = client()
    name, version = _registered_version_of(handle)
    if name and version:
        try:
            value = (c.get_model_version(name, version).tags or {}).get(TASK_TAG)
        except Exception:
            value = None
        if value:
            return value, f"{TASK_TAG} tag on registered version {name}/{version}"
    if handle.model_id:
        try:
            value = (c.get_logged_model(handle.model_id).tags or {}).get(TASK_TAG)
        except Exception:
            value = None
        if value:
            return value, f"{TASK_TAG} tag on logged model {handle.model_id}"
    if metadata and metadata.get(TASK_TAG):
        return str(metadata[TASK_TAG]), f"{TASK_TAG} in the MLmodel metadata"
    if handle.source_run_id:
        try:
            value = c.get_run(handle.source_run_id).data.tags.get(TASK_TAG)
        except Exception:
            value = None
        if value:
            return value, f"{TASK_TAG} tag on run {handle.source_run_id}"
    return None


def log_model_input(run_id: str, handle: ModelHandle) -> bool:
    """Record the model as a model input of the run (MLflow 3 links runs and logged models, and the
    UI shows it on the run); False when the model is not a logged model (no model id)."""
    from mlflow.entities import LoggedModelInput

    if not handle.model_id:
        return False
    client().log_inputs(run_id, models=[LoggedModelInput(model_id=handle.model_id)])
    return True


# ------------------------------------------------------------------------------- datasets


@dataclass
class LoggedSchema:
    """What MLflow stores about a logged dataset even when its rows cannot be loaded: the column
    names in order with their MLflow types, the profile (``num_rows``...), and where it is."""

    name: str
    digest: str
    run_id: str
    context: str | None
    columns: list[str]
    types: dict[str, str]
    profile: dict[str, Any]
    source_type: str
    loadable: bool

    @property
    def where(self) -> str:
        """``training data 'train' of run <id>``."""
        return f"{self.context or 'logged'} data '{self.name}' of run {self.run_id}"


def _input_context(dataset_input: Any) -> str | None:
    return {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context")


def _schema_of(dataset_input: Any, run_id: str) -> LoggedSchema | None:
    import json

    from governance.sources import source_location

    ds = dataset_input.dataset
    try:
        schema = json.loads(ds.schema) if ds.schema else {}
    except ValueError:
        schema = {}
    cols = schema.get("mlflow_colspec") if isinstance(schema, dict) else None
    if not isinstance(cols, list) or not all(isinstance(c, dict) and c.get("name") for c in cols):
        return None
    try:
        profile = json.loads(ds.profile) if ds.profile else {}
    except ValueError:
        profile = {}
    return LoggedSchema(
        name=ds.name, digest=ds.digest, run_id=run_id, context=_input_context(dataset_input),
        columns=[str(c["name"]) for c in cols], types={str(c["name"]): str(c.get("type")) for c in cols},
        profile=profile if isinstance(profile, dict) else {}, source_type=ds.source_type,
        loadable=source_location(ds) is not None,
    )


def _training_input(handle: ModelHandle) -> Any | None:
    if not handle.source_run_id:
        return None
    try:
        run = client().get_run(handle.source_run_id)
    except Exception:
        return None
    for d in run.inputs.dataset_inputs if run.inputs else []:
        if _input_context(d) == "training":
            return d
    return None


def training_schema(handle: ModelHandle) -> LoggedSchema | None:
    """The stored schema and profile of the training dataset the model's run logged (context
    ``training``), available even when it was logged without a loadable source
    (``mlflow.data.from_pandas(df)``); None when the run logged none with a column schema."""
    d = _training_input(handle)
    return _schema_of(d, handle.source_run_id) if d is not None else None


def load_logged_dataset(run_id: str, name: str) -> pd.DataFrame:
    """The table behind a dataset that run ``run_id`` logged with ``mlflow.log_input``."""
    from governance.sources import DATASET_PREFIX, read_source, resolve_source

    with resolve_source(f"{DATASET_PREFIX}{run_id}/{name}") as src:
        return read_source(src)


def training_frame(handle: ModelHandle) -> tuple[pd.DataFrame, str] | None:
    """The training table logged (context ``training``) by the run that produced the model; None
    when there is none or its source cannot be loaded (see :func:`training_schema`)."""
    d = _training_input(handle)
    if d is None:
        return None
    try:
        frame = load_logged_dataset(handle.source_run_id, d.dataset.name)
    except Exception:
        return None
    return frame, f"training data '{d.dataset.name}' of run {handle.source_run_id}"


# ------------------------------------------------------------------------------- runs


def resolve_run(run_id: str | None = None, experiment_name: str | None = None,
                run_name: str = "governance-explain", option: str = "--run-id") -> tuple[str, bool]:
    """The run to log into: ``run_id``, else ``MLFLOW_RUN_ID``, else the active run, else a new
    run in ``experiment_name`` (or ``MLFLOW_EXPERIMENT_ID`` / the default). Returns (id, created).
    ``option`` is how the user gave ``run_id`` (for the message when it does not exist)."""
    if run_id:
        try:  # fail early on a wrong id
            client().get_run(run_id)
        except MlflowException as exc:
            raise InputError(f"{option} {run_id}: no such run at {mlflow.get_tracking_uri()} "
                             f"(MLflow: {_reason(exc)}); leave out {option} to log into a new run") from exc
        return run_id, False
    env = os.environ.get("MLFLOW_RUN_ID")
    if env:
        return env, False
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    c = client()
    if experiment_name:
        exp = c.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment_name)
    else:
        from mlflow.tracking.fluent import _get_experiment_id

        exp_id = _get_experiment_id() or "0"
    run = c.create_run(exp_id, run_name=run_name, tags={"mlflow.source.name": "mlflow-governance"})
    return run.info.run_id, True


class RunNotReusable(InputError):
    """The run holds governance evidence already, or another mlflow-governance process is (or was,
    until it was killed) working in it: explaining into it would mix two datasets in one run."""


OWNER_TAGS = {"host": TAG_PREFIX + "owner_host", "pid": TAG_PREFIX + "owner_pid",
              "start": TAG_PREFIX + "owner_start"}
#: ``governance.status`` values that mean the run holds a complete explanation.
EVIDENCE_STATUSES = ("explained", "reported")
_NEW_RUN = "explain into a new run (leave out --run-id and MLFLOW_RUN_ID)"


def run_owner(tags: Mapping[str, str]) -> Owner | None:
    """The process recorded as working in a run (``governance.owner_*`` tags), None if none."""
    if OWNER_TAGS["pid"] not in tags:
        return None
    return Owner.from_mapping({k: tags.get(tag) for k, tag in OWNER_TAGS.items()})


def _refusal(run: Any, me: Owner) -> str | None:
    """Why the stage must not work in ``run`` (one line), None when it may."""
    rid, tags = run.info.run_id, run.data.tags
    owner = run_owner(tags)
    if owner is not None and owner != me:
        state = owner.state()
        if state == ALIVE:
            return (f"run {rid} is in use by another mlflow-governance process ({owner.describe()}): "
                    f"wait for it to finish, or {_NEW_RUN}")
        if state != DEAD:
            return (f"run {rid} is claimed by an mlflow-governance process on another host "
                    f"({owner.describe()}) that cannot be checked from here: {_NEW_RUN}")
        marked = ""
        if run.info.status == "RUNNING" and tags.get("mlflow.source.name") == "mlflow-governance":
            client().set_terminated(rid, "FAILED")  # a run the dead process created: nobody else ends it
            set_tags(rid, {"status": "failed"})
            marked = " (this tool created it: now marked FAILED)"
        return (f"run {rid} was being explained by an mlflow-governance process that is gone "
                f"({owner.describe()}, killed?), so its evidence is incomplete{marked}: {_NEW_RUN}")
    status = tags.get(TAG_PREFIX + "status")
    if status in EVIDENCE_STATUSES:
        return (f"run {rid} already holds governance evidence (governance.status={status}): {_NEW_RUN} "
                "rather than mixing two datasets in one run")
    if status == "failed":
        return (f"run {rid} holds a failed governance attempt (governance.status=failed): {_NEW_RUN} "
                "and keep this one as the record of the failure")
    if client().list_artifacts(rid, ARTIFACT_ROOT):
        return (f"run {rid} already holds governance evidence (artifacts under {ARTIFACT_ROOT}/): {_NEW_RUN} "
                "rather than mixing two datasets in one run")
    return None


def claim_run(run_id: str, created: bool) -> None:
    """Record this process as the one working in ``run_id`` (``governance.owner_host/pid/start``
    tags), after refusing with :class:`RunNotReusable` a run that the stage did not just create
    and that holds governance evidence (``governance.status`` explained/reported, a failed attempt
    (``failed``), or any artifact under ``governance/``) or carries the claim of another process (alive, on another host, or
    gone: killed mid-way; a RUNNING run it created is then marked FAILED). A run someone else
    created and keeps RUNNING (``mlflow run``, a notebook's active run) is fine."""
    me = Owner.current()
    if not created:
        why = _refusal(client().get_run(run_id), me)
        if why is not None:
            raise RunNotReusable(why)
    set_tags(run_id, {OWNER_TAGS["host"]: me.host, OWNER_TAGS["pid"]: me.pid, OWNER_TAGS["start"]: me.start})
    if run_owner(client().get_run(run_id).data.tags) != me:  # another process claimed it at the same time
        raise RunNotReusable(f"run {run_id} was claimed by another mlflow-governance process just now: {_NEW_RUN}")


def release_run(run_id: str) -> None:
    """Remove this process's claim on ``run_id`` (the stage has finished with it, either way)."""
    c = client()
    try:
        if run_owner(c.get_run(run_id).data.tags) != Owner.current():
            return
        for tag in OWNER_TAGS.values():
            c.delete_tag(run_id, tag)
    except MlflowException:
        pass


def finish_run(run_id: str, ok: bool) -> None:
    """Mark a run this package created as finished or failed."""
    client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags; keys get the ``governance.`` prefix when they lack it."""
    items = [
        RunTag(k if k.startswith(TAG_PREFIX) else TAG_PREFIX + k, str(v))
        for k, v in sorted(tags.items())
    ]
    client().log_batch(run_id, tags=items)


def log_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log scalar metrics (non-finite values are skipped: MLflow cannot compare them)."""
    import math
    import time

    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, 0) for k, v in sorted(metrics.items())
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 900):
        client().log_batch(run_id, metrics=items[i:i + 900])


def log_artifact_tree(run_id: str, local_root: str | Path) -> None:
    """Log ``local_root/governance/**`` under the run's ``governance/`` artifact folder."""
    src = Path(local_root) / ARTIFACT_ROOT
    client().log_artifacts(run_id, str(src), ARTIFACT_ROOT)


class StagingArea:
    """A temporary folder mirroring the run's artifact tree; logged in one go, then removed.

    The folder is owned (``governance.workdirs``): one left by a killed process is removed at the
    next start."""

    def __init__(self) -> None:
        self.root = make_owned_dir("governance-stage-")

    def path(self, relative: str) -> Path:
        """A path under ``governance/`` with its parent folders created."""
        p = self.root / ARTIFACT_ROOT / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, run_id: str) -> None:
        """Log everything staged to the run."""
        log_artifact_tree(run_id, self.root)

    def close(self) -> None:
        remove_owned(self.root)

    def __enter__(self) -> "StagingArea":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pandas_digest(frame: pd.DataFrame, n_rows: int | None = None) -> str:
    """MLflow's pandas dataset digest (``compute_pandas_digest``), with its string-column test run
    on the hashed first rows instead of the whole table; identical for numeric tables. ``n_rows``:
    the whole table's row count when ``frame`` holds only its first rows (a streamed table)."""
    import numpy as np
    from mlflow.data.digest_utils import MAX_ROWS, get_normalized_md5_digest

    trimmed = frame.head(MAX_ROWS)
    # MLflow keeps the columns whose every value is a str; only object and string columns can
    # hold one, so only they are tested value by value (a numeric table costs nothing here)
    textual = [c for c in trimmed.columns if trimmed[c].dtype == object or pd.api.types.is_string_dtype(trimmed[c])]
    strings = pd.Index([c for c in textual if (trimmed[c].map(type) == str).all()])
    numeric = trimmed.select_dtypes(include=[np.number]).columns
    trimmed = trimmed[strings.union(numeric)]
    return get_normalized_md5_digest(
        [pd.util.hash_pandas_object(trimmed).values, np.int64(len(frame) if n_rows is None else n_rows)]
        + [str(x).encode() for x in frame.columns]
    )


def _sample_schema(frame: pd.DataFrame, rows: int = 1000) -> Any:
    from mlflow.types.utils import _infer_schema

    try:
        return _infer_schema(frame.head(rows))
    except Exception:
        return None


def log_dataset(run_id: str, frame: pd.DataFrame, *, source: str, name: str,
                target_column: str | None, context: str = "validation") -> str:
    """Log ``frame`` as an MLflow dataset input of the run; returns its digest."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    kwargs: dict[str, Any] = {"name": name}
    if target_column and target_column in frame.columns:
        kwargs["targets"] = target_column
    from governance.sources import dataset_source

    resolved = dataset_source(source) if source else None
    if resolved is not None:
        kwargs["source"] = resolved
    kwargs["digest"] = pandas_digest(frame)
    ds = mlflow.data.from_pandas(frame, **kwargs)
    # MLflow infers the schema from every row (9 s on 100k x 79); column types are the same on a sample
    ds.__dict__["schema"] = _sample_schema(frame)
    client().log_inputs(run_id, datasets=[
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    ])
    return ds.digest


def tag_model_version(handle: ModelHandle, tags: Mapping[str, Any]) -> tuple[str, str] | None:
    """Set ``governance.*`` tags on the registered version behind ``handle``; returns its
    (name, version), None when the model is not registered."""
    name, version = _registered_version_of(handle)
    if not (name and version):
        return None
    c = client()
    for k, v in sorted(tags.items()):
        c.set_model_version_tag(name, version, k if k.startswith(TAG_PREFIX) else TAG_PREFIX + k, str(v))
    return name, version


def artifact_files(run_id: str, path: str = ARTIFACT_ROOT) -> Iterator[str]:
    """Every artifact file path under ``path`` in the run (for tests and checks)."""
    c = client()
    for f in c.list_artifacts(run_id, path or None):
        if f.is_dir:
            yield from artifact_files(run_id, f.path)
        else:
            yield f.path


def log_streamed_dataset(run_id: str, head: pd.DataFrame, n_rows: int, *, source: str, name: str,
                         target_column: str | None, context: str = "validation") -> str:
    """Log a table that was read in chunks as an MLflow dataset input of the run, from its first
    rows (``head``, at least MLflow's 10,000 digest rows when the table has them) and its row
    count: the same digest and schema :func:`log_dataset` gives the whole table, the whole
    table's profile. Returns the digest."""
    import json

    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    kwargs: dict[str, Any] = {"name": name, "digest": pandas_digest(head, n_rows=n_rows)}
    if target_column and target_column in head.columns:
        kwargs["targets"] = target_column
    from governance.sources import dataset_source

    resolved = dataset_source(source) if source else None
    if resolved is not None:
        kwargs["source"] = resolved
    ds = mlflow.data.from_pandas(head, **kwargs)
    ds.__dict__["schema"] = _sample_schema(head)
    d = ds.to_dict()
    entity = DatasetEntity(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                           schema=d.get("schema"),
                           profile=json.dumps({"num_rows": int(n_rows), "num_elements": int(n_rows) * head.shape[1]}))
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return ds.digest


# ------------------------------------------------------------------------------- drift and monitoring


def download_run_files(run_id: str, paths: list[str], dst: str | Path) -> dict[str, Path | None]:
    """Download the run's artifacts ``paths`` (files or folders) under ``dst``; None where absent."""
    from mlflow.exceptions import MlflowException

    c = client()
    out: dict[str, Path | None] = {}
    for path in paths:
        try:
            out[path] = Path(c.download_artifacts(run_id, path, str(dst)))
        except (MlflowException, OSError):
            out[path] = None
    return out


def run_info(run_id: str) -> Any:
    """The MLflow run ``run_id`` (tags in ``.data.tags``, experiment in ``.info.experiment_id``)."""
    return client().get_run(run_id)


def registered_version(model_uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a ``models:/name/version`` or ``models:/name@alias`` URI, else (None, None)."""
    return _registered_version(model_uri)


def find_or_create_run(experiment_id: str, tag: str, value: str, run_name: str) -> tuple[str, bool]:
    """The most recent run of the experiment whose tag ``tag`` equals ``value`` (a new run with
    that tag when there is none). Returns (run id, created)."""
    key = tag if tag.startswith(TAG_PREFIX) else TAG_PREFIX + tag
    escaped = value.replace("'", "\\'")
    found = client().search_runs([experiment_id], filter_string=f"tags.`{key}` = '{escaped}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id, False
    run = client().create_run(experiment_id, run_name=run_name,
                              tags={"mlflow.source.name": "mlflow-governance", key: value})
    return run.info.run_id, True


def log_metric_series(run_id: str, metrics: Mapping[str, float], *, step: int, timestamp_ms: int) -> None:
    """Log metrics at one ``step`` with the given timestamp (a time series MLflow's UI charts)."""
    import math

    items = [Metric(k, float(v), int(timestamp_ms), int(step)) for k, v in sorted(metrics.items())
             if v is not None and math.isfinite(float(v))]
    if items:
        client().log_batch(run_id, metrics=items)


def metric_steps(run_id: str, key: str) -> list[int]:
    """The steps at which the run logged metric ``key``."""
    return sorted(m.step for m in client().get_metric_history(run_id, key))


def create_run_in(experiment_id: str, run_name: str) -> str:
    """A new run in experiment ``experiment_id``; returns its id."""
    return client().create_run(experiment_id, run_name=run_name,
                               tags={"mlflow.source.name": "mlflow-governance"}).info.run_id
