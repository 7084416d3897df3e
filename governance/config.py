"""The effective configuration of a governance run (`governance.yaml`), validated with clear errors.

Every option has a default, every option can come from the YAML file, and the command line
overrides the file: named options (``--task``, ``--modes``...) and ``--set key=value`` for any
key (nested keys with dots, values read as YAML: ``--set reason_codes.top_n=3``,
``--set 'feature_columns=[a, b]'``). ``report``, ``model_card``, ``image`` and ``text`` are
free-form here: the report module and the modalities validate them.
:attr:`GovernanceConfig.configured` names the keys the user gave (so a default is never mistaken
for a choice, e.g. the task).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from governance.errors import InputError
from governance.tasks import MODES, STAGE_TASKS


class ConfigError(InputError, ValueError):
    """The configuration is invalid; the message says which key and why."""


@dataclass
class ReasonCodesConfig:
    """How many reason codes per side and the plain-language text per feature."""

    top_n: int = 4
    dictionary: dict[str, str] = field(default_factory=dict)


@dataclass
class QualityConfig:
    """Explanation-quality metrics (``governance.quality``). The cost knobs bound what a large model
    (a transformer encoder) costs; each bound is recorded in quality.json (``bounds``) and the
    report: ``mprt_max_layers`` randomises at most that many parameter layers, evenly spaced from
    the output to the input (None: every layer); ``sensitivity_perturbations`` per sample;
    ``ig_steps`` of integrated gradients."""

    enabled: bool = True
    n_samples: int = 256
    mprt_max_layers: int | None = None
    sensitivity_perturbations: int = 8
    ig_steps: int = 32


@dataclass
class AggregationConfig:
    """Knobs of the aggregation: bootstrap replicates, the random seed, top units per layer."""

    n_bootstrap: int = 200
    seed: int = 0
    top_units: int = 5
    sample_size: int = 2048  # the deterministic sample behind direction, plots and quality inputs


@dataclass
class DriftConfig:
    """Thresholds of explanation drift (``governance.drift``): when a unit is flagged and when a
    comparison's verdict is ``changed``."""

    top_k: int = 5  # the top units whose entries and exits are rank shifts
    min_difference: float = 0.01  # |importance after - before| a unit must exceed to be significant
    confidence: float = 0.95  # of the bootstrap interval of the difference
    max_significant_rate: float = 0.2  # share of the top-k units (either side) flagged significant tolerated
    max_js_divergence: float = 0.02  # Jensen-Shannon divergence (base 2) of the normalised importance
    min_top_k_overlap: float = 0.6  # share of the top-k units in common
    max_direction_flips: int = 0  # direction flips among the top-k units tolerated


@dataclass
class SparkConfig:
    """The Apache Spark engine (``engine: spark``): the session's master and extra Spark settings,
    how many partitions the rows are explained in (None: as Spark reads them), and where Spark
    writes the per-sample outputs when they are too large to log (None: logged to the run)."""

    master: str | None = None
    conf: dict[str, Any] = field(default_factory=dict)
    partitions: int | None = None
    output_uri: str | None = None


ENGINES = ("local", "spark")


@dataclass
class GovernanceConfig:
    """The whole configuration (sections as in docs/contracts.md)."""

    task: str = "binary-classification"
    modality: str = "tabular"
    target_column: str | None = None
    id_column: str | None = None  # integer (or text) sample ids; default: the row's position
    feature_columns: list[str] | None = None
    modes: list[str] = field(default_factory=lambda: list(MODES))
    primary_mode: str = "signed"
    batch_size: int = 4096
    multiplier: float = 100.0
    device: str = "cpu"
    cpu_threads: int | None = None
    expectations: list[dict[str, Any]] | None = None
    contract_block_cells: int = 4_000_000  # rows x columns per data-contract block (32 MB float64)
    reason_codes: ReasonCodesConfig = field(default_factory=ReasonCodesConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    gates: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    model_card: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False
    inputs: dict[str, Any] | None = None
    engine: str = "local"
    spark: SparkConfig = field(default_factory=SparkConfig)
    image: dict[str, Any] = field(default_factory=dict)  # image modality options (governance.modality.image)
    text: dict[str, Any] = field(default_factory=dict)  # text modality options (governance.modality.text)
    configured: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe dict of every option (the effective configuration)."""
        d = copy.deepcopy(asdict(self))
        d.pop("configured")
        return d

    def with_overrides(self, **overrides: Any) -> "GovernanceConfig":
        """A validated copy with ``overrides`` (those not None) applied; keeps :attr:`configured`
        (rebuilding from :meth:`to_dict` would mark every key as given)."""
        cfg = config_from_dict(self.to_dict(), **overrides)
        cfg.configured = self.configured | {k for k, v in overrides.items() if v is not None}
        return cfg

    def given(self, key: str) -> bool:
        """Whether the user set ``key`` (top-level name, e.g. ``task``), in the file or on the command line."""
        return key in self.configured

    def to_yaml(self) -> str:
        """The effective configuration as YAML with sorted keys (deterministic)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=False)

    def validate(self) -> "GovernanceConfig":
        """Check every value; raise :class:`ConfigError` naming the key. Returns ``self``."""
        if self.task not in STAGE_TASKS:
            raise ConfigError(f"task: '{self.task}' is not one of {', '.join(STAGE_TASKS)}")
        for name, value in (("allow_pickle", self.allow_pickle), ("quality.enabled", self.quality.enabled)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: must be true or false, got {value!r}")
        if self.target_column is not None and not isinstance(self.target_column, str):
            raise ConfigError(f"target_column: must be a column name, got {self.target_column!r}")
        for name, value in (("aggregation.seed", self.aggregation.seed),
                            ("aggregation.top_units", self.aggregation.top_units),
                            ("aggregation.n_bootstrap", self.aggregation.n_bootstrap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}: must be a non-negative integer, got {value!r}")
        if self.inputs is not None:
            from governance.model_inputs import parse_input_mapping

            parse_input_mapping(self.inputs)
        if not self.modes:
            raise ConfigError("modes: at least one mode is needed")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"modes: duplicated mode in {self.modes}")
        if self.primary_mode not in MODES:
            raise ConfigError(f"primary_mode: '{self.primary_mode}' is not one of {', '.join(MODES)}")
        if self.primary_mode not in self.modes:
            self.modes = [self.primary_mode] + list(self.modes)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.multiplier, (int, float)) or self.multiplier <= 0:
            raise ConfigError(f"multiplier: must be a positive number, got {self.multiplier!r}")
        self.multiplier = float(self.multiplier)
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device: must be cpu or cuda, got {self.device!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ConfigError(f"cpu_threads: must be a positive integer or null, got {self.cpu_threads!r}")
        if self.feature_columns is not None:
            if not isinstance(self.feature_columns, list) or not all(
                isinstance(c, str) for c in self.feature_columns
            ):
                raise ConfigError("feature_columns: must be a list of column names")
            if len(set(self.feature_columns)) != len(self.feature_columns):
                raise ConfigError("feature_columns: duplicated column name")
        if self.expectations is not None:
            if not isinstance(self.expectations, list):
                raise ConfigError("expectations: must be a list of {type: ..., kwargs...} entries")
            for i, e in enumerate(self.expectations):
                if not isinstance(e, dict) or not isinstance(e.get("type"), str):
                    raise ConfigError(
                        f"expectations[{i}]: each entry needs a 'type' such as "
                        "expect_column_values_to_not_be_null"
                    )
                if not e["type"].startswith("expect_"):
                    raise ConfigError(f"expectations[{i}]: '{e['type']}' is not an expectation type")
        if not isinstance(self.reason_codes.top_n, int) or self.reason_codes.top_n < 1:
            raise ConfigError("reason_codes.top_n: must be a positive integer")
        if not isinstance(self.reason_codes.dictionary, dict):
            raise ConfigError("reason_codes.dictionary: must map feature names to text")
        for key in ("n_samples", "mprt_max_layers", "sensitivity_perturbations", "ig_steps"):
            value = getattr(self.quality, key)
            if key == "mprt_max_layers" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"quality.{key}: must be a positive integer, got {value!r}")
        if self.aggregation.n_bootstrap < 10:
            raise ConfigError("aggregation.n_bootstrap: at least 10 replicates are needed")
        if not isinstance(self.aggregation.sample_size, int) or self.aggregation.sample_size < 1:
            raise ConfigError("aggregation.sample_size: must be a positive integer")
        self._validate_drift()
        from governance.modality import MODALITIES

        if self.modality not in MODALITIES:
            raise ConfigError(f"modality: '{self.modality}' is not one of {', '.join(sorted(MODALITIES))}")
        if self.id_column is not None and not isinstance(self.id_column, str):
            raise ConfigError(f"id_column: must be a column name, got {self.id_column!r}")
        if not isinstance(self.contract_block_cells, int) or self.contract_block_cells < 1:
            raise ConfigError(f"contract_block_cells: must be a positive integer, got {self.contract_block_cells!r}")
        if not isinstance(self.gates, list) or not all(isinstance(g, dict) for g in self.gates):
            raise ConfigError("gates: must be a list of mappings")
        for name in ("report", "model_card", "image", "text"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}: must be a mapping")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: '{self.engine}' is not one of {', '.join(ENGINES)}")
        sp = self.spark
        if sp.master is not None and not isinstance(sp.master, str):
            raise ConfigError(f"spark.master: must be a Spark master URL such as local[2], got {sp.master!r}")
        if not isinstance(sp.conf, dict):
            raise ConfigError("spark.conf: must map Spark settings to values, e.g. {spark.executor.memory: 4g}")
        if sp.partitions is not None and (not isinstance(sp.partitions, int) or isinstance(sp.partitions, bool)
                                          or sp.partitions < 1):
            raise ConfigError(f"spark.partitions: must be a positive integer or null, got {sp.partitions!r}")
        if sp.output_uri is not None and not isinstance(sp.output_uri, str):
            raise ConfigError(f"spark.output_uri: must be a path or URI, got {sp.output_uri!r}")
        return self

    def _validate_drift(self) -> None:
        d = self.drift
        if not isinstance(d.top_k, int) or isinstance(d.top_k, bool) or d.top_k < 1:
            raise ConfigError(f"drift.top_k: must be a positive integer, got {d.top_k!r}")
        if not isinstance(d.max_direction_flips, int) or isinstance(d.max_direction_flips, bool) \
                or d.max_direction_flips < 0:
            raise ConfigError(f"drift.max_direction_flips: must be a non-negative integer, got {d.max_direction_flips!r}")
        for name, lo, hi in (("min_difference", 0.0, 1.0), ("max_significant_rate", 0.0, 1.0),
                             ("max_js_divergence", 0.0, 1.0), ("min_top_k_overlap", 0.0, 1.0)):
            v = getattr(d, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"drift.{name}: must be a number from {lo:g} to {hi:g}, got {v!r}")
            setattr(d, name, float(v))
        if not isinstance(d.confidence, (int, float)) or not 0.5 <= d.confidence < 1.0:
            raise ConfigError(f"drift.confidence: must be a number from 0.5 to below 1, got {d.confidence!r}")
        d.confidence = float(d.confidence)


_SECTIONS = {"reason_codes": ReasonCodesConfig, "quality": QualityConfig, "aggregation": AggregationConfig,
             "drift": DriftConfig, "spark": SparkConfig}


def _build_section(name: str, cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


def _scalar_keys() -> set[str]:
    """Top-level keys that hold a value, not a section of keys."""
    free_form = {"report", "model_card", "inputs", "image", "text", "configured"}
    return {f.name for f in fields(GovernanceConfig)} - set(_SECTIONS) - free_form


def _parse_setting(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set: '{item}' is not key=value (e.g. --set reason_codes.top_n=3)")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {key}: empty part in the key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc
    return path, value


def apply_settings(data: dict[str, Any], settings: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``data`` with each ``key=value`` of ``settings`` applied in order (dots nest; values are YAML)."""
    out = copy.deepcopy(dict(data or {}))
    for item in settings or ():
        path, value = _parse_setting(item)
        node = out
        if len(path) > 1 and path[0] in _scalar_keys():
            raise ConfigError(f"--set {'.'.join(path)}: {path[0]} is not a section (set it as {path[0]}=...)")
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {'.'.join(path)}: {where} is not a section (it is {child!r})")
            node = child
        node[path[-1]] = value
    return out


def config_from_dict(data: dict[str, Any] | None, *, settings: list[str] | tuple[str, ...] | None = None,
                     **overrides: Any) -> GovernanceConfig:
    """Build and validate a config from a mapping, then ``settings`` (``key=value``), then
    ``overrides`` that are not None. Records which top-level keys were given."""
    data = apply_settings(dict(data or {}), settings)
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    known = {f.name for f in fields(GovernanceConfig)} - {"configured"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown}; known: {sorted(known)}")
    given = frozenset(k for k, v in data.items() if v is not None)
    if isinstance(data.get("modes"), str):
        data["modes"] = [m.strip() for m in data["modes"].split(",") if m.strip()]
    if isinstance(data.get("feature_columns"), str):
        data["feature_columns"] = [c.strip() for c in data["feature_columns"].split(",") if c.strip()]
    for name, cls in _SECTIONS.items():
        current = data.get(name)
        if not isinstance(current, cls):
            data[name] = _build_section(name, cls, current)
    for key in ("gates", "report", "model_card", "image", "text", "task", "modes", "primary_mode", "batch_size",
                "multiplier", "device", "allow_pickle", "engine"):
        if data.get(key) is None and key in data:
            del data[key]
    try:
        cfg = GovernanceConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"configuration: {exc}") from exc
    cfg.configured = given
    return cfg.validate()


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping in ``governance.yaml`` (empty when ``path`` is None)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return loaded or {}


def user_settings(path: str | Path | None = None, settings: list[str] | tuple[str, ...] | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """What the user gave: the file, then ``--set`` items, then named options that are not None
    (validated, so a bad key is reported before any work). Passing this mapping on keeps
    :attr:`GovernanceConfig.configured` exact, which passing a whole config would not."""
    data = apply_settings(read_config_file(path), settings)
    data.update({k: v for k, v in overrides.items() if v is not None})
    config_from_dict(data)
    return data


def load_config(path: str | Path | None = None, *, settings: list[str] | tuple[str, ...] | None = None,
                **overrides: Any) -> GovernanceConfig:
    """Load ``governance.yaml`` (or defaults when ``path`` is None) and apply CLI overrides."""
    return config_from_dict(read_config_file(path), settings=settings, **overrides)
