"""The text modality with the real engine and the real all-MiniLM-L6-v2 tokenizer on planted
evidence: neutral filler with one trigger word that decides the label. The trigger words rank
first in every mode, filler below; special tokens and padding carry exactly zero and appear in
no table; every text artifact is logged to a real sqlite MLflow store and loads; the documents do
not depend on the batch size. Bad texts (empty, not a string) fail the contract (exit 2) and a
missing tokenizer fails with one line (exit 1), logging no explanation."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from explain_fixtures import artifact_paths
from report_fixtures import use_store
from test_stage import assert_close
from text_fixtures import TRIGGERS, minilm_path, planted_texts, train_bag

from governance.config import config_from_dict
from governance.modality import get_modality
from governance.modality.text_source import TokenizerError
from governance.pipeline import explain_model
from governance.stage.batch import Explainer, explain_batch
from governance.validation import ContractViolation

N_VALID = 120
TRIGGER_WORDS = {w for ws in TRIGGERS.values() for w in ws}
CONTRACT_ONLY = {"governance/config.yaml", "governance/data_quality/validation_result.json",
                 "governance/data_quality/datasets.json"}


def _config(**text: Any) -> dict[str, Any]:
    return {"task": "multiclass-classification", "modality": "text", "target_column": "label",
            "text": {"tokenizer": minilm_path(), "max_length": 24, **text},
            "aggregation": {"n_bootstrap": 20, "sample_size": 64}, "quality": {"enabled": False}, "cpu_threads": 1}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("texts")
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = train_bag(*planted_texts(300, seed=0), tok)
    texts, y = planted_texts(N_VALID, seed=1)
    frame = pd.DataFrame({"text": texts, "label": y})
    frame.to_parquet(base / "valid.parquet", index=False)
    frame.to_json(base / "valid.jsonl", orient="records", lines=True)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with use_store(uri):
        mlflow.set_experiment("texts")
    return {"model": model, "frame": frame, "base": base, "uri": uri, "tokenizer": tok}


def _download(rid: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path))


def test_trigger_words_rank_first_and_special_tokens_carry_nothing(planted) -> None:
    with use_store(planted["uri"]):
        res = explain_model(planted["model"], planted["base"] / "valid.parquet", quiet=True, experiment_name="texts",
                            config={**_config(), "quality": {"enabled": True, "n_samples": 16}})
        rid = res.run_id
        gi = json.loads(_download(rid, "governance/explanations/global_importance.json").read_text())
        tokens = pd.read_parquet(_download(rid, "governance/explanations/token_relevance.parquet"))
        examples = json.loads(_download(rid, "governance/explanations/examples/texts.json").read_text())
        codes = pd.read_parquet(_download(rid, "governance/explanations/reason_codes.parquet"))
        quality = json.loads(_download(rid, "governance/explanations/quality.json").read_text())
    assert quality["modality"] == "token" and "morf_auc" in quality["metrics"]  # token deletion ran
    assert res.quality_note is None
    assert gi["modality"] == "text" and gi["n_samples"] == N_VALID
    for mode, doc in gi["modes"].items():  # the four trigger words first, filler below, in every mode
        assert {f["feature"] for f in doc["features"][:4]} == TRIGGER_WORDS, mode
    specials = {"[CLS]", "[SEP]", "[PAD]"}
    for f in gi["features"]:
        assert f["feature"] not in specials and f["count"] >= 5 and f["per_occurrence"] > 0
        assert f["value_relevance_correlation"] is None
    best = sorted(gi["features"], key=lambda f: -f["per_occurrence"])
    assert {f["feature"] for f in best[:4]} == TRIGGER_WORDS
    block = gi["text"]
    assert 0 < block["special_token_share"] < 1 and block["special_tokens_zeroed"] is True
    assert block["max_length"] == 24 and block["padding"] == "max_length" and block["truncated_share"] == 0
    assert {w["word"] for w in block["by_class"]["1"]["for"][:2]} == set(TRIGGERS[1])
    assert {w["word"] for w in block["by_class"]["0"]["for"][:2]} == set(TRIGGERS[0])
    assert not set(tokens["token"]) & specials and set(tokens.columns) == {
        "sample_id", "position", "token", "word", "relevance_signed", "relevance_default", "relevance_contrastive"}
    assert tokens["sample_id"].nunique() == N_VALID
    assert examples and all(len(e["tokens"]) == len(e["relevance"]) for e in examples)
    assert not any(t in specials for e in examples for t in e["tokens"])
    triggered = codes["supporting_1"].isin(TRIGGER_WORDS).mean()
    assert triggered > 0.9, triggered  # the trigger leads (almost) every decision


def test_special_tokens_and_padding_get_exactly_zero(planted) -> None:
    cfg = config_from_dict(_config())
    modality = get_modality(cfg)
    table = modality.open(planted["base"] / "valid.parquet")
    plan = modality.plan(table, types.SimpleNamespace(model=planted["model"], uri=None))
    batch = next(iter(modality.batches(table, plan, 16)))
    table.close()
    result = explain_batch(Explainer.from_config(planted["model"], cfg), modality, plan, batch)
    special = batch.extras["special"]
    assert special[:, 0].all() and (batch.inputs["attention_mask"] == 0).any()  # [CLS] and padding present
    for mode, r in result.modes.items():
        tok = r.detail["tokens"]
        assert (tok[special] == 0).all() and (tok[~special] != 0).mean() > 0.9, mode
        assert r.detail["special_abs"].sum() > 0  # the engine gave [CLS]/[SEP] relevance: reported, then zeroed
        assert np.allclose(r.relevance.sum(1), tok.sum(1))  # words hold exactly the kept tokens' relevance


def _docs(res: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"gi": res.global_importance, "stab": res.stability}, default=float))


def test_batch_size_and_format_do_not_change_the_documents(planted) -> None:
    ref = explain_model(planted["model"], planted["base"] / "valid.parquet", log=False, quiet=True,
                        config=_config(), batch_size=120)
    for data, batch in ((planted["base"] / "valid.parquet", 7), (planted["base"] / "valid.jsonl", 50)):
        res = explain_model(planted["model"], data, log=False, quiet=True, config=_config(), batch_size=batch)
        got, want = _docs(res), _docs(ref)
        assert_close(got, want, tol=1e-7, where=f"{data} batch {batch}")


def test_min_count_leaves_rare_words_unranked(planted) -> None:
    res = explain_model(planted["model"], planted["base"] / "valid.parquet", log=False, quiet=True,
                        config=_config(min_count=40))
    gi = res.global_importance
    assert gi["features"] and all(f["count"] >= 40 for f in gi["features"])
    assert gi["text"]["n_unranked"] > 0 and gi["text"]["n_ranked"] == len(gi["features"])


@pytest.mark.parametrize("value, expectation", [("   ", "text_length"), (17, "text_type"), (None, "not_be_null")])
def test_bad_texts_fail_the_contract(planted, tmp_path: Path, value: Any, expectation: str) -> None:
    frame = planted["frame"].head(30).astype({"text": object})
    frame.loc[3, "text"] = value
    path = tmp_path / "bad.jsonl"
    frame.to_json(path, orient="records", lines=True)
    with use_store(planted["uri"]):
        rid = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("texts").experiment_id).info.run_id
        with pytest.raises(ContractViolation) as info:
            explain_model(planted["model"], path, run_id=rid, quiet=True, config=_config())
        assert artifact_paths(rid) == CONTRACT_ONLY
    assert info.value.exit_code == 2 and expectation in str(info.value)


def test_a_missing_tokenizer_fails_with_one_line(planted, tmp_path: Path) -> None:
    cfg = _config()
    cfg["text"].pop("tokenizer")
    with pytest.raises(TokenizerError, match="no tokenizer: set text.tokenizer") as info:
        explain_model(planted["model"], planted["base"] / "valid.parquet", log=False, quiet=True, config=cfg)
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    with pytest.raises(TokenizerError, match="is not a folder saved with save_pretrained"):
        explain_model(planted["model"], planted["base"] / "valid.parquet", log=False, quiet=True,
                      config=_config(tokenizer=str(tmp_path / "nowhere")))
