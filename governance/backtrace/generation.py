"""Explaining greedy generation token by token (``Backtrace.explain_generation``).

For a causal language model (or an encoder-decoder such as T5) we generate ``k`` tokens
greedily and explain each one: the seed is the chosen token's logit at the position that
predicted it (spec 2, task ``generation``), and the walk gives the relevance of every prompt
token and every earlier generated token.

One captured graph serves all k steps: the sequence is laid out at its final length
``T0 + k - 1`` from the start, the not-yet-generated positions hold a placeholder token with
attention mask 0, and a small wrapper picks the logits at the current position with a
``gather``. In a causal model the placeholders cannot influence earlier positions, so the
logits, the greedy choice and the relevance are those of the unpadded prefix (up to float
round-off), and the placeholders receive exactly 0 (the causal mask gives A = 0 there). This
avoids one ``torch.export`` per generated token.

Models that return the next-token logits themselves, (N, V) from the last position (an LSTM
next-word model), cannot be padded on the right: they are explained at the sequence's true
length each step (one capture per step). Models whose ``forward`` takes no ``attention_mask``
are called with the token ids alone.

Encoder-decoder models: the encoder input is fixed; the decoder input starts with
``config.decoder_start_token_id`` and grows the same way. Both matrices are returned.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .explanation import Explanation


@dataclass
class GenerationExplanation:
    """Relevance of each greedily generated token over the tokens before it.

    ``sequences``: (N, T0 + k) prompt followed by the k generated tokens (decoder-only), or
    (N, 1 + k) decoder start token followed by the generated tokens (encoder-decoder).
    ``relevance``: (N, k, T) with T = ``sequences.shape[1]``; row i holds, for generated token i,
    the relevance of every token of ``sequences`` (prompt, earlier generated tokens); positions
    from the i-th generated token on (future) are 0.
    ``encoder_relevance``: (N, k, T_enc) for encoder-decoder models (else None).
    ``layer_relevance``: {module: (N, k)} signed relevance total at each module's output per step.
    ``seed_relevance``: (N, k) the seed of each step.
    ``steps``: the full per-step ``Explanation`` objects when ``keep_steps=True``.
    """

    mode: str
    sequences: torch.Tensor
    generated: torch.Tensor
    relevance: torch.Tensor
    layer_relevance: dict[str, torch.Tensor]
    seed_relevance: torch.Tensor
    encoder_relevance: torch.Tensor | None = None
    steps: list[Explanation] = field(default_factory=list, repr=False)

    @property
    def prompt_length(self) -> int:
        return int(self.sequences.shape[1] - self.generated.shape[1])

    def layer_summary(self):
        """Per module, the mean |relevance| at its output over steps and samples (DataFrame)."""
        import pandas as pd

        seed = self.seed_relevance.abs().double().clamp_min(1e-30)
        rows = [
            {"module": m, "mean_relevance": float(t.double().mean()),
             "share": float((t.double().abs() / seed).mean())}
            for m, t in self.layer_relevance.items()
        ]
        return pd.DataFrame(rows, columns=["module", "mean_relevance", "share"])


class _NextTokenLogits(nn.Module):
    """``model``'s next-token logits, shaped (N, 1, V): at ``position`` (one per sample) for
    models returning (N, T, V), or the model's own (N, V) next-token output."""

    def __init__(self, model: nn.Module, encoder_decoder: bool, use_cache_kw: bool, mask_kw: bool) -> None:
        super().__init__()
        self.model = model
        self.encoder_decoder = encoder_decoder
        self.use_cache_kw = use_cache_kw
        self.mask_kw = mask_kw

    def forward(self, input_ids, attention_mask=None, position=None, decoder_input_ids=None):
        kw: dict[str, Any] = {"input_ids": input_ids}
        if self.mask_kw and attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if self.encoder_decoder:
            kw["decoder_input_ids"] = decoder_input_ids
        if self.use_cache_kw:
            kw["use_cache"] = False
        out = self.model(**kw) if self.mask_kw or self.use_cache_kw or self.encoder_decoder else self.model(input_ids)
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        if logits.dim() == 2:  # the model already returns the next-token logits
            return logits.unsqueeze(1)
        idx = position.reshape(-1, 1, 1).expand(logits.shape[0], 1, logits.shape[-1])
        return torch.gather(logits, 1, idx)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _returns_sequence(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, wrapper: _NextTokenLogits) -> bool:
    """True when the model returns per-position logits (N, T, V) rather than (N, V)."""
    kw: dict[str, Any] = {"input_ids": ids}
    if wrapper.mask_kw:
        kw["attention_mask"] = mask
    if wrapper.use_cache_kw:
        kw["use_cache"] = False
    was = model.training
    model.eval()
    try:
        out = model(**kw) if (wrapper.mask_kw or wrapper.use_cache_kw) else model(ids)
    finally:
        model.train(was)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits.dim() == 3


def _module_totals(exp: Explanation) -> dict[str, torch.Tensor]:
    if exp.positive is not None and exp.negative is not None and not exp.books:
        pos, neg = exp.positive.module_totals(), exp.negative.module_totals()
        return {m: pos[m] - neg[m] for m in pos}
    return exp.module_totals()


def _user_module(name: str) -> str | None:
    """Wrapper module names back to the user's: "model.x.y" -> "x.y", "model" -> "" (root)."""
    if name == "model":
        return ""
    if name.startswith("model."):
        return name[len("model."):]
    return None


def explain_generation(
    bt: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 1,
    attention_mask: torch.Tensor | None = None,
    mode: str = "default",
    multiplier: float = 100.0,
    seed: str = "output",
    pad_token_id: int | None = None,
    keep_steps: bool = False,
) -> GenerationExplanation:
    """Generate ``max_new_tokens`` tokens greedily and explain each (see the module doc)."""
    from .engine import Backtrace

    model = bt.model
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise TypeError("explain_generation needs the model as an nn.Module (a Hugging Face or "
                        "plain causal LM taking input_ids and attention_mask)")
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be a (batch, tokens) integer tensor")
    k = int(max_new_tokens)
    if k < 1:
        raise ValueError("max_new_tokens must be at least 1")
    config = getattr(model, "config", None)
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    n, t0 = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=input_ids.dtype)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0

    cache = getattr(bt, "_generation", None)
    if cache is None or cache[0] is not model:
        wrapper = _NextTokenLogits(model, enc_dec, _accepts(model, "use_cache"),
                                   _accepts(model, "attention_mask")).eval()
        cache = (model, Backtrace(wrapper), wrapper)
        bt._generation = cache
    gbt, wrapper = cache[1], cache[2]
    # models returning (N, V) next-token logits (e.g. an LSTM next-word model) read the last
    # position: they are explained at the sequence's true length, one capture per step
    with torch.no_grad():
        growing = not enc_dec and not _returns_sequence(model, input_ids[:, :1], attention_mask[:, :1], wrapper)

    if enc_dec:
        start = getattr(config, "decoder_start_token_id", None)
        start = int(start) if start is not None else pad
        seq = torch.full((n, 1 + k), pad, dtype=input_ids.dtype, device=device)
        seq[:, 0] = start
        length = k  # decoder inputs: start token + k - 1 generated tokens
    else:
        seq = torch.full((n, t0 + k), pad, dtype=input_ids.dtype, device=device)
        seq[:, :t0] = input_ids
        mask = torch.zeros((n, t0 + k), dtype=input_ids.dtype, device=device)
        mask[:, :t0] = attention_mask
        length = t0 + k - 1
    first = 0 if enc_dec else t0 - 1  # the position whose logits pick generated token 0
    total = seq.shape[1]
    dtype = torch.float32
    relevance = torch.zeros((n, k, total), dtype=dtype, device=device)
    enc_rel = torch.zeros((n, k, t0), dtype=dtype, device=device) if enc_dec else None
    seeds = torch.zeros((n, k), dtype=torch.float64)
    layers: dict[str, torch.Tensor] = {}
    steps: list[Explanation] = []
    for i in range(k):
        p = first + i
        position = torch.full((n,), p, dtype=torch.long, device=device)
        if enc_dec:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position": position,
                      "decoder_input_ids": seq[:, :length]}
        elif growing:
            inputs = {"input_ids": seq[:, :p + 1]}
            if wrapper.mask_kw:
                inputs["attention_mask"] = mask[:, :p + 1]
        else:
            inputs = {"input_ids": seq[:, :length], "attention_mask": mask[:, :length], "position": position}
            if not wrapper.mask_kw:
                del inputs["attention_mask"]
        exp = gbt.explain(inputs, mode=mode, task="generation", multiplier=multiplier, seed=seed)
        rel = exp.input_relevance
        token = exp.target
        if enc_dec:
            relevance[:, i, :length] = rel["decoder_input_ids"].to(dtype)
            enc_rel[:, i] = rel["input_ids"].to(dtype)
        else:
            r_ids = rel["input_ids"] if isinstance(rel, dict) else rel
            relevance[:, i, :r_ids.shape[1]] = r_ids.to(dtype)
            mask[:, p + 1] = 1
        seq[:, p + 1] = token.to(seq.dtype)
        seeds[:, i] = exp.seed_relevance.double()
        for name, tot in _module_totals(exp).items():
            user = _user_module(name)
            if user is None:
                continue
            if user not in layers:
                layers[user] = torch.zeros((n, k), dtype=torch.float64)
            layers[user][:, i] = tot.double()
        if keep_steps:
            steps.append(exp)
    generated = seq[:, -k:].clone()
    return GenerationExplanation(
        mode=mode, sequences=seq, generated=generated, relevance=relevance,
        layer_relevance=layers, seed_relevance=seeds, encoder_relevance=enc_rel, steps=steps,
    )
