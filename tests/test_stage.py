"""The stage core with the real engine on a trained credit-risk MLP: every document and the sample
reservoir are the same (to 1e-12) for any batch size, any split of the rows into states merged in
any order, a reordered input with an id column, and a state's byte serialisation round-trips
exactly. Also the streamed sources (parquet, a parquet folder, CSV, DataFrame) give the same
documents through ``explain_model``."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from examples.credit_risk.generator import FEATURE_NAMES, Standardiser, generate_loans
from examples.credit_risk.model import train_mlp
from governance.config import config_from_dict
from governance.data import FrameSource
from governance.modality.base import UnitRelevance
from governance.modality.tabular import TabularModality
from governance.stage.batch import ROW_ALIGNMENT, Explainer, torch_threads
from governance.stage.documents import documents
from governance.stage.keys import reservoir_priority, sample_keys
from governance.stage.runner import explain_stream
from governance.stage.state import StageSettings, StageState

N_ROWS = 600
CONFIG = {"target_column": "default", "aggregation": {"n_bootstrap": 40, "sample_size": 150},
          "quality": {"enabled": False}, "cpu_threads": 1}


@pytest.fixture(scope="module")
def credit() -> tuple[Any, pd.DataFrame]:
    """A briefly trained credit MLP and N_ROWS standardised validation rows."""
    train = generate_loans(3000, seed=1)
    std = Standardiser.fit(train)
    t = std.transform(train)
    model = train_mlp(t[FEATURE_NAMES].to_numpy(), t["default"].to_numpy(), epochs=3, seed=0)
    return model, std.transform(generate_loans(N_ROWS, seed=7)).reset_index(drop=True)


def _state(model: Any, frame: pd.DataFrame, batch_size: int, **cfg: Any) -> StageState:
    config = config_from_dict({**CONFIG, **cfg})
    modality = TabularModality(config)
    table = FrameSource(frame)
    plan = modality.plan(table, types.SimpleNamespace(source_run_id=None))
    settings = StageSettings.from_config(config, plan.units)
    with torch_threads(1):  # tiny matrices: one thread is several times faster on a shared machine
        return explain_stream(Explainer.from_config(model, config), modality, plan, table, settings, None,
                              batch_size=batch_size)


def assert_close(a: Any, b: Any, tol: float = 1e-12, where: str = "") -> None:
    """Equal structures; floats equal within ``tol`` (absolute or relative)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert isinstance(b, float), f"{where}: {a!r} vs {b!r}"
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert abs(a - b) <= tol * max(1.0, abs(a)), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _docs(state: StageState) -> dict[str, Any]:
    d = documents(state)
    return json.loads(json.dumps({"global_importance": d.global_importance, "layer_ranking": d.layer_ranking,
                                  "stability": d.stability}, default=float))


def _reservoir(state: StageState) -> dict[str, Any]:
    r = state.reservoir
    return {"ids": r.ids.tolist(), **{k: v.tolist() for k, v in sorted(r.columns.items())}}


@pytest.fixture(scope="module")
def whole(credit) -> StageState:
    model, frame = credit
    return _state(model, frame, N_ROWS)


def test_documents_and_reservoir_are_identical_for_any_batch_size(credit, whole) -> None:
    model, frame = credit
    ref, ref_res = _docs(whole), _reservoir(whole)
    gi = ref["global_importance"]
    assert gi["n_samples"] == N_ROWS and gi["direction_sample"] == 150 and gi["modality"] == "tabular"
    assert sum(gi["reason_code_leaders"]["supporting"].values()) > 0
    for batch in (1, 7, 256):
        state = _state(model, frame, batch)
        assert_close(_docs(state), ref, where=f"batch {batch}")
        assert _reservoir(state) == ref_res, batch  # exactly the same samples and values


def test_states_over_any_split_merge_to_the_same_documents(credit, whole) -> None:
    """What Spark does: partitions explained separately (here with different batch sizes), partial
    states serialised, shipped and merged in any order or tree."""
    model, frame = credit
    cuts = [(0, 101), (101, 102), (102, 430), (430, N_ROWS)]
    parts = []
    for i, (a, b) in enumerate(cuts):
        # a partition keeps the global row positions as sample ids
        part = _state(model, frame.iloc[a:b].set_index(pd.RangeIndex(a, b)).reset_index(names="row"), (7, 64, 33, 200)[i],
                      id_column="row")
        parts.append(part.to_bytes())
    ref = _docs(whole)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        merged = StageState.from_bytes(parts[order[0]])
        for i in order[1:]:
            merged.merge(StageState.from_bytes(parts[i]))
        assert merged.n_samples == N_ROWS
        assert_close(_docs(merged), ref, where=f"order {order}")
        assert _reservoir(merged) == _reservoir(whole)
    left = StageState.from_bytes(parts[0]).merge(StageState.from_bytes(parts[1]))
    right = StageState.from_bytes(parts[2]).merge(StageState.from_bytes(parts[3]))
    assert_close(_docs(right.merge(left)), ref, where="tree")


def test_state_serialisation_round_trips_exactly(whole) -> None:
    blob = whole.to_bytes()
    back = StageState.from_bytes(blob)
    assert back.to_bytes() == blob
    assert _docs(back) == _docs(whole) and back.settings == whole.settings
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:  # a plain npz: loading it never unpickles
        assert all(npz[k].dtype.kind != "O" for k in npz.files)
    import zipfile

    assert {i.date_time for i in zipfile.ZipFile(io.BytesIO(blob)).infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with pytest.raises(ValueError, match="different settings"):
        StageState.empty(StageSettings(**{**whole.settings.__dict__, "seed": 1})).merge(back)


def test_reordered_rows_with_an_id_column_give_the_same_documents(credit, whole) -> None:
    model, frame = credit
    ided = frame.reset_index(names="loan_id")
    perm = np.random.default_rng(5).permutation(N_ROWS)
    shuffled = _state(model, ided.iloc[perm].reset_index(drop=True), 64, id_column="loan_id")
    assert_close(_docs(shuffled), _docs(whole))
    assert _reservoir(shuffled) == _reservoir(whole)


def test_reservoir_is_the_bottom_k_of_the_id_hash(whole) -> None:
    priority = reservoir_priority(sample_keys(np.arange(N_ROWS)), whole.settings.seed)
    expected = np.argsort(priority, kind="stable")[:150]
    assert whole.reservoir.ids.tolist() == expected.tolist()
    assert np.array_equal(whole.reservoir.columns["inputs"], whole.reservoir.columns["inputs"].astype(np.float32))


def test_text_ids_are_hashed_and_kept(credit) -> None:
    model, frame = credit
    ided = frame.head(130).assign(applicant=[f"A-{i:04d}" for i in range(130)])
    state = _state(model, ided, 50, id_column="applicant")
    assert state.reservoir.ids.dtype.kind == "U" and state.reservoir.ids[0].startswith("A-")
    again = _state(model, ided.iloc[::-1].reset_index(drop=True), 13, id_column="applicant")
    assert_close(_docs(again), _docs(state))


def test_row_alignment_keeps_engine_rows_bitwise_identical(credit) -> None:
    """Why explain_batch pads: the same row explained alone or among others, bitwise."""
    import torch

    from governance.backtrace import Backtrace

    model, frame = credit
    x = torch.from_numpy(frame[FEATURE_NAMES].to_numpy(np.float32))
    bt = Backtrace(model)
    ref = bt.explain(x[:ROW_ALIGNMENT * 4], mode="signed", task="binary-classification").input_relevance
    alone = bt.explain(torch.cat([x[5:6]] * ROW_ALIGNMENT), mode="signed", task="binary-classification")
    assert torch.equal(alone.input_relevance[0], ref[5])


# ----------------------------------------------------------------------------- explain_model


def test_every_source_and_batch_size_gives_the_same_artifacts(credit, tmp_path: Path) -> None:
    """Through the whole stage (contract, writers, plots; no MLflow): a parquet file, a folder of
    parquet files, a CSV file and the DataFrame, at different batch sizes."""
    from governance.pipeline import explain_model

    model, frame = credit
    frame = frame.head(300)
    frame.to_parquet(tmp_path / "valid.parquet", index=False)
    folder = tmp_path / "valid_parts"
    folder.mkdir()
    for i, (a, b) in enumerate([(0, 120), (120, 121), (121, 300)]):
        frame.iloc[a:b].to_parquet(folder / f"part-{i:05d}.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    frame.to_csv(tmp_path / "valid.csv", index=False)
    runs = {}
    for label, data, batch in (("dataframe", frame, 300), ("parquet", tmp_path / "valid.parquet", 7),
                               ("folder", folder, 64), ("csv", tmp_path / "valid.csv", 100)):
        runs[label] = explain_model(model, data, log=False, quiet=True, batch_size=batch, config=CONFIG)
    ref = runs["dataframe"]
    for label, res in runs.items():
        assert res.validation.success and res.validation.n_rows == 300, label
        # CSV round-trips the float32 values through text: equal to float32 precision only
        tol = 1e-12 if label != "csv" else 1e-5
        assert_close(json.loads(json.dumps(res.global_importance)), json.loads(json.dumps(ref.global_importance)),
                     tol=tol, where=label)
        assert_close(res.layer_ranking, ref.layer_ranking, tol=tol, where=label)
        assert_close(res.stability, ref.stability, tol=tol, where=label)


# ----------------------------------------------------------------------------- a new modality


class SignedFeatureCounts:
    """A modality's own accumulator (as text counts words): samples per unit."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def update(self, batch: Any, draws: Any) -> None:
        r = batch.primary
        for name, n in zip(r.unit_names, (r.relevance != 0).sum(0)):
            self.counts[name] = self.counts.get(name, 0) + int(n)

    def merge(self, other: "SignedFeatureCounts") -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def dump(self) -> tuple[dict, dict]:
        names = sorted(self.counts)
        return {"units": names}, {"counts": np.array([self.counts[k] for k in names], dtype=np.int64)}

    def load(self, meta: dict, arrays: dict) -> None:
        self.counts = dict(zip(meta["units"], arrays["counts"].tolist()))


class SignedFeatures(TabularModality):
    """A data-dependent vocabulary, like words: a feature's relevance counts for ``<feature>+``
    or ``<feature>-`` depending on the sign of the sample's value; the units have no single
    input value. One class, registered in one table: the stage is not touched."""

    name = "signed-features"
    fixed_units = False

    def plan(self, table, handle):
        return dataclasses.replace(super().plan(table, handle), units=None)

    def input_batch(self, frame, plan):
        b = super().input_batch(frame, dataclasses.replace(plan, units=FEATURE_NAMES))
        return dataclasses.replace(b, unit_values=None)

    def units(self, batch, plan, relevance):
        rel = np.asarray(relevance, dtype=np.float64)
        positive = batch.inputs > 0
        names = [f"{f}{s}" for s in "+-" for f in FEATURE_NAMES]
        present = [i for i in range(len(names)) if (positive if i < 78 else ~positive)[:, i % 78].any()]
        both = np.concatenate([np.where(positive, rel, 0.0), np.where(~positive, rel, 0.0)], axis=1)
        return UnitRelevance([names[i] for i in present], both[:, present])

    def sample_tables(self, result, plan):
        return {}

    def accumulators(self):
        return {"counts": SignedFeatureCounts()}


@pytest.fixture()
def signed_features(monkeypatch):
    from governance import modality

    monkeypatch.setitem(modality.MODALITIES, "signed-features", "test_stage:SignedFeatures")
    return "signed-features"


def test_a_modality_with_a_growing_vocabulary_plugs_in(credit, signed_features) -> None:
    from governance.modality import get_modality

    model, frame = credit
    frame = frame.head(300)

    def run(part: pd.DataFrame, batch: int) -> StageState:
        config = config_from_dict({**CONFIG, "modality": signed_features, "id_column": "row"})
        modality = get_modality(config)
        table = FrameSource(part)
        plan = modality.plan(table, types.SimpleNamespace(source_run_id=None))
        settings = StageSettings.from_config(config, plan.units)
        with torch_threads(1):
            return explain_stream(Explainer.from_config(model, config), modality, plan, table, settings, None,
                                  batch_size=batch)

    rows = frame.reset_index(names="row")
    whole = run(rows, 300)
    docs = _docs(whole)
    gi = docs["global_importance"]
    assert gi["modality"] == "signed-features" and "feature_columns" not in gi
    names = {f["feature"] for f in gi["features"]}
    assert "fico_score+" in names and "fico_score-" in names and len(names) <= 156
    assert all(f["value_relevance_correlation"] is None for f in gi["features"])  # no single value
    counts = whole.extra("counts").counts
    assert counts["fico_score+"] + counts["fico_score-"] == 300
    assert_close(_docs(run(rows, 7)), docs)
    parts = [run(rows.iloc[a:b], 64).to_bytes() for a, b in ((0, 50), (50, 300))]
    merged = StageState.from_bytes(parts[1], {"counts": SignedFeatureCounts()})
    merged.merge(StageState.from_bytes(parts[0], {"counts": SignedFeatureCounts()}))
    assert_close(_docs(merged), docs)
    assert merged.extra("counts").counts == counts
    with pytest.raises(ValueError, match="pass the modality's accumulators"):
        StageState.from_bytes(parts[0])


@pytest.mark.parametrize("mode", ["signed", "default", "contrastive"])
def test_layer_books_sum_each_modules_own_relevance(credit, mode: str) -> None:
    """layer_batch sums a tensor that several modules share (a linear layer, its activation and
    dropout) once; every module still gets the sums of its own relevance, computed naively here."""
    import torch

    from governance.backtrace import Backtrace
    from governance.stage.batch import layer_batch

    model, frame = credit
    x = torch.tensor(frame[FEATURE_NAMES].to_numpy(np.float32)[:50])
    exp = Backtrace(model).explain(x, mode=mode, task="binary-classification")
    lb = layer_batch(exp, 50)
    maps = ((exp.positive.layer_relevance, exp.negative.layer_relevance) if mode == "contrastive"
            else (exp.layer_relevance, None))
    checked = 0
    for module, rel in maps[0].items():
        if not module or module not in lb.unit_sum:
            continue
        # contrastive's net map R+ - R- in the engine's dtype, as the explanation gives it
        r = (rel.detach() - maps[1][module].detach() if maps[1] is not None else rel.detach()).double()
        np.testing.assert_array_equal(lb.unit_sum[module], r.reshape(50, -1).sum(0).numpy())
        np.testing.assert_array_equal(lb.unit_abs[module], r.abs().reshape(50, -1).sum(0).numpy())
        checked += 1
    assert {"fc1", "act1", "fc2"} <= set(lb.unit_sum) and checked >= 6
