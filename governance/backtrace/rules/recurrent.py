"""Recurrent layers (spec section 7): ``nn.LSTM`` and ``nn.GRU`` unrolled over time.

``torch.export`` keeps a recurrent layer as one op (``aten.lstm.input`` / ``aten.gru.input``)
with the flat weight list ``[w_ih, w_hh, b_ih, b_hh]`` per layer and direction. The rule
recomputes the cell's internals from the recorded layer input (one forward, vectorised over
batch and units), then walks time backwards; the only Python loops are over layers, directions
and time steps.

"Gates route, signals carry" -- in every ``gate ⊙ signal`` product the gate takes no relevance:

LSTM (gates i, f, o; candidate g = tanh(W_ig x_t + W_hg h_{t-1} + b_g))::

    h_t = o ⊙ tanh(c_t)          all of R(h_t) goes to c_t
    c_t = f ⊙ c_{t-1} + i ⊙ g    R(c_t) split by the add rule on |f ⊙ c_{t-1}|, |i ⊙ g|;
                                  the first share goes to c_{t-1}, the second to g
    g                             section 3 (tanh saturation, l=-2, u=2) over the concatenated
                                  input [x_t, h_{t-1}] with weights [W_ig, W_hg] and bias
                                  b_ig + b_hg: splits R(g) between x_t, h_{t-1} and the bias

GRU (gates r, z; candidate n)::

    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
        R(h_t) split by the add rule on |(1 - z) ⊙ n| and |z ⊙ h_{t-1}|; (1 - z) and z are gates,
        so the first share goes to n and the second straight to h_{t-1} (the carry path)
    n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t-1} + b_hn))
        r is a gate on the signal W_hn h_{t-1} + b_hn: it scales that signal's contributions but
        takes no relevance itself. So n's pre-activation is one affine unit over [x_t, h_{t-1}]
        with the effective weights [W_in, r ⊙ W_hn] and bias b_in + r ⊙ b_hn, and section 3
        (tanh saturation) splits R(n) between x_t, h_{t-1} and that bias.

The gates' own affine maps (W_i, W_f, W_o; W_r, W_z) receive no relevance, so they pass none.
In contrastive mode the add splits move R+ and R- independently and the candidate's affine map
routes the pair with the section-4 rule. Relevance reaching a constant initial state (the
zeros torch uses when no ``hx`` is given, so nothing in practice) is booked as absorbed.
nn.RNN (tanh or relu) has no gates: h_t = φ(W_ih x_t + W_hh h_{t-1} + b) is one affine unit over
[x_t, h_{t-1}] with φ's saturation range.
Supported: any number of layers, ``batch_first`` or not, bidirectional, with or without biases;
not supported: ``proj_size`` (LSTM projections) and packed sequences (``aten.lstm.data``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import fx

from ..capture import register_export_adapter
from ..context import RuleContext, safe_div
from ..registry import aten_ops, register_rule
from .affine import AffineUnit, _contrastive, _default_or_signed

TANH_SATURATION = (-2.0, 2.0)


def _linear_pair(d_in: int, gate: torch.Tensor | None):
    """fwd/bwd of the candidate's affine map over [x_t, h_{t-1}]; ``gate`` (N, H) scales the
    h-part's contributions (GRU's reset gate), matched to stacked batches by repetition."""

    def _rep(g: torch.Tensor, lead: int) -> torch.Tensor:
        k = lead // g.shape[0]
        return g.repeat(k, 1) if k > 1 else g

    def fwd(xc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if gate is None:
            return xc @ w.t()
        return xc[:, :d_in] @ w[:, :d_in].t() + _rep(gate, xc.shape[0]) * (xc[:, d_in:] @ w[:, d_in:].t())

    def bwd(s: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if gate is None:
            return s @ w
        return torch.cat([s @ w[:, :d_in], (_rep(gate, s.shape[0]) * s) @ w[:, d_in:]], 1)

    return fwd, bwd


def _affine_step(ctx: RuleContext, node: fx.Node, xc: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor | None, pre: torch.Tensor, gate: torch.Tensor | None,
                 d_in: int, Rs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Section 3 / 3b / 4 for the candidate's affine unit; returns R over [x_t, h_{t-1}] per map."""
    fwd, bwd = _linear_pair(d_in, gate)
    # a plain linear map (LSTM) can stack output units in one transposed product and recompute
    # single rows; the GRU's gate-scaled map (its gate matched to whole batches) cannot
    u = AffineUnit(None, w, b, fwd, bwd, pre, (-1, 0) if gate is None else None,  # type: ignore[arg-type]
                   row_dims=1 if gate is None else 0)
    if ctx.mode == "contrastive":
        rp, rn = _contrastive(ctx, node, u, Rs[0], Rs[1], x=xc)[None]
        return [rp, rn]
    out = _default_or_signed(ctx, node, u, Rs[0], signed=ctx.mode == "signed", x=xc, sat=TANH_SATURATION)
    return [out[None]]


def _add_split(Rs: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor):
    """Add rule on two terms with magnitudes a, b: (shares of a, shares of b) per map."""
    den = a + b
    outs_a, outs_b = [], []
    for R in Rs:
        s = safe_div(R, den)
        outs_a.append(s * a)
        outs_b.append(s * b)
    return outs_a, outs_b


def _params(ctx: RuleContext, node: fx.Node, n_gates: int):
    """Weights per (layer, direction): (w_ih, w_hh, b_ih | None, b_hh | None)."""
    a = node.args
    params = [ctx.value(p) for p in a[2]]
    has_bias, layers, bidir = bool(a[3]), int(a[4]), bool(a[7])
    dirs = 2 if bidir else 1
    per = 4 if has_bias else 2
    if len(params) != layers * dirs * per:
        raise ctx.unsupported(node, "recurrent layers with projections (proj_size) have no rule")
    out = []
    for k in range(layers * dirs):
        p = params[k * per:(k + 1) * per]
        out.append((p[0], p[1], p[2] if has_bias else None, p[3] if has_bias else None))
    return out, layers, dirs


def _lstm_direction(ctx, node, X, h0, c0, w_ih, w_hh, b_ih, b_hh, R_out, R_hT, R_cT):
    """One direction of one LSTM layer, time-major X (T, N, D). R_* are lists over maps.
    Returns (R_x (T, N, D) per map, R_h0 per map, R_c0 per map)."""
    T, N, D = X.shape
    H = w_hh.shape[1]
    xw = X @ w_ih.t()
    if b_ih is not None:
        xw = xw + b_ih + b_hh
    h, c = h0, c0
    hs, fcs, igs, gpres = [], [], [], []
    for t in range(T):
        gates = xw[t] + h @ w_hh.t()
        i, f, g, o = gates.chunk(4, 1)
        i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        gt = torch.tanh(g)
        hs.append(h)
        fcs.append(f * c)
        igs.append(i * gt)
        gpres.append(g)
        c = fcs[-1] + igs[-1]
        h = o * torch.tanh(c)
    w_g = torch.cat([w_ih[2 * H:3 * H], w_hh[2 * H:3 * H]], 1)
    b_g = (b_ih[2 * H:3 * H] + b_hh[2 * H:3 * H]) if b_ih is not None else None
    n_maps = len(R_out)
    Rh = list(R_hT)
    Rc = list(R_cT)
    R_x = [torch.empty_like(X) for _ in range(n_maps)]
    for t in reversed(range(T)):
        # h_t = o ⊙ tanh(c_t): all to c_t
        Rc = [Rc[k] + R_out[k][t] + Rh[k] for k in range(n_maps)]
        # c_t = f ⊙ c_{t-1} + i ⊙ g
        Rc, Rg = _add_split(Rc, fcs[t].abs(), igs[t].abs())
        xc = torch.cat([X[t], hs[t]], 1)
        Rxc = _affine_step(ctx, node, xc, w_g, b_g, gpres[t], None, D, Rg)
        for k in range(n_maps):
            R_x[k][t] = Rxc[k][:, :D]
        Rh = [r[:, D:] for r in Rxc]
    return R_x, Rh, Rc


def _gru_direction(ctx, node, X, h0, w_ih, w_hh, b_ih, b_hh, R_out, R_hT):
    T, N, D = X.shape
    H = w_hh.shape[1]
    xw = X @ w_ih.t()
    if b_ih is not None:
        xw = xw + b_ih
    h = h0
    hs, rs, zns, zhs, npres = [], [], [], [], []
    for t in range(T):
        hw = h @ w_hh.t()
        if b_hh is not None:
            hw = hw + b_hh
        ri, zi, ni = xw[t].chunk(3, 1)
        rh, zh, nh = hw.chunk(3, 1)
        r = torch.sigmoid(ri + rh)
        z = torch.sigmoid(zi + zh)
        npre = ni + r * nh
        n = torch.tanh(npre)
        hs.append(h)
        rs.append(r)
        zns.append((1 - z) * n)
        zhs.append(z * h)
        npres.append(npre)
        h = zns[-1] + zhs[-1]
    w_n = torch.cat([w_ih[2 * H:], w_hh[2 * H:]], 1)
    n_maps = len(R_out)
    Rh = list(R_hT)
    R_x = [torch.empty_like(X) for _ in range(n_maps)]
    for t in reversed(range(T)):
        Rh = [Rh[k] + R_out[k][t] for k in range(n_maps)]
        # h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
        Rn, Rcarry = _add_split(Rh, zns[t].abs(), zhs[t].abs())
        b_n = None
        if b_ih is not None:
            b_n = b_ih[2 * H:] + rs[t] * b_hh[2 * H:]
        xc = torch.cat([X[t], hs[t]], 1)
        Rxc = _affine_step(ctx, node, xc, w_n, b_n, npres[t], rs[t], D, Rn)
        for k in range(n_maps):
            R_x[k][t] = Rxc[k][:, :D]
        Rh = [Rcarry[k] + Rxc[k][:, D:] for k in range(n_maps)]
    return R_x, Rh


_RNN_ACT = {"rnn_tanh": torch.tanh, "rnn_relu": torch.relu}
_RNN_SAT = {"rnn_tanh": TANH_SATURATION, "rnn_relu": (0.0, None)}


def _rnn_direction(ctx, node, X, h0, w_ih, w_hh, b_ih, b_hh, R_out, R_hT, kind):
    """nn.RNN: h_t = φ(W_ih x_t + W_hh h_{t-1} + b) is one affine unit over [x_t, h_{t-1}]
    followed by φ (tanh or relu, whose saturation range applies); no gates."""
    T, N, D = X.shape
    xw = X @ w_ih.t()
    if b_ih is not None:
        xw = xw + b_ih + b_hh
    h = h0
    hs, pres = [], []
    for t in range(T):
        pre = xw[t] + h @ w_hh.t()
        hs.append(h)
        pres.append(pre)
        h = _RNN_ACT[kind](pre)
    w = torch.cat([w_ih, w_hh], 1)
    b = (b_ih + b_hh) if b_ih is not None else None
    n_maps = len(R_out)
    Rh = list(R_hT)
    R_x = [torch.empty_like(X) for _ in range(n_maps)]
    for t in reversed(range(T)):
        Rh = [Rh[k] + R_out[k][t] for k in range(n_maps)]
        xc = torch.cat([X[t], hs[t]], 1)
        fwd, bwd = _linear_pair(D, None)
        u = AffineUnit(None, w, b, fwd, bwd, pres[t], (-1, 0))  # type: ignore[arg-type]
        if ctx.mode == "contrastive":
            Rxc = list(_contrastive(ctx, node, u, Rh[0], Rh[1], x=xc)[None])
        else:
            Rxc = [_default_or_signed(ctx, node, u, Rh[0], signed=ctx.mode == "signed", x=xc,
                                      sat=_RNN_SAT[kind])[None]]
        for k in range(n_maps):
            R_x[k][t] = Rxc[k][:, :D]
        Rh = [r[:, D:] for r in Rxc]
    return R_x, Rh


def _maps(R: Any, contrastive: bool) -> list[dict]:
    if contrastive:
        return [r if isinstance(r, dict) else {0: r} for r in R]
    return [R if isinstance(R, dict) else {0: R}]


def _recurrent(ctx: RuleContext, node: fx.Node, R: Any, kind: str) -> dict:
    if node.target._overloadname != "input":
        raise ctx.unsupported(node, "packed sequences have no rule; pass a padded tensor")
    contrastive = ctx.mode == "contrastive"
    maps = _maps(R, contrastive)
    n_maps = len(maps)
    a = node.args
    x_node = a[0]
    batch_first = bool(a[8])
    X = ctx.value(x_node)
    if batch_first:
        X = X.transpose(0, 1)
    params, layers, dirs = _params(ctx, node, 4 if kind == "lstm" else 3)
    hx_nodes = list(a[1]) if kind == "lstm" else [a[1]]
    hx = [ctx.value(h) for h in hx_nodes]
    outs = ctx.value(node)
    H = params[0][1].shape[1]

    def rel(k: int, idx: int, like: torch.Tensor) -> torch.Tensor:
        r = maps[k].get(idx)
        return torch.zeros_like(like) if r is None else r

    R_top = [rel(k, 0, outs[0]) for k in range(n_maps)]
    if batch_first:
        R_top = [r.transpose(0, 1) for r in R_top]
    R_hn = [rel(k, 1, outs[1]) for k in range(n_maps)]
    R_cn = [rel(k, 2, outs[2]) for k in range(n_maps)] if kind == "lstm" else None
    # layer inputs (recomputed with the recorded outputs of the layers below)
    inputs = [X]
    if layers > 1:
        inputs += _layer_outputs(X, hx, params, layers, dirs, kind)
    R_h0 = [torch.zeros_like(hx[0]) for _ in range(n_maps)]
    R_c0 = [torch.zeros_like(hx[0]) for _ in range(n_maps)] if kind == "lstm" else None
    R_seq = R_top
    for layer in reversed(range(layers)):
        Xl = inputs[layer]
        R_in = [torch.zeros_like(Xl) for _ in range(n_maps)]
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = params[k]
            Ro = [r[..., d * H:(d + 1) * H] for r in R_seq]
            Xd = Xl.flip(0) if d == 1 else Xl
            if d == 1:
                Ro = [r.flip(0) for r in Ro]
            if kind == "lstm":
                Rx, Rh0, Rc0 = _lstm_direction(
                    ctx, node, Xd, hx[0][k], hx[1][k], w_ih, w_hh, b_ih, b_hh, Ro,
                    [r[k] for r in R_hn], [r[k] for r in R_cn])
                for m in range(n_maps):
                    R_c0[m][k] = Rc0[m]
            elif kind == "gru":
                Rx, Rh0 = _gru_direction(ctx, node, Xd, hx[0][k], w_ih, w_hh, b_ih, b_hh, Ro,
                                         [r[k] for r in R_hn])
            else:
                Rx, Rh0 = _rnn_direction(ctx, node, Xd, hx[0][k], w_ih, w_hh, b_ih, b_hh, Ro,
                                         [r[k] for r in R_hn], kind)
            for m in range(n_maps):
                R_in[m] += Rx[m].flip(0) if d == 1 else Rx[m]
                R_h0[m][k] = Rh0[m]
        R_seq = R_in
    result: dict[Any, Any] = {}
    R_x = [r.transpose(0, 1) if batch_first else r for r in R_seq]
    if ctx.is_relevant(x_node):
        result[x_node] = tuple(R_x) if contrastive else R_x[0]
    states = [R_h0] + ([R_c0] if kind == "lstm" else [])
    for h_node, Rs in zip(hx_nodes, states):
        if ctx.is_relevant(h_node):
            result[h_node] = tuple(Rs) if contrastive else Rs[0]
        elif not contrastive:
            ctx.absorb(Rs[0].transpose(0, 1))
    return result


def _layer_outputs(X, hx, params, layers, dirs, kind) -> list[torch.Tensor]:
    """Outputs of layers 0..L-2 (time-major), as the next layer's inputs."""
    outs = []
    inp = X
    for layer in range(layers - 1):
        parts = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = params[k]
            Xd = inp.flip(0) if d == 1 else inp
            ys = []
            h = hx[0][k]
            c = hx[1][k] if kind == "lstm" else None
            xw = Xd @ w_ih.t() + (b_ih if b_ih is not None else 0)
            for t in range(Xd.shape[0]):
                hw = h @ w_hh.t() + (b_hh if b_hh is not None else 0)
                if kind == "lstm":
                    i, f, g, o = (xw[t] + hw).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif kind == "gru":
                    ri, zi, ni = xw[t].chunk(3, 1)
                    rh, zh, nh = hw.chunk(3, 1)
                    r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
                    h = (1 - z) * torch.tanh(ni + r * nh) + z * h
                else:
                    h = _RNN_ACT[kind](xw[t] + hw)
                ys.append(h)
            y = torch.stack(ys)
            parts.append(y.flip(0) if d == 1 else y)
        inp = torch.cat(parts, -1)
        outs.append(inp)
    return outs


@register_rule(*aten_ops("lstm"), contrastive=True)
def lstm_rule(ctx: RuleContext, node: fx.Node, R: Any) -> dict:
    """nn.LSTM (aten.lstm.input): unrolled, gates route, signals carry (spec section 7)."""
    return _recurrent(ctx, node, R, "lstm")


@register_rule(*aten_ops("rnn_tanh", "rnn_relu"), contrastive=True)
def rnn_rule(ctx: RuleContext, node: fx.Node, R: Any) -> dict:
    """nn.RNN (aten.rnn_tanh.input / rnn_relu.input): unrolled, one affine unit per step."""
    return _recurrent(ctx, node, R, node.target._opname)


@register_rule(*aten_ops("gru"), contrastive=True)
def gru_rule(ctx: RuleContext, node: fx.Node, R: Any) -> dict:
    """nn.GRU (aten.gru.input): unrolled, gates route, signals carry (spec section 7)."""
    return _recurrent(ctx, node, R, "gru")


@register_export_adapter
@contextlib.contextmanager
def _quiet_flat_weights(model: Any) -> Iterator[None]:
    """torch.export warns that nn.LSTM / GRU / RNN re-assign ``_flat_weights`` while tracing;
    harmless here (the weights are read, never written), so it is not shown to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export")
        yield
