"""Text models as users log them, through a real sqlite MLflow store and the real engine:

- a transformers-flavour model (a small BERT built from a tiny ``transformers`` config, trained on
  the planted texts, logged with its tokenizer component): ``explain`` loads both offline and gives
  the same documents as the in-memory model with the tokenizer folder; a model logged without a
  tokenizer, with pickled weights or needing shipped code is refused with one line and no
  explanation artifacts;
- a pt2 (torch.export) model with several positional inputs: the stage passes the tokenizer
  outputs in the order the MLflow signature declares (or ``text.inputs`` maps them), with the same
  documents as the in-memory model called by name; quality (token deletion) runs on it, bounded
  and the bounds recorded;
- the report's word-tables part: per class the words for and against, escaped, in HTML and PDF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from explain_fixtures import artifact_paths
from report_fixtures import use_store
from test_stage import assert_close
from text_fixtures import TRIGGERS, minilm_path, planted_texts, train_bag

from governance.cli import main
from governance.config import ConfigError
from governance.pipeline import explain_model
from governance.quality.randomisation import spread_layers
from governance.tracking import ModelLoadError, PickleRefused, load_model

TRIGGER_WORDS = {w for ws in TRIGGERS.values() for w in ws}
MAX_LENGTH = 24


def _config(**extra: Any) -> dict[str, Any]:
    return {"task": "multiclass-classification", "modality": "text", "target_column": "label",
            "modes": ["signed", "default"], "primary_mode": "signed",
            "text": {"max_length": MAX_LENGTH}, "aggregation": {"n_bootstrap": 20, "sample_size": 64},
            "quality": {"enabled": False}, "cpu_threads": 1, **extra}


def tiny_bert(tokenizer: Any, texts: list[str], labels: np.ndarray) -> Any:
    """A two-layer BERT (hidden size 32) from a tiny config, trained on ``texts``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertForSequenceClassification(cfg)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    y = torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(**enc, labels=y).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("text-models")
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    train = planted_texts(300, seed=0)
    vt, vy = planted_texts(80, seed=1)
    pd.DataFrame({"text": vt, "label": vy}).to_parquet(base / "valid.parquet", index=False)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with use_store(uri):
        mlflow.set_experiment("text-models")
    return {"base": base, "tok": tok, "train": train, "uri": uri, "valid": base / "valid.parquet"}


@pytest.fixture(scope="module")
def bert(texts) -> dict[str, Any]:
    """The tiny BERT, logged with the transformers flavour (model + tokenizer) and saved locally."""
    model = tiny_bert(texts["tok"], *texts["train"])
    with use_store(texts["uri"]):
        with mlflow.start_run():
            info = mlflow.transformers.log_model({"model": model, "tokenizer": texts["tok"]}, name="model",
                                                 task="text-classification", pip_requirements=["transformers", "torch"])
    local = texts["base"] / "bert-local"
    mlflow.transformers.save_model({"model": model, "tokenizer": texts["tok"]}, str(local),
                                   task="text-classification", pip_requirements=["transformers", "torch"])
    return {"model": model, "uri": info.model_uri, "local": local}


def _docs(res: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"gi": res.global_importance, "stab": res.stability}, default=float))


def _explain_cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["explain", "--quiet", *args])


def test_a_transformers_model_is_explained_with_its_logged_tokenizer(texts, bert, tmp_path: Path) -> None:
    cfg = tmp_path / "governance.yaml"
    body = _config()
    body.pop("task")  # the flavour's task (text-classification) says: a classifier
    cfg.write_text(yaml.safe_dump(body))
    with use_store(texts["uri"]):
        res = _explain_cli("--model-uri", bert["uri"], "--data", str(texts["valid"]), "--config", str(cfg),
                           "--experiment-name", "text-models")
        assert res.exit_code == 0, res.output
        rid = res.stdout.strip().splitlines()[-1]
        tags = mlflow.MlflowClient().get_run(rid).data.tags
        gi = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=rid, artifact_path="governance/explanations/global_importance.json")).read_text())
    assert tags["governance.task"] == "multiclass-classification"
    assert "transformers flavour task text-classification" in tags["governance.task_source"]
    assert "governance.allow_pickle" not in tags  # safetensors: nothing was unpickled
    assert gi["text"]["tokenizer"] == f"{bert['uri']} (transformers tokenizer component)"
    for mode, doc in gi["modes"].items():  # the trained BERT decides by the trigger words
        assert {f["feature"] for f in doc["features"][:4]} == TRIGGER_WORDS, mode
    assert not {"[CLS]", "[SEP]", "[PAD]"} & {f["feature"] for f in gi["features"]}
    # loading kept the model and the tokenizer: the same documents as the in-memory model
    ref = explain_model(bert["model"], texts["valid"], log=False, quiet=True,
                        config=_config(text={"max_length": MAX_LENGTH, "tokenizer": minilm_path()}))
    got = json.loads(json.dumps({"gi": gi}, default=float))["gi"]
    assert_close(got["modes"], _docs(ref)["gi"]["modes"], tol=1e-6, where="transformers flavour vs in memory")
    texts["run_id"] = rid


def _edit_mlmodel(folder: Path, fn: Any) -> None:
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    fn(meta["flavors"]["transformers"])
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))


def test_a_transformers_model_without_tokenizer_fails_with_one_line(texts, bert, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(bert["local"], folder)
    shutil.rmtree(folder / "components")
    _edit_mlmodel(folder, lambda f: f.pop("components"))
    with use_store(texts["uri"]):
        exp = mlflow.get_experiment_by_name("text-models").experiment_id
        rid = mlflow.MlflowClient().create_run(exp).info.run_id
        res = _explain_cli("--model-uri", str(folder), "--data", str(texts["valid"]), "--modality", "text",
                           "--target-column", "label", "--run-id", rid, "--set", "quality.enabled=false")
        paths = artifact_paths(rid)
    assert res.exit_code == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "without a tokenizer component" in lines[0] and "Traceback" not in res.output
    assert not any(p.startswith("governance/explanations") for p in paths), paths


def test_pickled_weights_and_shipped_code_are_refused(bert, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(bert["local"], pickled)
    weights = pickled / "model" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))  # the refusal reads file names, loads nothing
    with pytest.raises(PickleRefused, match="stores its weights as a pickle") as info:
        load_model(str(pickled))
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    custom = tmp_path / "custom"
    shutil.copytree(bert["local"], custom)
    config = json.loads((custom / "model" / "config.json").read_text())
    (custom / "model" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(ModelLoadError, match="needs code shipped with the model"):
        load_model(str(custom))


class MaskFirst(nn.Module):
    """The planted classifier with its inputs in the other order (attention mask first)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids, attention_mask)


class Unnamed(nn.Module):
    """The planted classifier whose inputs are not named like tokenizer outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(ids, mask)


def _log_pt2(model: nn.Module, names: tuple[str, str], example: tuple[np.ndarray, np.ndarray]) -> str:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), n) for n in names]),
                         outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 2))]))
    with mlflow.start_run():
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pt2", signature=sig,
                                        input_example=example, pip_requirements=["torch"]).model_uri


def test_positional_pt2_models_get_the_tokenizer_outputs_in_their_order(texts) -> None:
    tok = texts["tok"]
    bag = train_bag(*texts["train"], tok)
    enc = tok(texts["train"][0][:4], max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    cfg = _config(text={"max_length": MAX_LENGTH, "tokenizer": minilm_path()})
    ref = _docs(explain_model(bag, texts["valid"], log=False, quiet=True, config=cfg))
    with use_store(texts["uri"]):
        plain = load_model(_log_pt2(bag, ("input_ids", "attention_mask"), (ids, mask)))
        swapped = load_model(_log_pt2(MaskFirst(bag), ("attention_mask", "input_ids"), (mask, ids)))
        unnamed = load_model(_log_pt2(Unnamed(bag), ("ids", "mask"), (ids, mask)))
    assert plain.serialization == "pt2" and not plain.allow_pickle
    with pytest.raises((TypeError, ValueError)):  # an exported program takes no keywords: the reason for positional calls
        plain.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    for handle, extra in ((plain, {}), (swapped, {}), (unnamed, {"inputs": ["input_ids", "attention_mask"]})):
        c = _config(text={"max_length": MAX_LENGTH, "tokenizer": minilm_path(), **extra})
        got = _docs(explain_model(handle, texts["valid"], log=False, quiet=True, config=c))
        assert_close(got, ref, tol=1e-6, where=f"{handle.uri} {extra}")
    assert {f["feature"] for f in ref["gi"]["features"][:4]} == TRIGGER_WORDS
    with pytest.raises(ConfigError, match="set text.inputs"):
        explain_model(unnamed, texts["valid"], log=False, quiet=True, config=cfg)
    texts["pt2"] = plain


def test_quality_on_a_pt2_text_model_is_bounded_and_says_so(texts) -> None:
    if "pt2" not in texts:
        pytest.skip("needs the pt2 model of the previous test")
    cfg = _config(text={"max_length": MAX_LENGTH, "tokenizer": minilm_path()},
                  quality={"enabled": True, "n_samples": 8, "mprt_max_layers": 1, "sensitivity_perturbations": 2,
                           "ig_steps": 8})
    with use_store(texts["uri"]):
        res = explain_model(texts["pt2"], texts["valid"], quiet=True, config=cfg, experiment_name="text-models")
    q = res.quality
    assert q["modality"] == "token" and q["n_samples"] == 8
    assert q["methods"]["backtrace_signed"]["morf_auc"] is not None  # token deletion ran on the exported program
    bounds = " | ".join(q["bounds"])
    assert "8 of the 80 explained samples" in bounds and "MPRT randomised 1 of the model's 2" in bounds
    assert "2 perturbations per sample instead of 8" in bounds and "8 steps instead of 32" in bounds
    assert len(q["metrics"]["mprt_spearman"]["parameters"]["layers"]) == 1
    assert spread_layers(list("abcdefg"), 3) == ["a", "d", "g"] and spread_layers(list("abc"), 1) == ["c"]
    texts["quality_run"] = res.run_id


def test_the_report_shows_the_word_tables(texts, tmp_path: Path) -> None:
    import subprocess

    from governance.report.render import render_template
    from governance.report.sections.explainability import word_tables

    rid = texts.get("quality_run") or texts.get("run_id")
    if rid is None:
        pytest.skip("needs a text run of the previous tests")
    with use_store(texts["uri"]):
        result = CliRunner().invoke(main, ["report", "--run-id", rid, "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "governance" / "reports" / "audit_report.html").read_text()
    part = html[html.index("Texts: words for and against"):]
    part = part[:part.index("</p>")]
    for c, words in TRIGGERS.items():  # each class's triggers are among its words "for"
        block = part[part.index(f"Predicted class {c} ("):]
        assert all(f"<td>{w}</td>" in block[:block.index("</table>")] for w in words), c
    assert "transformers tokenizer component" in html or "tokenizer" in html
    if texts.get("quality_run"):
        assert "Bounded to keep the cost affordable" in html and "MPRT randomised 1 of" in html
    pdf = tmp_path / "governance" / "reports" / "audit_report.pdf"
    text = subprocess.run(["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True).stdout
    assert "Texts: words for and against each decision" in text and "Word against" in text
    # escaped, and the same input gives the same bytes
    gi = {"modality": "text", "text": {"tokenizer": "<tok>", "max_length": 8, "truncation": True,
                                       "padding": "max_length", "by_class": {
                                           "1": {"n_samples": 3, "for": [{"word": "<script>", "mean_share": 0.5}],
                                                 "against": [{"word": "a&b", "mean_share": -0.25}]}}}}
    inp = type("Inp", (), {"ev": type("Ev", (), {"global_importance": gi})()})()
    ctx = {"x": word_tables.build(inp)}
    first = render_template("sections/explainability/word_tables.html.j2", ctx)
    assert first == render_template("sections/explainability/word_tables.html.j2", {"x": word_tables.build(inp)})
    assert "&lt;script&gt;" in first and "a&amp;b" in first and "&lt;tok&gt;" in first and "<script>" not in first
