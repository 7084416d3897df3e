"""Model definitions shared by the benchmarks (plain torch, no torchvision)."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from zoo_models import BasicBlock  # noqa: E402  (the residual block the zoo tests use)


def paper_mlp() -> nn.Module:
    """The seed's tabular MLP: 78 -> 39 -> 19 -> 1, ReLU, dropout 0.2, sigmoid."""
    return nn.Sequential(
        nn.Linear(78, 39), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(39, 19), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(19, 1), nn.Sigmoid(),
    )


class SmallCNN(nn.Module):
    """A CNN on 3x32x32 with batch norm and one residual block."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = BasicBlock(32, 32, 1)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.gap(self.conv(x)), 1))


class ResNet34(nn.Module):
    """ResNet-34-shaped classifier: BasicBlocks [3, 4, 6, 3] at widths 64..512."""

    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], width
        for i, (n, w) in enumerate(zip([3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width])):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.layers(self.stem(x))), 1))


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial running statistics (as a trained model has)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model
