"""Seeding the output: where the backward walk starts (spec section 2)."""

from __future__ import annotations

import torch

from governance.tasks import TASKS


def _target_index(y: torch.Tensor, target, task: str) -> torch.Tensor:
    """Target per sample: given (int or (N,)) or the argmax of the output (last position for
    generation)."""
    n = y.shape[0]
    scores = y[:, -1, :] if task == "generation" else y.reshape(n, -1)
    if target is None:
        return scores.argmax(-1)
    t = torch.as_tensor(target, device=y.device).long()
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target must be an int or a tensor of shape ({n},), got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t >= scores.shape[-1])).any()):
        raise ValueError(f"target out of range: the output has {scores.shape[-1]} classes")
    return t


def _at(y: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """0/1 mask of the explained output per sample."""
    mask = torch.zeros_like(y, dtype=torch.bool)
    n = y.shape[0]
    rows = torch.arange(n, device=y.device)
    if task == "generation":
        mask[rows, -1, target] = True
    else:
        mask.reshape(n, -1)[rows, target] = True
    return mask


def make_seed(
    y: torch.Tensor,
    task: str,
    mode: str,
    target=None,
    multiplier: float = 100.0,
    seed: str = "output",
    threshold: float = 0.5,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The seeded relevance at the output: [R] or [R+, R-] in contrastive mode, and the target."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if seed not in ("output", "unit"):
        raise ValueError(f"seed must be 'output' or 'unit', got {seed!r}")
    if not y.is_floating_point():
        raise ValueError("the model output is not a float tensor; nothing to explain")
    y = y.detach()
    m = float(multiplier)
    val = torch.ones_like(y) if seed == "unit" else y
    zero = torch.zeros_like(y)
    contrastive = mode == "contrastive"
    tgt = None
    if task in ("multiclass-classification", "generation"):
        if task == "generation" and y.dim() != 3:
            raise ValueError("generation expects token logits shaped (batch, tokens, vocabulary)")
        tgt = _target_index(y, target, task)
        at = _at(y, tgt, task)
        rp = torch.where(at, m * val, zero)
        if not contrastive:
            return [rp], tgt
        if task == "generation":
            others = torch.zeros_like(at)
            others[:, -1, :] = True
            others &= ~at
        else:
            others = ~at
        return [rp, torch.where(others, m * val, zero)], tgt
    if task == "binary-classification":
        if y.reshape(y.shape[0], -1).shape[1] != 1:
            raise ValueError(
                f"binary-classification expects one output per sample, got shape {tuple(y.shape)}; "
                "use multiclass-classification for several class outputs"
            )
        rp = m * val
        return ([rp, m * (1 - val)] if contrastive else [rp]), None
    if task == "regression":
        if not contrastive:
            return [m * val], None
        if seed == "unit":
            return [m * (y > 0).to(y.dtype), m * (y < 0).to(y.dtype)], None
        return [m * y.clamp(min=0), m * (-y).clamp(min=0)], None
    if task == "bbox-regression":
        return ([m * val, m * (1 - val)] if contrastive else [m * val]), None
    # binary-segmentation: pixels predicted positive
    on = y > threshold
    rp = torch.where(on, m * val, zero)
    return ([rp, torch.where(on, m * (1 - val), zero)] if contrastive else [rp]), None
