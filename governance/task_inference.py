"""Which task a model solves, decided from what is known, in a fixed order (never guessed silently):

1. the configuration or the command line (``task:`` / ``--task``);
2. the model's metadata (a ``governance.task`` tag or MLmodel metadata key, the ``model_type``
   given to ``mlflow.models.evaluate``), read by :mod:`governance.tracking`;
3. the model's output: ``(N, K>=2)`` is multiclass; ``(N, 1)`` or ``(N,)`` within [0, 1] is binary;
   ``(N, K, H, W)`` at the input image's ``H x W`` is segmentation; anything else is regression,
   with a note to say so once on stderr (an unbounded single output is never thresholded at 0 into
   classes). Box regression is never inferred: ``(N, 4)`` reads as four class scores, and an image
   model's four outputs say so in a note.

Pure functions without torch or MLflow, so the decision is tested on its own.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

from governance.errors import InputError
from governance.tasks import STAGE_TASKS

# what metadata may say, as recorded by people and by MLflow, mapped to a task (None: a classifier,
# binary or multiclass by the output's width)
ALIASES: dict[str, str | None] = {
    **{t: t for t in STAGE_TASKS},
    "binary": "binary-classification",
    "binary_classification": "binary-classification",
    "multiclass": "multiclass-classification",
    "multiclass_classification": "multiclass-classification",
    "classification": None,
    "classifier": None,
    "regression": "regression",
    "regressor": "regression",
}
CLASSIFIERS = ("binary-classification", "multiclass-classification")


class TaskError(InputError):
    """The task that was named cannot fit the model's output; the message says how to fix it."""


class TaskDecision(NamedTuple):
    """The task, where it came from (the ``governance.task_source`` tag), and a note for stderr."""

    task: str
    source: str
    note: str | None = None


def _width(shape: Sequence[int] | None) -> int | None:
    """Outputs per sample: K for (N, K), 1 for (N,); None when unknown or not a score vector."""
    if shape is None:
        return None
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return 1
    if len(dims) == 2 and dims[1] > 0:
        return dims[1]
    return None


def _shape_text(shape: Sequence[int] | None) -> str:
    dims = ["N"] + [str(int(d)) for d in tuple(shape or ())[1:]]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _in_unit_interval(output_range: tuple[float, float] | None) -> bool:
    if output_range is None:
        return False
    lo, hi = (float(v) for v in output_range)
    return math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo and hi <= 1.0


def _from_output(shape: Sequence[int] | None, output_range: tuple[float, float] | None,
                 classifier: bool, input_shape: Sequence[int] | None = None) -> TaskDecision:
    """The output rule; ``classifier``: the metadata says classifier without saying which;
    ``input_shape``: the model input's shape (an image's (N, C, H, W) decides segmentation)."""
    if shape is None:
        raise TaskError("the task cannot be inferred without the model's output; set --task (config task:)")
    dims = tuple(int(d) for d in shape)
    image = input_shape is not None and len(tuple(input_shape)) == 4
    if len(dims) == 4 and image and dims[2:] == tuple(int(d) for d in tuple(input_shape)[2:]):
        return TaskDecision("segmentation", f"inferred from output (per-pixel scores {_shape_text(shape)} "
                                            "at the input's height and width)")
    width = _width(shape)
    if width is not None and width >= 2:
        decision = TaskDecision("multiclass-classification", f"inferred from output ({width} outputs per sample)")
        if width == 4 and image:
            decision = decision._replace(note=(
                "the image model gives 4 outputs per sample: explained as 4 class scores; if they are box "
                "coordinates set --task box-regression (config task:)"))
        return decision
    if width == 1 and _in_unit_interval(output_range):
        return TaskDecision("binary-classification", "inferred from output (one output per sample in [0, 1])")
    if width == 1:
        lo, hi = output_range if output_range is not None else (float("nan"), float("nan"))
        said = "is recorded as a classifier but gives" if classifier else "gives"
        note = (f"the model {said} one output per sample outside [0, 1] (range [{lo:.4g}, {hi:.4g}]), so it "
                "is explained as regression of that score, not thresholded into classes; if it is a "
                "classifier's logit, log the model with its sigmoid to explain probabilities, or set "
                "--task regression (config task:) to say so")
        return TaskDecision("regression", "inferred from output (one output per sample, not in [0, 1])", note)
    also = (" (a per-pixel map at another resolution than the input: set --task segmentation)"
            if len(dims) == 4 and image else "")
    note = (f"the model's output {_shape_text(shape)} is not one score per class, so it is explained as "
            f"regression of its sum; set --task (config task:) if it is something else{also}")
    return TaskDecision("regression", f"inferred from output (shape {_shape_text(shape)})", note)


def output_facts(output: Any) -> tuple[tuple[int, ...], tuple[float, float]]:
    """The shape and (min, max) of a model's output on a sample (a tensor or an array): the
    ``output_shape`` and ``output_range`` :func:`infer_task` takes."""
    import numpy as np

    values = output.detach().cpu().float().numpy() if hasattr(output, "detach") else np.asarray(output, dtype=float)
    if values.size == 0:
        return tuple(values.shape), (float("nan"), float("nan"))
    return tuple(int(d) for d in values.shape), (float(np.nanmin(values)), float(np.nanmax(values)))


def check_task_output(task: str, output_shape: Sequence[int] | None, where: str) -> None:
    """Raise :class:`TaskError` when a named task cannot fit the output's shape."""
    if task == "segmentation" and output_shape is not None and len(tuple(output_shape)) != 4:
        raise TaskError(
            f"task segmentation ({where}) expects per-pixel class scores (N, K, H, W), but the model gives "
            f"{_shape_text(output_shape)}; set the task the model solves (--task, config task:)")
    if task == "box-regression" and output_shape is not None and (
            len(tuple(output_shape)) != 2 or int(tuple(output_shape)[1]) != 4):
        raise TaskError(
            f"task box-regression ({where}) expects box coordinates (N, 4) (x0, y0, x1, y1; class scores may "
            f"follow as a second output), but the model gives {_shape_text(output_shape)}; set the task the "
            "model solves (--task, config task:)")
    width = _width(output_shape)
    if width is None:
        return
    if task == "binary-classification" and width != 1:
        raise TaskError(
            f"task binary-classification ({where}) expects one output per sample, but the model gives "
            f"{width} {_shape_text(output_shape)}; set --task multiclass-classification, or leave the "
            "task out to infer it")
    if task == "multiclass-classification" and width < 2:
        raise TaskError(
            f"task multiclass-classification ({where}) expects one output per class, but the model gives "
            f"one {_shape_text(output_shape)}; set --task binary-classification or regression, or leave "
            "the task out to infer it")


def infer_task(configured: str | None, hint: tuple[str, str] | None, output_shape: Sequence[int] | None,
               output_range: tuple[float, float] | None,
               input_shape: Sequence[int] | None = None) -> TaskDecision:
    """Decide the task: ``configured`` (config/CLI) > ``hint`` ((value, where) from the model's
    metadata) > the output (``output_shape`` of a forward pass, ``output_range`` its (min, max)).

    Returns ``TaskDecision(task, source, note)``; ``source`` is ``config``, ``model metadata
    (<where>)`` or ``inferred from output (<why>)``; ``note`` (or None) is to be said once on stderr.
    Raises :class:`TaskError` when a named task cannot fit the output, or a name is unknown.
    """
    if configured is not None:
        if configured not in STAGE_TASKS:
            raise TaskError(f"task: '{configured}' is not one of {', '.join(STAGE_TASKS)}")
        check_task_output(configured, output_shape, "config")
        return TaskDecision(configured, "config")
    if hint is not None:
        value, where = hint
        key = str(value).strip().lower()
        if key not in ALIASES:
            decision = _from_output(output_shape, output_range, False, input_shape)
            note = (f"the model's metadata names an unknown task '{value}' ({where}); ignored. "
                    + (decision.note or ""))
            return decision._replace(note=note.strip())
        task = ALIASES[key]
        if task is not None:
            check_task_output(task, output_shape, f"model metadata: {where}")
            return TaskDecision(task, f"model metadata ({where})")
        decision = _from_output(output_shape, output_range, True, input_shape)
        return decision._replace(source=f"model metadata ({where}: a classifier), {decision.source}")
    return _from_output(output_shape, output_range, False, input_shape)
