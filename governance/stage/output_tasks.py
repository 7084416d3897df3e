"""Image output tasks: what the engine seeds for a segmentation model or a box regressor, and
what the stage records as their decisions. One entry per task in ``OUTPUT_TASKS``.

The engine seeds one of its own tasks (``governance.backtrace``, spec section 2) at the output
of the model, masked where needed, so the stage needs no seeding code of its own:

- ``segmentation``: the model's output is kept at the predicted class's score on each pixel of
  the predicted mask and zeroed everywhere else: the mask is the arg-max map without
  ``image.background_class`` (default 0; null: every pixel), a one-channel output thresholded
  (0.5 for probabilities, 0 for logits). It is applied after the forward of a copy of an
  ``nn.Module``, or as ATen ops appended to an exported graph, so layer names stay. The mask is
  an integer tensor, so the engine's multiplication rule hands the whole seed to the scores. The
  engine seeds it as ``regression``: ``multiplier * score`` on each mask pixel (default mode
  conserves it up to the biases; contrastive splits it into positive and negative scores).
- ``box-regression``: the model as it is; the engine explains its first float output (the four
  box outputs, also when class scores follow as a second output) as ``bbox-regression``:
  ``multiplier * y`` on every coordinate (contrastive: ``R- = multiplier * (1 - y)``, for
  coordinates normalised to [0, 1]).

Decisions per sample (``Decisions``): segmentation gives the mask's dominant class (the class of
most mask pixels; the background class when the mask is empty) as the prediction, the share of
pixels per class, and the mean predicted-class score over the mask as the score. Box regression
gives no class prediction (one global heatmap), the four outputs in the model's order and, when
the model returns class scores too, their arg-max; its score is the sum of the four outputs (what
the relevance conserves).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx, nn


@dataclass
class Decisions:
    """One batch's decisions: predicted class (n,) or None, score (n,), direction (n,), and the
    per-sample prediction columns written beside the relevance (name -> (n,) array)."""

    predictions: np.ndarray | None
    scores: np.ndarray
    direction: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)


def explained_output(out: Any) -> Any:
    """The output a model's explanation starts from: ``.logits`` of a model output object, the
    first element of a tuple (the stage's ``model_output`` reads outputs the same way)."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _numpy(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class Segmentation:
    """The predicted mask of a (N, K, H, W) segmentation model (see the module docstring)."""

    name = "segmentation"
    engine_task = "regression"

    def __init__(self, background: int | None = 0) -> None:
        self.background = background

    def threshold(self, probe: np.ndarray) -> float | None:
        """One-channel outputs: 0.5 for probabilities, 0 for logits (decided once on a probe)."""
        if probe.ndim == 4 and probe.shape[1] == 1 and probe.size:
            return 0.5 if (probe.min() >= 0 and probe.max() <= 1) else 0.0
        return None

    def wrap(self, model: Any, threshold: float | None) -> Any:
        """The model with its output masked (``_mask_scores``), as a graph or a module copy."""
        thr = 0.0 if threshold is None else threshold
        if _aten_graph(model):
            return _masked_graph(model, self.background, thr)
        return _masked_module(model, self.background, thr)

    def classes(self, out: np.ndarray, threshold: float | None) -> np.ndarray:
        """(n, H, W) predicted class per pixel (0/1 for one channel)."""
        if out.shape[1] == 1:
            return (out[:, 0] > (0.0 if threshold is None else threshold)).astype(np.int64)
        return out.argmax(1).astype(np.int64)

    def decide(self, raw: Any, n: int, threshold: float | None) -> Decisions:
        out = _numpy(explained_output(raw))[:n]
        if out.ndim != 4:
            from governance.stage.batch import StageError

            raise StageError(f"segmentation needs per-pixel class scores (N, K, H, W), got {out.shape}")
        cls = self.classes(out, threshold)
        k = max(out.shape[1], 2)
        bg = 0 if out.shape[1] == 1 else self.background
        counts = np.stack([(cls == c).reshape(n, -1).sum(1) for c in range(k)], axis=1)
        pixels = cls[0].size if n else 1
        shares = counts / pixels
        fg = counts.copy()
        if bg is not None and bg < k:
            fg[:, bg] = -1
        dominant = np.where(fg.max(1, initial=-1) > 0, fg.argmax(1), bg if bg is not None else fg.argmax(1))
        picked = np.take_along_axis(out, cls[:, None], axis=1)[:, 0] if out.shape[1] > 1 else out[:, 0]
        in_mask = cls != bg if bg is not None else np.ones_like(cls, dtype=bool)
        area = in_mask.reshape(n, -1).sum(1)
        score = np.where(area > 0, (picked * in_mask).reshape(n, -1).sum(1) / np.maximum(area, 1), 0.0)
        columns = {f"mask_share_{c}": shares[:, c].astype(np.float32) for c in range(k)}
        columns["mask_pixels"] = area.astype(np.int64)
        return Decisions(dominant.astype(np.int64), score.astype(np.float64), np.ones(n), columns)


class BoxRegression:
    """The four box outputs of a box regressor (see the module docstring)."""

    name = "box-regression"
    engine_task = "bbox-regression"

    def threshold(self, probe: np.ndarray) -> float | None:
        return None

    def wrap(self, model: Any, threshold: float | None) -> Any:
        """The model as it is: the engine explains its first float output (the boxes)."""
        return model

    def decide(self, raw: Any, n: int, threshold: float | None) -> Decisions:
        box = _numpy(explained_output(raw))[:n].reshape(n, -1)
        if box.shape[1] != 4:
            from governance.stage.batch import StageError

            raise StageError(f"box-regression needs (N, 4) box outputs, got {box.shape}")
        columns = {f"box_{i}": box[:, i].astype(np.float32) for i in range(4)}
        if isinstance(raw, (tuple, list)) and len(raw) > 1 and hasattr(raw[1], "shape") and raw[1].dim() == 2:
            columns["box_class"] = _numpy(raw[1])[:n].argmax(1).astype(np.int64)
        return Decisions(None, box.sum(1).astype(np.float64), np.ones(n), columns)


class ModelWrapper(nn.Module):
    """A module around the user's model (``self.model``); a mode switch leaves an exported model
    (MLflow's pt2 models refuse one, and are captured in eval form already) as it is."""

    def train(self, mode: bool = True) -> "ModelWrapper":
        self.training = mode
        try:
            self.model.train(mode)
        except NotImplementedError:
            pass
        return self


def _mask_scores(y: torch.Tensor, background: int | None, threshold: float) -> torch.Tensor:
    """``y`` (N, K, H, W) kept at the predicted class of each pixel of the predicted mask, 0
    elsewhere; the mask is an integer / boolean tensor (a constant of the explanation)."""
    if y.shape[1] == 1:
        return y * (y > threshold)
    cls = y.argmax(1)
    keep = nn.functional.one_hot(cls, y.shape[1]).permute(0, 3, 1, 2)
    if background is not None:
        keep = keep * (cls != background).unsqueeze(1)
    return y * keep


def _aten_graph(model: Any) -> bool:
    """An exported (pt2) model: a GraphModule of ATen ops, which the engine walks as it is."""
    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def _masked_module(model: nn.Module, background: int | None, threshold: float) -> nn.Module:
    """A shallow copy of ``model`` (the same submodules and parameters, so the same layer names in
    the explanation) whose output is ``_mask_scores`` of the model's."""
    base = type(model)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _mask_scores(explained_output(base.forward(self, *args, **kwargs)), background, threshold)

    clone = copy.copy(model)
    clone.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})
    return clone


def _masked_graph(gm: fx.GraphModule, background: int | None, threshold: float) -> fx.GraphModule:
    """An exported (ATen) graph with ``_mask_scores`` appended as ATen ops to its first output
    (the engine walks ATen graphs as they are, so their layer names stay)."""
    aten = torch.ops.aten
    graph = copy.deepcopy(gm.graph)
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    y = leaves[0]
    val = y.meta.get("val")
    if val is None or val.dim() != 4:
        from governance.stage.batch import StageError

        raise StageError("segmentation needs an exported model whose first output is (N, K, H, W) scores")
    k = int(val.shape[1])
    with graph.inserting_before(out):
        if k == 1:
            keep = graph.call_function(aten.gt.Scalar, (y, threshold))
        else:
            cls = graph.call_function(aten.argmax.default, (y, 1, True))
            classes = graph.call_function(aten.arange.default, (k,), {"device": val.device})
            classes = graph.call_function(aten.view.default, (classes, [1, k, 1, 1]))
            keep = graph.call_function(aten.eq.Tensor, (cls, classes))
            if background is not None:
                fg = graph.call_function(aten.ne.Scalar, (cls, background))
                keep = graph.call_function(aten.logical_and.default, (keep, fg))
        masked = graph.call_function(aten.mul.Tensor, (y, keep))
    out.args = (pytree.tree_map(lambda a: masked if a is y else a, out.args[0]),)
    new = fx.GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec", "meta"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.recompile()
    return new


class _Summed(ModelWrapper):
    """One output per sample: the sum of what an output task's wrapper returns (what the engine's
    seed conserves), for the quality metrics."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.model = wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = explained_output(self.model(x))
        return y.reshape(y.shape[0], -1).sum(1, keepdim=True)


def summed_output(model: Any, task: str, background: int | None, threshold: float | None = None) -> nn.Module:
    """The model reduced to the one number per sample that ``task`` explains (the quality metrics
    measure how its relevance predicts changes of that number)."""
    return _Summed(output_task(task, {"background_class": background}).wrap(model, threshold))


#: task name -> its output task (the configuration's ``image.background_class`` reaches
#: segmentation through ``output_task``).
OUTPUT_TASKS: dict[str, type] = {"segmentation": Segmentation, "box-regression": BoxRegression}


def output_task(task: str, image: dict[str, Any] | None = None) -> Any:
    """The output task for ``task`` (None for the engine's own tasks)."""
    kind = OUTPUT_TASKS.get(task)
    if kind is None:
        return None
    if kind is Segmentation:
        section = image or {}
        return Segmentation(section["background_class"] if "background_class" in section else 0)
    return kind()
