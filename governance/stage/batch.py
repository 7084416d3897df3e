"""One batch through the engine: every mode, predictions, unit relevance, layer books, reason codes.

``explain_batch`` is a pure function of the batch (no state, no files, no MLflow), so the same
call runs in the streaming runner and inside a Spark executor. Its result does not depend on
which other samples share the batch: the engine is called on a row count padded up to a
multiple of ``ROW_ALIGNMENT`` (by repeating the batch's first sample), because float32 BLAS
kernels give bitwise different rows for small or ragged row counts (GEMV for one row,
remainder tiles) and identical rows for aligned ones (measured on CPU with 1 and 2 threads).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from governance.aggregate import (
    LayerBatch,
    contrastive_maps,
    decision_direction,
    l1_shares,
    top_reasons,
)
from governance.errors import InputError
from governance.modality.base import InputBatch, Modality, ModalityPlan
from governance.stage.keys import sample_keys

#: The engine always sees a row count that is a multiple of this (see the module docstring).
ROW_ALIGNMENT = 64


class StageError(InputError):
    """The stage cannot run with these inputs (the message says why)."""


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


@dataclass
class ModeResult:
    """One mode's result for a batch: relevance per unit (``unit_names``), its L1-normalised
    shares, the per-sample L1 norm, the layer books summed over the batch, and (contrastive as
    the primary mode, for its reason codes) the R+ / R- maps per unit."""

    unit_names: list[str]
    relevance: np.ndarray
    shares: np.ndarray
    relevance_l1: np.ndarray
    layers: LayerBatch
    positive: np.ndarray | None = None
    negative: np.ndarray | None = None
    detail: Any = None  # the modality's finer relevance (UnitRelevance.detail)


@dataclass
class BatchResult:
    """Everything the stage keeps from one explained batch.

    ``sample_ids`` (n,) and their 64-bit ``keys``; ``predictions`` (n,) predicted class (None for
    regression); ``scores`` (n,) the model's output (one output, or the largest); ``direction``
    (n,) +1 where positive relevance supports the decision, -1 where it pushes against it;
    ``targets`` when the data has labels; ``inputs`` / ``unit_values`` from the modality;
    ``modes`` by mode; ``reasons``: the primary mode's reason codes per side, (unit index (n, k),
    share (n, k)) with -1 / NaN in empty slots, indices into the primary mode's unit names."""

    sample_ids: np.ndarray
    keys: np.ndarray
    predictions: np.ndarray | None
    scores: np.ndarray
    direction: np.ndarray
    targets: np.ndarray | None
    inputs: Any
    unit_values: np.ndarray | None
    modes: dict[str, ModeResult]
    primary_mode: str
    reasons: dict[str, tuple[np.ndarray, np.ndarray]]
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def primary(self) -> ModeResult:
        return self.modes[self.primary_mode]

    @property
    def decisions(self) -> np.ndarray:
        """The per-sample decision column: the predicted class, or the score for regression."""
        return self.predictions if self.predictions is not None else self.scores


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, dict):
        return {k: _to_numpy(v) for k, v in t.items()}  # type: ignore[return-value]
    return t.detach().float().cpu().numpy()


def _head(values: Any, n: int) -> Any:
    """The first ``n`` rows of an array, or of each array of a dict (several model inputs)."""
    if isinstance(values, dict):
        return {k: v[:n] for k, v in values.items()}
    return values[:n]


def _pad(inputs: Any, n: int) -> Any:
    """``inputs`` with the first sample repeated up to a multiple of ``ROW_ALIGNMENT`` rows."""
    extra = -n % ROW_ALIGNMENT
    if not extra:
        return inputs
    if isinstance(inputs, dict):
        return {k: _pad(v, n) for k, v in inputs.items()}
    return np.concatenate([inputs, np.repeat(inputs[:1], extra, axis=0)])


def predicted_class(task: str, output: np.ndarray, threshold: float | None) -> np.ndarray | None:
    """The predicted class per sample (None for regression and other non-class tasks)."""
    out = output.reshape(len(output), -1)
    if task == "binary-classification":
        if out.shape[1] == 1:
            return (out[:, 0] > (0.5 if threshold is None else threshold)).astype(np.int64)
        return out.argmax(1).astype(np.int64)
    if task in ("multiclass-classification", "generation"):
        return out.argmax(1).astype(np.int64)
    return None


def output_score(output: np.ndarray) -> np.ndarray:
    """The model's output per sample: the one output, or the largest of several."""
    out = output.reshape(len(output), -1)
    return out[:, 0] if out.shape[1] == 1 else out.max(1)


def layer_batch(exp: Any, n: int) -> LayerBatch:
    """The explanation's per-sample layer books (first ``n`` rows) summed into a LayerBatch.

    The modules' books are stacked into one (modules, n) float64 matrix per quantity, so each
    ratio and sum is one operation over every module; the per-unit relevance (float32 in the
    engine) is summed in float64 without a float64 copy. Sums run in float64, so batches of any
    size add up to the same totals (to rounding far below 1e-12)."""
    import torch

    lb = LayerBatch(n=n)
    parts = [("relevance", exp)]
    if exp.positive is not None and exp.negative is not None:
        parts = [("positive", exp.positive), ("negative", exp.negative)]
    f64 = torch.float64
    for map_name, e in parts:
        names = [name for name in e.books if name]  # the root module: its output is the seed itself
        if not names:
            continue
        for name in names:
            lb.types.setdefault(name, e.module_types.get(name, ""))
        books = [e.books[name] for name in names]
        seed_abs = e.seed_relevance[:n].to(f64).abs()
        safe = torch.where(seed_abs > 0, seed_abs, torch.ones_like(seed_abs))
        a_in = torch.stack([b.relevance_in[:n] for b in books]).to(f64)
        share = (torch.stack([b.abs_relevance_in[:n] for b in books]).to(f64) / safe).sum(1)
        a_abs = a_in.abs()
        denom = torch.where(a_abs > 0, a_abs, torch.ones_like(a_abs))
        bias = (torch.stack([b.bias_absorbed[:n] for b in books]).to(f64) / denom).sum(1)
        totals = torch.stack([share, bias, a_in.sum(1)]).tolist()
        for i, (name, b) in enumerate(zip(names, books)):
            branch_sum, branch_n = 0.0, 0.0
            if b.branch_in is not None and b.skip_in is not None:
                bi = b.branch_in[:n].to(f64)
                tot = bi + b.skip_in[:n].to(f64)
                ok = tot.abs() > 0
                branch_sum, branch_n = float((bi[ok] / tot[ok]).sum()), float(ok.sum())
            lb.sums[(name, map_name)] = np.array(
                [totals[0][i], totals[1][i], totals[2][i], branch_sum, branch_n])
    # modules that pass relevance through (activations, dropout) share their input's tensor:
    # each distinct tensor is summed once; contrastive's net map R+ - R- likewise, per pair
    contrastive = exp.positive is not None and exp.negative is not None
    done: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for module in exp.layer_relevance:
        if not module or module not in lb.types:
            continue
        if contrastive:
            p, q = exp.positive.layer_relevance[module], exp.negative.layer_relevance[module]
        else:
            p = q = exp.layer_relevance[module]
        if p.dim() < 2:
            continue
        # the sums depend on the tensor(s) and on which axis holds the units, not on the module
        key = (id(p), id(q), unit_axis(p.dim(), lb.types[module]))
        if key not in done:
            rel = p[:n] - q[:n] if contrastive else p[:n]
            per = per_unit_relevance(rel.detach(), lb.types[module]).to(f64)
            total = per.sum(0).cpu().numpy()
            done[key] = (total, per.abs_().sum(0).cpu().numpy())
        lb.unit_sum[module], lb.unit_abs[module] = (a.copy() for a in done[key])
    return lb


def per_unit_relevance(rel: Any, module_type: str) -> Any:
    """(N, units) relevance per sample and output unit of a module (channels for convolutions,
    the last axis otherwise) from its relevance at the output (N, ...), a torch tensor."""
    if rel.dim() == 2:
        return rel
    axis = unit_axis(rel.dim(), module_type)
    moved = rel.movedim(axis, -1)
    return moved.reshape(rel.shape[0], -1, rel.shape[axis]).sum(1)


def unit_axis(ndim: int, module_type: str) -> int:
    """The axis of a module's output (N, ...) that holds its units: channels (axis 1) for
    convolutions and 2-D outputs, the last axis otherwise (tokens x features)."""
    return 1 if ndim <= 2 or "conv" in module_type.lower() else ndim - 1


def model_output_raw(model: Any, x: Any) -> Any:
    """What the model returns for inputs ``x`` (a tensor, a tuple or a dict), without gradients."""
    import torch

    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)


def model_output(model: Any, x: Any) -> Any:
    """The model's output tensor for inputs ``x`` (a tensor, a tuple of positional inputs or a
    dict of keyword inputs), without gradients: ``.logits`` of a model output object, the first
    element of a tuple."""
    from governance.stage.output_tasks import explained_output

    return explained_output(model_output_raw(model, x))


class Explainer:
    """The engine for one model and configuration: every mode on a batch of model inputs."""

    def __init__(self, model: Any, *, task: str, modes: Sequence[str], primary_mode: str,
                 multiplier: float = 100.0, device: str = "cpu", top_n: int = 4,
                 image: dict[str, Any] | None = None) -> None:
        from governance.stage.output_tasks import output_task

        self.model = model
        self.output_task = output_task(task, image)  # segmentation / box regression, else None
        self._bt: Any = None
        self.task = task
        self.modes = list(modes)
        self.primary_mode = primary_mode
        self.multiplier = float(multiplier)
        self.device = device
        self.top_n = int(top_n)
        self.threshold: float | None = None

    @classmethod
    def from_config(cls, model: Any, cfg: Any) -> "Explainer":
        return cls(model, task=cfg.task, modes=cfg.modes, primary_mode=cfg.primary_mode,
                   multiplier=cfg.multiplier, device=cfg.device, top_n=cfg.reason_codes.top_n,
                   image=getattr(cfg, "image", None))

    @property
    def bt(self) -> Any:
        """The engine, built on first use (an output task's wrapper needs the calibrated threshold)."""
        if self._bt is None:
            from governance.backtrace import Backtrace

            ot = self.output_task
            self._bt = Backtrace(ot.wrap(self.model, self.threshold) if ot is not None else self.model)
        return self._bt

    def calibrate(self, modality: Modality, batch: InputBatch) -> None:
        """Decide once, on a probe batch (the data's first rows), whether a one-output binary
        model emits probabilities (threshold 0.5) or logits (threshold 0), so the decision rule
        does not depend on how the rows are batched."""
        out = model_output(self.model, modality.to_model(batch.inputs, self.device))
        out = out.detach().float().cpu().numpy()
        if self.output_task is not None:
            self.threshold = self.output_task.threshold(out)
            modality.calibrated(self.threshold)
            return
        out = out.reshape(len(batch), -1)
        if out.shape[1] == 1 and len(out):
            self.threshold = 0.5 if (out.min() >= 0 and out.max() <= 1) else 0.0

    def explanations(self, x: Any) -> Iterator[tuple[str, Any]]:
        """``(mode, explanation)`` for each configured mode over one recorded forward pass, each
        walked when the caller takes it (so a caller that drops each before the next holds one
        at a time); a shape mismatch becomes a clear StageError."""
        task = self.output_task.engine_task if self.output_task is not None else self.task
        try:
            yield from self.bt.iter_modes(x, modes=tuple(self.modes), task=task, multiplier=self.multiplier)
        except RuntimeError as exc:
            if "shape" in str(exc) or "size" in str(exc):
                raise StageError(f"the model rejected the input batch ({exc}); check feature_columns and "
                                 "target_column") from exc
            raise


def explain_batch(explainer: Explainer, modality: Modality, plan: ModalityPlan, batch: InputBatch) -> BatchResult:
    """Explain one batch in every mode (see the module docstring)."""
    n = len(batch)
    x = modality.to_model(_pad(batch.inputs, n), explainer.device)
    modes: dict[str, ModeResult] = {}
    pred = score = direction = None
    extras: dict[str, Any] = dict(batch.extras)
    for mode, exp in explainer.explanations(x):  # one recorded forward pass for every mode
        if score is None and explainer.output_task is not None:
            decided = explainer.output_task.decide(model_output_raw(explainer.model, x), n, explainer.threshold)
            pred, score, direction = decided.predictions, decided.scores, decided.direction
            extras["prediction_columns"] = decided.columns
        elif score is None:
            output = _to_numpy(exp.output)[:n]
            if explainer.threshold is None and output.reshape(n, -1).shape[1] == 1:
                explainer.threshold = 0.5 if (output.min() >= 0 and output.max() <= 1) else 0.0
            pred = predicted_class(explainer.task, output, explainer.threshold)
            score = output_score(output)
            direction = decision_direction(explainer.task, output, pred)
        units = modality.units(batch, plan, _head(_to_numpy(exp.input_relevance), n))
        rel = np.asarray(units.relevance, dtype=np.float64)
        pos = neg = None
        if mode == explainer.primary_mode and exp.positive is not None and exp.negative is not None:
            pos = modality.units(batch, plan, _head(_to_numpy(exp.positive.input_relevance), n)).relevance
            neg = modality.units(batch, plan, _head(_to_numpy(exp.negative.input_relevance), n)).relevance
        shares, l1 = l1_shares(rel)
        modes[mode] = ModeResult(unit_names=units.names, relevance=rel, shares=shares, relevance_l1=l1,
                                 layers=layer_batch(exp, n), positive=pos, negative=neg, detail=units.detail)
        del exp
    primary = modes[explainer.primary_mode]
    sup = adv = None
    if primary.positive is not None and primary.negative is not None:
        sup, adv = contrastive_maps(primary.positive, primary.negative, direction)
    reasons = top_reasons(primary.shares, direction, top_n=explainer.top_n, supporting=sup, adverse=adv)
    return BatchResult(
        sample_ids=batch.sample_ids, keys=sample_keys(batch.sample_ids), predictions=pred, scores=score,
        direction=direction, targets=batch.targets, inputs=batch.inputs, unit_values=batch.unit_values,
        modes=modes, primary_mode=explainer.primary_mode, reasons=reasons, extras=extras,
    )
