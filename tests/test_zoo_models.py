"""The seed's model zoo explained end to end (issue 3, recurrent / MoE / vision half).

Models from ``zoo_models.py``. Properties, each able to fail:

* the LSTM rule equals a naive per-time-step, per-unit loop written from spec section 7;
* padded tokens receive exactly 0 (text models, every mode);
* bias-free models conserve relevance in default mode; every model's books add up
  (seed = input + bias-absorbed, nothing silently dropped);
* batched equals per-sample; contrastive mode runs on every model;
* the explanation of the predicted output is finite and not all zero;
* MoE: the experts' relevance per token sums to the block's output relevance, unrouted
  experts get exactly 0, and the export-time dense dispatch reproduces the model's output.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import zoo_models as zm
from governance.backtrace import Backtrace, UnsupportedOperationError

warnings.filterwarnings("ignore", message=".*were assigned during export.*")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inp(e):
    r = e.input_relevance
    return r["input_ids"] if isinstance(r, dict) else r


def _root(e):
    s = e.layer_summary(per_sample=True)
    return s[s.module == ""]


# --------------------------------------------------------------------------------------------
# the zoo
# --------------------------------------------------------------------------------------------

def _moe_inputs(n=2, t=10):
    ids = zm.token_batch(n, t, 128, pad_last=4, left=True, seed=3)
    return {"input_ids": ids, "attention_mask": (ids != zm.PAD).long()}


ZOO = {
    "textcnn": (lambda: zm.seeded(zm.TextCNN), lambda: zm.token_batch(2, 16, 200), "multiclass-classification"),
    "lstm_lm": (lambda: zm.seeded(zm.LSTMNextWord), lambda: zm.token_batch(2, 12, 120, left=True),
                "multiclass-classification"),
    "resnet34": (lambda: zm.seeded(zm.ResNet34), lambda: zm.images(2, size=16), "multiclass-classification"),
    # bias-free U-Net and box regressor: also the conservation cases below
    "unet": (lambda: zm.seeded(zm.UNet, bias=False), lambda: zm.blob_images(2, size=16), "binary-segmentation"),
    "bbox": (lambda: zm.seeded(zm.BoxRegressor, bias=False), lambda: zm.images(2), "bbox-regression"),
    "moe_lm": (lambda: zm.moe_causal_lm(), _moe_inputs, "generation"),
}

_CACHE: dict = {}


def zoo(name):
    if name not in _CACHE:
        build, data, task = ZOO[name]
        model = build()
        _CACHE[name] = (model, Backtrace(model), data(), task)
    return _CACHE[name]


def _slice(x, i):
    if isinstance(x, dict):
        return {k: v[i:i + 1] for k, v in x.items()}
    return x[i:i + 1]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_explains_all_modes(name):
    """Predicted output explained in every mode: finite, non-trivial; books add up in default
    mode; contrastive gives both maps."""
    _, bt, x, task = zoo(name)
    e = bt.explain(x, task=task)
    r = _inp(e)
    assert torch.isfinite(r).all()
    for i in range(r.shape[0]):
        assert (r[i] != 0).any(), f"sample {i}: all-zero relevance"
    root = _root(e)
    seed = e.seed_relevance.double()
    total = torch.tensor(root.relevance_out.values) + torch.tensor(root.bias_absorbed.values)
    assert torch.allclose(total, seed, rtol=1e-4, atol=1e-4 * float(seed.abs().max())), (total, seed)
    assert torch.allclose(e.input_total().double(), torch.tensor(root.relevance_out.values), rtol=1e-4, atol=1e-3)
    c = bt.explain(x, task=task, mode="contrastive")
    for part in (c.positive, c.negative):
        assert torch.isfinite(_inp(part)).all()
    assert (_inp(c.positive) != 0).any() and (_inp(c.negative) != 0).any()
    assert torch.equal(_inp(c), _inp(c.positive) - _inp(c.negative))
    if name in ("textcnn", "lstm_lm", "bbox"):  # signed mode (spec 3b) on a few, to keep the run short
        s = bt.explain(x, task=task, mode="signed")
        assert torch.isfinite(_inp(s)).all() and (_inp(s) != 0).any()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_batched_equals_per_sample(name):
    _, bt, x, task = zoo(name)
    for mode in ("default", "contrastive") if name == "lstm_lm" else ("default",):
        full = _inp(bt.explain(x, task=task, mode=mode))
        for i in range(full.shape[0]):
            one = _inp(bt.explain(_slice(x, i), task=task, mode=mode))
            torch.testing.assert_close(full[i:i + 1], one, rtol=1e-4, atol=1e-5 * float(full.abs().max()))


@pytest.mark.parametrize("name", ["textcnn", "lstm_lm", "moe_lm"])
def test_padded_tokens_get_exactly_zero(name):
    _, bt, x, task = zoo(name)
    ids = x["input_ids"] if isinstance(x, dict) else x
    pad = ids == zm.PAD
    assert pad.any() and (~pad).any()
    for mode in ("default", "contrastive", "signed"):
        e = bt.explain(x, task=task, mode=mode)
        maps = [e.positive, e.negative] if mode == "contrastive" else [e]
        for m in maps:
            r = _inp(m)
            assert torch.all(r[pad] == 0), (mode, r[pad])
            assert (r[~pad] != 0).any()


def test_segmentation_and_bbox_seeds_follow_spec_2():
    model, bt, x, _ = zoo("unet")
    p = model(x)
    on = p > 0.5
    assert on.any() and (~on).any(), "the test U-Net should predict both classes"
    e = bt.explain(x, task="binary-segmentation")
    torch.testing.assert_close(e.seed_relevance, (100 * p * on).flatten(1).sum(1))
    c = bt.explain(x, task="binary-segmentation", mode="contrastive")
    torch.testing.assert_close(c.negative.seed_relevance, (100 * (1 - p) * on).flatten(1).sum(1))
    e2 = bt.explain(x, task="binary-segmentation", threshold=0.9)
    assert float(e2.seed_relevance.abs().sum()) < float(e.seed_relevance.abs().sum())
    model, bt, x, _ = zoo("bbox")
    y = model(x)
    e = bt.explain(x, task="bbox-regression")
    torch.testing.assert_close(e.seed_relevance, 100 * y.sum(1))
    c = bt.explain(x, task="bbox-regression", mode="contrastive")
    torch.testing.assert_close(c.positive.seed_relevance, 100 * y.sum(1))
    torch.testing.assert_close(c.negative.seed_relevance, 100 * (1 - y).sum(1))


# --------------------------------------------------------------------------------------------
# conservation on bias-free models
# --------------------------------------------------------------------------------------------

BIAS_FREE = {
    "textcnn": (lambda: zm.seeded(zm.TextCNN, bias=False), lambda: zm.token_batch(2, 16, 200), "multiclass-classification"),
    "lstm_lm": (lambda: zm.seeded(zm.LSTMNextWord, bias=False), lambda: zm.token_batch(2, 12, 120, left=True),
                "multiclass-classification"),
    "moe_block": (lambda: zm.moe_block(), lambda: torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)),
                  "regression"),
}


@pytest.mark.parametrize("name", list(BIAS_FREE) + ["unet", "bbox", "moe_lm"])
def test_bias_free_models_conserve(name):
    """No bias anywhere: input relevance = seed in default mode (saturation only reroutes), and
    R+ / R- are each conserved in contrastive mode."""
    if name in BIAS_FREE:
        build, data, task = BIAS_FREE[name]
        model, x = build(), data()
        bt = Backtrace(model)
    else:
        model, bt, x, task = zoo(name)
    e = bt.explain(x, task=task)
    seed = e.seed_relevance.double()
    assert float(seed.abs().min()) > 0
    root = _root(e)
    assert float(root.bias_absorbed.abs().max()) == 0.0
    err = ((e.input_total().double() - seed).abs() / seed.abs()).max()
    assert err < 1e-4, float(err)
    c = bt.explain(x, task=task, mode="contrastive")
    for part in (c.positive, c.negative):
        s = part.seed_relevance.double()
        assert torch.allclose(part.input_total().double(), s, rtol=1e-4, atol=1e-4 * float(s.abs().max()) + 1e-6)


# --------------------------------------------------------------------------------------------
# mixture of experts
# --------------------------------------------------------------------------------------------

def _router_topk(block, h):
    _, _, idx = block.gate(h.reshape(-1, h.shape[-1]))
    return idx


@pytest.mark.parametrize("mode", ["default", "contrastive", "signed"])
def test_moe_block_expert_relevance(mode):
    blk = zm.moe_block()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    bt = Backtrace(blk)
    e = bt.explain(x, task="regression", mode=mode)
    er = e.expert_relevance[""]
    assert er.shape == (3, 5, 4)
    out_rel = e.layer_relevance["experts"].reshape(3, 5, -1).sum(-1)
    torch.testing.assert_close(er.sum(-1), out_rel, rtol=1e-5, atol=1e-4)
    routed = torch.zeros(15, 4, dtype=torch.bool)
    routed.scatter_(1, _router_topk(blk, x), True)
    assert torch.all(er.reshape(15, 4)[~routed] == 0)
    assert (er.reshape(15, 4)[routed] != 0).all()
    torch.testing.assert_close(e.output, blk(x), rtol=1e-5, atol=1e-5)


def test_moe_lm_expert_relevance_per_token():
    model, bt, x, task = zoo("moe_lm")
    e = bt.explain(x, task=task)
    blocks = [f"model.layers.{i}.mlp" for i in range(2)]
    assert sorted(e.expert_relevance) == blocks
    for b in blocks:
        er = e.expert_relevance[b]
        assert er.shape == (2, 10, 4)
        out_rel = e.layer_relevance[b].sum(-1)
        torch.testing.assert_close(er.sum(-1), out_rel, rtol=1e-5, atol=1e-5 * float(out_rel.abs().max()))
        assert int((er != 0).sum(-1).max()) <= 2  # top-2 routing: the others get exactly 0
    # tokens after nothing / masked tokens: padded positions route relevance nowhere
    pad = x["input_ids"] == zm.PAD
    for b in blocks:
        assert torch.all(e.expert_relevance[b][pad] == 0)
    # the dense dispatch used for export reproduces the model's logits
    with torch.no_grad():
        ref = model(**x).logits
    torch.testing.assert_close(e.output, ref, rtol=1e-4, atol=1e-4)
    c = bt.explain(x, task=task, mode="contrastive")
    for b in blocks:
        torch.testing.assert_close(c.expert_relevance[b],
                                   c.positive.expert_relevance[b] - c.negative.expert_relevance[b])
    # the model itself is left as it was (the export adapter restores the experts' forward)
    assert "forward" not in vars(model.model.layers[0].mlp.experts)


# --------------------------------------------------------------------------------------------
# recurrent layers
# --------------------------------------------------------------------------------------------

def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def naive_lstm_relevance(x, lstm, R_out, signed=False):
    """Spec section 7 for one sample of a one-layer LSTM, loops over time, units and inputs.

    x: (T, D) list; R_out: (T, H) relevance at every output h_t. Returns (T, D) relevance of x
    and the number of saturated candidate units met."""
    W_ih = lstm.weight_ih_l0.tolist()
    W_hh = lstm.weight_hh_l0.tolist()
    b_ih = lstm.bias_ih_l0.tolist()
    b_hh = lstm.bias_hh_l0.tolist()
    T, D, H = len(x), len(x[0]), len(W_hh[0])
    h, c = [0.0] * H, [0.0] * H
    steps = []
    for t in range(T):
        pre = [sum(W_ih[j][i] * x[t][i] for i in range(D)) + b_ih[j]
               + sum(W_hh[j][k] * h[k] for k in range(H)) + b_hh[j] for j in range(4 * H)]
        ig = [_sig(pre[j]) for j in range(H)]
        fg = [_sig(pre[H + j]) for j in range(H)]
        g = [math.tanh(pre[2 * H + j]) for j in range(H)]
        og = [_sig(pre[3 * H + j]) for j in range(H)]
        fc = [fg[j] * c[j] for j in range(H)]
        igg = [ig[j] * g[j] for j in range(H)]
        steps.append({"h_prev": list(h), "fc": fc, "ig": igg})
        c = [fc[j] + igg[j] for j in range(H)]
        h = [og[j] * math.tanh(c[j]) for j in range(H)]
    Rx = [[0.0] * D for _ in range(T)]
    Rh_carry, Rc_carry = [0.0] * H, [0.0] * H
    saturated = 0
    for t in reversed(range(T)):
        st = steps[t]
        Rc = [Rc_carry[j] + R_out[t][j] + Rh_carry[j] for j in range(H)]  # h_t = o*tanh(c_t): all to c_t
        Rg = [0.0] * H
        for j in range(H):  # c_t = f*c_{t-1} + i*g: add rule on |terms|
            a, b = abs(st["fc"][j]), abs(st["ig"][j])
            Rc_carry[j] = Rc[j] * a / (a + b) if a + b else 0.0
            Rg[j] = Rc[j] * b / (a + b) if a + b else 0.0
        Rh_carry = [0.0] * H
        for j in range(H):  # g: unified rule with tanh saturation over [x_t, h_{t-1}]
            row = 2 * H + j
            z = [W_ih[row][i] * x[t][i] for i in range(D)] + [W_hh[row][k] * st["h_prev"][k] for k in range(H)]
            bias = b_ih[row] + b_hh[row]
            P = sum(v for v in z if v > 0)
            N = sum(-v for v in z if v < 0)
            tj = P - N + bias
            keep_p, keep_n = not tj < -2.0, not tj > 2.0
            saturated += (not keep_p) or (not keep_n)
            den = (P if keep_p else 0.0) + (N if keep_n else 0.0) + abs(bias)
            if den == 0:
                continue
            for idx, v in enumerate(z):
                if (v > 0 and keep_p) or (v < 0 and keep_n):
                    share = Rg[j] * (v if signed else abs(v)) / den
                    if idx < D:
                        Rx[t][idx] += share
                    else:
                        Rh_carry[idx - D] += share
    return Rx, saturated


class _LSTMOut(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


@pytest.mark.parametrize("mode", ["default", "signed"])
def test_lstm_rule_matches_naive_loop(mode):
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3, batch_first=True).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(6.0)  # big weights: the candidate saturates on both sides somewhere
    model = _LSTMOut(lstm).eval()
    x = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    e = Backtrace(model).explain(x, task="regression", mode=mode)
    R_out = 100.0 * model(x).detach()
    total_sat = 0
    for n in range(x.shape[0]):
        ref, sat = naive_lstm_relevance(x[n].tolist(), lstm, R_out[n].tolist(), signed=mode == "signed")
        total_sat += sat
        torch.testing.assert_close(e.input_relevance[n], torch.tensor(ref, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-9)
    assert total_sat > 0, "the test should exercise the saturation branch"


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k)],
                         ids=["LSTM", "GRU", "RNN-tanh", "RNN-relu"])
def test_recurrent_multilayer_bidirectional_conserves(cls):
    """Bias-free stacked bidirectional LSTM/GRU over batch-first input (and a time-major one):
    default and contrastive conserve; batched equals per-sample."""

    class Net(nn.Module):
        def __init__(self, batch_first):
            super().__init__()
            self.batch_first = batch_first
            self.rnn = cls(4, 5, num_layers=2, bidirectional=True, bias=False, batch_first=batch_first)
            self.fc = nn.Linear(10, 3, bias=False)

        def forward(self, x):
            if not self.batch_first:
                x = x.transpose(0, 1)
            out, _ = self.rnn(x)
            return self.fc(out[:, -1] if self.batch_first else out[-1])

    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    for batch_first in (True, False) if cls is nn.LSTM else (True,):
        net = zm.seeded(lambda: Net(batch_first))
        bt = Backtrace(net)
        e = bt.explain(x)
        torch.testing.assert_close(e.input_total(), e.seed_relevance, rtol=1e-4, atol=1e-4)
        c = bt.explain(x, mode="contrastive")
        for part in (c.positive, c.negative):
            torch.testing.assert_close(part.input_total(), part.seed_relevance, rtol=1e-4, atol=1e-4)
        one = bt.explain(x[1:2])
        torch.testing.assert_close(e.input_relevance[1:2], one.input_relevance, rtol=1e-4, atol=1e-5)


def test_gru_reads_final_state_and_initial_state():
    """Relevance entering through h_n, and a user-given h0 that depends on the input."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.init = nn.Linear(4, 5, bias=False)
            self.rnn = nn.GRU(4, 5, batch_first=True, bias=False)
            self.fc = nn.Linear(5, 2, bias=False)

        def forward(self, x):
            h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0)
            _, hn = self.rnn(x, h0)
            return self.fc(hn[0])

    net = zm.seeded(Net)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    e = Backtrace(net).explain(x)
    torch.testing.assert_close(e.input_total(), e.seed_relevance, rtol=1e-4, atol=1e-4)
    assert float(e.layer_relevance["init"].abs().sum()) > 0


def test_lstm_with_projections_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, proj_size=3, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    with pytest.raises(UnsupportedOperationError, match="lstm"):
        Backtrace(zm.seeded(Net)).explain(torch.randn(2, 3, 4), task="regression")


def naive_gru_relevance(x, gru, R_out):
    """The GRU reading of spec 7 (see rules/recurrent.py), one sample, loops over time and units:
    h_t = (1-z) n + z h_{t-1} split by |terms| (gates route), n's unit j is affine over
    [x_t, h_{t-1}] with weights [W_in_j, r_j W_hn_j] and bias b_in_j + r_j b_hn_j, tanh saturation."""
    W_ih, W_hh = gru.weight_ih_l0.tolist(), gru.weight_hh_l0.tolist()
    b_ih, b_hh = gru.bias_ih_l0.tolist(), gru.bias_hh_l0.tolist()
    T, D, H = len(x), len(x[0]), len(W_hh[0])
    h = [0.0] * H
    steps = []
    for t in range(T):
        gi = [sum(W_ih[j][i] * x[t][i] for i in range(D)) + b_ih[j] for j in range(3 * H)]
        gh = [sum(W_hh[j][k] * h[k] for k in range(H)) + b_hh[j] for j in range(3 * H)]
        r = [_sig(gi[j] + gh[j]) for j in range(H)]
        z = [_sig(gi[H + j] + gh[H + j]) for j in range(H)]
        n = [math.tanh(gi[2 * H + j] + r[j] * gh[2 * H + j]) for j in range(H)]
        steps.append({"h_prev": list(h), "r": r, "zn": [(1 - z[j]) * n[j] for j in range(H)],
                      "zh": [z[j] * h[j] for j in range(H)]})
        h = [steps[-1]["zn"][j] + steps[-1]["zh"][j] for j in range(H)]
    Rx = [[0.0] * D for _ in range(T)]
    carry = [0.0] * H
    for t in reversed(range(T)):
        st = steps[t]
        Rh = [carry[j] + R_out[t][j] for j in range(H)]
        carry = [0.0] * H
        for j in range(H):
            a, b = abs(st["zn"][j]), abs(st["zh"][j])
            Rn = Rh[j] * a / (a + b) if a + b else 0.0
            carry[j] += Rh[j] * b / (a + b) if a + b else 0.0
            row = 2 * H + j
            rj = st["r"][j]
            z_ = [W_ih[row][i] * x[t][i] for i in range(D)] + [rj * W_hh[row][k] * st["h_prev"][k] for k in range(H)]
            bias = b_ih[row] + rj * b_hh[row]
            P = sum(v for v in z_ if v > 0)
            N = sum(-v for v in z_ if v < 0)
            tj = P - N + bias
            keep_p, keep_n = not tj < -2.0, not tj > 2.0
            den = (P if keep_p else 0.0) + (N if keep_n else 0.0) + abs(bias)
            if den == 0:
                continue
            for idx, v in enumerate(z_):
                if (v > 0 and keep_p) or (v < 0 and keep_n):
                    share = Rn * abs(v) / den
                    if idx < D:
                        Rx[t][idx] += share
                    else:
                        carry[idx - D] += share
    return Rx


def test_gru_rule_matches_naive_loop():
    torch.manual_seed(1)
    gru = nn.GRU(2, 3, batch_first=True).double()
    with torch.no_grad():
        for p in gru.parameters():
            p.mul_(5.0)
    model = _LSTMOut(gru).eval()
    x = torch.randn(2, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    e = Backtrace(model).explain(x, task="regression")
    R_out = 100.0 * model(x).detach()
    for n in range(x.shape[0]):
        ref = naive_gru_relevance(x[n].tolist(), gru, R_out[n].tolist())
        torch.testing.assert_close(e.input_relevance[n], torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "nearest-exact"])
def test_upsampling_conserves(mode):
    """U-Net up-sampling as export gives it (upsample_nearest2d / upsample_bilinear2d /
    _upsample_nearest_exact2d): bias-free, relevance is conserved and batched = per-sample."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.head = nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            kw = {"align_corners": False} if mode == "bilinear" else {}
            y = nn.functional.interpolate(y, scale_factor=2, mode=mode, **kw)
            return torch.sigmoid(self.head(y))

    net = zm.seeded(Net)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    bt = Backtrace(net)
    e = bt.explain(x, task="binary-segmentation")
    torch.testing.assert_close(e.input_total(), e.seed_relevance, rtol=1e-4, atol=1e-4)
    one = bt.explain(x[1:], task="binary-segmentation")
    torch.testing.assert_close(e.input_relevance[1:], one.input_relevance, rtol=1e-5, atol=1e-5)


def test_expert_summary_ranks_experts():
    blk = zm.moe_block()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    e = Backtrace(blk).explain(x, task="regression")
    df = e.expert_summary()
    assert list(df.expert.sort_values()) == [0, 1, 2, 3]
    assert df.abs_relevance.is_monotonic_decreasing
    assert abs(df.share.sum() - 1.0) < 1e-9
    er = e.expert_relevance[""]
    assert abs(df.abs_relevance.sum() - float(er.double().abs().sum(1).sum(1).mean())) < 1e-6
    assert abs(df.tokens.sum() - 5 * 2) < 1e-9  # top-2 routing: 2 experts per token


def test_moe_exported_program_explains_like_the_module():
    """The pt2 path: export inside ``dense_experts`` (as a user logging to MLflow would) and
    explain the ExportedProgram; same relevance and expert table as the module itself."""
    from governance.backtrace.rules.moe import dense_experts

    blk = zm.moe_block()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    with dense_experts(blk):
        ep = torch.export.export(blk, (x,), strict=False)
    assert "forward" not in vars(blk.experts)
    a = Backtrace(ep).explain(x, task="regression")
    b = Backtrace(blk).explain(x, task="regression")
    torch.testing.assert_close(a.input_relevance, b.input_relevance, rtol=0, atol=0)
    torch.testing.assert_close(a.expert_relevance[""], b.expert_relevance[""], rtol=0, atol=0)
    # the exported graph stays differentiable (gradient baselines on a logged model)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ep.module()(xa).sum().backward()
    blk(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "contrastive", "signed"])
def test_moe_routed_rule_equals_dense_graph_walk(mode, monkeypatch):
    """The routed-experts op (each expert walked on its own tokens inside one rule) gives the
    same relevance as walking the dense-dispatch graph op by op with the ordinary rules."""
    import governance.backtrace.rules.moe as moe

    model, bt, x, task = zoo("moe_lm")
    routed = bt.explain(x, task=task, mode=mode)
    assert any("moe_experts" in str(n.target) for n in bt._graphs.get((), x).gm.graph.nodes)
    if "moe_lm_dense" not in _CACHE:  # captured once with the dense graph, then reused
        with monkeypatch.context() as mp:
            mp.setattr(moe, "ROUTED", False)
            dense_bt = Backtrace(model)
            dense_bt.explain(x, task=task)
        assert not any("moe_experts" in str(n.target) for n in dense_bt._graphs.get((), x).gm.graph.nodes)
        _CACHE["moe_lm_dense"] = dense_bt
    dense = _CACHE["moe_lm_dense"].explain(x, task=task, mode=mode)
    scale = float(_inp(dense).abs().max())
    torch.testing.assert_close(_inp(routed), _inp(dense), rtol=1e-4, atol=1e-5 * scale)
    for b in dense.expert_relevance:
        torch.testing.assert_close(routed.expert_relevance[b], dense.expert_relevance[b], rtol=1e-4, atol=1e-6)
    if mode == "default":
        r, d = _root(routed), _root(dense)
        np_ = pytest.importorskip("numpy")
        np_.testing.assert_allclose(r.bias_absorbed.values, d.bias_absorbed.values, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_moe_routed_rule_with_expert_biases(mode, monkeypatch):
    """Experts with biases (the has_bias layout of transformers' experts): the routed rule's
    bias books, scattered back per sample, equal the dense graph's."""
    import governance.backtrace.rules.moe as moe

    blk = zm.moe_block()
    ex = blk.experts
    g = torch.Generator().manual_seed(7)
    ex.gate_up_proj_bias = nn.Parameter(0.3 * torch.randn(ex.gate_up_proj.shape[:2], generator=g))
    ex.down_proj_bias = nn.Parameter(0.3 * torch.randn(ex.down_proj.shape[:2], generator=g))
    ex.has_bias = True
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(8))
    routed = Backtrace(blk).explain(x, task="regression", mode=mode)
    monkeypatch.setattr(moe, "ROUTED", False)
    dense = Backtrace(blk).explain(x, task="regression", mode=mode)
    torch.testing.assert_close(routed.input_relevance, dense.input_relevance, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed.expert_relevance[""], dense.expert_relevance[""], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed.output, dense.output, rtol=1e-5, atol=1e-5)  # (eager Mixtral has no biases)
    if mode == "default":
        r, d = _root(routed), _root(dense)
        assert float(r.bias_absorbed.abs().min()) > 0
        torch.testing.assert_close(torch.tensor(r.bias_absorbed.values), torch.tensor(d.bias_absorbed.values),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(r.relevance_out.values) + torch.tensor(r.bias_absorbed.values),
                                   routed.seed_relevance.double(), rtol=1e-4, atol=1e-3)


def _naive_contrastive_unit(z, bias, rp, rn):
    """Spec 4 for one unit: what each contributor receives, as (to R+, to R-) per contributor."""
    P = sum(v for v in z if v > 0)
    N = sum(-v for v in z if v < 0)
    t = P - N + bias
    out = [(0.0, 0.0)] * len(z)
    pos_amt = neg_amt = None  # (amount, map) routed to the positive / negative contributors
    if P > 0 and N == 0:
        pos_amt = [(rp, 0), (rn, 1)]
    elif N > 0 and P == 0:
        neg_amt = [(rp, 0), (rn, 1)]
    elif P > 0 and N > 0 and t != 0:
        if rp == rn:
            pos_amt, neg_amt = [(rn, 1)], [(rp, 0)]
        else:
            big, small = ((rp, 0), (rn, 1)) if rp > rn else ((rn, 1), (rp, 0))
            pos_amt, neg_amt = ([big], [small]) if t > 0 else ([small], [big])
    res = []
    for v in z:
        to = [0.0, 0.0]
        if v > 0 and pos_amt:
            for amt, m in pos_amt:
                to[m] += amt * v / P
        if v < 0 and neg_amt:
            for amt, m in neg_amt:
                to[m] += amt * (-v) / N
        res.append(tuple(to))
    return res or out


def naive_lstm_contrastive(x, lstm, Rp_out, Rn_out):
    """Spec 7 + 4 for one sample: R+ and R- split by the add rule independently, the candidate's
    affine unit routes the pair with the contrastive rule (no saturation, no bias absorption)."""
    W_ih, W_hh = lstm.weight_ih_l0.tolist(), lstm.weight_hh_l0.tolist()
    b_ih, b_hh = lstm.bias_ih_l0.tolist(), lstm.bias_hh_l0.tolist()
    T, D, H = len(x), len(x[0]), len(W_hh[0])
    h, c, steps = [0.0] * H, [0.0] * H, []
    for t in range(T):
        pre = [sum(W_ih[j][i] * x[t][i] for i in range(D)) + b_ih[j]
               + sum(W_hh[j][k] * h[k] for k in range(H)) + b_hh[j] for j in range(4 * H)]
        ig = [_sig(pre[j]) * math.tanh(pre[2 * H + j]) for j in range(H)]
        fc = [_sig(pre[H + j]) * c[j] for j in range(H)]
        steps.append({"h_prev": list(h), "fc": fc, "ig": ig})
        c = [fc[j] + ig[j] for j in range(H)]
        h = [_sig(pre[3 * H + j]) * math.tanh(c[j]) for j in range(H)]
    Rx = [[[0.0] * D for _ in range(T)] for _ in range(2)]
    carry_h = [[0.0] * H, [0.0] * H]
    carry_c = [[0.0] * H, [0.0] * H]
    for t in reversed(range(T)):
        st = steps[t]
        Rg = [[0.0] * H, [0.0] * H]
        for m, R_out in enumerate((Rp_out, Rn_out)):
            for j in range(H):
                rc = carry_c[m][j] + R_out[t][j] + carry_h[m][j]
                a, b = abs(st["fc"][j]), abs(st["ig"][j])
                carry_c[m][j] = rc * a / (a + b) if a + b else 0.0
                Rg[m][j] = rc * b / (a + b) if a + b else 0.0
        carry_h = [[0.0] * H, [0.0] * H]
        for j in range(H):
            row = 2 * H + j
            z = [W_ih[row][i] * x[t][i] for i in range(D)] + [W_hh[row][k] * st["h_prev"][k] for k in range(H)]
            for idx, (tp, tn) in enumerate(_naive_contrastive_unit(z, b_ih[row] + b_hh[row], Rg[0][j], Rg[1][j])):
                for m, amt in ((0, tp), (1, tn)):
                    if idx < D:
                        Rx[m][t][idx] += amt
                    else:
                        carry_h[m][idx - D] += amt
    return Rx


def test_lstm_contrastive_matches_naive_loop():
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3, batch_first=True).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(3.0)
    model = _LSTMOut(lstm).eval()
    x = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    e = Backtrace(model).explain(x, task="bbox-regression", mode="contrastive")
    y = model(x).detach()
    Rp, Rn = 100.0 * y, 100.0 * (1 - y)  # spec 2, bbox-regression contrastive seed
    for n in range(3):
        ref_p, ref_n = naive_lstm_contrastive(x[n].tolist(), lstm, Rp[n].tolist(), Rn[n].tolist())
        torch.testing.assert_close(e.positive.input_relevance[n], torch.tensor(ref_p, dtype=torch.float64), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(e.negative.input_relevance[n], torch.tensor(ref_n, dtype=torch.float64), rtol=1e-9, atol=1e-9)
