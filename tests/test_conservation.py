"""Conservation and the books (spec 3, 4, 8): default mode loses relevance only to biases (and
units with nothing to split), layer by layer, as ``exp.layer_summary()`` reports; contrastive
mode conserves both R+ and R- wherever t_j != 0. Every book is checked against the naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import naive_rules as nr
from naive_rules import DTYPE
from test_engine_models import _bt, _one_intra_op_thread, make_blocknet, make_mlp  # noqa: F401 (autouse fixture)

RTOL = 1e-9


def make_chain(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),  # 0
        nn.BatchNorm2d(3),  # 1 (folded into 0)
        nn.Tanh(),  # 2
        nn.MaxPool2d(2),  # 3
        nn.Conv2d(3, 4, 2),  # 4
        nn.ReLU(),  # 5
        nn.AdaptiveAvgPool2d(1),  # 6
        nn.Flatten(),  # 7
        nn.Linear(4, 3),  # 8
        nn.Softmax(dim=-1),  # 9
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m[0].weight.mul_(3.0)
        m[1].running_mean.copy_(torch.randn(3, generator=g) * 0.2)
        m[1].running_var.copy_(torch.rand(3, generator=g) + 0.5)
        m[1].weight.copy_(torch.randn(3, generator=g) * 1.5)
        m[1].bias.copy_(torch.randn(3, generator=g) * 0.5)
        m[8].weight.mul_(5.0)
    return m.to(DTYPE).eval()


def naive_chain(m, x, mode, target):
    """Naive walk of ``make_chain``; returns relevance at every module's output, the input
    relevance and the naive books {module: LayerResult}."""
    with torch.no_grad():
        acts = [x]
        for layer in m:
            acts.append(layer(acts[-1]))
    y = acts[-1]
    R, _ = nr.seed("multiclass-classification", y, mode=mode, target=target)
    rel = {"9": R, "8": R}
    books = {}
    res = nr.linear_rule(acts[8], m[8].weight, m[8].bias, R, mode, "softmax")
    books["8"] = res
    rel["7"] = res.relevance
    rel["6"] = nr._each_map(res.relevance, mode, lambda r: r.reshape(acts[7].shape))
    R5 = nr.adaptive_avgpool_rule(acts[6], rel["6"], mode, 1)
    rel["5"] = rel["4"] = R5
    res = nr.conv_rule(acts[4], m[4].weight, m[4].bias, R5, mode, "relu")
    books["4"] = res
    rel["3"] = res.relevance
    R2 = nr.maxpool_rule(acts[3], res.relevance, mode, 2)
    rel["2"] = rel["1"] = R2
    W, b = nr.fold_bn(m[0].weight, m[0].bias, m[1])
    res = nr.conv_rule(x, W, b, R2, mode, "tanh", padding=1)
    books["0"] = res
    pre = {"0": acts[2], "4": acts[5], "8": acts[9]}
    return rel, res.relevance, books, pre


def _rows(exp, per_sample=True):
    df = exp.layer_summary(per_sample=per_sample)
    return df


def _col(df, module, col, n):
    sub = df[df["module"] == module].sort_values("sample")
    assert len(sub) == n, f"{module}: {len(sub)} rows"
    return torch.tensor(sub[col].to_numpy(), dtype=torch.float64)


def _inputs():
    torch.manual_seed(9)
    return torch.randn(4, 2, 6, 6, dtype=DTYPE), torch.tensor([0, 1, 2, 0])


def test_default_books_chain_against_naive():
    """Layer by layer, per sample: seed = input + bias-absorbed + dropped; every module's
    relevance_out equals the next module's relevance_in; each affine layer's bias_absorbed and
    saturation_rerouted equal the naive loop's; nothing is dropped."""
    m = make_chain()
    x, target = _inputs()
    n = x.shape[0]
    rel, rin, books, pre = naive_chain(m, x, "default", target)
    assert (pre["0"].abs() > 2).any() and (pre["4"] < 0).any()  # tanh and relu saturate somewhere
    exp = _bt(m).explain(x, mode="default", task="multiclass-classification", target=target)
    nr.compare(exp.input_relevance, rin, RTOL, "chain input")
    for k, v in rel.items():
        nr.compare(exp.layer_relevance[k], v, RTOL, f"chain layer {k}")
    df = _rows(exp)
    seed = exp.seed_relevance.double()
    scale = float(seed.abs().max())
    # the root row: everything in, the input relevance out
    nr.compare(_col(df, "", "relevance_in", n), seed, RTOL, "root in")
    nr.compare(_col(df, "", "relevance_out", n), exp.input_total().double(), RTOL, "root out")
    # layer by layer
    names = [str(i) for i in range(10)]
    for i, name in enumerate(names):
        r_in = _col(df, name, "relevance_in", n)
        nr.compare(r_in, exp.layer_relevance[name].double().reshape(n, -1).sum(1), RTOL, f"{name} in = Σ layer")
        below = exp.input_total().double() if i == 0 else _col(df, names[i - 1], "relevance_in", n)
        nr.compare(_col(df, name, "relevance_out", n), below, RTOL, f"{name} out = next in")
        nr.compare(_col(df, name, "dropped", n), torch.zeros(n, dtype=torch.float64), 0.0,
                   f"{name} dropped", atol=1e-9 * scale)
    bias = {k: _col(df, k, "bias_absorbed", n) for k in names}
    nr.compare(bias["0"] + bias["1"], books["0"].bias, RTOL, "conv0+bn1 bias absorbed", atol=1e-12)
    nr.compare(bias["4"], books["4"].bias, RTOL, "conv4 bias absorbed", atol=1e-12)
    nr.compare(bias["8"], books["8"].bias, RTOL, "fc8 bias absorbed", atol=1e-12)
    for k in names:
        if k not in ("0", "1", "4", "8"):
            assert float(bias[k].abs().max()) == 0.0, k
    total_bias = sum(bias.values())
    total_drop = sum(_col(df, k, "dropped", n) for k in names)
    nr.compare(exp.input_total().double() + total_bias + total_drop, seed, RTOL, "seed = input + bias + dropped")
    assert float(total_bias.abs().min()) > 1e-3 * scale  # the bias share is real, not renormalised
    # saturation books
    rer = {k: _col(df, k, "saturation_rerouted", n) for k in names}
    nr.compare(rer["0"] + rer["1"], books["0"].rerouted, RTOL, "conv0 saturation_rerouted", atol=1e-12)
    nr.compare(rer["4"], books["4"].rerouted, RTOL, "conv4 saturation_rerouted", atol=1e-12)
    nr.compare(rer["8"], books["8"].rerouted, RTOL, "fc8 saturation_rerouted", atol=1e-12)
    assert float(books["0"].rerouted.abs().max()) > 0  # tanh saturation moved relevance
    # batch means are the means of the per-sample rows
    mean = exp.layer_summary()
    for col in ("relevance_in", "relevance_out", "bias_absorbed", "dropped"):
        for k in names:
            got = float(mean[mean["module"] == k][col].iloc[0])
            assert abs(got - float(_col(df, k, col, n).mean())) <= 1e-9 * scale, (k, col)


def test_default_books_mlp_against_naive():
    m = make_mlp()
    torch.manual_seed(1)
    x = torch.randn(6, 78, dtype=DTYPE)
    n = x.shape[0]
    with torch.no_grad():
        h1 = m[1](m[0](x))
        h2 = m[3](m[2](h1))
        p = m(x)
    R, _ = nr.seed("binary-classification", p)
    l3 = nr.linear_rule(h2, m[4].weight, m[4].bias, R, "default", "sigmoid")
    l2 = nr.linear_rule(h1, m[2].weight, m[2].bias, l3.relevance, "default", "relu")
    l1 = nr.linear_rule(x, m[0].weight, m[0].bias, l2.relevance, "default", "relu")
    exp = _bt(m).explain(x, mode="default", task="binary-classification")
    df = _rows(exp)
    for name, book in (("4", l3), ("2", l2), ("0", l1)):
        nr.compare(_col(df, name, "bias_absorbed", n), book.bias, RTOL, f"mlp {name} bias", atol=1e-12)
        nr.compare(_col(df, name, "saturation_rerouted", n), book.rerouted, RTOL, f"mlp {name} rerouted", atol=1e-12)
        nr.compare(_col(df, name, "dropped", n), book.dropped, RTOL, f"mlp {name} dropped", atol=1e-9)
    assert float(l3.rerouted.abs().max()) > 0  # the sigmoid does saturate
    lost = l1.bias + l2.bias + l3.bias
    nr.compare(exp.seed_relevance.double() - exp.input_total().double(), lost, RTOL, "mlp seed - input = bias")


def test_default_dead_unit_is_dropped_and_reported():
    """A unit with P = N = b = 0 that receives relevance passes nothing (no NaN / inf); the
    summary reports it as dropped."""
    lin = nn.Linear(3, 4).to(DTYPE)
    with torch.no_grad():
        lin.weight[2] = 0.0
        lin.bias[2] = 0.0
    model = nn.Sequential(lin).eval()
    torch.manual_seed(10)
    x = torch.randn(3, 3, dtype=DTYPE)
    target = torch.tensor([2, 1, 2])
    exp = _bt(model).explain(x, mode="default", task="multiclass-classification", target=target, seed="unit")
    R = torch.zeros(3, 4, dtype=torch.float64)
    R[torch.arange(3), target] = 100.0
    book = nr.linear_rule(x, lin.weight, lin.bias, R, "default")
    nr.compare(exp.input_relevance, book.relevance, RTOL, "dead unit input")
    assert torch.isfinite(exp.input_relevance).all()
    df = _rows(exp)
    nr.compare(_col(df, "0", "dropped", 3), torch.tensor([100.0, 0.0, 100.0], dtype=torch.float64), RTOL,
               "dead unit dropped", atol=1e-9)
    nr.compare(_col(df, "0", "bias_absorbed", 3), book.bias, RTOL, "dead unit bias", atol=1e-12)
    nr.compare(exp.input_total().double(), torch.tensor([0.0, 100.0, 0.0], dtype=torch.float64) - book.bias,
               RTOL, "dead unit input total", atol=1e-9)


def _mlp_nobias():
    m = make_mlp(seed=3)
    out = nn.Sequential(nn.Linear(78, 39, bias=False), nn.ReLU(), nn.Linear(39, 19, bias=False), nn.ReLU(),
                        nn.Linear(19, 1, bias=False), nn.Sigmoid()).to(DTYPE)
    with torch.no_grad():
        for i in (0, 2, 4):
            out[i].weight.copy_(m[i].weight)
    return out.eval()


def _contrastive_models():
    torch.manual_seed(1)
    xm = torch.randn(6, 78, dtype=DTYPE)
    x, target = _inputs()
    torch.manual_seed(2)
    xb = torch.randn(4, 3, 5, 5, dtype=DTYPE)
    return {
        "mlp_nobias": (_mlp_nobias(), xm, "binary-classification", None),
        "mlp_bias": (make_mlp(), xm, "binary-classification", None),
        "chain": (make_chain(), x, "multiclass-classification", target),
        "resnet_block": (make_blocknet(), xb, "multiclass-classification", None),
    }


@pytest.mark.parametrize("name", ["mlp_nobias", "mlp_bias", "chain", "resnet_block"])
def test_contrastive_totals_conserved(name):
    """Spec 4: no saturation and no bias absorption, so the R+ and R- totals at the input equal
    the seeded totals (no unit here has t_j = 0); every module's books agree."""
    model, x, task, target = _contrastive_models()[name]
    exp = _bt(model).explain(x, mode="contrastive", task=task, target=target)
    n = x.shape[0]
    for label, sub in (("R+", exp.positive), ("R-", exp.negative)):
        seed = sub.seed_relevance.double()
        assert float(seed.abs().min()) > 0
        nr.compare(sub.input_total().double(), seed, RTOL, f"{name} {label} input total = seed")
        df = sub.layer_summary(per_sample=True)
        scale = float(seed.abs().max())
        for module in df["module"].unique():
            b = _col(df, module, "bias_absorbed", n)
            d = _col(df, module, "dropped", n)
            assert float(b.abs().max()) <= 1e-12 * scale, (label, module, "bias")
            assert float(d.abs().max()) <= 1e-9 * scale, (label, module, "dropped", d.tolist())
    nr.compare(exp.input_relevance, exp.positive.input_relevance - exp.negative.input_relevance, 1e-12,
               "net = R+ - R-")


def test_contrastive_t_zero_drops_both_maps():
    """A unit with t_j = 0 (both sides present) passes nothing in either map; the books show it
    as dropped (y = 0 -> bbox seed R+ = 0, R- = 100)."""
    lin = nn.Linear(2, 2).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, -1.0]]))
        lin.bias.copy_(torch.tensor([1.0, -0.5]))
    model = nn.Sequential(lin).eval()
    x = torch.tensor([[2.0, 3.0]], dtype=DTYPE)  # unit 0: t = 2 - 3 + 1 = 0; unit 1: t = 0.5
    exp = _bt(model).explain(x, mode="contrastive", task="bbox-regression")
    (Rp, Rn), _ = nr.seed("bbox-regression", model(x).detach(), mode="contrastive")
    book = nr.linear_rule(x, lin.weight, lin.bias, (Rp, Rn), "contrastive")
    nr.compare_rel(nr.engine_input(exp, "contrastive"), book.relevance, "contrastive", "t=0 unit")
    # unit 1 (y = 0.5, tie 50/50) passes everything; unit 0 drops R- = 100
    nr.compare(exp.negative.seed_relevance.double() - exp.negative.input_total().double(),
               torch.tensor([100.0], dtype=torch.float64), RTOL, "t=0 R- lost")
    nr.compare(exp.positive.seed_relevance.double() - exp.positive.input_total().double(),
               torch.tensor([0.0], dtype=torch.float64), RTOL, "t=0 R+ lost", atol=1e-12)
    df = exp.negative.layer_summary(per_sample=True)
    nr.compare(_col(df, "0", "dropped", 1), torch.tensor([100.0], dtype=torch.float64), RTOL, "t=0 dropped")


@pytest.mark.parametrize("mode,task", [("default", "multiclass-classification"), ("default", "regression"),
                                       ("signed", "multiclass-classification"), ("contrastive", "bbox-regression")])
def test_summary_abs_relevance_and_share(mode, task):
    """abs_relevance_in = Σ|relevance at the module's output| and share = that / |seed|, also
    when the maps carry both signs (signed mode, a regression seed of mixed signs)."""
    m = make_chain()
    x, target = _inputs()
    if task != "multiclass-classification":
        m = nn.Sequential(*list(m)[:-1]).eval()  # end in the Linear: raw outputs of both signs
        target = None
    exp = _bt(m).explain(x, mode=mode, task=task, target=target)
    subs = [exp.positive, exp.negative] if mode == "contrastive" else [exp]
    n = x.shape[0]
    for sub in subs:
        df = sub.layer_summary(per_sample=True)
        seed_abs = sub.seed_relevance.double().abs()
        for name, rel in sub.layer_relevance.items():
            a = rel.double().reshape(n, -1).abs().sum(1)
            nr.compare(_col(df, name, "abs_relevance_in", n), a, RTOL, f"{mode} {task} {name} abs", atol=1e-12)
            nr.compare(_col(df, name, "share", n), a / seed_abs, RTOL, f"{mode} {task} {name} share", atol=1e-12)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_resnet_block_books_and_branch_share(mode):
    """The residual block: seed = input + bias-absorbed (default; contrastive: both totals kept),
    and branch_share of the block = relevance entering its add through the conv branch over
    all that entered it (naive: the add rule's split ∝ |branch| vs |skip|)."""
    from test_engine_models import naive_blocknet

    net = make_blocknet()
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5, dtype=DTYPE)
    n = x.shape[0]
    target = torch.tensor([0, 1, 2, 3])
    naive, _ = naive_blocknet(net, x, mode, target)
    exp = _bt(net).explain(x, mode=mode, task="multiclass-classification", target=target)
    subs = [(exp.positive, 0), (exp.negative, 1)] if mode == "contrastive" else [(exp, None)]
    for sub, k in subs:
        branch = naive["block.bn2"] if k is None else naive["block.bn2"][k]
        around = naive["block"] if k is None else naive["block"][k]
        b_tot = branch.reshape(n, -1).sum(1)
        a_tot = around.reshape(n, -1).sum(1)
        df = sub.layer_summary(per_sample=True)
        nr.compare(_col(df, "block", "branch_share", n), b_tot / a_tot, RTOL, f"{mode} branch share")
        leaves = [name for name, mod in net.named_modules() if name and not list(mod.children())]
        bias = sum(_col(df, name, "bias_absorbed", n) for name in leaves)
        drop = sum(_col(df, name, "dropped", n) for name in leaves)
        nr.compare(sub.input_total().double() + bias + drop, sub.seed_relevance.double(), RTOL,
                   f"{mode} block seed = input + bias + dropped")
        assert float(drop.abs().max()) <= 1e-9 * float(sub.seed_relevance.abs().max())
        if mode == "default":
            assert float(bias.min()) > 0


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_books_float32_model(mode):
    """The same books on a float32 model (what users run): the totals add up to float32
    round-off (1e-5 of the seed), and the per-layer bias shares match the naive loop."""
    m = make_chain().float()
    x, target = _inputs()
    x = x.float()
    n = x.shape[0]
    exp = _bt(m).explain(x, mode=mode, task="multiclass-classification", target=target)
    names = [str(i) for i in range(10)]
    subs = [exp.positive, exp.negative] if mode == "contrastive" else [exp]
    for sub in subs:
        df = sub.layer_summary(per_sample=True)
        seed = sub.seed_relevance.double()
        scale = float(seed.abs().max())
        bias = sum(_col(df, k, "bias_absorbed", n) for k in names)
        drop = sum(_col(df, k, "dropped", n) for k in names)
        nr.compare(sub.input_total().double() + bias + drop, seed, 1e-5, f"f32 {mode} seed = input + bias + dropped")
        assert float(drop.abs().max()) <= 1e-5 * scale
        if mode == "contrastive":
            nr.compare(sub.input_total().double(), seed, 1e-5, "f32 contrastive total kept")
    if mode == "default":
        _, _, books, _ = naive_chain(m, x, "default", target)
        df = exp.layer_summary(per_sample=True)
        nr.compare(_col(df, "8", "bias_absorbed", n), books["8"].bias, 1e-5, "f32 fc8 bias")
        nr.compare(_col(df, "4", "bias_absorbed", n), books["4"].bias, 1e-5, "f32 conv4 bias")
        nr.compare(_col(df, "0", "bias_absorbed", n) + _col(df, "1", "bias_absorbed", n), books["0"].bias, 1e-5,
                   "f32 conv0+bn bias")
