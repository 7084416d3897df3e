"""The text modality on the other model families the issue names: embedding + Conv1D, LSTM and
GRU classifiers (token ids and attention mask from the real MiniLM tokenizer), trained on the
planted texts of ``text_fixtures`` (one trigger word decides the label among neutral filler).

Recorded per mode (120 validation texts): the four trigger words are the top four words in the
signed and default modes for all three families; in the contrastive mode they are the top four for
Conv1D and within the top five for LSTM and GRU (one filler word or "." slips in between)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from test_stage import assert_close
from test_text import TRIGGER_WORDS, _config, _docs
from text_fixtures import minilm_path, planted_texts

from governance.pipeline import explain_model

MAX_LENGTH = 24


class ConvText(nn.Module):
    """Embedding, a Conv1d over time with ReLU, masked max over time, a linear head."""

    def __init__(self, vocab: int, dim: int = 16, channels: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(1).to(torch.float32)
        h = torch.relu(self.conv(self.embed(input_ids).transpose(1, 2))) * m
        return self.head(h.amax(2))


class RecurrentText(nn.Module):
    """Embedding, an LSTM or GRU, the outputs averaged over the attention mask, a linear head."""

    def __init__(self, vocab: int, cell: Callable[..., nn.Module], dim: int = 16, hidden: int = 16,
                 classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        out, _ = self.rnn(self.embed(input_ids))
        return self.head((out * m).sum(1) / m.sum(1))


FAMILIES: dict[str, Callable[[int], nn.Module]] = {
    "conv1d": lambda vocab: ConvText(vocab),
    "lstm": lambda vocab: RecurrentText(vocab, nn.LSTM),
    "gru": lambda vocab: RecurrentText(vocab, nn.GRU),
}


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    base = tmp_path_factory.mktemp("families")
    texts, y = planted_texts(120, seed=1)
    pd.DataFrame({"text": texts, "label": y}).to_parquet(base / "valid.parquet", index=False)
    train, labels = planted_texts(300, seed=0)
    enc = tok(train, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    valid = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return {"tok": tok, "data": base / "valid.parquet", "enc": enc, "labels": torch.from_numpy(labels),
            "valid": valid, "y": y}


def _trained(family: str, s: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family](s["tok"].vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(s["enc"]["input_ids"], s["enc"]["attention_mask"]), s["labels"]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(s["valid"]["input_ids"], s["valid"]["attention_mask"]).argmax(1).numpy() == s["y"]).mean()
    assert acc >= 0.9, (family, acc)  # the model really learned the triggers
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trigger_words_lead_for_every_model_family(setting, family: str) -> None:
    model = _trained(family, setting)
    res = explain_model(model, setting["data"], log=False, quiet=True, config=_config(max_length=MAX_LENGTH))
    gi = res.global_importance
    assert gi["modality"] == "text" and gi["n_samples"] == 120
    for mode, doc in gi["modes"].items():
        words = [f["feature"] for f in doc["features"]]
        assert not {"[CLS]", "[SEP]", "[PAD]"} & set(words), mode
        top = 4 if mode != "contrastive" or family == "conv1d" else 5
        assert TRIGGER_WORDS <= set(words[:top]), (family, mode, words[:6])
    if family == "lstm":  # a recurrent row's relevance does not depend on its batch
        other = explain_model(model, setting["data"], log=False, quiet=True, config=_config(max_length=MAX_LENGTH),
                              batch_size=7)
        assert_close(_docs(other), _docs(res), tol=1e-7, where="lstm batch 7")
    assert np.isfinite([f["importance"] for f in gi["features"]]).all()
