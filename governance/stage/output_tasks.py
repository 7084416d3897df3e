"""Image output tasks: what the engine seeds for a segmentation model or a box regressor, and
what the stage records as their decisions. One entry per task in ``OUTPUT_TASKS``.

The engine seeds one of its own tasks (``governance.backtrace``, spec section 2) at the output
of a thin wrapper around the model, so the stage needs no seeding code of its own:

- ``segmentation``: the wrapper keeps, at each pixel of the predicted mask, the predicted class's
  score and zeroes everything else (the mask is the arg-max map without ``image.background_class``,
  default 0; a one-channel output is thresholded: 0.5 for probabilities, 0 for logits). The mask
  is an integer tensor, so the engine's multiplication rule hands the whole seed to the scores.
  The engine seeds it as ``regression``: ``multiplier * score`` on each mask pixel (default and
  signed modes conserve it); contrastive splits it into positive and negative scores.
- ``box-regression``: the wrapper returns the four box outputs (the first output when the model
  also returns class scores) and the engine seeds them as ``bbox-regression``:
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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Decisions:
    """One batch's decisions: predicted class (n,) or None, score (n,), direction (n,), and the
    per-sample prediction columns written beside the relevance (name -> (n,) array)."""

    predictions: np.ndarray | None
    scores: np.ndarray
    direction: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)


def _first(out: Any) -> Any:
    """The explained output: ``.logits`` of an output object, the first element of a tuple."""
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
        return _PredictedMask(model, self.background, 0.0 if threshold is None else threshold)

    def classes(self, out: np.ndarray, threshold: float | None) -> np.ndarray:
        """(n, H, W) predicted class per pixel (0/1 for one channel)."""
        if out.shape[1] == 1:
            return (out[:, 0] > (0.0 if threshold is None else threshold)).astype(np.int64)
        return out.argmax(1).astype(np.int64)

    def decide(self, raw: Any, n: int, threshold: float | None) -> Decisions:
        out = _numpy(_first(raw))[:n]
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
        return _BoxOutput(model)

    def decide(self, raw: Any, n: int, threshold: float | None) -> Decisions:
        box = _numpy(_first(raw))[:n].reshape(n, -1)
        if box.shape[1] != 4:
            from governance.stage.batch import StageError

            raise StageError(f"box-regression needs (N, 4) box outputs, got {box.shape}")
        columns = {f"box_{i}": box[:, i].astype(np.float32) for i in range(4)}
        if isinstance(raw, (tuple, list)) and len(raw) > 1 and hasattr(raw[1], "shape") and raw[1].dim() == 2:
            columns["box_class"] = _numpy(raw[1])[:n].argmax(1).astype(np.int64)
        return Decisions(None, box.sum(1).astype(np.float64), np.ones(n), columns)


class _PredictedMask(nn.Module):
    """The predicted class's score at each pixel of the predicted mask, 0 elsewhere."""

    def __init__(self, model: Any, background: int | None, threshold: float) -> None:
        super().__init__()
        self.model, self.background, self.threshold = model, background, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _first(self.model(x))
        if y.shape[1] == 1:
            return y * (y > self.threshold)
        cls = y.argmax(1)
        keep = nn.functional.one_hot(cls, y.shape[1]).permute(0, 3, 1, 2)
        if self.background is not None:
            keep = keep * (cls != self.background).unsqueeze(1)
        return y * keep


class _BoxOutput(nn.Module):
    """The box outputs alone (the first output of a model that also returns class scores)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _first(self.model(x))


class _Summed(nn.Module):
    """One output per sample: the sum of what an output task's wrapper returns (what the engine's
    seed conserves), for the quality metrics."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.wrapped(x)
        return y.reshape(y.shape[0], -1).sum(1, keepdim=True)


def summed_output(model: Any, task: str, background: int | None, threshold: float | None = None) -> nn.Module:
    """The model reduced to the one number per sample that ``task`` explains (the quality metrics
    measure how its relevance predicts changes of that number)."""
    ot = OUTPUT_TASKS[task](background) if task == "segmentation" else OUTPUT_TASKS[task]()
    return _Summed(ot.wrap(model, threshold))


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
