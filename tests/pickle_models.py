"""Models for the pickle tests: a module whose unpickling writes a marker file (the stand-in for
the arbitrary code a pickle can run), and small models of the shapes people log."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

MARKER_ENV = "GOVERNANCE_TEST_PICKLE_MARKER"


class MarkerMLP(nn.Module):
    """A small MLP; unpickling it writes the file named by ``$GOVERNANCE_TEST_PICKLE_MARKER``."""

    def __init__(self, n_features: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))

    def __setstate__(self, state: dict) -> None:
        target = os.environ.get(MARKER_ENV)
        if target:
            Path(target).write_text("code ran while unpickling\n")
        super().__setstate__(state)


class TwoInputs(nn.Module):
    """Numeric features plus a categorical index through an embedding; 3 class logits."""

    def __init__(self, n_numeric: int = 4, n_categories: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_categories, 3)
        self.fc1 = nn.Linear(n_numeric + 3, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, numeric: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(torch.cat([numeric, self.emb(category)], dim=1))))
