"""Robustness and conservation of an explanation.

- ``max_sensitivity`` (Yeh et al. 2019): ``max_{x' in B(x)} ||e(x') - e(x)|| / ||e(x)||`` over
  ``n_perturb`` seeded draws, with the target held fixed. Lower is better. Continuous inputs:
  ``x' = x + u``, ``u ~ U(-r, r)`` elementwise with ``r = radius * std(X)`` (the sample's overall
  standard deviation, so ``radius`` is scale-free). Token ids: ``x'`` has one random unprotected
  position replaced by the baseline token (the Hamming-1 neighbourhood, the discrete analogue).
  NaN where ``e(x) = 0``.
- ``completeness_gap``: ``|sum_i a_i - T| / |T|`` where T is what the method claims to
  distribute (integrated gradients: ``f(x) - f(x')``; gradient x input: ``f(x) - f(0)``;
  DLBacktrace: the seeded relevance). Lower is better; 0 means conservation holds.
"""

from __future__ import annotations

from typing import Callable

import torch

from governance.quality.features import FeatureSpace

Tensor = torch.Tensor


def neighbours(x: Tensor, space: FeatureSpace, *, n_perturb: int, radius: float, scale: float,
               generator: torch.Generator) -> Tensor:
    """``n_perturb`` perturbed copies of x stacked perturbation-major: (n_perturb * N, ...)."""
    reps = x.unsqueeze(0).expand((n_perturb,) + tuple(x.shape)).reshape((-1,) + tuple(x.shape[1:]))
    if space.modality == "token":
        valid = space.valid(reps)
        u = torch.rand(tuple(valid.shape), generator=generator).to(x.device)
        u = torch.where(valid, u, torch.full_like(u, -1.0))
        pick = torch.zeros_like(valid)
        pick.scatter_(1, u.argmax(1, keepdim=True), True)
        pick &= valid  # rows without a valid position stay unchanged
        return space.perturb(reps, pick)
    r = radius * scale
    noise = (torch.rand(tuple(reps.shape), generator=generator, dtype=reps.dtype).to(x.device) * 2 - 1) * r
    return reps + noise


def max_sensitivity(explain: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor, space: FeatureSpace, *,
                    attr: Tensor | None = None, n_perturb: int = 8, radius: float = 0.05, scale: float | None = None,
                    seed: int = 0) -> Tensor:
    """Max-sensitivity per sample (N,); ``explain(x, target) -> attribution`` is called once on
    all perturbed copies stacked (batched). ``scale`` defaults to ``x.std()``."""
    g = torch.Generator().manual_seed(seed)
    if attr is None:
        attr = explain(x, target)
    if scale is None:
        scale = float(x.float().std()) if torch.is_floating_point(x) else 1.0
    xs = neighbours(x, space, n_perturb=n_perturb, radius=radius, scale=scale, generator=g)
    ep = explain(xs, target.repeat(n_perturb))
    n = x.shape[0]
    e0 = attr.reshape(n, -1).double()
    ep = ep.reshape(n_perturb, n, -1).double()
    diff = torch.linalg.vector_norm(ep - e0.unsqueeze(0), dim=2).amax(0)
    base = torch.linalg.vector_norm(e0, dim=1)
    return torch.where(base > 0, diff / torch.where(base > 0, base, torch.ones_like(base)),
                       torch.full_like(base, float("nan"))).float()


def completeness_gap(attr: Tensor, total: Tensor) -> Tensor:
    """``|sum_i a_i - T| / |T|`` per sample (N,); NaN where T = 0."""
    s = attr.reshape(attr.shape[0], -1).double().sum(1)
    t = total.double().reshape(-1)
    return torch.where(t != 0, (s - t).abs() / torch.where(t != 0, t.abs(), torch.ones_like(t)),
                       torch.full_like(t, float("nan"))).float()
