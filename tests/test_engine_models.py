"""The engine on whole models: seeding (spec 2), batching, determinism, a ResNet block and the
paper-style MLP against naive whole-network loops, an MLflow round trip, unsupported ops and
global torch state."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import naive_rules as nr
from naive_rules import DTYPE, MODES, RTOL


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with nr.one_thread():
        yield


def _bt(model):
    from governance.backtrace import Backtrace

    return Backtrace(model.eval())


# ============================================================================================
# seeding (spec 2)
# ============================================================================================


def _seed_model(task):
    torch.manual_seed(21)
    if task == "binary-classification":
        return nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()), torch.randn(5, 4), "1"
    if task == "multiclass-classification":
        return nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=-1)), torch.randn(6, 4), "1"
    if task == "regression":
        return nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4) * 2, "0"
    if task == "bbox-regression":
        return nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), torch.randn(5, 4), "1"
    if task == "binary-segmentation":
        m = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Sigmoid())
        with torch.no_grad():
            m[0].weight.mul_(3)
        return m, torch.randn(3, 1, 4, 4), "1"
    if task == "generation":
        return nn.Sequential(nn.Linear(4, 6)), torch.randn(3, 5, 4), "0"
    raise ValueError(task)


TASKS = ["binary-classification", "multiclass-classification", "regression", "bbox-regression",
         "binary-segmentation", "generation"]


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("task", TASKS)
def test_seed_at_output(task, mode):
    """The relevance at the output module equals the spec-2 seed; target = argmax by default."""
    model, x, out_name = _seed_model(task)
    model = model.to(DTYPE).eval()
    x = x.to(DTYPE)
    with torch.no_grad():
        y = model(x)
    R, tgt = nr.seed(task, y, mode=mode)
    if task == "regression" and mode == "contrastive":
        assert (y < 0).any() and (y > 0).any()
    if task == "binary-segmentation":
        assert (y > 0.5).any() and (y < 0.5).any()
    exp = _bt(model).explain(x, mode=mode, task=task)
    nr.compare_rel(nr.engine_layer(exp, mode, out_name), R, mode, f"seed {task} {mode}", rtol=1e-12)
    assert torch.equal(exp.output.detach().to(DTYPE), y)
    if tgt is None:
        assert exp.target is None or task == "binary-classification"
    else:
        assert exp.target.tolist() == tgt
    if mode == "contrastive":
        for sub, r in ((exp.positive, R[0]), (exp.negative, R[1])):
            nr.compare(sub.seed_relevance, r.reshape(r.shape[0], -1).sum(1), 1e-12, f"seed total {task}")
    else:
        nr.compare(exp.seed_relevance, R.reshape(R.shape[0], -1).sum(1), 1e-12, f"seed total {task}")


def test_seed_options():
    """Explicit target, multiplier, seed="unit", segmentation threshold."""
    model, x, _ = _seed_model("multiclass-classification")
    model = model.to(DTYPE).eval()
    x = x.to(DTYPE)
    with torch.no_grad():
        y = model(x)
    bt = _bt(model)
    target = torch.tensor([4, 0, 1, 2, 3, 4])
    exp = bt.explain(x, mode="default", task="multiclass-classification", target=target, multiplier=7.0)
    R, _ = nr.seed("multiclass-classification", y, target=target, multiplier=7.0)
    nr.compare(exp.layer_relevance["1"], R, 1e-12, "explicit target, multiplier 7")
    exp = bt.explain(x, mode="default", task="multiclass-classification", target=2)
    R, _ = nr.seed("multiclass-classification", y, target=[2] * 6)
    nr.compare(exp.layer_relevance["1"], R, 1e-12, "int target")
    exp = bt.explain(x, mode="default", task="multiclass-classification", seed="unit")
    R, tgt = nr.seed("multiclass-classification", y, kind="unit")
    nr.compare(exp.layer_relevance["1"], R, 1e-12, "unit seed")
    assert exp.target.tolist() == tgt
    assert torch.all(exp.seed_relevance == 100.0)
    # segmentation with another threshold
    model, x, _ = _seed_model("binary-segmentation")
    model = model.to(DTYPE).eval()
    x = x.to(DTYPE)
    with torch.no_grad():
        y = model(x)
    for mode in ("default", "contrastive"):
        exp = _bt(model).explain(x, mode=mode, task="binary-segmentation", threshold=0.3)
        R, _ = nr.seed("binary-segmentation", y, mode=mode, threshold=0.3)
        nr.compare_rel(nr.engine_layer(exp, mode, "1"), R, mode, "segmentation threshold 0.3", rtol=1e-12)


# ============================================================================================
# the paper-style MLP (78 -> 39 -> 19 -> 1, ReLU, sigmoid) against a naive whole-network loop
# ============================================================================================


def make_mlp(seed=0, dtype=DTYPE):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(78, 39), nn.ReLU(), nn.Linear(39, 19), nn.ReLU(), nn.Linear(19, 1),
                      nn.Sigmoid())
    with torch.no_grad():
        m[0].weight.mul_(2.0)
        m[2].weight.mul_(2.0)
        m[4].weight.mul_(30.0)  # some samples saturate the sigmoid on each side
    return m.to(dtype).eval()


def naive_mlp(m, x, mode):
    """Whole-network naive walk: seed 100·p (binary classification), then each Linear with the
    saturation of the activation it feeds. Returns {name: relevance at that module's output}."""
    with torch.no_grad():
        h1 = m[1](m[0](x))
        h2 = m[3](m[2](h1))
        p = m(x)
    R, _ = nr.seed("binary-classification", p, mode=mode)
    out = {"5": R, "4": R}
    R2 = nr.linear_rule(h2, m[4].weight, m[4].bias, R, mode, "sigmoid").relevance
    out["3"] = out["2"] = R2
    R1 = nr.linear_rule(h1, m[2].weight, m[2].bias, R2, mode, "relu").relevance
    out["1"] = out["0"] = R1
    out["input"] = nr.linear_rule(x, m[0].weight, m[0].bias, R1, mode, "relu").relevance
    return out


@pytest.mark.parametrize("mode", MODES)
def test_mlp_end_to_end(mode):
    m = make_mlp()
    torch.manual_seed(1)
    x = torch.randn(6, 78, dtype=DTYPE)
    with torch.no_grad():
        t3 = m[4](m[3](m[2](m[1](m[0](x)))))
    assert (t3 < -4).any() and (t3 > 4).any() and ((t3.abs() - 4).abs().min() > 1e-3)
    naive = naive_mlp(m, x, mode)
    exp = _bt(m).explain(x, mode=mode, task="binary-classification")
    nr.compare_rel(nr.engine_input(exp, mode), naive["input"], mode, f"mlp input {mode}")
    for name in ("0", "1", "2", "3", "4", "5"):
        nr.compare_rel(nr.engine_layer(exp, mode, name), naive[name], mode, f"mlp layer {name} {mode}")


# ============================================================================================
# a ResNet block (conv-BN-ReLU-conv-BN + skip, ReLU) against a naive whole-network loop
# ============================================================================================


class Block(nn.Module):
    def __init__(self, C=3):
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(C)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class BlockNet(nn.Module):
    """Block -> global average pool -> Linear(3, 4) -> softmax (multiclass)."""

    def __init__(self):
        super().__init__()
        self.block = Block(3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 4)
        self.soft = nn.Softmax(dim=-1)

    def forward(self, x):
        return self.soft(self.fc(self.flat(self.pool(self.block(x)))))


def make_blocknet(seed=0, dtype=DTYPE):
    torch.manual_seed(seed)
    net = BlockNet()
    g = torch.Generator().manual_seed(seed)
    for bn in (net.block.bn1, net.block.bn2):
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(3, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(3, generator=g))
            bn.bias.copy_(torch.randn(3, generator=g) * 0.5)
    with torch.no_grad():
        net.fc.weight.mul_(4.0)
    return net.to(dtype).eval()


def naive_blocknet(net, x, mode, target=None):
    b = net.block
    with torch.no_grad():
        t1 = b.bn1(b.conv1(x))
        h1 = b.relu(t1)
        t2 = b.bn2(b.conv2(h1))
        a = b.relu2(t2 + x)
        pooled = net.flat(net.pool(a))
        y = net(x)
    out = {}
    R, tgt = nr.seed("multiclass-classification", y, mode=mode, target=target)
    out["soft"] = out["fc"] = R
    Rp = nr.linear_rule(pooled, net.fc.weight, net.fc.bias, R, mode, "softmax").relevance
    out["flat"] = Rp
    Rp = nr._each_map(Rp, mode, lambda r: r.reshape(x.shape[0], 3, 1, 1))
    out["pool"] = Rp
    Ra = nr.adaptive_avgpool_rule(a, Rp, mode, 1)
    out["block"] = out["block.relu2"] = Ra
    (R_branch, R_skip), _ = nr.add_rule([t2, x], Ra, mode)
    out["block.bn2"] = R_branch
    W2, b2 = nr.fold_bn(b.conv2.weight, b.conv2.bias, b.bn2)
    Rh1 = nr.conv_rule(h1, W2, b2, R_branch, mode, "none", padding=1).relevance
    out["block.relu"] = out["block.bn1"] = Rh1
    W1, b1 = nr.fold_bn(b.conv1.weight, b.conv1.bias, b.bn1)
    Rx = nr.conv_rule(x, W1, b1, Rh1, mode, "relu", padding=1).relevance
    if mode == "contrastive":
        out["input"] = (Rx[0] + R_skip[0], Rx[1] + R_skip[1])
    else:
        out["input"] = Rx + R_skip
    out["t1"] = t1
    out["pre_soft"] = net.fc(pooled)
    return out, tgt


@pytest.mark.parametrize("mode", MODES)
def test_resnet_block_end_to_end(mode):
    net = make_blocknet()
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5, dtype=DTYPE)
    target = torch.tensor([0, 1, 2, 3])
    naive, tgt = naive_blocknet(net, x, mode, target)
    t1 = naive["t1"]
    assert (t1 < 0).any() and (t1 > 0).any() and t1.abs().min() > 1e-4
    pre = naive["pre_soft"]
    assert ((pre + 1).abs().min() > 1e-3) and ((pre - 2).abs().min() > 1e-3)
    exp = _bt(net).explain(x, mode=mode, task="multiclass-classification", target=target)
    nr.compare_rel(nr.engine_input(exp, mode), naive["input"], mode, f"resnet block input {mode}")
    for name in ("fc", "flat", "pool", "block", "block.relu2", "block.bn2", "block.relu"):
        nr.compare_rel(nr.engine_layer(exp, mode, name), naive[name], mode, f"resnet layer {name} {mode}")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(3, 2)
        self.fb = nn.Linear(4, 2)
        self.act = nn.Tanh()

    def forward(self, a, b):
        return self.act(self.fa(a) + self.fb(b))


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
@pytest.mark.parametrize("mode", MODES)
def test_two_input_model(mode, as_dict):
    """Several inputs: input_relevance is a dict by argument name. tanh(fa(a) + fb(b)): the add
    splits ∝ |term|; each Linear has no activation of its own (it feeds the add)."""
    torch.manual_seed(22)
    model = TwoInputs().to(DTYPE).eval()
    a = torch.randn(3, 3, dtype=DTYPE)
    b = torch.randn(3, 4, dtype=DTYPE)
    with torch.no_grad():
        ta, tb = model.fa(a), model.fb(b)
        y = model(a, b)
    task = "bbox-regression" if mode == "contrastive" else "regression"
    R, _ = nr.seed(task, y, mode=mode)
    (Ra, Rb), _ = nr.add_rule([ta, tb], R, mode)
    ea = nr.linear_rule(a, model.fa.weight, model.fa.bias, Ra, mode).relevance
    eb = nr.linear_rule(b, model.fb.weight, model.fb.bias, Rb, mode).relevance
    exp = _bt(model).explain({"a": a, "b": b} if as_dict else (a, b), mode=mode, task=task)
    got = exp.input_relevance
    assert isinstance(got, dict) and set(got) == {"a", "b"}, type(got)
    if mode == "contrastive":
        for key, e in (("a", ea), ("b", eb)):
            nr.compare(exp.positive.input_relevance[key], e[0], RTOL, f"two inputs {key} R+")
            nr.compare(exp.negative.input_relevance[key], e[1], RTOL, f"two inputs {key} R-")
    else:
        nr.compare(got["a"], ea, RTOL, "two inputs a")
        nr.compare(got["b"], eb, RTOL, "two inputs b")


# ============================================================================================
# float32 models, batching, determinism
# ============================================================================================


@pytest.mark.parametrize("mode", MODES)
def test_float32_models_match_naive(mode):
    """The same whole-network comparisons on float32 models (what users run), to float32
    round-off (1e-5 relative to the largest relevance)."""
    m = make_mlp(dtype=torch.float32)
    torch.manual_seed(1)
    x = torch.randn(6, 78)
    exp = _bt(m).explain(x, mode=mode, task="binary-classification")
    nr.compare_rel(nr.engine_input(exp, mode), naive_mlp(m, x, mode)["input"], mode, f"mlp f32 {mode}", rtol=1e-5)
    net = make_blocknet(dtype=torch.float32)
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5)
    target = torch.tensor([0, 1, 2, 3])
    naive, _ = naive_blocknet(net, x, mode, target)
    exp = _bt(net).explain(x, mode=mode, task="multiclass-classification", target=target)
    nr.compare_rel(nr.engine_input(exp, mode), naive["input"], mode, f"resnet f32 {mode}", rtol=1e-5)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.block = Block(4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.pool(self.act(self.bn(self.conv(x))))
        return torch.softmax(self.fc(self.gap(self.block(h)).flatten(1)), dim=-1)


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_single_calls(mode):
    """A batch of N gives the N single-sample results. float64, so that the model's own
    forward (whose float32 reduction order depends on the batch size) does not blur it."""
    torch.manual_seed(3)
    for model, x in ((SmallCNN().to(DTYPE).eval(), torch.randn(5, 2, 6, 6, dtype=DTYPE)),
                     (make_mlp(), torch.randn(5, 78, dtype=DTYPE))):
        task = "multiclass-classification" if isinstance(model, SmallCNN) else "binary-classification"
        bt = _bt(model)
        full = bt.explain(x, mode=mode, task=task)
        got = nr.engine_input(full, mode)
        for i in range(x.shape[0]):
            one = bt.explain(x[i:i + 1], mode=mode, task=task)
            ref = nr.engine_input(one, mode)
            if mode == "contrastive":
                for a, b in zip(got, ref):
                    nr.compare(a[i:i + 1], b, 1e-10, f"batch vs single {mode} sample {i}")
            else:
                nr.compare(got[i:i + 1], ref, 1e-10, f"batch vs single {mode} sample {i}")
            nr.compare(full.seed_relevance[i:i + 1], one.seed_relevance, 1e-10, "seed")
            for name, v in one.layer_relevance.items():
                nr.compare(full.layer_relevance[name][i:i + 1], v, 1e-10, f"layer {name} sample {i}")


@pytest.mark.parametrize("mode", MODES)
def test_determinism(mode):
    torch.manual_seed(4)
    model = SmallCNN().eval()
    x = torch.randn(4, 2, 6, 6)
    a = _bt(model).explain(x, mode=mode, task="multiclass-classification")
    b = _bt(model).explain(x, mode=mode, task="multiclass-classification")
    c = _bt(model).explain(x.clone(), mode=mode, task="multiclass-classification")
    for other in (b, c):
        assert torch.equal(a.input_relevance, other.input_relevance)
        for k, v in a.layer_relevance.items():
            assert torch.equal(v, other.layer_relevance[k]), k
        if mode == "contrastive":
            assert torch.equal(a.positive.input_relevance, other.positive.input_relevance)
            assert torch.equal(a.negative.input_relevance, other.negative.input_relevance)
        assert a.layer_summary(per_sample=True).equals(other.layer_summary(per_sample=True))


# ============================================================================================
# MLflow round trip (pt2 GraphModule from mlflow.pytorch.load_model)
# ============================================================================================


@pytest.mark.slow
def test_mlflow_logged_model_explains_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.pytorch

    torch.manual_seed(5)
    model = SmallCNN().eval()
    x = torch.randn(3, 2, 6, 6)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp_id = mlflow.create_experiment("bt", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp_id):
            info = mlflow.pytorch.log_model(model, name="m", input_example=x.numpy())
        loaded = mlflow.pytorch.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    assert torch.equal(loaded(x), model(x))
    for mode in MODES:
        a = _bt(model).explain(x, mode=mode, task="multiclass-classification")
        b = nr.explain(loaded, x, mode, task="multiclass-classification")
        nr.compare(b.input_relevance, a.input_relevance, 0.0, f"mlflow round trip {mode}", atol=1e-6)
        # the layer view (what the layer ranking is built from) survives the round trip too
        assert sorted(b.layer_relevance) == sorted(a.layer_relevance)
        for k, v in a.layer_relevance.items():
            nr.compare(b.layer_relevance[k], v, 0.0, f"mlflow round trip layer {k}", atol=1e-6)
        sa, sb = a.layer_summary(), b.layer_summary()
        assert list(sa["module"]) == list(sb["module"])
        for col in ("relevance_in", "relevance_out", "bias_absorbed", "dropped"):
            assert (sa[col] - sb[col]).abs().max() <= 1e-6, col
        if mode == "contrastive":
            nr.compare(b.positive.input_relevance, a.positive.input_relevance, 0.0, "R+", atol=1e-6)
            nr.compare(b.negative.input_relevance, a.negative.input_relevance, 0.0, "R-", atol=1e-6)


# ============================================================================================
# unsupported ops, global state
# ============================================================================================


class Inner(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


class Outer(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Inner(op))

    def forward(self, x):
        return self.block(self.fc(x)).sum(-1, keepdim=True)


@pytest.mark.parametrize("op,aten", [
    (lambda x: torch.cumsum(x, dim=1), "cumsum"),
    (lambda x: torch.fft.fft(x).real, "fft"),
    (lambda x: torch.sort(x, dim=1).values, "sort"),
], ids=["cumsum", "fft", "sort"])
def test_unsupported_op_raises(op, aten):
    from governance.backtrace import UnsupportedOperationError

    torch.manual_seed(6)
    model = Outer(op).eval()
    with pytest.raises(UnsupportedOperationError) as ei:
        _bt(model).explain(torch.randn(2, 4), mode="default", task="regression")
    msg = str(ei.value)
    assert "aten." in msg and aten in msg, msg
    assert "block.1" in msg, msg


def test_global_torch_state_unchanged():
    torch.manual_seed(7)
    model = SmallCNN().eval()
    x = torch.randn(2, 2, 6, 6)
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    dtype = torch.get_default_dtype()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.set_num_threads(2)
        _bt(model).explain(x, mode="default", task="multiclass-classification")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(not det)
        _bt(model).explain(x, mode="contrastive", task="multiclass-classification")
        assert torch.are_deterministic_algorithms_enabled() is (not det)
        torch.use_deterministic_algorithms(det)
        for grad in (True, False):
            for mode in MODES:
                with torch.set_grad_enabled(grad):
                    _bt(model).explain(x, mode=mode, task="multiclass-classification")
                    assert torch.is_grad_enabled() is grad
                assert torch.get_num_threads() == threads
                assert torch.are_deterministic_algorithms_enabled() is det
                assert torch.get_default_dtype() is dtype
        from governance.backtrace import Backtrace

        model.train()
        Backtrace(model).explain(x, mode="default", task="multiclass-classification")
        assert model.training  # the caller's train/eval flag is left alone
        model.eval()
        for k, v in model.state_dict().items():
            assert torch.equal(v, params[k]), k
        assert all(p.requires_grad for p in model.parameters())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def test_register_rule_makes_an_unsupported_op_explainable():
    """The documented way out of UnsupportedOperationError: register a rule for the op."""
    from governance.backtrace import register_rule
    from governance.backtrace import registry

    torch.manual_seed(6)
    model = Outer(lambda x: torch.cumsum(x, dim=1)).to(DTYPE).eval()
    x = torch.randn(2, 4, dtype=DTYPE)
    before = dict(registry._RULES)
    try:
        @register_rule(torch.ops.aten.cumsum)
        def cumsum_all_to_input(ctx, node, R):  # a deliberately simple rule: reverse cumsum
            return {node.args[0]: R.flip(1).cumsum(1).flip(1)}

        exp = _bt(model).explain(x, mode="default", task="regression")
    finally:
        registry._RULES.clear()
        registry._RULES.update(before)
    with torch.no_grad():
        h = model.block[0](model.fc(x))
        c = torch.cumsum(h, 1)
    R, _ = nr.seed("regression", model(x).detach())
    (rc,) = [nr.reduce_rule(c, R, "default", (1,), keepdim=True)]
    rh = rc.flip(1).cumsum(1).flip(1)
    expected = nr.linear_rule(x, model.fc.weight, model.fc.bias, rh, "default", "relu").relevance
    nr.compare(exp.input_relevance, expected, RTOL, "registered cumsum rule")


class _TokenTanh(nn.Module):
    """Linear + tanh over (N, T, d) tokens of mixed sign (saturating units, rows recomputed
    from one-signed sums), then a per-sample head: the affine rules' every route over rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 16)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            self.lin.weight.mul_(3.0)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


def _tokens(n=7, t=5, d=24):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, t, d, generator=g, dtype=DTYPE)
    x[:, 0] = 0.0
    x[:, 0, 3] = 1.5  # one contribution per unit in token 0: those rows are recomputed
    return x


def _books(exp):
    return {(name, f): getattr(b, f) for name, b in exp.books.items()
            for f in ("relevance_in", "relevance_out", "bias_absorbed", "saturation_rerouted")}


@pytest.mark.parametrize("block_bytes", [1, 2500])
@pytest.mark.parametrize("mode", MODES)
def test_row_blocks_equal_the_whole_batch(mode, block_bytes, monkeypatch):
    """Affine ops on big batches run over blocks of samples (``ROW_BLOCK_BYTES``): relevance at
    every input and module, and the books per sample, are those of the whole batch at once
    (float64: only the convolution's own batch-size rounding may differ), with blocks of one
    sample and uneven blocks alike."""
    from governance.backtrace.rules import affine

    torch.manual_seed(3)
    cases = ((SmallCNN().to(DTYPE).eval(), torch.randn(7, 2, 6, 6, dtype=DTYPE), "multiclass-classification"),
             (make_mlp(), torch.randn(7, 78, dtype=DTYPE), "binary-classification"),
             (_TokenTanh().to(DTYPE).eval(), _tokens(), "regression"))
    steps: list[tuple[int, int]] = []
    orig = affine._by_row_blocks

    def spy(ctx, node, u, R, step):
        steps.append((step, ctx.value(u.x_node).shape[0]))
        return orig(ctx, node, u, R, step)

    for model, x, task in cases:
        whole = _bt(model).explain(x, mode=mode, task=task)
        with monkeypatch.context() as mp:
            mp.setattr(affine, "ROW_BLOCK_BYTES", block_bytes)
            mp.setattr(affine, "_by_row_blocks", spy)
            steps.clear()
            blocked = _bt(model).explain(x, mode=mode, task=task)
        assert steps and all(s < n for s, n in steps), steps
        if block_bytes == 1:
            assert all(s == 1 for s, _ in steps)
        else:
            assert any(n % s for s, n in steps), steps  # an uneven last block somewhere
        for got, ref in zip(_as_tuple(nr.engine_input(blocked, mode)), _as_tuple(nr.engine_input(whole, mode))):
            nr.compare(got, ref, 1e-10, f"{type(model).__name__} {mode} input")
        for name in whole.layer_relevance:
            for got, ref in zip(_as_tuple(nr.engine_layer(blocked, mode, name)),
                                _as_tuple(nr.engine_layer(whole, mode, name))):
                nr.compare(got, ref, 1e-10, f"{type(model).__name__} {mode} layer {name}")
        for part in ((blocked.positive, whole.positive), (blocked.negative, whole.negative)) \
                if mode == "contrastive" else ((blocked, whole),):
            got, ref = _books(part[0]), _books(part[1])
            assert got.keys() == ref.keys()
            for k in ref:
                nr.compare(got[k], ref[k], 1e-10, f"{type(model).__name__} {mode} books {k}", atol=1e-12)


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)
