"""The credit-risk MLP (78 -> 39 -> 19 -> 1, ReLU, dropout 0.2, sigmoid) and its training loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CreditRiskMLP(nn.Module):
    """Probability of default from 78 standardised loan features."""

    def __init__(self, n_features: int = 78, hidden: tuple[int, int] = (39, 19), dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden[0])
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.out = nn.Linear(hidden[1], 1)
        self.prob = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.prob(self.out(x))


def train_mlp(
    x: np.ndarray, y: np.ndarray, *, epochs: int = 15, batch_size: int = 256, lr: float = 2e-3,
    weight_decay: float = 1e-4, seed: int = 0,
) -> CreditRiskMLP:
    """Train with Adam on binary cross-entropy, deterministically; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CreditRiskMLP(n_features=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    xt = torch.tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.tensor(np.asarray(y), dtype=torch.float32).reshape(-1, 1)
    loss_fn = nn.BCELoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate_mlp(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Validation AUC, log-loss and accuracy."""
    from sklearn.metrics import log_loss, roc_auc_score

    p = model(torch.tensor(np.asarray(x), dtype=torch.float32)).numpy().reshape(-1)
    return {
        "val_auc": float(roc_auc_score(y, p)),
        "val_log_loss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))),
        "val_accuracy": float(((p > 0.5) == y).mean()),
    }
