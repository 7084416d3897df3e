"""Model-parameter randomisation (sanity checks, Adebayo et al. 2018; Hedström et al. 2023).

Cascading MPRT: the layers that own parameters are randomised one after another from the output
to the input (top-down); after each step the explanation of the partly randomised model is
compared with the original by the Spearman rank correlation of |attribution| over the feature
units. A method whose explanation depends on the learned parameters loses similarity quickly:
``mprt_spearman`` (after every layer is randomised) and ``mprt_spearman_mean`` (over the cascade)
are *lower is better*.

Efficient MPRT (eMPRT): the ratio ``H(e_random) / H(e_original)`` of the explanation entropy
(``complexity.entropy``) after full randomisation to before. A faithful explanation of a random
model is diffuse, so the ratio should rise: *higher is better*.

Randomising a parameter tensor replaces it with Gaussian noise of the tensor's own mean and
standard deviation (a scale-preserving re-initialisation), drawn from a generator seeded with
``seed + step``. The model passed in is never modified: each step works on a deep copy.
An explanation that becomes constant (e.g. all zero once the ReLUs of a random layer die) keeps
none of the original ranking and counts as similarity 0 (Spearman itself is undefined there).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from governance.quality.complexity import entropy
from governance.quality.features import FeatureSpace

Tensor = torch.Tensor


def parameter_layers(model: nn.Module, x_probe: Tensor) -> list[str]:
    """Names of the modules that own parameters directly, in the order a forward pass of
    ``x_probe`` first calls them (modules never called are left out); for an exported graph
    module, in the order its graph first reads their parameters."""
    owners = {name: m for name, m in model.named_modules()
              if any(p.numel() > 0 for p in m.parameters(recurse=False))}
    order: list[str] = []
    handles = []
    for name, m in owners.items():
        handles.append(m.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(x_probe)
    finally:
        for h in handles:
            h.remove()
    if order:
        return order
    # an exported graph (torch.export / MLflow pt2) reads parameters with get_attr instead of
    # calling submodules: order the owners by the first graph node that reads their parameters
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
                if owner in owners and owner not in order:
                    order.append(owner)
    return order or list(owners)


def spread_layers(layers: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``layers`` (in forward order), evenly spaced and always including the
    first and the last, so a bounded MPRT cascade still reaches from the output to the input."""
    layers = list(layers)
    if k >= len(layers):
        return layers
    if k == 1:
        return layers[-1:]
    picks = sorted({round(i * (len(layers) - 1) / (k - 1)) for i in range(k)})
    return [layers[i] for i in picks]


@torch.no_grad()
def randomise_(module: nn.Module, generator: torch.Generator) -> None:
    """Replace each parameter the module owns directly with N(mean, std) noise of its own
    statistics (std falls back to |mean|, then 1, for constant tensors)."""
    for p in module.parameters(recurse=False):
        if p.numel() == 0:
            continue
        mean = float(p.mean())
        std = float(p.std()) if p.numel() > 1 else 0.0
        scale = std if std > 0 else (abs(mean) if mean != 0 else 1.0)
        noise = torch.randn(tuple(p.shape), generator=generator, dtype=torch.float32)
        p.copy_((mean + scale * noise).to(p.dtype))


def average_ranks(v: Tensor, valid: Tensor | None = None) -> Tensor:
    """Ranks (0-based) of each row of ``v`` (N, F), ties sharing their average rank; invalid
    entries are ranked after every valid one (and should be masked by the caller)."""
    n, f = v.shape
    key = v.to(torch.float64)
    if valid is not None:
        key = torch.where(valid, key, torch.full_like(key, float("inf")))
    srt, idx = torch.sort(key, dim=1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    gid = (torch.cumsum(new.long(), dim=1) - 1) + torch.arange(n, device=v.device).unsqueeze(1) * f
    pos = torch.arange(f, device=v.device, dtype=torch.float64).expand(n, f)
    sums = torch.zeros(n * f, dtype=torch.float64, device=v.device).scatter_add_(0, gid.reshape(-1), pos.reshape(-1))
    cnt = torch.zeros(n * f, dtype=torch.float64, device=v.device).scatter_add_(0, gid.reshape(-1), torch.ones(n * f, dtype=torch.float64, device=v.device))
    avg = (sums / cnt.clamp(min=1))[gid]
    return torch.empty_like(avg).scatter_(1, idx, avg)


def spearman(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Spearman rank correlation per row (N,) over the valid entries (average ranks for ties);
    NaN where either row is constant."""
    if valid is None:
        valid = torch.ones_like(a, dtype=torch.bool)
    ra, rb = average_ranks(a, valid), average_ranks(b, valid)
    w = valid.to(torch.float64)
    cnt = w.sum(1, keepdim=True).clamp(min=1)
    ra = (ra - (ra * w).sum(1, keepdim=True) / cnt) * w
    rb = (rb - (rb * w).sum(1, keepdim=True) / cnt) * w
    num = (ra * rb).sum(1)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(den, float("nan"))).float()


def _constant(a: Tensor, valid: Tensor) -> Tensor:
    """(N,) True where a row is constant over its valid entries."""
    hi = torch.where(valid, a, torch.full_like(a, float("-inf"))).amax(1)
    lo = torch.where(valid, a, torch.full_like(a, float("inf"))).amin(1)
    return hi == lo


def mprt(model: nn.Module, x: Tensor, target: Tensor, explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
         space: FeatureSpace, *, attr: Tensor | None = None, layers: Sequence[str] | None = None,
         seed: int = 0, absolute: bool = True) -> dict:
    """Cascading MPRT and eMPRT for one explanation method.

    ``explain(model, x, target)`` must accept any model (a new DLBacktrace engine is built per
    randomised copy). Returns ``{"layers": [names, top-down], "spearman_per_layer": (L, N),
    "entropy_ratio_per_layer": (L, N), "spearman": (N,), "entropy_ratio": (N,)}``; the last two
    are after full randomisation.
    """
    if layers is None:
        layers = parameter_layers(model, x[:1])
    layers = list(layers)[::-1]  # top-down: output layer first
    if attr is None:
        attr = explain(model, x, target)
    valid = space.valid(x)
    a0 = space.aggregate(attr)
    a0 = a0.abs() if absolute else a0
    h0 = entropy(a0, valid)
    current = model
    rhos, ratios = [], []
    for step, name in enumerate(layers):
        current = copy.deepcopy(current)
        randomise_(current.get_submodule(name) if name else current, torch.Generator().manual_seed(seed + step))
        a = space.aggregate(explain(current, x, target))
        a = a.abs() if absolute else a
        rho = spearman(a0, a, valid)
        # a constant explanation (e.g. all zero after ReLUs die) keeps none of the original
        # ranking: similarity 0 rather than undefined, as long as the original was not constant
        const = _constant(a, valid) & ~_constant(a0, valid)
        rhos.append(torch.where(const, torch.zeros_like(rho), rho))
        ratios.append(entropy(a, valid) / h0)
    if not layers:
        raise ValueError("the model has no parameters to randomise")
    sp = torch.stack(rhos)
    er = torch.stack(ratios)
    return {"layers": layers, "spearman_per_layer": sp, "entropy_ratio_per_layer": er,
            "spearman": sp[-1], "entropy_ratio": er[-1]}
