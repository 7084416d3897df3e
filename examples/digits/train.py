"""The bundled `digits` example: scikit-learn's real 8x8 handwritten digits (1,797 images, pixel
values 0..16), a small CNN trained briefly, logged to the active MLflow run with the validation
images as an ``.npz`` (``x``: (N, 8, 8) uint8, ``y``: labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

N_VALID = 300


class DigitsCNN(nn.Module):
    """conv(1->8, 3x3) -> relu -> maxpool 2 -> linear(8*4*4 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, validation x, validation y); x as (N, 8, 8) uint8 values 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x, y = d.images[order].astype(np.uint8), d.target[order].astype(np.int64)
    return x[N_VALID:], y[N_VALID:], x[:N_VALID], y[:N_VALID]


def train_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    """The CNN trained with Adam on images scaled to [0, 1] (pixel / 16)."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x[:, None].astype(np.float32) / 16.0), torch.from_numpy(y)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    return model.eval()


def train_and_log(out_dir: Path, *, epochs: int = 15, seed: int = 0) -> dict[str, Any]:
    """Train, log the model (``model``) and the data (``data/validation.npz``) to the active run."""
    import mlflow

    xtr, ytr, xva, yva = digits_split(seed)
    model = train_cnn(xtr, ytr, epochs=epochs, seed=seed)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xva[:, None].astype(np.float32) / 16.0)).argmax(1).numpy() == yva).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "validation.npz"
    with open(path, "wb") as f:
        np.savez(f, x=xva, y=yva)
    mlflow.log_params({"dataset": "sklearn.datasets.load_digits", "epochs": epochs, "seed": seed,
                       "architecture": "conv1-8 relu maxpool linear128-10"})
    mlflow.log_metric("validation_accuracy", acc)
    mlflow.log_artifact(str(path), "data")
    example = xva[:4, None].astype(np.float32) / 16.0
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch", "mlflow"])
    return {"model_uri": info.model_uri, "validation_path": str(path), "accuracy": acc}
