"""Backtrace over a table in batches: every mode per batch, the primary mode's local relevance and
reason codes streamed to parquet (one row group per batch, so memory stays flat in the number of
rows), and the mergeable reductions (importance, layer ranking) accumulated on the way."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from governance.aggregate import (
    BatchDraws,
    ImportanceAccumulator,
    LayerAccumulator,
    contrastive_maps,
    decision_direction,
    top_reasons,
)
from governance.config import GovernanceConfig
from governance.errors import InputError


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads and restore the previous number afterwards.

    Small tabular models gain little from several threads, and on a busy machine OpenMP's spin
    waits make several threads many times slower than one (measured on the 2-core CI box)."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StageError(InputError):
    """The stage cannot run with these inputs (the message says why)."""


def _predicted_class(task: str, output: np.ndarray, threshold: float | None) -> np.ndarray | None:
    out = output.reshape(len(output), -1)
    if task == "binary-classification":
        if out.shape[1] == 1:
            return (out[:, 0] > (0.5 if threshold is None else threshold)).astype(np.int64)
        return out.argmax(1).astype(np.int64)
    if task in ("multiclass-classification", "generation"):
        return out.argmax(1).astype(np.int64)
    return None


def _score(output: np.ndarray) -> np.ndarray:
    out = output.reshape(len(output), -1)
    return out[:, 0] if out.shape[1] == 1 else out.max(1)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, dict):
        raise StageError("models with several inputs are not supported by the tabular stage yet")
    return t.detach().float().cpu().numpy()


class _ParquetStream:
    """Append DataFrames to one parquet file, one row group per batch."""

    def __init__(self, path: Path) -> None:
        self.path, self.writer = path, None

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            strings = [f.name for f in table.schema if str(f.type) == "string"]
            # dictionary-encode the feature names in the reason codes, never the float columns
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="snappy",
                                           use_dictionary=strings or False)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _reason_table(sample_ids: np.ndarray, pred: np.ndarray, score: np.ndarray, shares: np.ndarray,
                  direction: np.ndarray, names: list[str], cfg: GovernanceConfig,
                  positive: np.ndarray | None, negative: np.ndarray | None) -> tuple[Any, dict]:
    """The reason codes of one batch as an Arrow table (columns: see docs/contracts.md)."""
    import pyarrow as pa

    sup = adv = None
    if positive is not None and negative is not None:
        sup, adv = contrastive_maps(positive, negative, direction)
    tops = top_reasons(shares, direction, top_n=cfg.reason_codes.top_n, supporting=sup, adverse=adv)
    name_arr = np.asarray(names + [""], dtype=object)
    text_arr = np.asarray([cfg.reason_codes.dictionary.get(f, f) for f in names] + [""], dtype=object)
    cols: dict[str, Any] = {"sample_id": pa.array(sample_ids), "prediction": pa.array(pred),
                            "score": pa.array(score)}
    for label, (idx, _) in tops.items():
        ok = idx >= 0
        offsets = np.concatenate([[0], np.cumsum(ok.sum(1))]).astype(np.int32)
        cols[label] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(name_arr[idx[ok]], pa.string()))
    for label, (idx, mag) in tops.items():
        for j in range(idx.shape[1]):
            empty = idx[:, j] < 0
            cols[f"{label}_{j + 1}"] = pa.array(name_arr[idx[:, j]], pa.string(), mask=empty)
            cols[f"{label}_{j + 1}_share"] = pa.array(mag[:, j], pa.float64(), mask=empty)
            cols[f"{label}_{j + 1}_text"] = pa.array(text_arr[idx[:, j]], pa.string(), mask=empty)
    leaders = {label: np.bincount(idx[:, 0][idx[:, 0] >= 0], minlength=len(names)) for label, (idx, _) in tops.items()}
    return pa.table(cols), leaders


def _local_table(head: dict[str, np.ndarray], rel: np.ndarray, names: list[str]) -> Any:
    import pyarrow as pa

    arrays = [pa.array(v) for v in head.values()]
    rel32 = np.asarray(rel, dtype=np.float32)
    arrays += [pa.array(rel32[:, j]) for j in range(rel32.shape[1])]
    return pa.Table.from_arrays(arrays, names=list(head) + list(names))


def run_backtrace(model: Any, x: np.ndarray, names: list[str], cfg: GovernanceConfig, out_dir: Path, *,
                  targets: np.ndarray | None = None, quiet: bool = False) -> dict[str, Any]:
    """Explain every row of ``x`` in batches in every mode, streaming the primary mode's local
    relevance and reason codes to parquet under ``out_dir``; returns the reductions."""
    import torch
    from tqdm.auto import tqdm

    from governance.backtrace import Backtrace

    bt = Backtrace(model)
    agg = cfg.aggregation
    imps = {m: ImportanceAccumulator(names, n_bootstrap=agg.n_bootstrap) for m in cfg.modes}
    layers = {m: LayerAccumulator(top_units=agg.top_units) for m in cfg.modes}
    local = _ParquetStream(out_dir / "local_relevance.parquet")
    codes = _ParquetStream(out_dir / "reason_codes.parquet")
    leaders = {"supporting": np.zeros(len(names), dtype=np.int64), "adverse": np.zeros(len(names), dtype=np.int64)}
    n = len(x)
    threshold: float | None = None
    device = cfg.device
    bar = tqdm(total=n, unit="rows", unit_scale=True, desc="backtrace", disable=quiet, mininterval=0.5)
    try:
        for start in range(0, n, cfg.batch_size):
            xb = torch.from_numpy(x[start:start + cfg.batch_size]).to(device)
            m_rows = len(xb)
            draws = BatchDraws.make(agg.seed, start, m_rows, agg.n_bootstrap)
            ids = np.arange(start, start + m_rows, dtype=np.int64)
            pred = score = direction = None
            for mode in cfg.modes:
                try:
                    exp = bt.explain(xb, mode=mode, task=cfg.task, multiplier=cfg.multiplier)
                except RuntimeError as exc:
                    if start == 0 and "shape" in str(exc):
                        raise StageError(f"the model rejected a batch of {x.shape[1]} feature columns "
                                         f"({exc}); check feature_columns and target_column") from exc
                    raise
                rel = _to_numpy(exp.input_relevance).reshape(m_rows, -1)
                if pred is None:
                    output = _to_numpy(exp.output)
                    if threshold is None and output.reshape(m_rows, -1).shape[1] == 1:
                        threshold = 0.5 if (output.min() >= 0 and output.max() <= 1) else 0.0
                    pred = _predicted_class(cfg.task, output, threshold)
                    score = _score(output)
                    direction = decision_direction(cfg.task, output, pred)
                shares = imps[mode].update(rel, draws, pred)
                layers[mode].update(exp.layer_summary(), m_rows, exp.layer_relevance)
                if mode == cfg.primary_mode:
                    head = {"sample_id": ids, "prediction": pred if pred is not None else score, "score": score}
                    if targets is not None:
                        head["target"] = targets[start:start + m_rows]
                    head["relevance_l1"] = np.abs(rel).sum(1)
                    local.write(_local_table(head, rel, names))
                    pos = neg = None
                    if mode == "contrastive" and exp.positive is not None and exp.negative is not None:
                        pos = _to_numpy(exp.positive.input_relevance).reshape(m_rows, -1)
                        neg = _to_numpy(exp.negative.input_relevance).reshape(m_rows, -1)
                    rc, lead = _reason_table(ids, pred if pred is not None else score, score, shares,
                                             direction, names, cfg, pos, neg)
                    codes.write(rc)
                    for label in leaders:
                        leaders[label] += lead[label]
            bar.update(m_rows)
    finally:
        bar.close()
        local.close()
        codes.close()
    return {"importance": imps, "layers": layers,
            "reason_summary": {label: dict(sorted(((names[i], int(c)) for i, c in enumerate(cnt) if c),
                                                  key=lambda kv: (-kv[1], kv[0])))
                               for label, cnt in leaders.items()}}
