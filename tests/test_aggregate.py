"""Aggregation on synthetic relevance arrays: normalisation, importance, CIs, ranks, classes,
stability, layer ranking and reason codes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from governance.aggregate import (
    BatchDraws,
    Directions,
    ImportanceAccumulator,
    LayerAccumulator,
    LayerBatch,
    column_spearman,
    contrastive_maps,
    decision_direction,
    direction_label,
    global_importance_document,
    l1_normalise,
    layer_ranking_document,
    reason_codes,
    spearman,
    stability_document,
)
from governance.stage.keys import sample_keys

NAMES = ["a", "b", "c", "d", "e"]


def _relevance(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.array([5.0, 3.0, 1.0, 0.2, 0.1])
    return rng.normal(size=(n, 5)) * scale


def _run(rel: np.ndarray, batch: int, classes: np.ndarray | None = None, seed: int = 0) -> ImportanceAccumulator:
    acc = ImportanceAccumulator(NAMES, n_bootstrap=100)
    for start in range(0, len(rel), batch):
        chunk = rel[start:start + batch]
        draws = BatchDraws.make(seed, start, len(chunk), 100)
        acc.update(chunk, draws, None if classes is None else classes[start:start + batch])
    return acc


def test_l1_normalise_rows_sum_to_one_and_zero_rows_stay_zero() -> None:
    r = np.array([[1.0, -3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, -4.0]])
    s = l1_normalise(r)
    assert np.allclose(np.abs(s).sum(1), [1.0, 0.0, 1.0])
    assert np.allclose(s[0], [0.25, -0.75, 0.0])
    assert np.all(np.isfinite(s))


def test_importance_matches_direct_computation_and_ranks_by_magnitude() -> None:
    rel = _relevance(3000)
    acc = _run(rel, batch=512)
    table = acc.table()
    s = l1_normalise(rel)
    direct = pd.Series(np.abs(s).mean(0), index=NAMES)
    got = table.set_index("feature")
    assert np.allclose(got.loc[NAMES, "importance"], direct.loc[NAMES], atol=1e-12)
    assert np.allclose(got.loc[NAMES, "signed"], s.mean(0), atol=1e-12)
    assert np.allclose(got.loc[NAMES, "std"], np.abs(s).std(0, ddof=1), atol=1e-9)
    assert list(table["feature"]) == NAMES  # scale order
    assert list(table["rank"]) == [1, 2, 3, 4, 5]
    assert (table["ci_low"] <= table["importance"]).all() and (table["importance"] <= table["ci_high"]).all()
    # the bootstrap CI is close to the normal approximation of the standard error
    se = np.abs(s).std(0, ddof=1) / np.sqrt(len(s))
    width = (got.loc[NAMES, "ci_high"] - got.loc[NAMES, "ci_low"]).to_numpy()
    assert np.all(width > 2 * se) and np.all(width < 6 * se)


def test_bootstrap_is_deterministic_and_depends_on_seed() -> None:
    rel = _relevance(1000)
    t1, t2 = _run(rel, 256).table(), _run(rel, 256).table()
    pd.testing.assert_frame_equal(t1, t2)
    t3 = _run(rel, 256, seed=7).table()
    assert not np.allclose(t1["ci_low"], t3["ci_low"])


def test_merge_of_partitions_equals_one_pass() -> None:
    rel = _relevance(2048)
    whole = _run(rel, 512)
    left = ImportanceAccumulator(NAMES, n_bootstrap=100)
    right = ImportanceAccumulator(NAMES, n_bootstrap=100)
    for start in range(0, 2048, 512):
        target = left if start < 1024 else right
        target.update(rel[start:start + 512], BatchDraws.make(0, start, 512, 100))
    merged = left.merge(right)
    pd.testing.assert_frame_equal(whole.table(), merged.table())


def test_per_class_tables_and_document_shape() -> None:
    rel = _relevance(1000)
    classes = np.array([0, 1] * 500)
    rel[classes == 1, 4] *= 500  # feature e dominates class 1 only
    acc = {"signed": _run(rel, 300, classes), "default": _run(np.abs(rel), 300, classes)}
    doc, long = global_importance_document(acc, "signed")
    assert doc["method"] == "dlbacktrace" and doc["primary_mode"] == "signed" and doc["n_samples"] == 1000
    assert list(doc["modes"]) == ["signed", "default"]
    assert set(doc["features"][0]) == {"feature", "importance", "signed", "std", "ci_low", "ci_high", "rank"}
    assert [f["rank"] for f in doc["features"]] == [1, 2, 3, 4, 5]
    assert doc["by_class"]["1"]["features"][0]["feature"] == "e"
    assert doc["by_class"]["0"]["features"][0]["feature"] == "a"
    assert doc["by_class"]["0"]["n_samples"] == 500
    assert set(long["mode"]) == {"signed", "default"} and set(long["class"]) == {"all", "0", "1"}
    assert len(long) == 2 * 3 * 5


def test_stability_high_for_consistent_data_low_for_noise() -> None:
    acc = _run(_relevance(4000), 1000)
    st = stability_document({"signed": acc}, "signed", seed=0)
    assert st["stability"] > 0.95
    assert st["modes"]["signed"]["n_half_a"] + st["modes"]["signed"]["n_half_b"] == 4000
    noise = _run(np.random.default_rng(3).normal(size=(60, 5)), 60)
    assert noise.stability()["spearman"] < 0.95
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)


def test_reason_codes_dominant_feature_leads_and_direction_flips() -> None:
    rel = np.array([
        [0.1, 9.0, -0.5, 0.2, -0.1],   # b dominates, supports a positive decision
        [0.1, 9.0, -0.5, 0.2, -0.1],   # same relevance, negative decision: b is adverse
        [-7.0, 0.1, 0.3, 0.0, 0.0],
    ])
    pred = np.array([1, 0, 0])
    direction = decision_direction("binary-classification", np.array([0.9, 0.2, 0.1]), pred)
    codes = reason_codes(l1_normalise(rel), direction, NAMES, top_n=4, dictionary={"b": "Debt-to-income ratio is high"})
    assert codes.loc[0, "supporting_1"] == "b" and codes.loc[0, "supporting_1_text"] == "Debt-to-income ratio is high"
    assert codes.loc[0, "adverse_1"] == "c"
    assert codes.loc[1, "adverse_1"] == "b" and codes.loc[1, "supporting_1"] == "c"
    assert codes.loc[2, "supporting_1"] == "a"
    assert codes.loc[0, "supporting_1_share"] == pytest.approx(9.0 / 9.9)
    # only two features push against sample 0's decision: slots 3 and 4 are empty
    assert pd.isna(codes.loc[0, "adverse_3"]) and np.isnan(codes.loc[0, "adverse_3_share"])
    assert [c for c in codes.columns if c.endswith("_1")] == ["supporting_1", "adverse_1"]


def test_contrastive_maps_orient_to_decision() -> None:
    pos = np.array([[4.0, 1.0, 0.0], [4.0, 1.0, 0.0]])
    neg = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    sup, adv = contrastive_maps(pos, neg, np.array([1.0, -1.0]))
    assert sup[0].argmax() == 0 and adv[0].argmax() == 2
    assert sup[1].argmax() == 2 and adv[1].argmax() == 0
    assert np.isclose(sup[0].sum() + adv[0].sum(), 1.0)


def _layer_batch(n: int, share: dict[str, float], branch: dict[str, float], units: np.ndarray) -> LayerBatch:
    """A batch of ``n`` samples whose per-sample books are the given constants."""
    lb = LayerBatch(n=n, types={"fc1": "Linear", "block": "Block"})
    for module, sh in share.items():
        b = branch.get(module)
        lb.sums[(module, "relevance")] = np.array([sh * n, 0.1 * n, 1.0 * n, 0.0 if b is None else b * n,
                                                   0.0 if b is None else float(n)])
    per = np.repeat(units[None, :], n, axis=0)
    lb.unit_sum["fc1"], lb.unit_abs["fc1"] = per.sum(0), np.abs(per).sum(0)
    return lb


def test_layer_ranking_weights_samples_and_picks_top_units() -> None:
    acc = LayerAccumulator(top_units=2)
    units = np.array([0.0, 3.0, -5.0])
    acc.update(_layer_batch(30, {"fc1": 0.8, "block": 0.9}, {"block": 0.25}, units))
    other = LayerAccumulator(top_units=2)
    other.update(_layer_batch(10, {"fc1": 0.2, "block": 0.3}, {"block": 0.75}, units))
    acc.merge(other)
    doc = layer_ranking_document({"signed": acc}, "signed")
    layers = {d["module"]: d for d in doc["layers"]}
    assert layers["block"]["share"] == pytest.approx((0.9 * 30 + 0.3 * 10) / 40)
    assert layers["fc1"]["share"] == pytest.approx((0.8 * 30 + 0.2 * 10) / 40)
    assert layers["block"]["branch_share"] == pytest.approx((0.25 * 30 + 0.75 * 10) / 40)
    assert layers["fc1"]["branch_share"] is None
    assert [d["module"] for d in doc["layers"]] == ["block", "fc1"]
    assert [d["rank"] for d in doc["layers"]] == [1, 2]
    assert [u["unit"] for u in layers["fc1"]["top_units"]] == [2, 1]
    assert layers["fc1"]["top_units"][0]["mean_relevance"] == pytest.approx(-5.0)
    meta, arrays = acc.dump()
    assert layer_ranking_document({"signed": LayerAccumulator.load(meta, arrays)}, "signed") == doc


def test_draws_are_keyed_by_sample_id() -> None:
    """The same sample gets the same bootstrap weights and half in any batch; the weights are
    Poisson(1) and the halves fair coins."""
    whole = BatchDraws.make(3, 0, 20000, 60)
    part = BatchDraws.make(3, 7000, 500, 60)
    assert np.array_equal(part.weights, whole.weights[:, 7000:7500])
    assert np.array_equal(part.half, whole.half[7000:7500])
    ids = np.array([7042, 12, 7001])
    assert np.array_equal(BatchDraws.for_keys(sample_keys(ids), 3, 60).weights, whole.weights[:, ids])
    w = whole.weights
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    assert whole.half.mean() == pytest.approx(0.5, abs=0.02)
    assert abs(np.corrcoef(w[0], w[1])[0, 1]) < 0.03  # replicates are independent
    assert not np.array_equal(BatchDraws.make(4, 0, 100, 60).weights, whole.weights[:, :100])


def test_importance_is_the_same_for_any_batching_and_merge_order() -> None:
    rel = _relevance(1500)
    classes = (rel[:, 0] > 0).astype(int)
    ref = _run(rel, 1500, classes)
    for batch in (1, 7, 256):
        got = _run(rel, batch, classes)
        pd.testing.assert_frame_equal(got.table(), ref.table(), rtol=1e-12, atol=1e-12)
        for key, (t, n) in ref.class_tables().items():
            pd.testing.assert_frame_equal(got.class_tables()[key][0], t, rtol=1e-12, atol=1e-12)
        assert got.stability() == pytest.approx(ref.stability(), rel=1e-12)
    parts = [(0, 400), (400, 401), (401, 1500)]
    accs = []
    for a, b in parts:
        acc = ImportanceAccumulator(NAMES, n_bootstrap=100)
        acc.update(rel[a:b], BatchDraws.make(0, a, b - a, 100), classes[a:b])
        accs.append(acc)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = ImportanceAccumulator(NAMES, n_bootstrap=100)
        for i in order:
            merged.merge(ImportanceAccumulator.load(*accs[i].dump()))
        pd.testing.assert_frame_equal(merged.table(), ref.table(), rtol=1e-12, atol=1e-12)


def test_units_that_appear_batch_by_batch_merge_by_name() -> None:
    """Words (a data-dependent vocabulary): each batch names its own units; a unit absent from a
    sample has share 0 there, so the result equals one pass over the dense table."""
    rel = _relevance(600)
    dense = ImportanceAccumulator(NAMES, n_bootstrap=50)
    dense.update(rel, BatchDraws.make(0, 0, 600, 50))
    shares = l1_normalise(rel)
    grown = ImportanceAccumulator(n_bootstrap=50)
    # the first batch only holds units c and a, the second all five in another order
    for a, b, cols in ((0, 200, [2, 0]), (200, 600, [4, 1, 3, 0, 2])):
        grown.update(None, BatchDraws.make(0, a, b - a, 50), shares=shares[a:b][:, cols],
                     units=[NAMES[c] for c in cols])
    expected = ImportanceAccumulator(NAMES, n_bootstrap=50)
    masked = shares.copy()
    masked[:200][:, [1, 3, 4]] = 0.0
    expected.update(None, BatchDraws.make(0, 0, 600, 50), shares=masked)
    pd.testing.assert_frame_equal(grown.table().sort_values("feature").reset_index(drop=True),
                                  expected.table().sort_values("feature").reset_index(drop=True),
                                  rtol=1e-12, atol=1e-12)
    assert grown.feature_names == ["c", "a", "e", "b", "d"]


def test_direction_follows_the_value_relevance_correlation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3))
    rel = np.stack([2 * x[:, 0] + 0.1 * rng.normal(size=500), -x[:, 1] ** 3, rng.normal(size=500)], axis=1)
    rho = column_spearman(x, rel)
    assert rho[0] > 0.9 and rho[1] == pytest.approx(-1.0) and abs(rho[2]) < 0.1
    assert [direction_label(r) for r in rho] == ["raises", "lowers", "mixed"]
    assert np.isnan(column_spearman(np.ones((10, 1)), rng.normal(size=(10, 1)))[0])
    assert direction_label(None) == "mixed" and direction_label(float("nan")) == "mixed"
    one = ImportanceAccumulator(["a", "b", "c"], n_bootstrap=50)
    one.update(rel, BatchDraws.make(0, 0, 500, 50))
    acc = {"signed": one}
    dirs = Directions(rho={"all": {"a": float(rho[0]), "b": float(rho[1]), "c": None}}, n={"all": 500})
    doc, long = global_importance_document(acc, "signed", directions={"signed": dirs}, modality="tabular")
    by = {f["feature"]: f for f in doc["features"]}
    assert (by["a"]["direction"], by["b"]["direction"], by["c"]["direction"]) == ("raises", "lowers", "mixed")
    assert by["c"]["value_relevance_correlation"] is None and doc["direction_sample"] == 500
    assert doc["modality"] == "tabular" and list(long.columns[-2:]) == ["direction", "value_relevance_correlation"]
    # units without a single input value (regions, words): the sign of the mean signed share decides
    doc, _ = global_importance_document(acc, "signed", directions={"signed": None})
    assert all(f["value_relevance_correlation"] is None for f in doc["features"])
    assert {f["feature"]: f["direction"] for f in doc["features"]}["b"] == direction_label(
        by["b"]["signed"] / by["b"]["importance"])
