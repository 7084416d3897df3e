"""What one "feature" is for each input modality, and how the model's explained output is read.

Every quality metric works on *feature units*:

- tabular ``(N, F)``: one unit per column;
- image ``(N, C, H, W)``: one unit per ``patch_size x patch_size`` square over all channels
  (region perturbation; ``patch_size=1`` is pixel flipping);
- token ``(N, T)`` integer ids: one unit per position; special tokens and padding are
  *protected* (never perturbed, never ranked);
- anything else (e.g. ``(N, C, L)``): one unit per element.

``FeatureSpace.aggregate`` sums an attribution over the elements of each unit (N, F);
``FeatureSpace.perturb`` replaces a set of units by the baseline. Everything is batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from governance.modality.base import QUALITY_KINDS, detect_modality

Tensor = torch.Tensor

# The unit kinds and their detection live in the modality layer, shared with the stage and the report.
MODALITIES = QUALITY_KINDS


def resolve_baseline(spec: str | float | Tensor, X: Tensor, modality: str) -> Tensor:
    """The value a perturbed unit takes, broadcastable to one sample.

    ``"mean"``: the per-feature mean over ``X`` (tabular/generic) or the per-channel mean
    (image); ``"zero"``: 0; a number: that constant; a tensor: used as given.
    """
    if isinstance(spec, Tensor):
        return spec.to(X.device, X.dtype)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full((1,) * (X.dim() - 1), float(spec), dtype=X.dtype, device=X.device)
    if spec == "zero":
        return torch.zeros((1,) * (X.dim() - 1), dtype=X.dtype, device=X.device)
    if spec == "mean":
        if modality == "image":
            return X.mean(dim=(0, 2, 3)).view(-1, 1, 1)
        return X.mean(dim=0)
    raise ValueError(f"unknown baseline {spec!r}: use 'mean', 'zero', a number or a tensor")


@dataclass
class FeatureSpace:
    """Feature units of one modality (see the module docstring).

    ``baseline`` is a float tensor broadcastable to one sample (continuous inputs) or the
    replacement token id (token inputs). ``protected_ids`` are token ids never perturbed.
    """

    modality: str
    sample_shape: tuple[int, ...]
    baseline: Tensor | int
    patch_size: int = 1
    protected_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}")
        if self.patch_size < 1:
            raise ValueError("patch_size must be >= 1")
        if self.modality == "token" and not isinstance(self.baseline, int):
            raise ValueError("token inputs need an integer baseline token id ([UNK] or [MASK])")

    # -- geometry ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Number of patches along H and W (image only)."""
        _, h, w = self.sample_shape
        p = self.patch_size
        return (h + p - 1) // p, (w + p - 1) // p

    @property
    def n_features(self) -> int:
        if self.modality == "image":
            gh, gw = self.grid
            return gh * gw
        n = 1
        for s in self.sample_shape:
            n *= s
        return n

    def valid(self, x: Tensor) -> Tensor:
        """(N, F) bool: the units that may be perturbed and ranked."""
        n = x.shape[0]
        if self.modality == "token":
            if not self.protected_ids:
                return torch.ones_like(x, dtype=torch.bool)
            prot = torch.tensor(self.protected_ids, device=x.device, dtype=x.dtype)
            return ~torch.isin(x, prot)
        return torch.ones(n, self.n_features, dtype=torch.bool, device=x.device)

    # -- attribution -> units -----------------------------------------------------------------
    def aggregate(self, attr: Tensor) -> Tensor:
        """Sum the attribution over each unit's elements: (N, ...) -> (N, F)."""
        n = attr.shape[0]
        if self.modality == "image":
            a = attr.sum(dim=1)  # over channels
            p = self.patch_size
            if p == 1:
                return a.reshape(n, -1)
            gh, gw = self.grid
            h, w = a.shape[1:]
            a = torch.nn.functional.pad(a, (0, gw * p - w, 0, gh * p - h))
            return a.reshape(n, gh, p, gw, p).sum(dim=(2, 4)).reshape(n, -1)
        return attr.reshape(n, -1)

    def expand(self, mask: Tensor) -> Tensor:
        """(N, F) bool unit mask -> bool mask shaped like the input."""
        n = mask.shape[0]
        if self.modality == "image":
            c, h, w = self.sample_shape
            gh, gw = self.grid
            p = self.patch_size
            m = mask.reshape(n, gh, gw)
            if p > 1:
                m = m.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, :h, :w]
            return m.unsqueeze(1).expand(n, c, h, w)
        return mask.reshape((n,) + tuple(self.sample_shape))

    def perturb(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace the units selected by ``mask`` (N, F) with the baseline."""
        m = self.expand(mask)
        if self.modality == "token":
            return torch.where(m, torch.full_like(x, int(self.baseline)), x)
        base = self.baseline.to(x.dtype)
        return torch.where(m, base.expand_as(x[0]).unsqueeze(0).expand_as(x), x)


def make_space(
    x: Tensor,
    X_ref: Tensor | None = None,
    *,
    baseline: str | float | Tensor | int | None = None,
    patch_size: int = 1,
    protected_ids: Sequence[int] = (),
) -> FeatureSpace:
    """Build the ``FeatureSpace`` of ``x``; the baseline statistics come from ``X_ref`` (or x)."""
    modality = detect_modality(x)
    if modality == "token":
        if baseline is None or not isinstance(baseline, int):
            raise ValueError("token inputs need baseline=<token id> (the [UNK] or [MASK] id)")
        return FeatureSpace("token", tuple(x.shape[1:]), int(baseline), 1, tuple(int(i) for i in protected_ids))
    ref = x if X_ref is None else X_ref
    base = resolve_baseline("mean" if baseline is None else baseline, ref, modality)
    return FeatureSpace(modality, tuple(x.shape[1:]), base, patch_size if modality == "image" else 1)


# -- reading the model's output ---------------------------------------------------------------

def raw_output(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` flattened to (N, K); ``.logits`` or the first element of a tuple is taken."""
    out = model(x)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(out.shape[0], -1)


def forward(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """The model's raw output for ``x`` in chunks, (N, K), without gradients."""
    with torch.no_grad():
        return torch.cat([raw_output(model, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)], 0)


def resolve_target(out: Tensor, task: str, target: Tensor | int | Sequence[int] | None) -> Tensor:
    """(N,) long index of the explained output: the given target, else the argmax for
    classification with several outputs, else 0 (single output: binary probability/logit or
    regression value)."""
    n = out.shape[0]
    if target is not None:
        t = torch.as_tensor(target, dtype=torch.long, device=out.device)
        return t.expand(n).clone() if t.dim() == 0 else t.reshape(n)
    if out.shape[1] > 1 and "classification" in task:
        return out.argmax(dim=1)
    if out.shape[1] > 1:
        raise ValueError(f"task {task!r} with {out.shape[1]} outputs needs an explicit target")
    return torch.zeros(n, dtype=torch.long, device=out.device)


def confidence_transform(out: Tensor) -> str:
    """How to turn raw outputs (N, K) into the model's confidence, decided once on unperturbed
    outputs: ``"raw"`` when they already are probabilities (in [0, 1], rows summing to 1 when
    K > 1), else ``"softmax"`` (K > 1) or ``"sigmoid"`` (one output)."""
    in_unit = bool((out >= 0).all() and (out <= 1).all())
    if out.shape[1] > 1:
        sums = out.sum(1)
        if in_unit and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            return "raw"
        return "softmax"
    return "raw" if in_unit else "sigmoid"


def select(out: Tensor, target: Tensor, transform: str = "raw") -> Tensor:
    """The explained score (N,) from raw outputs (N, K): ``out[n, target[n]]`` after
    ``transform`` (``raw``, ``softmax`` over K, or ``sigmoid``)."""
    if transform == "softmax":
        out = out.softmax(dim=1)
    elif transform == "sigmoid":
        out = out.sigmoid()
    elif transform != "raw":
        raise ValueError(f"transform must be 'raw', 'softmax' or 'sigmoid', got {transform!r}")
    return out.gather(1, target.view(-1, 1)).squeeze(1)


def perturbed_scores(model: nn.Module, x: Tensor, masks: Tensor, space: FeatureSpace, target: Tensor,
                     transform: str = "raw", batch_size: int = 512, budget: int = 1 << 24) -> Tensor:
    """Scores (K, N) of x with the units of ``masks[k]`` (K, N, F) at the baseline.

    Perturbed copies are stacked and scored in large batches; at most ``budget`` input elements
    are materialised at a time.
    """
    k_total, n, f = masks.shape
    per = max(1, x[0].numel() * n)
    group = max(1, budget // per)
    rows = []
    for k0 in range(0, k_total, group):
        m = masks[k0 : k0 + group]
        g = m.shape[0]
        xs = space.perturb(x.repeat((g,) + (1,) * (x.dim() - 1)), m.reshape(-1, f))
        rows.append(select(forward(model, xs, batch_size), target.repeat(g), transform).reshape(g, n))
    return torch.cat(rows, 0)


def score(model: nn.Module, x: Tensor, target: Tensor, transform: str = "raw", batch_size: int = 256) -> Tensor:
    """``select(forward(model, x), target, transform)``: the explained score (N,)."""
    return select(forward(model, x, batch_size), target, transform)
