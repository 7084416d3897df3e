"""Synthetic shapes whose mask / box is known, a tiny U-Net (conv, pooling, transposed conv,
upsampling, skip concatenation) and a tiny box regressor, each trained briefly on them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from image_fixtures import fit_cross_entropy

SIZE = 16


def shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, 16, 16) uint8 images of dim noise with one bright object (class 1: a square, class 2:
    a plus sign) at a random place; their (n, 16, 16) masks (0 background), object classes and
    (n, 4) boxes (x0, y0, x1, y1) / 16, the object's pixel extent (end exclusive)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 70, size=(n, SIZE, SIZE)).astype(np.uint8)
    masks = np.zeros((n, SIZE, SIZE), dtype=np.int64)
    cls = 1 + np.arange(n) % 2
    boxes = np.zeros((n, 4), dtype=np.float32)
    for i in range(n):
        s = int(rng.integers(5, 8))
        r0, c0 = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
        m = np.zeros((SIZE, SIZE), dtype=bool)
        if cls[i] == 1:
            m[r0:r0 + s, c0:c0 + s] = True
        else:
            mid = s // 2
            m[r0:r0 + s, c0 + mid - 1:c0 + mid + 1] = True
            m[r0 + mid - 1:r0 + mid + 1, c0:c0 + s] = True
        x[i][m] = rng.integers(200, 256, size=int(m.sum()))
        masks[i][m] = cls[i]
        boxes[i] = (c0 / SIZE, r0 / SIZE, (c0 + s) / SIZE, (r0 + s) / SIZE)
    return x, masks, cls.astype(np.int64), boxes


class TinyUNet(nn.Module):
    """Encoder (two convs, max pooling, a conv), decoder (transposed conv and a bilinear
    upsample of the bottleneck), the skip concatenated, then per-pixel class scores."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.resize = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(8 + 8 + 16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        mid = self.mid(self.pool(skip))
        return self.dec(torch.cat([self.up(mid), skip, self.resize(mid)], dim=1))


class TinyBoxNet(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> linear -> relu -> linear: four box outputs,
    and (``with_classes``) class scores as a second output."""

    def __init__(self, with_classes: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(16 * (SIZE // 4) ** 2, 32), nn.ReLU())
        self.box = nn.Linear(32, 4)
        self.cls = nn.Linear(32, 3) if with_classes else None

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        return (self.box(h), self.cls(h)) if self.cls is not None else self.box(h)


def _inputs(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]


def train_unet(x: np.ndarray, masks: np.ndarray, *, epochs: int = 25, seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    xt, yt = _inputs(x), torch.from_numpy(masks)
    return fit_cross_entropy(TinyUNet(), xt, yt, epochs=epochs)


def train_boxnet(x: np.ndarray, boxes: np.ndarray, cls: np.ndarray | None = None, *, epochs: int = 40,
                 seed: int = 0) -> TinyBoxNet:
    torch.manual_seed(seed)
    xt, bt = _inputs(x), torch.from_numpy(boxes)
    model = TinyBoxNet(with_classes=cls is not None)
    ct = torch.from_numpy(cls) if cls is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(xt), 32):
            opt.zero_grad()
            out = model(xt[i:i + 32])
            if ct is not None:
                loss = nn.functional.mse_loss(out[0], bt[i:i + 32]) + 0.1 * nn.functional.cross_entropy(out[1], ct[i:i + 32])
            else:
                loss = nn.functional.mse_loss(out, bt[i:i + 32])
            loss.backward()
            opt.step()
    return model.eval()
