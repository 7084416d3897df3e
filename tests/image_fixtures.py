"""Planted-evidence images: 16x16 grey noise whose class is decided by a 4x4 patch in the top
right corner (white: class 1, dark grey: class 0), and a small CNN trained on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 16
PATCH = (slice(0, 4), slice(12, 16))  # region r0c3 of a 4x4 grid


def planted_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16, 16) uint8 images and their labels (balanced)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(40, 216, size=(n, SIZE, SIZE)).astype(np.uint8)
    y = np.arange(n) % 2
    x[y == 1, PATCH[0], PATCH[1]] = 255
    x[y == 0, PATCH[0], PATCH[1]] = 90
    return x, y.astype(np.int64)


class SmallCNN(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> linear (2 classes)."""

    def __init__(self, channels: int = 1, classes: int = 2, size: int = SIZE) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * (size // 4) ** 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 30, seed: int = 0, scale: float = 255.0) -> SmallCNN:
    """The CNN trained on (n, H, W[, C]) images scaled by ``scale``."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(x.astype(np.float32) / scale)
    xt = xt[:, None] if xt.dim() == 3 else xt.permute(0, 3, 1, 2)
    yt = torch.from_numpy(y)
    model = SmallCNN(channels=xt.shape[1], classes=int(y.max()) + 1, size=xt.shape[-1])
    return fit_cross_entropy(model, xt, yt, epochs=epochs)


def fit_cross_entropy(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor, *, epochs: int,
                      lr: float = 1e-2, batch: int = 32) -> nn.Module:
    """``model`` trained with Adam on cross-entropy in mini-batches (class or per-pixel labels), in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for i in range(0, len(xt), batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + batch]), yt[i:i + batch]).backward()
            opt.step()
    return model.eval()


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """The images as PNGs in class-subfolder layout ``root/<label>/<i>.png``."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    return root
