"""Complexity: how concentrated an explanation is over its feature units.

With ``p_i = |a_i| / sum_j |a_j|`` over the n valid units of a sample:

- ``entropy`` (Bhatt et al. 2020): ``H = -sum_i p_i log p_i`` (0 log 0 = 0). Lower is better
  (more focused): 0 for a one-hot attribution, ``log n`` for a uniform one.
- ``gini`` sparseness (Chalasani et al. 2020): with ``|a|`` sorted ascending,
  ``G = sum_k (2k - n - 1) |a|_(k) / (n sum_k |a|_(k))``, k = 1..n. Higher is better (sparser):
  0 for uniform, ``(n - 1) / n`` for one-hot.

An all-zero attribution has no distribution: both are NaN for that sample.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _mass(a: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    m = a.abs().to(torch.float64)
    if valid is None:
        valid = torch.ones_like(m, dtype=torch.bool)
    m = torch.where(valid, m, torch.zeros_like(m))
    return m, m.sum(1), valid.sum(1)


def entropy(a: Tensor, valid: Tensor | None = None) -> Tensor:
    """Shannon entropy of the normalised |attribution| per sample: (N, F) -> (N,)."""
    m, total, _ = _mass(a, valid)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p = m / safe.unsqueeze(1)
    h = -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))).sum(1)
    return torch.where(total > 0, h, torch.full_like(h, float("nan"))).float()


def gini(a: Tensor, valid: Tensor | None = None) -> Tensor:
    """Gini index of |attribution| per sample over its n valid units: (N, F) -> (N,).

    Invalid units are zeroed and sorted first; zeros add nothing to the sum, so a valid unit's
    rank among the valid ones is its position minus the number of invalid units.
    """
    m, total, n = _mass(a, valid)
    f = m.shape[1]
    srt = torch.sort(m, dim=1).values
    pos = torch.arange(1, f + 1, device=m.device, dtype=m.dtype).unsqueeze(0)
    k = pos - (f - n).unsqueeze(1).to(m.dtype)
    nn_ = n.unsqueeze(1).to(m.dtype)
    num = ((2 * k - nn_ - 1) * srt).sum(1)
    safe = torch.where(total > 0, total * n.to(m.dtype), torch.ones_like(total))
    return torch.where(total > 0, num / safe, torch.full_like(total, float("nan"))).float()
