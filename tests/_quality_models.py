"""Small seeded models and data for the quality tests and the benchmark (trained in seconds)."""

from __future__ import annotations

import torch
from torch import nn


def _fork_train(seed: int, fn):
    """Run ``fn`` with the global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def synthetic_tabular(n: int = 1200, n_features: int = 12, seed: int = 0):
    """A binary task whose label depends on the first four features only (the true drivers)
    plus an interaction; the other features are noise correlated with nothing."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_features, generator=g)
    logit = 2.0 * X[:, 0] - 1.5 * X[:, 1] + 1.0 * X[:, 2] * (X[:, 3] > 0) + 1.0 * X[:, 3]
    y = (logit + 0.3 * torch.randn(n, generator=g) > 0).float()
    names = [f"x{i}" for i in range(n_features)]
    return X, y, names, names[:4]


def train_tabular_mlp(X: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 150, sigmoid: bool = True) -> nn.Module:
    """A 3-layer MLP ending in a sigmoid (one output: P(y = 1)), full-batch Adam."""

    def run():
        layers = [nn.Linear(X.shape[1], 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)]
        model = nn.Sequential(*layers, nn.Sigmoid()) if sigmoid else nn.Sequential(*layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(epochs):
            opt.zero_grad()
            p = model(X).squeeze(1)
            loss = nn.functional.binary_cross_entropy(p, y) if sigmoid else nn.functional.binary_cross_entropy_with_logits(p, y)
            loss.backward()
            opt.step()
        return model.eval()

    return _fork_train(seed, run)


class DigitsCNN(nn.Module):
    """conv(1->8) relu conv(8->16) relu maxpool(2) flatten linear(256->10) on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))))


def digits(seed: int = 0):
    """scikit-learn's digits as (N, 1, 8, 8) floats in [0, 1], split 75/25 with ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return X[perm[:cut]], y[perm[:cut]], X[perm[cut:]], y[perm[cut:]]


def train_digits_cnn(X: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 8) -> nn.Module:
    """Adam, batch 64, a few epochs (a couple of seconds on two cores)."""

    def run():
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), 64):
                b = perm[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[b]), y[b]).backward()
                opt.step()
        return model.eval()

    return _fork_train(seed, run)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(X)
    pred = (out.squeeze(1) > 0.5).float() if out.shape[1] == 1 else out.argmax(1)
    return float((pred == y).float().mean())
