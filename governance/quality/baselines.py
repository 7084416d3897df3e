"""Attribution methods compared on the same samples: DLBacktrace (default, contrastive, signed)
and the baselines gradient x input, integrated gradients and a random attribution.

One verb for every method (Captum's convention): ``explainer.explain(model, x, target)`` returns
an ``Attribution`` whose ``values`` are shaped like ``x`` (``(N, T)`` for token ids) and whose
``total`` is the quantity the method claims to distribute over the inputs (used by the
completeness gap; ``None`` when it claims none). Every method explains the model's *raw* output
at ``target`` (``model(x)[n, target[n]]``), the quantity the engine seeds.

Token inputs (integer ids) are explained through the model's input embedding: gradients are taken
with respect to the embedding output and ``(gradient * embedding)`` is summed over the hidden axis.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from governance.quality.features import raw_output, select

Tensor = torch.Tensor


@dataclass
class Attribution:
    """Attribution of one batch: ``values`` shaped like the input, ``total`` (N,) or None."""

    values: Tensor
    total: Tensor | None = None


class Explainer:
    """Base class: ``name`` and ``explain(model, x, target) -> Attribution``."""

    name: str = "explainer"
    #: False for magnitude maps (one-signed importance, e.g. DLBacktrace's default mode): they
    #: rank features without saying in which direction, so they are never negated.
    signed: bool = True

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return self.explain(model, x, target).values


# -- token models: differentiate through the input embedding -----------------------------------

def find_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding: ``model.get_input_embeddings()`` when it exists, else the first
    ``nn.Embedding`` in the module tree."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            if isinstance(emb, nn.Embedding):
                return emb
        except (NotImplementedError, AttributeError):
            pass
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise ValueError("token inputs need a model with an nn.Embedding input layer")


def _output_with_embedding(model: nn.Module, ids: Tensor, emb: nn.Embedding, values: Tensor) -> Tensor:
    """Run ``model(ids)`` with the embedding's output replaced by ``values``."""
    handle = emb.register_forward_hook(lambda _m, _i, _o: values)
    try:
        return raw_output(model, ids)
    finally:
        handle.remove()


def _gradient(model: nn.Module, x: Tensor, target: Tensor, emb: nn.Embedding | None = None,
              emb_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(d sum_n f_n / d input, f) at the given input (or embedding values for token models)."""
    with torch.enable_grad():
        if emb is None:
            inp = x.detach().clone().requires_grad_(True)
            out = raw_output(model, inp)
        else:
            inp = emb_values.detach().clone().requires_grad_(True)
            out = _output_with_embedding(model, x, emb, inp)
        f = select(out, target, "raw")
        (g,) = torch.autograd.grad(f.sum(), inp)
    return g, f.detach()


class GradientXInput(Explainer):
    """Gradient x input: ``a_i = x_i * df/dx_i`` (Shrikumar et al. 2016). Complete for models
    that are linear through the origin: ``sum_i a_i = f(x) - f(0)``."""

    name = "gradient_x_input"

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = batch_size

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        vals, totals = [], []
        token = not torch.is_floating_point(x)
        emb = find_embedding(model) if token else None
        for i in range(0, x.shape[0], self.batch_size):
            xb, tb = x[i : i + self.batch_size], target[i : i + self.batch_size]
            if token:
                with torch.no_grad():
                    e = emb(xb)
                g, f = _gradient(model, xb, tb, emb, e)
                vals.append((g * e).sum(-1))
                with torch.no_grad():
                    f0 = select(_output_with_embedding(model, xb, emb, torch.zeros_like(e)), tb)
            else:
                g, f = _gradient(model, xb, tb)
                vals.append(g * xb)
                with torch.no_grad():
                    f0 = select(raw_output(model, torch.zeros_like(xb)), tb)
            totals.append(f - f0)
        return Attribution(torch.cat(vals), torch.cat(totals))


class IntegratedGradients(Explainer):
    """Integrated gradients (Sundararajan et al. 2017) with the trapezoid rule:

        a_i = (x_i - x'_i) * sum_k w_k * df/dx_i (x' + alpha_k (x - x')),  alpha_k = k / m,
        w_0 = w_m = 1 / (2m), w_k = 1 / m otherwise,

    so that ``sum_i a_i ~= f(x) - f(x')`` (completeness). The baseline ``x'`` is zero (or the given
    tensor) for continuous inputs; for token ids it is the embedding of ``baseline_token_id`` at
    every position not in ``protected_ids`` (special tokens keep their embedding).
    """

    name = "integrated_gradients"

    def __init__(self, n_steps: int = 32, baseline: Tensor | float = 0.0, baseline_token_id: int | None = None,
                 protected_ids: Sequence[int] = (), batch_size: int = 64) -> None:
        if n_steps < 1:
            raise ValueError("n_steps must be >= 1")
        self.n_steps = n_steps
        self.baseline = baseline
        self.baseline_token_id = baseline_token_id
        self.protected_ids = tuple(protected_ids)
        self.batch_size = batch_size

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        m = self.n_steps
        alphas = torch.linspace(0.0, 1.0, m + 1, device=device, dtype=dtype)
        w = torch.full((m + 1,), 1.0 / m, device=device, dtype=dtype)
        w[0] = w[-1] = 0.5 / m
        return alphas, w

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        token = not torch.is_floating_point(x)
        emb = find_embedding(model) if token else None
        vals, totals = [], []
        for i in range(0, x.shape[0], self.batch_size):
            xb, tb = x[i : i + self.batch_size], target[i : i + self.batch_size]
            b = xb.shape[0]
            with torch.no_grad():
                if token:
                    if self.baseline_token_id is None:
                        raise ValueError("integrated gradients on token ids needs baseline_token_id")
                    keep = torch.isin(xb, torch.tensor(self.protected_ids, dtype=xb.dtype, device=xb.device)) \
                        if self.protected_ids else torch.zeros_like(xb, dtype=torch.bool)
                    base_ids = torch.where(keep, xb, torch.full_like(xb, self.baseline_token_id))
                    inp, ref = emb(xb), emb(base_ids)
                else:
                    inp = xb
                    ref = (self.baseline.to(xb) if isinstance(self.baseline, Tensor)
                           else torch.full_like(xb, float(self.baseline))).expand_as(xb)
            alphas, w = self._weights(inp.device, inp.dtype)
            shape = (-1,) + (1,) * inp.dim()
            path = ref.unsqueeze(0) + alphas.view(shape) * (inp - ref).unsqueeze(0)  # (m+1, b, ...)
            path = path.reshape((-1,) + tuple(inp.shape[1:]))
            t_rep = tb.repeat(self.n_steps + 1)
            if token:
                g, f = _gradient(model, xb.repeat(self.n_steps + 1, 1), t_rep, emb, path)
            else:
                g, f = _gradient(model, path, t_rep)
            g = g.reshape((self.n_steps + 1, b) + tuple(inp.shape[1:]))
            avg = (w.view(shape) * g).sum(0)
            a = (inp - ref) * avg
            vals.append(a.sum(-1) if token else a)
            f = f.reshape(self.n_steps + 1, b)
            totals.append(f[-1] - f[0])
        return Attribution(torch.cat(vals), torch.cat(totals))


class RandomAttribution(Explainer):
    """Independent standard-normal attribution per input element (per token for ids), drawn from
    a generator seeded once: the chance level every metric is compared against.

    The generator is seeded with ``seed + 104729`` (a fixed offset) so that its stream never
    coincides with data drawn as ``torch.randn`` from a generator seeded with the same small
    integer (the "random" attribution would then equal the input).
    """

    name = "random"
    SEED_OFFSET = 104729

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed + self.SEED_OFFSET)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        vals = torch.randn(tuple(x.shape), generator=self.generator, dtype=dtype)
        return Attribution(vals.to(x.device), None)


class BacktraceExplainer(Explainer):
    """DLBacktrace (``governance.backtrace``) in one mode: ``default``, ``contrastive`` (R+ - R-)
    or ``signed``.

    Relevance is proportional to the seeded output (``multiplier * y``), so it is multiplied by
    the sign of the seed (contrastive: of the R+ seed): positive then reads "supports the
    explained output", as it does for the other methods (no change when the seed is positive, as
    for probabilities). ``total`` is the
    seed (contrastive: seed+ - seed-), the amount a conservative walk would hand to the inputs.
    One engine is built per model object (a randomised copy gets its own).
    """

    def __init__(self, mode: str, task: str, batch_size: int = 256, **explain_kwargs) -> None:
        self.mode = mode
        self.task = task
        self.name = f"backtrace_{mode}"
        self.signed = mode != "default"
        self.batch_size = batch_size
        self.explain_kwargs = explain_kwargs
        self._engines: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()

    def _engine(self, model: nn.Module):
        from governance.backtrace import Backtrace  # the engine is imported lazily

        eng = self._engines.get(model)
        if eng is None:
            eng = Backtrace(model)
            self._engines[model] = eng
        return eng

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        eng = self._engine(model)
        vals, totals = [], []
        n, bs = x.shape[0], self.batch_size
        for i in range(0, n, bs):
            xb, tb = x[i : i + bs], target[i : i + bs]
            keep = xb.shape[0]
            if n > bs and keep < bs:  # pad the last chunk: the engine exports once per input shape
                pad = torch.arange(bs - keep, device=x.device) % keep
                xb, tb = torch.cat([xb, xb[pad]]), torch.cat([tb, tb[pad]])
            single = self.task in ("binary-classification", "regression") and bool((tb == 0).all())
            exp = eng.explain(xb, mode=self.mode, task=self.task, target=None if single else tb,
                              **self.explain_kwargs)
            rel = exp.input_relevance
            if isinstance(rel, dict):
                if len(rel) != 1:
                    raise ValueError("quality metrics support models with a single input tensor")
                rel = next(iter(rel.values()))
            if self.mode == "contrastive" and getattr(exp, "positive", None) is not None \
                    and getattr(exp, "negative", None) is not None:
                seed = exp.positive.seed_relevance - exp.negative.seed_relevance
                oriented_by = exp.positive.seed_relevance  # R+ - R- already reads "for vs against"
            else:
                seed = exp.seed_relevance
                oriented_by = seed
            seed = seed.detach().to(torch.float32).reshape(-1)
            sign = torch.where(oriented_by.detach().reshape(-1) < 0, -1.0, 1.0).to(seed)
            rel = rel.detach().to(torch.float32)
            vals.append((rel * sign.view((-1,) + (1,) * (rel.dim() - 1)))[:keep])
            totals.append((seed * sign)[:keep])
        return Attribution(torch.cat(vals), torch.cat(totals))


def _numpy_seeded(seed: int):
    """A context that seeds numpy's global RNG (which SHAP and LIME draw from) and restores it."""
    import contextlib

    import numpy as np

    @contextlib.contextmanager
    def ctx():
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)

    return ctx()


def _predict_fn(model: nn.Module, dtype: torch.dtype, device: torch.device):
    import numpy as np

    def predict(z):
        with torch.no_grad():
            out = raw_output(model, torch.as_tensor(np.asarray(z), dtype=dtype, device=device))
        return out.double().cpu().numpy()

    return predict


class KernelShap(Explainer):
    """KernelSHAP (Lundberg & Lee 2017) from the optional ``shap`` package, tabular inputs only:
    Shapley values of the raw output at the target against ``n_background`` background rows
    (drawn from ``background`` with ``seed``), ``nsamples`` coalitions per row. ``total`` is
    ``f(x) - E[f(background)]`` (Shapley values are efficient)."""

    name = "kernel_shap"

    def __init__(self, background: Tensor, nsamples: int = 256, n_background: int = 32, seed: int = 0) -> None:
        import shap  # noqa: F401  (fails early when not installed)

        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(background.shape[0], generator=g)[: min(n_background, background.shape[0])]
        self.background = background[idx].detach().cpu().double().numpy()
        self.nsamples = nsamples
        self.seed = seed

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        import numpy as np
        import shap

        if x.dim() != 2 or not torch.is_floating_point(x):
            raise ValueError("kernel_shap supports tabular (N, F) inputs only")
        f = _predict_fn(model, x.dtype, x.device)
        with _numpy_seeded(self.seed):
            ex = shap.KernelExplainer(f, self.background)
            sv = ex.shap_values(x.detach().cpu().double().numpy(), nsamples=self.nsamples, silent=True)
        if isinstance(sv, list):  # older shap: one (N, F) array per output
            sv = np.stack(sv, axis=-1)
        sv = np.asarray(sv)
        if sv.ndim == 2:
            sv = sv[:, :, None]
        t = target.cpu().numpy()
        vals = torch.as_tensor(sv[np.arange(len(t)), :, t], dtype=torch.float32, device=x.device)
        base = np.atleast_1d(np.asarray(ex.expected_value, dtype=np.float64))
        with torch.no_grad():
            fx = select(raw_output(model, x), target, "raw").double().cpu().numpy()
        total = torch.as_tensor(fx - base[t], dtype=torch.float32, device=x.device)
        return Attribution(vals, total)


class Lime(Explainer):
    """LIME (Ribeiro et al. 2016) from the optional ``lime`` package, tabular inputs only: the
    coefficients of a local linear surrogate of the raw output at the target, fitted on
    ``num_samples`` perturbations drawn around each row from the statistics of ``background``
    (no discretisation). One fit per row: meant for small samples."""

    name = "lime"

    def __init__(self, background: Tensor, num_samples: int = 500, seed: int = 0) -> None:
        from lime.lime_tabular import LimeTabularExplainer  # noqa: F401

        self.background = background.detach().cpu().double().numpy()
        self.num_samples = num_samples
        self.seed = seed

    def explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Attribution:
        import numpy as np
        from lime.lime_tabular import LimeTabularExplainer

        if x.dim() != 2 or not torch.is_floating_point(x):
            raise ValueError("lime supports tabular (N, F) inputs only")
        f = _predict_fn(model, x.dtype, x.device)
        lt = LimeTabularExplainer(self.background, mode="regression", discretize_continuous=False,
                                  random_state=self.seed)
        rows = x.detach().cpu().double().numpy()
        out = np.zeros(rows.shape, dtype=np.float64)
        t = target.cpu().numpy()
        for i in range(rows.shape[0]):  # LIME fits one surrogate per instance by design
            fi = (lambda z, k=int(t[i]): f(z)[:, k])
            e = lt.explain_instance(rows[i], fi, num_features=rows.shape[1], num_samples=self.num_samples)
            # regression mode keeps the surrogate's coefficients under key 1 (key 0 is their negation)
            for j, w in e.local_exp[1]:
                out[i, j] = w
        return Attribution(torch.as_tensor(out, dtype=torch.float32, device=x.device), None)


OPTIONAL_BASELINES = ("kernel_shap", "lime")


def optional_explainer(name: str, background: Tensor, seed: int = 0) -> Explainer:
    """``kernel_shap`` or ``lime``; raises ImportError when the package is not installed."""
    if name == "kernel_shap":
        return KernelShap(background, seed=seed)
    if name == "lime":
        return Lime(background, seed=seed)
    raise ValueError(f"unknown optional baseline {name!r}; choose from {OPTIONAL_BASELINES}")


def default_explainers(task: str, modes: Sequence[str] = ("default", "contrastive", "signed"), *,
                       seed: int = 0, ig_steps: int = 32, ig_baseline: Tensor | float = 0.0,
                       baseline_token_id: int | None = None, protected_ids: Sequence[int] = ()) -> list[Explainer]:
    """DLBacktrace in each mode, then gradient x input, integrated gradients and random."""
    out: list[Explainer] = [BacktraceExplainer(m, task) for m in modes]
    out += [GradientXInput(),
            IntegratedGradients(ig_steps, ig_baseline, baseline_token_id, protected_ids),
            RandomAttribution(seed)]
    return out
