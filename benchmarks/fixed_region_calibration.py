"""Calibrate the image modality's fixed-region (shortcut) rule on cases whose truth is known.

Cases (16x16 grey images, a small CNN trained per case, 300 validation images explained by the
stage with a per-pixel grid, then regions re-summed to 4x4 and 8x8 grids):

- ``digits``: scikit-learn's real 8x8 digits upsampled to 16x16, no watermark (truth: no shortcut);
- ``digits+mark(class 3, s px, strength a)``: a bright s x s square in the top-left corner of every
  class-3 image, train and validation (a shortcut the model may use);
- ``digits+mark(random)``: the same square on a random half of all images, unrelated to the class
  (a fixed bright spot that is no shortcut);
- ``digits+mark(decides class 10, ...)``: a random 15% of the images carry the mark and are
  labelled 10 whatever digit they show (only the mark tells the class: a shortcut by construction);
- ``centred``: a square, a plus or a ring always centred (relevance on the centre is the object, not
  a shortcut).

Truth for a watermark case: the model relies on the mark when removing it from the validation
images changes the prediction of more than half of the marked class's images. For every rule
(region share s, sample fraction f; a group is all samples or one predicted class with >= 10) the
script prints whether it flags, and the largest hit fraction per case, so false and true flag rates
can be read off. Run: ``python benchmarks/fixed_region_calibration.py [name filter ...]`` (about
1.5 minutes a case on a busy 2-core CPU).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SHARES = (0.25, 0.3, 0.4, 0.5)
FRACTIONS = (0.3, 0.5, 0.7)
MIN_SAMPLES = 10


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images, np.ones((2, 2))) * (255.0 / 16.0)
    return x.astype(np.float32), d.target.astype(np.int64)


def mark(x: np.ndarray, which: np.ndarray, size: int, strength: float) -> np.ndarray:
    out = x.copy()
    out[which, :size, :size] = np.maximum(out[which, :size, :size], 255.0 * strength)
    return out


def centred(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, size=(n, 16, 16)).astype(np.float32)
    y = np.arange(n) % 3
    rr, cc = np.mgrid[:16, :16]
    for i in range(n):
        s = int(rng.integers(3, 6))
        if y[i] == 0:
            m = (abs(rr - 7.5) < s) & (abs(cc - 7.5) < s)
        elif y[i] == 1:
            m = ((abs(rr - 7.5) < s) & (abs(cc - 7.5) < 1.5)) | ((abs(cc - 7.5) < s) & (abs(rr - 7.5) < 1.5))
        else:
            d = np.hypot(rr - 7.5, cc - 7.5)
            m = (d < s + 0.5) & (d > s - 1.5)
        x[i][m] = rng.uniform(200, 255, size=int(m.sum()))
    return x, y.astype(np.int64)


def train(x: np.ndarray, y: np.ndarray, seed: int = 0) -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from image_fixtures import SmallCNN

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x / 255.0)[:, None].float(), torch.from_numpy(y)
    model = SmallCNN(channels=1, classes=int(y.max()) + 1, size=16)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(12):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x / 255.0)[:, None].float()).argmax(1).numpy()


def region_shares(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, work: Path) -> tuple[dict, np.ndarray]:
    """Per grid: (n, regions) share of |relevance| per sample; and the predicted classes."""
    import mlflow
    import pandas as pd

    from governance.pipeline import explain_model

    data = work / "valid.npz"
    np.savez(data, x=np.clip(np.rint(x), 0, 255).astype(np.uint8), y=y)
    cfg = {"task": "multiclass-classification", "modality": "image", "image": {"scale": 255, "grid": [16, 16]},
           "modes": ["default"], "primary_mode": "default", "quality": {"enabled": False},
           "aggregation": {"n_bootstrap": 10, "sample_size": 16}, "cpu_threads": 1}
    res = explain_model(model, data, quiet=True, experiment_name="calibration", config=cfg)
    path = mlflow.artifacts.download_artifacts(run_id=res.run_id,
                                               artifact_path="governance/explanations/local_relevance.parquet")
    local = pd.read_parquet(path)
    pix = np.abs(local[[f"r{r}c{c}" for r in range(16) for c in range(16)]].to_numpy(np.float64)).reshape(-1, 16, 16)
    pix /= np.maximum(pix.sum((1, 2), keepdims=True), 1e-300)
    out = {}
    for g in (4, 8):
        k = 16 // g
        out[g] = pix.reshape(-1, g, k, g, k).sum((2, 4)).reshape(len(pix), -1)
    return out, local["prediction"].to_numpy()


def hit_fraction(shares: np.ndarray, pred: np.ndarray, share: float) -> tuple[float, str]:
    """The largest fraction of samples (overall or of one predicted class with >= 10 samples) in
    which one region holds >= ``share``, and the group."""
    hits = shares >= share
    best, group = float(hits.mean(0).max()), "all"
    for c in np.unique(pred):
        m = pred == c
        if m.sum() >= MIN_SAMPLES:
            f = float(hits[m].mean(0).max())
            if f > best:
                best, group = f, f"class {c}"
    return best, group


def main() -> None:
    import mlflow

    rng = np.random.default_rng(0)
    xd, yd = digits()
    order = rng.permutation(len(xd))
    tr, va = order[:1200], order[1200:1500]
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, float, int]] = []
    cases.append(("digits", xd[tr], yd[tr], xd[va], yd[va], None, 0.0, 0))
    for size in (2, 4):
        for strength in (0.3, 0.6, 1.0):
            cases.append((f"digits+mark(class 3, {size}px, {strength})", mark(xd[tr], yd[tr] == 3, size, strength),
                          yd[tr], mark(xd[va], yd[va] == 3, size, strength), yd[va], yd[va] == 3, strength, size))
    half_tr, half_va = rng.random(len(tr)) < 0.5, rng.random(len(va)) < 0.5
    cases.append(("digits+mark(random half, 4px, 1.0)", mark(xd[tr], half_tr, 4, 1.0), yd[tr],
                  mark(xd[va], half_va, 4, 1.0), yd[va], half_va, 1.0, 4))
    for size, strength in ((2, 0.5), (2, 1.0), (4, 0.5), (4, 1.0)):  # the mark alone decides class 10
        m_tr, m_va = rng.random(len(tr)) < 0.15, rng.random(len(va)) < 0.15
        cases.append((f"digits+mark(decides class 10, {size}px, {strength})", mark(xd[tr], m_tr, size, strength),
                      np.where(m_tr, 10, yd[tr]), mark(xd[va], m_va, size, strength), np.where(m_va, 10, yd[va]),
                      m_va, strength, size))
    xc, yc = centred(1500, 1)
    cases.append(("centred shapes", xc[:1200], yc[:1200], xc[1200:], yc[1200:], None, 0.0, 0))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        for name, xtr, ytr, xva, yva, marked, strength, size in cases:
            if len(sys.argv) > 1 and not any(a in name for a in sys.argv[1:]):
                continue
            model = train(xtr, ytr)
            acc = float((predict(model, xva) == yva).mean())
            relies = None
            if marked is not None and "class " in name:
                clean = xd[va]
                changed = predict(model, clean)[marked] != predict(model, xva)[marked]
                relies = bool(changed.mean() > 0.5)
                relies_share = float(changed.mean())
            else:
                relies_share = 0.0
                relies = False
            shares, pred = region_shares(model, xva, yva, work)
            row = {"case": name, "accuracy": acc, "shortcut": relies, "prediction_change_without_mark": relies_share}
            for g, s in shares.items():
                for share in SHARES:
                    f, group = hit_fraction(s, pred, share)
                    row[f"grid{g}_share{share}"] = [round(f, 3), group]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nflag decisions (rule -> cases flagged; truth: shortcut)")
    for g in (4, 8):
        for share in SHARES:
            for frac in FRACTIONS:
                flagged = [r["grid%d_share%s" % (g, share)][0] >= frac for r in rows]
                truth = [r["shortcut"] for r in rows]
                tp = sum(a and b for a, b in zip(flagged, truth))
                fp = sum(a and not b for a, b in zip(flagged, truth))
                print(f"grid {g}x{g} share {share} fraction {frac}: true flags {tp}/{sum(truth)}, "
                      f"false flags {fp}/{len(truth) - sum(truth)}")


if __name__ == "__main__":
    main()
