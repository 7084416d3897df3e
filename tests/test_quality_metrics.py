"""Each quality metric on cases computed by hand."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch
from torch import nn

from governance.quality import complexity, faithfulness, randomisation, robustness
from governance.quality.baselines import GradientXInput, IntegratedGradients, RandomAttribution
from governance.quality.features import FeatureSpace, make_space, resolve_target, select


def linear_model(F: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(F, 1)
    with torch.no_grad():
        m.weight.copy_(torch.randn(1, F, generator=g))
        m.bias.fill_(0.3)
    return m.eval()


class Flat(nn.Module):
    """A linear model over a flattened image."""

    def __init__(self, shape, seed: int = 0) -> None:
        super().__init__()
        n = math.prod(shape)
        self.lin = linear_model(n, seed)

    def forward(self, x):
        return self.lin(x.flatten(1))


class TokenSum(nn.Module):
    """f(ids) = sum_t v[ids_t] (a one-dimensional embedding summed over positions)."""

    def __init__(self, vocab: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 1)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, 1, generator=torch.Generator().manual_seed(seed)))
            self.emb.weight[1] = 0.0  # the baseline ("[MASK]") token contributes nothing

    def forward(self, ids):
        return self.emb(ids).sum(dim=(1, 2)).unsqueeze(1)


# -- faithfulness correlation ---------------------------------------------------------------------

def test_faithfulness_correlation_exact_linear_attribution_is_one():
    X = torch.randn(40, 9, generator=torch.Generator().manual_seed(1))
    m = linear_model(9)
    space = make_space(X, baseline="mean")
    exact = m.weight[0].detach() * (X - space.baseline)  # f(x) - f(x_S<-b) = sum_S w_i (x_i - b_i)
    t = torch.zeros(40, dtype=torch.long)
    fc = faithfulness.faithfulness_correlation(m, X, exact, space, t, n_runs=32, subset_fraction=0.3)
    assert torch.allclose(fc, torch.ones_like(fc), atol=1e-5)
    # a wrong attribution (signs flipped on half the features) is visibly less faithful
    wrong = exact * torch.tensor([1, -1] * 4 + [1.0])
    assert float(faithfulness.faithfulness_correlation(m, X, wrong, space, t, n_runs=32).mean()) < 0.9


def test_faithfulness_correlation_image_patches_exact_is_one():
    X = torch.rand(10, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    m = Flat((2, 5, 5)).eval()
    space = make_space(X, baseline="zero", patch_size=2)  # 3x3 patches, ragged at the border
    assert space.n_features == 9
    exact = m.lin.weight.detach().view(1, 2, 5, 5) * X
    fc = faithfulness.faithfulness_correlation(m, X, exact, space, torch.zeros(10, dtype=torch.long), n_runs=24)
    assert torch.allclose(fc, torch.ones_like(fc), atol=1e-5)


def test_faithfulness_correlation_tokens_respects_protected_positions():
    m = TokenSum().eval()
    ids = torch.tensor([[0, 5, 7, 9, 3, 2, 2], [0, 4, 4, 11, 6, 8, 3]])  # 0 = [CLS], 3 = [SEP], 2 = [PAD]
    space = make_space(ids, baseline=1, protected_ids=(0, 2, 3))
    valid = space.valid(ids)
    assert valid.tolist() == [[False, True, True, True, False, False, False], [False, True, True, True, True, True, False]]
    exact = GradientXInput()(m, ids, torch.zeros(2, dtype=torch.long))  # = v[id_t] - v[baseline] = v[id_t]
    assert torch.allclose(exact, m.emb.weight[ids, 0].detach())
    fc = faithfulness.faithfulness_correlation(m, ids, exact, space, torch.zeros(2, dtype=torch.long), n_runs=32, subset_size=2)
    assert torch.allclose(fc, torch.ones_like(fc), atol=1e-5)
    # protected positions are never perturbed
    pert = space.perturb(ids, torch.ones_like(valid) & valid)
    assert (pert[~valid] == ids[~valid]).all() and (pert[valid] == 1).all()


# -- flipping -------------------------------------------------------------------------------------

def test_flipping_auc_by_hand():
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.bias.zero_()
    x = torch.tensor([[1.0, 1.0]])
    space = make_space(x, baseline="zero")
    curves = faithfulness.flipping_curves(m, x, torch.tensor([[1.0, 2.0]]), space, torch.zeros(1, dtype=torch.long))
    assert curves["fractions"].tolist() == [0.0, 0.5, 1.0]
    assert curves["morf"].tolist() == [[3.0, 1.0, 0.0]]  # remove x2 (relevance 2) first
    assert curves["lerf"].tolist() == [[3.0, 2.0, 0.0]]
    s = faithfulness.flipping_scores(curves)
    assert s["morf_auc"].item() == pytest.approx(1.25)
    assert s["lerf_auc"].item() == pytest.approx(1.75)
    assert s["delta_auc"].item() == pytest.approx(0.5)


def test_random_ranking_has_delta_auc_about_zero_and_exact_ranking_positive():
    X = torch.randn(600, 10, generator=torch.Generator().manual_seed(3))
    m = linear_model(10, seed=4)
    space = make_space(X, baseline="mean")
    t = torch.zeros(600, dtype=torch.long)
    rnd = RandomAttribution(seed=5)(m, X, t)
    d_rand = faithfulness.flipping_scores(faithfulness.flipping_curves(m, X, rnd, space, t))["delta_auc"]
    exact = m.weight[0].detach() * (X - space.baseline)
    d_exact = faithfulness.flipping_scores(faithfulness.flipping_curves(m, X, exact, space, t))["delta_auc"]
    scale = float(d_exact.mean())
    assert scale > 1.0
    # E[delta] = 0 for a random ranking: the mean is within 3 standard errors of 0
    se = float(d_rand.std()) / math.sqrt(600)
    assert abs(float(d_rand.mean())) < 3 * se + 1e-6
    assert abs(float(d_rand.mean())) < 0.05 * scale


def test_trapezoid_matches_numpy():
    np = pytest.importorskip("numpy")
    y = torch.rand(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.linspace(0, 1, 7, dtype=torch.float64)
    assert torch.allclose(faithfulness.trapezoid_auc(y, x), torch.tensor(np.trapezoid(y.numpy(), x.numpy(), axis=1)))


# -- complexity -----------------------------------------------------------------------------------

def test_entropy_and_gini_known_values():
    F = 8
    one_hot = torch.zeros(1, F)
    one_hot[0, 3] = -2.5
    uniform = torch.full((1, F), 0.7)
    assert complexity.entropy(one_hot).item() == pytest.approx(0.0, abs=1e-7)
    assert complexity.entropy(uniform).item() == pytest.approx(math.log(F), rel=1e-6)
    assert complexity.gini(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert complexity.gini(one_hot).item() == pytest.approx((F - 1) / F, rel=1e-6)
    a = torch.tensor([[3.0, -1.0, 2.0]])
    p = torch.tensor([3.0, 1.0, 2.0]) / 6
    assert complexity.entropy(a).item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert complexity.gini(a).item() == pytest.approx(4.0 / 18.0, rel=1e-6)  # (-2*1 + 0*2 + 2*3) / (3*6)
    assert math.isnan(complexity.entropy(torch.zeros(1, 4)).item())


def test_complexity_ignores_protected_units():
    a = torch.tensor([[3.0, -1.0, 2.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, False, False]])
    assert complexity.entropy(a, valid).item() == pytest.approx(complexity.entropy(a[:, :3]).item(), rel=1e-6)
    assert complexity.gini(a, valid).item() == pytest.approx(complexity.gini(a[:, :3]).item(), rel=1e-6)


# -- robustness -----------------------------------------------------------------------------------

def test_completeness_gap_by_hand():
    a = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    gap = robustness.completeness_gap(a, torch.tensor([3.0, 4.0]))
    assert gap.tolist() == pytest.approx([0.0, 0.5])


def test_max_sensitivity_identity_and_constant_explainers():
    x = torch.rand(20, 5, generator=torch.Generator().manual_seed(0)) + 1.0
    space = make_space(x)
    t = torch.zeros(20, dtype=torch.long)
    const = robustness.max_sensitivity(lambda xs, ts: torch.ones_like(xs), x, t, space, radius=0.1, scale=1.0)
    assert torch.all(const == 0)
    ident = robustness.max_sensitivity(lambda xs, ts: xs, x, t, space, radius=0.1, scale=1.0, n_perturb=16)
    bound = 0.1 * math.sqrt(5) / torch.linalg.vector_norm(x, dim=1)
    assert torch.all(ident > 0) and torch.all(ident <= bound + 1e-6)
    again = robustness.max_sensitivity(lambda xs, ts: xs, x, t, space, radius=0.1, scale=1.0, n_perturb=16)
    assert torch.equal(ident, again)  # seeded


# -- randomisation --------------------------------------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 15), generator=g).float()
    b = torch.randint(0, 5, (6, 15), generator=g).float()
    ours = randomisation.spearman(a, b)
    for i in range(6):
        assert ours[i].item() == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-5)
    valid = torch.ones_like(a, dtype=torch.bool)
    valid[:, 10:] = False
    masked = randomisation.spearman(a, b, valid)
    for i in range(6):
        assert masked[i].item() == pytest.approx(stats.spearmanr(a[i, :10].numpy(), b[i, :10].numpy()).statistic, abs=1e-5)


def test_mprt_order_copy_and_model_independent_explainer():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)).eval()
    x = torch.randn(16, 6, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert randomisation.parameter_layers(model, x[:1]) == ["0", "2", "4"]
    space = make_space(x)
    t = torch.zeros(16, dtype=torch.long)
    # an "explanation" that ignores the model is not sensitive to randomisation: similarity stays 1
    res = randomisation.mprt(model, x, t, lambda m, xs, ts: xs * 2.0, space)
    assert res["layers"] == ["4", "2", "0"]
    assert torch.allclose(res["spearman"], torch.ones(16))
    assert torch.allclose(res["entropy_ratio"], torch.ones(16))
    # gradient x input of the model does lose similarity
    res = randomisation.mprt(model, x, t, GradientXInput(), space)
    assert res["spearman_per_layer"].shape == (3, 16)
    assert float(res["spearman"].mean()) < 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched


def test_randomise_is_seeded_and_changes_parameters():
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    randomisation.randomise_(a, torch.Generator().manual_seed(3))
    randomisation.randomise_(b, torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, w0)


# -- features -------------------------------------------------------------------------------------

def test_image_patch_aggregate_and_expand_are_consistent():
    space = FeatureSpace("image", (3, 5, 7), torch.zeros(1, 1, 1), patch_size=3)
    assert space.grid == (2, 3) and space.n_features == 6
    attr = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    agg = space.aggregate(attr)
    assert agg.shape == (2, 6)
    assert torch.allclose(agg.sum(1), attr.sum(dim=(1, 2, 3)))
    assert agg[0, 5].item() == attr[0, :, 3:5, 6:7].sum().item()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4] = True
    m = space.expand(mask)
    assert m.shape == (2, 3, 5, 7) and int(m.sum()) == 3 * 2 * 3 and bool(m[1, :, 3:5, 3:6].all())


def test_targets_and_scores():
    out = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    t = resolve_target(out, "multiclass-classification", None)
    assert t.tolist() == [1, 0]
    assert torch.allclose(select(out, t, "softmax"), out.softmax(1).max(1).values)
    assert resolve_target(torch.rand(4, 1), "binary-classification", None).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        resolve_target(out, "regression", None)


# -- baselines ------------------------------------------------------------------------------------

def test_gradient_x_input_exact_on_linear():
    m = linear_model(5)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    att = GradientXInput().explain(m, x, torch.zeros(7, dtype=torch.long))
    assert torch.allclose(att.values, m.weight.detach() * x)
    assert torch.allclose(att.total, (x @ m.weight.detach().T).squeeze(1), atol=1e-6)


def test_integrated_gradients_completeness_on_nonlinear_model():
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2] * 3)
    att = IntegratedGradients(n_steps=128).explain(model, x, t)
    gap = robustness.completeness_gap(att.values, att.total)
    assert float(gap.max()) < 1e-3
    with torch.no_grad():
        expected = model(x).gather(1, t.view(-1, 1)).squeeze(1) - model(torch.zeros_like(x))[:, t].diagonal()
    assert torch.allclose(att.total, expected, atol=1e-5)


def test_integrated_gradients_matches_captum_when_installed():
    captum = pytest.importorskip("captum.attr")
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2, 0, 1, 1, 0])
    ours = IntegratedGradients(n_steps=49).explain(model, x, t).values  # 50 points on the path
    theirs = captum.IntegratedGradients(model).attribute(x, target=t, n_steps=50, method="riemann_trapezoid")
    # captum's trapezoid weights over n points are 1/n (ends 1/2n), summing to (n-1)/n; ours are
    # 1/(n-1) (ends 1/2(n-1)), summing to 1, so the two differ by exactly n/(n-1)
    assert torch.allclose(ours, theirs.float() * 50 / 49, atol=1e-5)


def test_integrated_gradients_tokens_complete():
    m = TokenSum().eval()
    ids = torch.tensor([[0, 5, 7, 9, 3], [0, 4, 4, 11, 3]])
    ig = IntegratedGradients(n_steps=8, baseline_token_id=1, protected_ids=(0, 3))
    att = ig.explain(m, ids, torch.zeros(2, dtype=torch.long))
    v = m.emb.weight[:, 0].detach()
    expected = torch.where(torch.isin(ids, torch.tensor([0, 3])), torch.zeros(()), v[ids] - v[1])
    assert torch.allclose(att.values, expected, atol=1e-6)


def test_random_attribution_is_seeded():
    x = torch.zeros(3, 4)
    t = torch.zeros(3, dtype=torch.long)
    assert torch.equal(RandomAttribution(7)(None, x, t), RandomAttribution(7)(None, x, t))
    assert not torch.equal(RandomAttribution(7)(None, x, t), RandomAttribution(8)(None, x, t))


def test_region_flipping_with_patches_on_a_linear_image_model():
    """With the exact attribution, removing 2x2 regions most-relevant-first lowers the raw output
    at every step (each region's removal lowers it by that region's summed attribution)."""
    X = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    m = Flat((1, 6, 6), seed=5).eval()
    space = make_space(X, baseline="zero", patch_size=2)
    exact = m.lin.weight.detach().view(1, 1, 6, 6) * X
    t = torch.zeros(6, dtype=torch.long)
    curves = faithfulness.flipping_curves(m, X, exact, space, t, n_steps=9)
    morf, lerf = curves["morf"], curves["lerf"]
    agg = torch.sort(space.aggregate(exact), dim=1, descending=True).values  # (6, 9) region sums
    expected = morf[:, :1] - torch.cat([torch.zeros(6, 1), agg.cumsum(1)], 1)
    assert torch.allclose(morf, expected, atol=1e-5)
    assert torch.all(faithfulness.flipping_scores(curves)["delta_auc"] > 0)
    assert torch.allclose(morf[:, -1], lerf[:, -1])  # everything removed: both end at f(baseline)
