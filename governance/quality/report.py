"""``quality_report``: every metric for every method on the same seeded sample -> quality.json."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from governance.quality import complexity, faithfulness, randomisation, robustness
from governance.quality.baselines import Explainer, default_explainers, optional_explainer
from governance.quality.features import confidence_transform, forward, make_space, resolve_target

Tensor = torch.Tensor

METRIC_GROUPS = ("faithfulness_correlation", "flipping", "max_sensitivity", "completeness", "complexity",
                 "mprt", "ground_truth")

METRICS: dict[str, dict[str, str]] = {
    "faithfulness_correlation": {"direction": "higher", "group": "faithfulness_correlation",
                                 "description": "Pearson correlation over random unit subsets set to the baseline "
                                                "between the summed attribution and the drop of the raw output"},
    "morf_auc": {"direction": "lower", "group": "flipping",
                 "description": "area under the confidence curve when units are removed most-relevant-first"},
    "lerf_auc": {"direction": "higher", "group": "flipping",
                 "description": "area under the confidence curve when units are removed least-relevant-first"},
    "delta_auc": {"direction": "higher", "group": "flipping",
                  "description": "lerf_auc - morf_auc; about 0 for a random ranking"},
    "max_sensitivity": {"direction": "lower", "group": "max_sensitivity",
                        "description": "worst relative change ||e(x') - e(x)|| / ||e(x)|| over small input perturbations"},
    "completeness_gap": {"direction": "lower", "group": "completeness",
                         "description": "|sum of attribution - what the method distributes| / |what it distributes|"},
    "entropy": {"direction": "lower", "group": "complexity",
                "description": "Shannon entropy of the normalised |attribution| over units (0 one-hot, log n uniform)"},
    "gini": {"direction": "higher", "group": "complexity",
             "description": "Gini sparseness of |attribution| over units (0 uniform, (n-1)/n one-hot)"},
    "mprt_spearman": {"direction": "lower", "group": "mprt",
                      "description": "Spearman correlation of |attribution| before and after randomising every layer"},
    "mprt_spearman_mean": {"direction": "lower", "group": "mprt",
                           "description": "mean Spearman correlation over the top-down randomisation cascade"},
    "mprt_entropy_ratio": {"direction": "higher", "group": "mprt",
                           "description": "efficient MPRT: entropy after full randomisation / entropy before"},
    "ground_truth_hits": {"direction": "higher", "group": "ground_truth",
                          "description": "true drivers among the method's top-k features by mean |attribution| "
                                         "(k = number of true drivers)"},
    "ground_truth_recall": {"direction": "higher", "group": "ground_truth",
                            "description": "ground_truth_hits / k"},
    "ground_truth_local_recall": {"direction": "higher", "group": "ground_truth",
                                  "description": "mean over samples of the share of true drivers in the sample's top-k"},
}


def _as_tensor(X: Any) -> tuple[Tensor, list[str] | None]:
    names = None
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):  # pandas DataFrame
        names = [str(c) for c in X.columns]
        X = X.to_numpy()
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a tensor, numpy array or DataFrame, got {type(X).__name__}")
    if torch.is_floating_point(X) and X.dtype != torch.float32:
        X = X.to(torch.float32)
    return X, names


def _mean(v: Tensor) -> float | None:
    """Mean over the samples where the metric is defined; None when it is nowhere defined."""
    v = v.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def quality_report(model: nn.Module, X: Any, *, task: str, target: Any = None,
                   modes: Sequence[str] = ("default", "contrastive", "signed"), n_samples: int = 256, seed: int = 0,
                   feature_names: Sequence[str] | None = None, ground_truth: Sequence[str] | None = None,
                   metrics: Sequence[str] | None = None, explainers: Sequence[Explainer] | None = None,
                   baseline: str | float | Tensor | None = None, patch_size: int = 1,
                   tokenizer: Any = None, baseline_token_id: int | None = None,
                   protected_ids: Sequence[int] | None = None, flip_steps: int | None = None,
                   faithfulness_runs: int = 64, subset_fraction: float = 0.2, sensitivity_perturbations: int = 8,
                   sensitivity_radius: float = 0.05, ig_steps: int = 32, mprt_layers: Sequence[str] | None = None,
                   mprt_max_layers: int | None = None,
                   optional_baselines: Sequence[str] = (), batch_size: int = 512, timings: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Explanation-quality metrics for DLBacktrace in each of ``modes`` and the baselines
    (gradient x input, integrated gradients, random) on the same ``n_samples`` rows of ``X``
    (drawn with ``seed``; all rows when fewer).

    Returns the quality.json document::

        {"n_samples", "modality", "primary_method", "parameters": {...},
         "metrics": {name: {"direction": "higher"|"lower", "description", "parameters"}},
         "methods": {method: {metric: float | None}},      # mean over samples; None = undefined
         "details": {method: {"mprt_spearman_per_layer": {layer: float}, ...}},
         "errors": {method or "method.metric": message},   # e.g. an op the engine cannot explain
         "timings": {method: {"explain_s", "metrics_s", "explain_cpu_s", "metrics_cpu_s"}}}
                                                            # wall and CPU seconds, only with timings=True

    ``X``: (N, F) tabular, (N, C, H, W) image or (N, T) token ids (a tensor, array or DataFrame).
    Token inputs need ``tokenizer`` (its special ids are protected, its [MASK] or [UNK] id is the
    baseline) or ``baseline_token_id``/``protected_ids``. ``baseline`` for continuous inputs:
    "mean" (default), "zero", a number or a tensor. ``metrics``: a subset of
    ``METRIC_GROUPS`` (default: all that apply). ``ground_truth``: names of the true drivers
    (needs ``feature_names`` or a DataFrame). ``optional_baselines``: ``"kernel_shap"`` and/or
    ``"lime"`` (tabular, when the packages are installed; otherwise listed under ``errors``).
    ``mprt_max_layers``: randomise at most that many parameter layers, evenly spaced from the
    output to the input (``randomisation.spread_layers``). What was bounded (the sample, the MPRT
    layers, fewer perturbations or integration steps than the defaults) is listed in ``bounds``.

    Every method explains the model's decision (``decision_polarity``): the target's output, or
    for a one-output binary classifier ``p`` (class 1) / ``1 - p`` (class 0). The model is put in
    eval mode for the computation and its mode restored; no global torch state is changed.
    """
    X, df_names = _as_tensor(X)
    feature_names = list(feature_names) if feature_names is not None else df_names
    groups = set(METRIC_GROUPS if metrics is None else metrics)
    unknown = groups - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"unknown metric groups {sorted(unknown)}; choose from {METRIC_GROUPS}")
    if ground_truth is None:
        groups.discard("ground_truth")
    say = progress or (lambda _msg: None)

    # -- the sample ---------------------------------------------------------------------------
    n_total = X.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_total, generator=g)[: min(n_samples, n_total)].sort().values
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = X[idx].to(device)
    tgt_in = target
    if target is not None and not isinstance(target, int):
        t = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target)
        tgt_in = t[idx] if t.dim() > 0 and t.shape[0] == n_total else t

    # -- token set-up -----------------------------------------------------------------------------
    token = not torch.is_floating_point(x)
    if token:
        if tokenizer is not None:
            if baseline_token_id is None:
                baseline_token_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
            if protected_ids is None:
                protected_ids = [i for i in tokenizer.all_special_ids if i not in (tokenizer.unk_token_id, tokenizer.mask_token_id)]
        if baseline_token_id is None:
            raise ValueError("token inputs need tokenizer= or baseline_token_id= (the [MASK] or [UNK] id)")
    protected_ids = tuple(protected_ids or ())
    space = make_space(x, X.to(device) if not token else None,
                       baseline=baseline_token_id if token else baseline, patch_size=patch_size,
                       protected_ids=protected_ids)
    if "ground_truth" in groups:
        if token or feature_names is None or space.n_features != len(feature_names):
            raise ValueError("ground_truth needs tabular inputs and feature_names (or a DataFrame)")
        missing = [n for n in ground_truth if n not in feature_names]
        if missing:
            raise ValueError(f"ground-truth drivers not among the features: {missing}")

    was_training = model.training
    _set_mode(model, False)
    try:
        out = forward(model, x, batch_size)
        tgt = resolve_target(out, task, tgt_in)
        # a regression output is its own score: never squashed or thresholded as a probability
        transform = "raw" if task == "regression" else confidence_transform(out)
        polarity = decision_polarity(out, task, transform)
        valid = space.valid(x)
        if explainers is None:
            explainers = default_explainers(task, modes, seed=seed, ig_steps=ig_steps, baseline_token_id=baseline_token_id,
                                            protected_ids=protected_ids)
        optional_errors = {}
        explainers = list(explainers)
        for opt_name in optional_baselines:
            try:
                explainers.append(optional_explainer(opt_name, X.to(device), seed=seed))
            except ImportError as err:
                optional_errors[opt_name] = f"not installed ({err})"
        params = {
            "faithfulness_correlation": {"n_runs": faithfulness_runs, "subset_fraction": subset_fraction,
                                         "output": "raw", "baseline": _describe(baseline, token, baseline_token_id)},
            "flipping": {"n_steps": flip_steps if flip_steps is not None else int(min(int(valid.sum(1).max()), 32)),
                         "output": f"confidence ({transform} of the raw output)", "patch_size": space.patch_size,
                         "baseline": _describe(baseline, token, baseline_token_id)},
            "max_sensitivity": {"n_perturbations": sensitivity_perturbations,
                                "radius": sensitivity_radius if not token else None,
                                "neighbourhood": "one token replaced by the baseline token" if token
                                else "uniform noise U(-r, r), r = radius * std(X)"},
            "completeness": {},
            "complexity": {"units": space.modality if space.modality != "image" else f"{space.patch_size}x{space.patch_size} patches"},
            "mprt": {"order": "top-down cascade", "similarity": "spearman of |attribution|",
                     "randomisation": "N(mean, std) of each parameter tensor"},
            "ground_truth": {"k": len(ground_truth) if ground_truth else 0},
        }
        bounds = _bounds(int(x.shape[0]), n_total, sensitivity_perturbations, ig_steps, groups)
        if "mprt" in groups and mprt_layers is None and mprt_max_layers is not None:
            every = randomisation.parameter_layers(model, x[:1])
            mprt_layers = randomisation.spread_layers(every, mprt_max_layers)
            params["mprt"].update({"layers": list(mprt_layers), "n_parameter_layers": len(every)})
            if len(mprt_layers) < len(every):
                bounds.append(f"MPRT randomised {len(mprt_layers)} of the model's {len(every)} parameter layers, "
                              f"evenly spaced from the output to the input ({', '.join(mprt_layers[::-1])}), "
                              f"quality.mprt_max_layers={mprt_max_layers}")
        metrics_doc = {name: {**{k: v for k, v in spec.items() if k != "group"}, "parameters": params[spec["group"]]}
                       for name, spec in METRICS.items() if spec["group"] in groups}
        doc: dict[str, Any] = {
            "n_samples": int(x.shape[0]), "modality": space.modality,
            "primary_method": f"backtrace_{modes[0]}" if modes else None,
            "parameters": {"seed": seed, "task": task, "n_features": space.n_features, "modes": list(modes),
                           "ig_steps": ig_steps},
            "metrics": metrics_doc, "methods": {}, "details": {}, "errors": dict(optional_errors), "bounds": bounds,
        }
        if timings:
            doc["timings"] = {}
        std_x = float(x.float().std()) if not token else 1.0
        for ex in explainers:
            name = ex.name
            say(f"quality: {name}")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                att = ex.explain(model, x, tgt)
            except Exception as err:  # an engine that cannot explain this model is evidence too
                doc["errors"][name] = f"{type(err).__name__}: {err}"
                continue
            t_explain, c_explain = time.perf_counter() - t0, time.process_time() - c0
            a = att.values.to(torch.float32)
            total = att.total
            if ex.signed:  # explain the decision: class-0 decisions of a one-output binary model
                a = a * polarity.view((-1,) + (1,) * (a.dim() - 1))
                total = None if total is None else total * polarity
            row: dict[str, float | None] = {}
            det: dict[str, Any] = {}

            def guarded(metric: str, fn: Callable[[], None]) -> None:
                try:
                    fn()
                except Exception as err:
                    doc["errors"][f"{name}.{metric}"] = f"{type(err).__name__}: {err}"

            if "faithfulness_correlation" in groups:
                def _fc() -> None:
                    fc = faithfulness.faithfulness_correlation(model, x, a, space, tgt, n_runs=faithfulness_runs,
                                                               subset_fraction=subset_fraction, seed=seed, polarity=polarity,
                                                               batch_size=batch_size)
                    row["faithfulness_correlation"] = _mean(fc)
                guarded("faithfulness_correlation", _fc)
            if "flipping" in groups:
                def _flip() -> None:
                    curves = faithfulness.flipping_curves(model, x, a, space, tgt, n_steps=flip_steps,
                                                          transform=transform, polarity=polarity,
                                                          batch_size=batch_size)
                    for k, v in faithfulness.flipping_scores(curves).items():
                        row[k] = _mean(v)
                    det["morf_curve"] = [float(c) for c in curves["morf"].mean(0)]
                    det["lerf_curve"] = [float(c) for c in curves["lerf"].mean(0)]
                guarded("flipping", _flip)
            if "max_sensitivity" in groups:
                def _ms() -> None:
                    ms = robustness.max_sensitivity(lambda xs, ts: ex(model, xs, ts), x, tgt, space,
                                                    attr=att.values.to(torch.float32),
                                                    n_perturb=sensitivity_perturbations, radius=sensitivity_radius,
                                                    scale=std_x, seed=seed)
                    row["max_sensitivity"] = _mean(ms)
                    det["max_sensitivity_undefined"] = int((~torch.isfinite(ms)).sum())
                guarded("max_sensitivity", _ms)
            if "completeness" in groups and total is not None:
                row["completeness_gap"] = _mean(robustness.completeness_gap(a, total))
            if "complexity" in groups:
                agg = space.aggregate(a)
                row["entropy"] = _mean(complexity.entropy(agg, valid))
                row["gini"] = _mean(complexity.gini(agg, valid))
            if "mprt" in groups:
                def _mprt() -> None:
                    res = randomisation.mprt(model, x, tgt, ex, space, attr=a, layers=mprt_layers, seed=seed)
                    row["mprt_spearman"] = _mean(res["spearman"])
                    row["mprt_spearman_mean"] = _mean(res["spearman_per_layer"].nanmean(0))
                    row["mprt_entropy_ratio"] = _mean(res["entropy_ratio"])
                    det["mprt_spearman_per_layer"] = {l: _mean(v) for l, v in zip(res["layers"], res["spearman_per_layer"])}
                    det["mprt_entropy_ratio_per_layer"] = {l: _mean(v) for l, v in zip(res["layers"], res["entropy_ratio_per_layer"])}
                guarded("mprt", _mprt)
            if "ground_truth" in groups:
                agg = space.aggregate(a).abs()
                k = len(ground_truth)
                truth = torch.zeros(agg.shape[1], dtype=torch.bool)
                truth[[feature_names.index(n) for n in ground_truth]] = True
                top_global = torch.sort(agg.mean(0).cpu(), descending=True, stable=True).indices[:k]
                hits = int(truth[top_global].sum())
                top_local = torch.sort(agg.cpu(), dim=1, descending=True, stable=True).indices[:, :k]
                row["ground_truth_hits"] = float(hits)
                row["ground_truth_recall"] = hits / k
                row["ground_truth_local_recall"] = float(truth[top_local].float().sum(1).mean() / k)
                det["top_features"] = [feature_names[i] for i in top_global.tolist()]
            doc["methods"][name] = row
            if det:
                doc["details"][name] = det
            if timings:
                doc["timings"][name] = {"explain_s": t_explain, "metrics_s": time.perf_counter() - t0 - t_explain,
                                        "explain_cpu_s": c_explain,
                                        "metrics_cpu_s": time.process_time() - c0 - c_explain}
    finally:
        _set_mode(model, was_training)
    return _clean(doc)


def _bounds(n: int, n_total: int, perturbations: int, ig_steps: int, groups: set[str]) -> list[str]:
    """What this report computed on less than everything or with fewer steps than the defaults,
    in words (quality.json ``bounds``; the audit report prints them)."""
    out = []
    if n < n_total:
        out.append(f"the metrics ran on {n} of {n_total} samples (quality.n_samples)")
    if "max_sensitivity" in groups and perturbations < 8:
        out.append(f"max sensitivity drew {perturbations} perturbations per sample instead of 8 "
                   "(quality.sensitivity_perturbations)")
    if ig_steps < 32:
        out.append(f"integrated gradients integrated over {ig_steps} steps instead of 32 (quality.ig_steps)")
    return out


def _set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; exported graphs (torch.export / MLflow pt2) refuse mode switches
    and are already captured in eval form, so they are left as they are."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


def decision_polarity(out: Tensor, task: str, transform: str) -> Tensor:
    """(N,) +1, or -1 where a binary classifier with one output decided class 0 (p < 0.5).

    Every metric explains the model's *decision*: for a one-output binary model that is ``p`` for
    class-1 decisions and ``1 - p`` for class-0 decisions, whose signed attribution is the negated
    attribution of ``p``. Multi-output models explain the target's output; regression: +1.
    """
    n = out.shape[0]
    if task != "binary-classification" or out.shape[1] != 1:
        return torch.ones(n, device=out.device)
    p = out[:, 0].sigmoid() if transform == "sigmoid" else out[:, 0]
    return torch.where(p < 0.5, -1.0, 1.0).to(out.device)


def _describe(baseline: Any, token: bool, token_id: int | None) -> Any:
    if token:
        return f"token id {token_id}"
    if baseline is None:
        return "mean"
    if isinstance(baseline, Tensor):
        return "tensor"
    return baseline


def quality_metrics(quality: dict, prefix: str = "governance_quality") -> dict[str, float]:
    """Flatten a quality document to MLflow metrics ``<prefix>_<method>_<metric>``, skipping
    undefined (None) values."""
    out = {}
    for method, row in quality.get("methods", {}).items():
        for metric, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{prefix}_{method}_{metric}"] = float(value)
    return out
