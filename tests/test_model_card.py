"""The model card: Hugging Face Markdown with front matter, model-card-toolkit JSON, HTML."""

from __future__ import annotations

import json
import re

import yaml
from click.testing import CliRunner

from governance.cli import main
from governance.report.options import MODEL_CARD_FIELDS, MORE_INFO

HF_SECTIONS = ["## Model Details", "### Model Description", "## Uses", "### Direct Use", "### Out-of-Scope Use",
               "## Bias, Risks, and Limitations", "## Training Details", "## Evaluation", "## Environmental Impact",
               "## Technical Specifications", "## Citation", "## Model Card Contact"]


def _card(published, name):
    return (published.out_v2 / "governance" / "model_card" / name).read_text(encoding="utf-8")


def test_markdown_has_front_matter_and_the_hugging_face_sections(published):
    md = _card(published, "model_card.md")
    assert md.startswith("---\n")
    front = yaml.safe_load(md.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "pytorch"
    assert front["model_name"] == "credit-risk" and front["model_version"] == "2"
    assert "accuracy" in front["metrics"] and "validation" in front["datasets"]
    positions = [md.index(s + "\n") for s in HF_SECTIONS]
    assert positions == sorted(positions)


def test_json_uses_the_model_card_toolkit_keys_filled_from_mlflow(published, tracking):
    import mlflow

    card = json.loads(_card(published, "model_card.json"))
    assert {"model_details", "model_parameters", "quantitative_analysis", "considerations"} <= set(card)
    d = card["model_details"]
    assert d["name"] == "credit-risk" and d["version"]["name"] == "2"
    assert d["owners"][0]["name"] == "Model Risk Lab" and d["licenses"][0]["identifier"] == "apache-2.0"
    assert "tensor float32 (-1, 6)" in card["model_parameters"]["input_format"]
    assert "97 parameters" in card["model_parameters"]["model_architecture"]
    train = mlflow.MlflowClient().get_run(tracking.train_run_ids["v2"]).data.metrics
    metrics = {m["type"]: m["value"] for m in card["quantitative_analysis"]["performance_metrics"]}
    assert metrics == train
    assert "income" in card["quantitative_analysis"]["graphics"]["description"]
    assert set(card["considerations"]) == {"users", "use_cases", "limitations", "tradeoffs", "ethical_considerations"}


def test_human_only_fields_say_more_information_needed_and_are_counted(published):
    md = _card(published, "model_card.md")
    provided = {"developed_by", "license"}  # the model_card: section of the fixture's config
    n_missing = len(MODEL_CARD_FIELDS) - len(provided)
    assert f"{n_missing} of {len(MODEL_CARD_FIELDS)} fields" in md
    assert "**Developed by:** Model Risk Lab" in md
    assert f"**Funded by:** {MORE_INFO}" in md
    html = _card(published, "model_card.html")
    assert html.count(f">{MORE_INFO}<") == n_missing
    assert f"{n_missing} of {len(MODEL_CARD_FIELDS)}" in json.loads(_card(published, "model_card.json"))[
        "model_details"]["documentation"]


def test_explanation_results_in_the_card(published):
    md = _card(published, "model_card.md")
    assert "primary mode signed" in md
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", md, flags=re.M)
    assert rows[0][0] == "1" and rows[0][1].strip() == "income"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    # stability is the recorded split-half rank correlation (the key stability.json has), not "n/a"
    st = json.loads((published.out_v2 / "governance/explanations/stability.json").read_text())
    assert f"stability {st['stability']:.3f}," in md and "stability n/a" not in md
    # direction of effect from the recorded value-relevance correlation, in words
    gi = json.loads((published.out_v2 / "governance/explanations/global_importance.json").read_text())
    dti = next(f for f in gi["features"] if f["feature"] == "debt_to_income")
    assert dti["direction"] == "raises" and dti["signed"] < 0  # the mean signed share points the wrong way
    row = next(line for line in md.splitlines() if line.startswith("| ") and "debt\\_to\\_income" in line)
    assert f"higher values raise the output (\u03c1 {dti['value_relevance_correlation']:+.2f})" in row


def test_card_command_for_a_model_uri(published, tracking, tmp_path):
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/credit-risk/2", "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_card.html", "model_card.json", "model_card.md"]
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["model_details"]["name"] == "credit-risk"
    assert "income" in card["quantitative_analysis"]["graphics"]["description"]  # found via the registry
    # a folder that holds anything is refused, and left as it was
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/credit-risk/2", "--output-dir", str(tmp_path)])
    assert res.exit_code == 1 and "is not empty" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_card.html", "model_card.json", "model_card.md"]


def test_card_without_output_dir_is_logged_to_the_governance_run(published, tracking, tmp_path, monkeypatch):
    """Never into the current folder: the card goes to the run, outside governance/ (whose
    manifest it would otherwise break)."""
    import mlflow

    from governance.archive import verify_run

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/credit-risk/2"])
    assert res.exit_code == 0, res.output
    rid = tracking.explain_run_ids["v2"]
    assert f"runs:/{rid}/model_cards/credit-risk-v2" in res.output
    assert list(tmp_path.iterdir()) == []
    names = {f.path for f in mlflow.MlflowClient().list_artifacts(rid, "model_cards/credit-risk-v2")}
    assert names == {f"model_cards/credit-risk-v2/model_card.{e}" for e in ("md", "json", "html")}
    assert verify_run(rid).ok


def test_card_for_the_audited_alias_cites_the_approved_run(published, tracking, tmp_path):
    from governance.approval import approve

    approve(tracking.model_name, tracking.versions["v2"], "Dana Reviewer", "Validator", policy="default")
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/credit-risk@audited", "--output-dir",
                                    str(tmp_path / "card")])
    assert res.exit_code == 0, res.output
    rid = tracking.explain_run_ids["v2"]
    assert f"explanation results from governance run {rid}" in res.output
    md = (tmp_path / "card" / "model_card.md").read_text()
    assert f"(governance run {rid})" in md
    assert f"approved (report of governance run {rid})" in md


def test_card_never_unpickles_a_model_without_opt_in(tracking, tmp_path, monkeypatch):
    """A model logged in MLflow's pickle format whose unpickling runs code. Without a governance
    run the card falls back to the model's files: it must not load it unless --allow-pickle."""
    import mlflow

    import pickle_payload

    marker = tmp_path / "marker.txt"
    monkeypatch.setenv(pickle_payload.MARKER_ENV, str(marker))
    with mlflow.start_run(run_name="pickled"):
        mlflow.pytorch.log_model(pickle_payload.Payload(), name="model", serialization_format="pickle",
                                 registered_model_name="pickled-model", pip_requirements=["torch"])
    assert not marker.exists()
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/pickled-model/1", "--output-dir",
                                    str(tmp_path / "safe")])
    assert res.exit_code == 0, res.output
    assert not marker.exists(), "the pickle was loaded without opt-in"
    card = json.loads((tmp_path / "safe" / "model_card.json").read_text())
    assert card["model_parameters"]["model_architecture"] == MORE_INFO
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/pickled-model/1", "--output-dir",
                                    str(tmp_path / "opted-in"), "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert marker.exists()  # the opt-in really loads it (and so ran its code)
    card = json.loads((tmp_path / "opted-in" / "model_card.json").read_text())
    assert "Payload with 21 parameters" in card["model_parameters"]["model_architecture"]


def test_card_without_governance_run_and_unknown_model(tracking, tmp_path):
    from governance.report.evidence import ModelFacts
    from governance.report.model_card import build_model_card, render_model_card

    card = build_model_card(ModelFacts(uri="models:/x/1", name="x", version="1"), None, {}, date=None)
    files = render_model_card(card)
    md = files["model_card.md"].decode()
    assert "Explanation results: not provided" in md
    assert f"{len(MODEL_CARD_FIELDS)} of {len(MODEL_CARD_FIELDS)} fields" in md
    res = CliRunner().invoke(main, ["card", "--model-uri", "models:/does-not-exist/7", "--output-dir", str(tmp_path)])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "not found" in res.output
