"""Faithfulness: does removing what the explanation calls important change the model's output?

- Feature / pixel / token flipping (Samek et al. 2017; the seed's MoRF/LeRF token perturbation):
  units are replaced by the baseline in Most-Relevant-First and Least-Relevant-First order; the
  model's confidence in the target after each step gives two curves over the fraction of units
  removed. ``morf_auc`` (lower is better), ``lerf_auc`` (higher is better) and
  ``delta_auc = lerf_auc - morf_auc`` (higher is better; ~0 for a random ranking).
- Faithfulness correlation (Bhatt et al. 2020): over random subsets S of units set to the baseline,
  the Pearson correlation between ``sum_{i in S} a_i`` and ``f(x) - f(x_S<-baseline)`` (higher is
  better; exactly 1 for the exact attribution of a linear model).
"""

from __future__ import annotations

import torch
from torch import nn

from governance.quality.features import FeatureSpace, forward, perturbed_scores, select

Tensor = torch.Tensor


def trapezoid_auc(curve: Tensor, fractions: Tensor) -> Tensor:
    """Area under ``curve`` (N, S) over ``fractions`` (S,) in [0, 1] by the trapezoid rule:
    ``sum_s (x_{s+1} - x_s) * (y_s + y_{s+1}) / 2``."""
    dx = fractions[1:] - fractions[:-1]
    return ((curve[:, 1:] + curve[:, :-1]) * 0.5 * dx).sum(dim=1)


def _ranks(key: Tensor, descending: bool) -> Tensor:
    """Rank of each unit (0 = first) when sorting ``key`` (N, F); ties keep index order."""
    order = torch.sort(key, dim=1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return ranks


def flipping_curves(model: nn.Module, x: Tensor, attr: Tensor, space: FeatureSpace, target: Tensor, *,
                    n_steps: int | None = None, transform: str = "raw", polarity: Tensor | None = None,
                    batch_size: int = 512) -> dict[str, Tensor]:
    """MoRF and LeRF perturbation curves.

    Units are ranked by their summed attribution (``space.aggregate``); protected units are never
    removed. At step s = 0..S the first ``round(s / S * n_valid)`` units of the order are set to
    the baseline and the score ``select(model(x'), target, transform)`` is recorded; where
    ``polarity`` is -1 (a binary model's class-0 decisions) the score is ``1 - p``, the
    confidence in the decision.
    Returns ``{"fractions": (S+1,), "morf": (N, S+1), "lerf": (N, S+1)}``.
    """
    a = space.aggregate(attr).to(torch.float32)
    valid = space.valid(x)
    n, f = a.shape
    n_valid = valid.sum(1)
    steps = int(n_steps) if n_steps is not None else int(min(int(n_valid.max()), 32))
    steps = max(steps, 1)
    fractions = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
    k = torch.round(fractions.view(-1, 1) * n_valid.view(1, -1).to(fractions.dtype)).long()  # (S+1, N)
    curves = {}
    for name, desc in (("morf", True), ("lerf", False)):
        fill = float("-inf") if desc else float("inf")
        ranks = _ranks(torch.where(valid, a, torch.full_like(a, fill)), desc)  # (N, F)
        masks = ranks.unsqueeze(0) < k.unsqueeze(-1)  # (S+1, N, F)
        sc = perturbed_scores(model, x, masks, space, target, transform, batch_size)  # (S+1, N)
        if polarity is not None:
            sc = torch.where(polarity.view(1, -1) < 0, 1.0 - sc, sc)
        curves[name] = sc.T
    curves["fractions"] = fractions
    return curves


def flipping_scores(curves: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample ``morf_auc``, ``lerf_auc`` and ``delta_auc = lerf_auc - morf_auc`` (N,)."""
    morf = trapezoid_auc(curves["morf"], curves["fractions"])
    lerf = trapezoid_auc(curves["lerf"], curves["fractions"])
    return {"morf_auc": morf, "lerf_auc": lerf, "delta_auc": lerf - morf}


def pearson(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Pearson correlation along ``dim``; NaN where either side is constant."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    num = (a * b).sum(dim)
    den = torch.sqrt((a * a).sum(dim) * (b * b).sum(dim))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def faithfulness_correlation(model: nn.Module, x: Tensor, attr: Tensor, space: FeatureSpace, target: Tensor, *,
                             n_runs: int = 64, subset_fraction: float = 0.2, subset_size: int | None = None,
                             transform: str = "raw", polarity: Tensor | None = None, seed: int = 0,
                             batch_size: int = 512) -> Tensor:
    """Faithfulness correlation per sample (N,), NaN where undefined (constant attribution sums or
    a model that ignores every subset).

    For run r a subset S_r of ``subset_size`` valid units (default ``round(subset_fraction *
    n_valid)``, at least 1) is drawn uniformly without replacement from a generator seeded with
    ``seed``; ``corr_r( sum_{i in S_r} a_i , f(x) - f(x with S_r at the baseline) )``. The drop is
    multiplied by ``polarity`` (N,) when given (-1: the decision explained is the other class).
    """
    a = space.aggregate(attr).to(torch.float32)
    valid = space.valid(x)
    n, f = a.shape
    n_valid = valid.sum(1)
    if subset_size is None:
        k = torch.clamp(torch.round(subset_fraction * n_valid.float()).long(), min=1)
    else:
        k = torch.clamp(torch.full_like(n_valid, int(subset_size)), max=n_valid)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n_runs, n, f), generator=g).to(x.device)
    u = torch.where(valid.unsqueeze(0), u, torch.full_like(u, 2.0))
    ranks = torch.argsort(torch.argsort(u, dim=2), dim=2)
    masks = ranks < k.view(1, -1, 1)  # (R, N, F)
    f0 = select(forward(model, x, batch_size), target, transform)
    fp = perturbed_scores(model, x, masks, space, target, transform, batch_size)  # (R, N)
    drop = (f0.unsqueeze(0) - fp).T  # (N, R)
    if polarity is not None:
        drop = drop * polarity.view(-1, 1).to(drop)
    summed = (a.unsqueeze(0) * masks).sum(-1).T  # (N, R)
    return pearson(summed.double(), drop.double()).float()
