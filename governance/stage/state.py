"""The stage's mergeable state: every accumulator has ``update(batch, draws)`` and ``merge(other)``.

A :class:`StageState` folds explained batches (``governance.stage.batch.BatchResult``) into
sums, counts and a bounded sample; the documents are computed from a (merged) state only
(``governance.stage.documents``). States built over any split of the rows merge to the same
documents (sums are associative up to float rounding; counts, the reservoir and unit
vocabularies merge by key), which is what lets Spark executors ship partial states to the
driver. ``to_bytes`` / ``from_bytes`` serialise a state as an ``.npz`` of plain arrays with a
JSON header (no pickle, ``allow_pickle=False`` on load).

Adding an accumulator: a class with ``update(batch, draws)``, ``merge(other)``, ``dump() ->
(json metadata, {name: array})`` and ``load(meta, arrays)`` (into a fresh instance); register it
in ``StageState.empty`` (shared) or return it from ``Modality.accumulators()`` (modality-specific).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from governance.aggregate import ImportanceAccumulator, LayerAccumulator, UnitVocabulary
from governance.stage.batch import BatchResult
from governance.stage.keys import Draws, reservoir_priority

FORMAT = "governance-stage-state"
VERSION = 1


class Accumulator(Protocol):
    """A mergeable reduction over explained batches (see the module docstring)."""

    def update(self, batch: BatchResult, draws: Draws) -> None: ...

    def merge(self, other: Any) -> None: ...

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class StageSettings:
    """What a state needs to know to accumulate and to be merged with another (must be equal)."""

    modality: str
    task: str
    modes: tuple[str, ...]
    primary_mode: str
    seed: int
    n_bootstrap: int
    top_units: int
    sample_size: int
    units: tuple[str, ...] | None

    @classmethod
    def from_config(cls, cfg: Any, units: list[str] | None, sample_size: int | None = None) -> "StageSettings":
        agg = cfg.aggregation
        k = sample_size if sample_size is not None else agg.sample_size
        return cls(modality=cfg.modality, task=cfg.task, modes=tuple(cfg.modes), primary_mode=cfg.primary_mode,
                   seed=int(agg.seed), n_bootstrap=int(agg.n_bootstrap), top_units=int(agg.top_units),
                   sample_size=int(k), units=None if units is None else tuple(units))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = list(self.modes)
        d["units"] = None if self.units is None else list(self.units)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSettings":
        return cls(**{**d, "modes": tuple(d["modes"]), "units": None if d["units"] is None else tuple(d["units"])})


class _PerMode:
    """One accumulator per mode (``_kind``: a class with ``merge``, ``dump`` and ``load``)."""

    _kind: Any

    def __init__(self, settings: StageSettings) -> None:
        self.modes = {m: self._new(settings) for m in settings.modes}

    def _new(self, settings: StageSettings) -> Any:
        raise NotImplementedError

    def merge(self, other: "_PerMode") -> None:
        for mode, acc in self.modes.items():
            acc.merge(other.modes[mode])

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return _dump_modes({m: a.dump() for m, a in self.modes.items()})

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        parts = _load_modes(meta, arrays)
        self.modes = {m: self._kind.load(*parts[m]) for m in self.modes}


class ImportanceByMode(_PerMode):
    """Per mode: importance moments overall, per predicted class and per half, and the bootstrap
    replicate sums (``governance.aggregate.ImportanceAccumulator``)."""

    _kind = ImportanceAccumulator

    def _new(self, settings: StageSettings) -> ImportanceAccumulator:
        return ImportanceAccumulator(list(settings.units or ()), n_bootstrap=settings.n_bootstrap)

    def update(self, batch: BatchResult, draws: Draws) -> None:
        for mode, acc in self.modes.items():
            r = batch.modes[mode]
            acc.update(None, draws, batch.predictions, shares=r.shares, units=r.unit_names)


class LayersByMode(_PerMode):
    """Per mode: the layer books and per-unit relevance sums (``LayerAccumulator``)."""

    _kind = LayerAccumulator

    def _new(self, settings: StageSettings) -> LayerAccumulator:
        return LayerAccumulator(top_units=settings.top_units)

    def update(self, batch: BatchResult, draws: Draws) -> None:
        for mode, acc in self.modes.items():
            acc.update(batch.modes[mode].layers)


def _dump_modes(parts: Mapping[str, tuple[dict, dict]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta, arrays = {}, {}
    for mode, (m, a) in parts.items():
        meta[mode] = m
        arrays.update({f"{mode}/{k}": v for k, v in a.items()})
    return meta, arrays


def _load_modes(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[dict, dict]]:
    return {mode: (m, {k[len(mode) + 1:]: v for k, v in arrays.items() if k.startswith(mode + "/")})
            for mode, m in meta.items()}


SIDES = ("supporting", "adverse")


class LeaderCounts:
    """How often each unit is a sample's first supporting / first adverse reason code."""

    def __init__(self, settings: StageSettings) -> None:
        self.units = UnitVocabulary(settings.units or ())
        self.counts = {side: np.zeros(len(self.units), dtype=np.int64) for side in SIDES}

    def _grow(self) -> None:
        for side in SIDES:
            c = self.counts[side]
            if len(c) < len(self.units):
                self.counts[side] = np.concatenate([c, np.zeros(len(self.units) - len(c), dtype=np.int64)])

    def update(self, batch: BatchResult, draws: Draws) -> None:
        names = batch.primary.unit_names
        cols = self.units.columns(names)
        self._grow()
        for side in SIDES:
            first = batch.reasons[side][0][:, 0]
            counts = np.bincount(first[first >= 0], minlength=len(names))
            if cols is None:
                self.counts[side] += counts
            else:
                np.add.at(self.counts[side], cols, counts)

    def merge(self, other: "LeaderCounts") -> None:
        cols = self.units.columns(other.units.names)
        self._grow()
        for side in SIDES:
            if cols is None:
                self.counts[side] += other.counts[side]
            else:
                np.add.at(self.counts[side], cols, other.counts[side])

    def leaders(self) -> dict[str, dict[str, int]]:
        """Per side: unit -> count, most frequent first (ties by name); units never leading left out."""
        names = self.units.names
        return {side: dict(sorted(((names[i], int(c)) for i, c in enumerate(self.counts[side]) if c),
                                  key=lambda kv: (-kv[1], kv[0])))
                for side in SIDES}

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"units": list(self.units.names)}, dict(self.counts)

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.units = UnitVocabulary(meta["units"])
        self.counts = {side: arrays[side].astype(np.int64) for side in SIDES}


class Reservoir:
    """A deterministic, mergeable sample: the ``k`` samples with the smallest hash of (seed,
    sample id) (bottom-k; ties by key), with their model inputs, predictions, scores and (fixed
    units) relevance per unit in every mode. Merge = union, then keep the k smallest."""

    def __init__(self, settings: StageSettings) -> None:
        self.k = int(settings.sample_size)
        self.seed = int(settings.seed)
        self.modes = list(settings.modes)
        self.fixed_units = settings.units is not None
        self.priority = np.zeros(0, dtype=np.uint64)
        self.keys = np.zeros(0, dtype=np.uint64)
        self.ids: np.ndarray = np.zeros(0, dtype=np.int64)
        self.columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.priority)

    def _rows(self, batch: BatchResult, take: np.ndarray) -> dict[str, np.ndarray]:
        cols: dict[str, np.ndarray] = {"score": np.asarray(batch.scores, dtype=np.float64)[take]}
        if batch.predictions is not None:
            cols["prediction"] = np.asarray(batch.predictions)[take]
        if isinstance(batch.inputs, np.ndarray):
            cols["inputs"] = batch.inputs[take]
        elif isinstance(batch.inputs, dict):
            cols.update({f"inputs/{k}": np.asarray(v)[take] for k, v in batch.inputs.items()})
        if batch.unit_values is not None and batch.unit_values is not batch.inputs:
            cols["unit_values"] = np.asarray(batch.unit_values)[take]
        if self.fixed_units:
            for mode in self.modes:
                cols[f"relevance/{mode}"] = batch.modes[mode].relevance[take]
        return cols

    def _keep(self, priority: np.ndarray, keys: np.ndarray, ids: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        if len(self.priority):
            priority = np.concatenate([self.priority, priority])
            keys = np.concatenate([self.keys, keys])
            ids = np.concatenate([self.ids, ids])
            cols = {k: np.concatenate([self.columns[k], v]) for k, v in cols.items()}
        order = np.lexsort((keys, priority))[: self.k]
        self.priority, self.keys, self.ids = priority[order], keys[order], ids[order]
        self.columns = {k: v[order] for k, v in cols.items()}

    def update(self, batch: BatchResult, draws: Draws) -> None:
        if self.k <= 0:
            return
        priority = reservoir_priority(batch.keys, self.seed)
        take = np.arange(len(batch))
        if len(self.priority) >= self.k:  # only samples that beat the current k-th can enter
            take = take[priority < self.priority[-1]]
            if not len(take):
                return
        ids = np.asarray(batch.sample_ids)
        if ids.dtype.kind == "O":
            ids = ids.astype(str)
        self._keep(priority[take], batch.keys[take], ids[take], self._rows(batch, take))

    def merge(self, other: "Reservoir") -> None:
        if len(other):
            self._keep(other.priority, other.keys, other.ids, other.columns)

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"priority": self.priority, "keys": self.keys, "ids": self.ids}
        arrays.update({f"col/{k}": v for k, v in self.columns.items()})
        return {"k": self.k, "columns": sorted(self.columns)}, arrays

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.priority, self.keys, self.ids = arrays["priority"], arrays["keys"], arrays["ids"]
        self.columns = {k: arrays[f"col/{k}"] for k in meta["columns"]}


class StageState:
    """Every accumulator of the stage (see the module docstring). ``components`` maps a name to
    an accumulator: ``importance``, ``layers``, ``leaders``, ``reservoir`` and the modality's own
    under ``modality/<name>``."""

    def __init__(self, settings: StageSettings, components: dict[str, Accumulator]) -> None:
        self.settings = settings
        self.components = components
        self.n_samples = 0

    @classmethod
    def empty(cls, settings: StageSettings, extras: Mapping[str, Accumulator] | None = None) -> "StageState":
        """A state with nothing added; ``extras``: the modality's accumulators (fresh instances)."""
        components: dict[str, Accumulator] = {
            "importance": ImportanceByMode(settings),
            "layers": LayersByMode(settings),
            "leaders": LeaderCounts(settings),
            "reservoir": Reservoir(settings),
        }
        components.update({f"modality/{k}": v for k, v in (extras or {}).items()})
        return cls(settings, components)

    @property
    def importance(self) -> ImportanceByMode:
        return self.components["importance"]  # type: ignore[return-value]

    @property
    def layers(self) -> LayersByMode:
        return self.components["layers"]  # type: ignore[return-value]

    @property
    def leaders(self) -> LeaderCounts:
        return self.components["leaders"]  # type: ignore[return-value]

    @property
    def reservoir(self) -> Reservoir:
        return self.components["reservoir"]  # type: ignore[return-value]

    def extra(self, name: str) -> Accumulator:
        """The modality's accumulator ``name``."""
        return self.components[f"modality/{name}"]

    def update(self, batch: BatchResult) -> "StageState":
        """Add one explained batch."""
        draws = Draws.for_keys(batch.keys, self.settings.seed, self.settings.n_bootstrap)
        for acc in self.components.values():
            acc.update(batch, draws)
        self.n_samples += len(batch)
        return self

    def merge(self, other: "StageState") -> "StageState":
        """Fold ``other`` (a state over other rows, same settings) into this one; returns self."""
        if other.settings != self.settings:
            raise ValueError("cannot merge stage states with different settings: "
                             f"{other.settings.to_dict()} vs {self.settings.to_dict()}")
        if set(other.components) != set(self.components):
            raise ValueError(f"cannot merge stage states with components {sorted(other.components)} "
                             f"into {sorted(self.components)}")
        for name, acc in self.components.items():
            acc.merge(other.components[name])
        self.n_samples += other.n_samples
        return self

    # -- serialisation ------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The state as an ``.npz`` (plain arrays + a JSON header); :meth:`from_bytes` restores it."""
        header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "settings": self.settings.to_dict(),
                                  "n_samples": self.n_samples, "components": {}}
        arrays: dict[str, np.ndarray] = {}
        for name, acc in self.components.items():
            meta, arrs = acc.dump()
            header["components"][name] = meta
            for k, v in arrs.items():
                v = np.asarray(v)
                if v.dtype.kind == "O":
                    raise TypeError(f"{name}/{k}: object arrays cannot be serialised without pickle")
                arrays[f"{name}//{k}"] = v
        arrays["__header__"] = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        buf = io.BytesIO()
        # np.savez's layout, with sorted members and a fixed timestamp: the same state, the same bytes
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in sorted(arrays.items()):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, extras: Mapping[str, Accumulator] | None = None) -> "StageState":
        """A state from :meth:`to_bytes`; ``extras``: fresh instances of the modality's
        accumulators (``Modality.accumulators()``) when the state has any."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"not a stage state of version {VERSION}: {header.get('format')} {header.get('version')}")
        state = cls.empty(StageSettings.from_dict(header["settings"]), extras)
        missing = set(header["components"]) - set(state.components)
        if missing:
            raise ValueError(f"the state holds components {sorted(missing)}: pass the modality's accumulators")
        for name, meta in header["components"].items():
            prefix = name + "//"
            state.components[name].load(meta, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        state.n_samples = int(header["n_samples"])
        return state

    def copy(self, extras: Mapping[str, Accumulator] | None = None) -> "StageState":
        """An independent, exact copy (through the serialisation); ``extras`` as for
        :meth:`from_bytes`."""
        return StageState.from_bytes(self.to_bytes(), extras)
