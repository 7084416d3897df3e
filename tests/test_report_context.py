"""Context building without the PDF: examples (heatmaps, token highlights), options, escaping."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from governance.report.options import ReportError, parse_model_card_options, parse_report_options


@pytest.fixture(scope="module")
def evidence(governance_store, tmp_path_factory):
    from governance.report.evidence import load_run_evidence
    from report_fixtures import use_store

    with use_store(governance_store.tracking_uri):
        return load_run_evidence(governance_store.explain_run_ids["v2"], tracking_uri=governance_store.tracking_uri,
                                 workdir=tmp_path_factory.mktemp("evidence"))


def test_image_heatmaps_and_token_highlights_are_rendered(evidence):
    from governance.report.context import build_context
    from governance.report.render import render_html

    rng = np.random.default_rng(0)
    images = {"inputs": rng.random((3, 1, 8, 8)), "relevance": rng.normal(size=(3, 1, 8, 8)),
              "predictions": np.array([3, 1, 7])}
    texts = [{"id": "s1", "tokens": ["the", "<b>loan</b>", "was", "late"], "relevance": [0.01, 0.5, -0.2, 0.9],
              "prediction": "default"}]
    ev = dataclasses.replace(evidence, image_examples=images, text_examples=texts)
    html = render_html(build_context(ev))
    section = html[html.index("Examples: relevance over inputs"):html.index("Limitations of the method")]
    imgs = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', section)
    assert len(imgs) == 3 and "relevance heatmap" in imgs[0]
    assert "&lt;b&gt;loan&lt;/b&gt;" in section and "<b>loan</b>" not in section
    # the strongest token gets the most intense highlight; signs pick the colour
    alphas = [float(a) for a in re.findall(r"rgba\(\d+, \d+, \d+, ([0-9.]+)\)", section)]
    assert alphas.index(max(alphas)) == 3
    assert "rgba(31, 78, 121" in section and "rgba(192, 80, 77" in section
    assert "Not provided: the run logged no example" not in section


def test_without_examples_the_report_says_so(evidence):
    from governance.report.context import build_context

    ctx = build_context(evidence)
    ex = ctx["explainability"]["examples"]
    assert ex["images"] == [] and "images.npz" in ex["images_missing"]
    assert "texts.json" in ex["texts_missing"]


def test_context_is_precomputed_strings(evidence):
    from governance.report.context import build_context

    ctx = build_context(evidence)
    row = ctx["explainability"]["features"][0]
    assert all(isinstance(v, str) for v in row.values())
    assert row["importance"].endswith("%")
    assert ctx["meta"]["report_id"].startswith("GR-")


def test_missing_artifacts_are_marked_not_provided(evidence):
    from governance.report.context import build_context

    ev = dataclasses.replace(evidence, quality=None, layer_ranking=None, stability=None, reason_codes=None,
                             validation=None, previous=None)
    ctx = build_context(ev)
    assert ctx["explainability"]["quality"]["missing"].startswith("Not provided")
    assert ctx["explainability"]["layers"]["missing"].startswith("Not provided")
    assert ctx["explainability"]["stability"]["missing"].startswith("Not provided")
    assert ctx["decisions"]["missing"].startswith("Not provided")
    assert ctx["data"]["validation"]["missing"].startswith("Not provided")
    assert "no earlier version" in ctx["changes"]["missing"]


def test_report_options_are_validated():
    with pytest.raises(ReportError, match="unknown key"):
        parse_report_options({"titel": "x"})
    with pytest.raises(ReportError, match="select"):
        parse_report_options({"sample_decisions": {"select": "worst"}})
    with pytest.raises(ReportError, match="positive integer"):
        parse_report_options({"top_features": 0})
    opts = parse_report_options({"out_of_scope": "Pricing", "sample_decisions": {"n": 3, "select": "first"}})
    assert opts.out_of_scope == ["Pricing"] and opts.sample_decisions.n == 3
    with pytest.raises(ReportError, match="model_card: unknown"):
        parse_model_card_options({"owner": "me"})


def test_sample_selection_by_ids(evidence):
    from governance.report.context import build_context

    cfg = dict(evidence.config, report={"sample_decisions": {"select": "ids", "ids": [3, 5], "n": 10}})
    ctx = build_context(dataclasses.replace(evidence, config=cfg))
    assert [r["id"] for r in ctx["decisions"]["rows"]] == ["3", "5"]


def test_templates_ship_inside_the_wheel(tmp_path):
    """`pip wheel` packs templates/ as governance/templates, and the lookup finds them installed."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "w"), str(root)], check=True, capture_output=True)
    wheel = next((tmp_path / "w").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for t in ("audit_report.html.j2", "model_card.md.j2", "model_card.html.j2", "report.css", "macros.html.j2",
              "sections/cover.html.j2", "sections/explainability/quality.html.j2"):
        assert f"governance/templates/{t}" in names
    assert "governance/policies/default.yaml" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("from governance.report.render import template_dir; d = template_dir(); "
            "print(d); assert (d / 'audit_report.html.j2').is_file(); "
            "from governance.policy import load_policy; assert load_policy('default').gates")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout
    assert str(tmp_path / "site") in out


def test_local_relevance_is_read_bounded(tmp_path):
    """Large local relevance: evenly spaced rows, and only the top features when the norm is stored."""
    import pandas as pd

    from governance.report import evidence as E

    n, feats = 120_000, [f"f{i}" for i in range(60)]
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, len(feats))).astype("float32"), columns=feats)
    df.insert(0, "relevance_l1", np.abs(df.to_numpy()).sum(1))
    df.insert(0, "prediction", rng.integers(0, 2, n))
    df.insert(0, "sample_id", np.arange(n))
    path = tmp_path / "local_relevance.parquet"
    df.to_parquet(path, index=False)
    out = E._read_local_relevance(path, feats)
    assert len(out) <= E.MAX_LOCAL_ROWS and out.attrs["n_rows_total"] == n
    assert list(out["sample_id"][:3]) == [0, 3, 6]  # every third row of 120,000
    assert len([c for c in out.columns if c.startswith("f")]) == E.MAX_LOCAL_FEATURES
    assert {"sample_id", "prediction", "relevance_l1"} <= set(out.columns)


def test_report_renders_without_any_model_metadata(evidence):
    """A run whose model URI is unknown still renders, saying what is not provided."""
    from governance.report.context import build_context
    from governance.report.evidence import ModelFacts
    from governance.report.render import render_html

    ev = dataclasses.replace(evidence, model=ModelFacts(architecture_note="model URI not recorded"),
                             previous=None, datasets=[], metrics={}, plots={})
    html = render_html(build_context(ev))
    assert "Not provided: the model is not registered" in html
    assert "Not provided: model URI not recorded" in html
    assert "Not provided: no dataset was logged as an input of the run" in html
    assert "the model is not registered" in html[html.index('id="sec-changes"'):]


def test_a_failed_render_logs_nothing(governance_store, tracking, monkeypatch, tmp_path):
    """Everything is rendered before anything is logged: a failure leaves the run untouched."""
    import mlflow

    from governance.report import ReportError, publish
    from governance.report.publish import publish_report

    client = mlflow.MlflowClient()
    rid = governance_store.explain_run_ids["v1"]

    def listing():
        out, todo = set(), ["governance"]
        while todo:
            for f in client.list_artifacts(rid, todo.pop()):
                (todo.append(f.path) if f.is_dir else out.add((f.path, f.file_size)))
        return out

    before = listing()

    def broken_pdf(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(publish, "render_pdf", broken_pdf)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        publish_report(rid)
    assert listing() == before
    bad = tmp_path / "bad.yaml"
    bad.write_text("report:\n  titel: typo\n")
    with pytest.raises(ReportError, match="unknown key"):
        publish_report(rid, config_path=bad)
    assert listing() == before
    assert "governance.report_id" not in client.get_run(rid).data.tags


# ----------------------------------------------------------------------------- honesty (issue 10)


def _html_of(ev) -> str:
    from governance.report.context import build_context
    from governance.report.render import render_html

    return render_html(build_context(ev))


def test_what_the_stage_could_not_be_sure_of_is_flagged(evidence):
    """Unverified feature order, a contract derived from the data it checks, a pickle loaded by
    opt-in: each shows as a risk flag and where it applies, never as a plain "passed"."""
    validation = dict(evidence.validation, contract_source="validation data schema", independent=False,
                      notes=["no training data was logged with the model"])
    tags = dict(evidence.tags, **{"governance.feature_order": "unverified", "governance.feature_order_source": "none",
                                  "governance.allow_pickle": "true", "governance.contract_independent": "false"})
    html = _html_of(dataclasses.replace(evidence, tags=tags, validation=validation))
    risks = html[html.index('id="sec-risks"'):html.index('id="sec-changes"')]
    assert "Feature order UNVERIFIED" in risks
    assert "contract not independent of the data it checks" in risks
    assert "loaded from a pickle by explicit opt-in" in risks
    cover = html[html.index('id="sec-cover"'):html.index('id="sec-system"')]
    assert "UNVERIFIED: the model carries no feature names" in cover
    assert "from a pickle, by explicit opt-in" in cover
    data = html[html.index('id="sec-data"'):html.index('id="sec-performance"')]
    assert re.search(r'<span class="fail">contract not independent of the data it checks</span>', data)
    assert "no training data was logged with the model" in data
    summary = html[html.index('aria-label="Summary"'):html.index("</table>", html.index('aria-label="Summary"'))]
    assert "Data contract</th><td>contract not independent of the data it checks" in summary
    assert "Data contract</th><td>passed" not in summary


def test_an_older_run_with_a_schema_derived_contract_is_not_independent(evidence):
    validation = {k: v for k, v in evidence.validation.items() if k not in ("independent", "notes")}
    validation["contract_source"] = "validation data schema"
    tags = {k: v for k, v in evidence.tags.items() if k != "governance.contract_independent"}
    html = _html_of(dataclasses.replace(evidence, tags=tags, validation=validation))
    assert "Data contract: contract not independent of the data it checks" in html


def test_direction_not_recorded_for_an_older_run(governance_store, tmp_path):
    from governance.report.context import build_context
    from governance.report.evidence import load_run_evidence
    from report_fixtures import use_store

    with use_store(governance_store.tracking_uri):
        old = load_run_evidence(governance_store.explain_run_ids["v1"], workdir=tmp_path)
    ctx = build_context(old)
    assert {r["direction"] for r in ctx["explainability"]["features"]} == {"direction not recorded"}
    assert "direction not recorded" in ctx["explainability"]["effect_note"]


def test_all_expectations_table_stays_inside_the_page(evidence, tmp_path):
    """A contract with long parameters (type lists, float64 bounds) used to run off the page."""
    import subprocess

    from PIL import Image

    from governance.report.context import build_context
    from governance.report.render import render_html, render_pdf

    types = ["bool", "int8", "int16", "int32", "int64", "uint8", "float32", "float64", "Int64", "Float64"]
    results = []
    for i in range(12):
        col = f"a_rather_long_feature_name_number_{i:02d}_with_suffix"
        results.append({"success": True, "expectation_config": {
            "type": "expect_column_values_to_be_in_type_list", "kwargs": {"column": col, "type_list": types[:6]}},
            "result": {"observed_value": "float64"}})
        results.append({"success": True, "expectation_config": {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": col, "min_value": -1.7976931348623157e308, "max_value": 1.7976931348623157e308,
                       "mostly": 0.999}},
            "result": {"element_count": 160, "unexpected_count": 0}})
    validation = {"success": True, "contract_source": "training data", "great_expectations": {
        "success": True, "suite_name": "governance_contract", "results": results, "statistics": {}}}
    ev = dataclasses.replace(evidence, validation=validation)
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(render_pdf(render_html(build_context(ev)), created=ev.start_time))
    pages = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True,
                           text=True).stdout.split("\f")
    first = next(i for i, p in enumerate(pages, start=1) if "All expectations" in p)
    for page in range(first, first + 2):
        subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", str(page), "-l", str(page), str(pdf),
                        str(tmp_path / "p")], check=True)
    for png in sorted(tmp_path.glob("p-*.png")):
        im = Image.open(png).convert("L")
        right = im.crop((int(im.width * (210 - 14) / 210), 0, im.width, im.height))  # the 16 mm margin
        assert min(right.getdata()) > 200, f"{png.name}: the table runs into the right margin"


# ----------------------------------------------------------------------------- section registry (issue 11)


def test_a_new_part_is_one_builder_and_one_partial_registered_in_one_table(evidence, monkeypatch):
    """e.g. mean heatmaps for images: registered after per-class importance, printed there;
    a part whose builder returns None (does not apply to the run) prints nothing."""
    import jinja2

    from governance.report import render
    from governance.report.sections import explainability
    from governance.report.sections.base import Part

    partial = '<h3>Mean heatmaps</h3>\n<p>{{ x.heatmaps.n }} classes</p>\n'
    env = render.environment()
    monkeypatch.setattr(env, "loader", jinja2.ChoiceLoader(
        [jinja2.DictLoader({"sections/explainability/heatmaps.html.j2": partial}), env.loader]))
    env.cache.clear() if env.cache is not None else None
    parts = list(explainability.PARTS)
    at = [p.id for p in parts].index("per_class") + 1
    parts[at:at] = [Part("heatmaps", lambda inp: {"heatmaps": {"n": "2"}}, "sections/explainability/heatmaps.html.j2"),
                    Part("words", lambda inp: None, "sections/explainability/absent.html.j2")]
    monkeypatch.setattr(explainability, "PARTS", tuple(parts))
    html = _html_of(evidence)
    assert "<h3>Mean heatmaps</h3>\n<p>2 classes</p>\n" in html
    assert html.index("Importance per predicted class") < html.index("Mean heatmaps") < html.index("Layer ranking")


def test_a_new_section_is_numbered_and_listed_from_the_table(evidence, monkeypatch):
    import jinja2

    from governance.report import context, render
    from governance.report.sections.base import Section

    env = render.environment()
    monkeypatch.setattr(env, "loader", jinja2.ChoiceLoader([jinja2.DictLoader({
        "sections/fairness.html.j2": '<section class="chapter" id="fairness">{{ fairness.text }}</section>\n'}),
        env.loader]))
    monkeypatch.setattr(context, "SECTIONS", context.SECTIONS + (
        Section("fairness", "Fairness", lambda inp: {"text": "by group"}, "sections/fairness.html.j2"),))
    html = _html_of(evidence)
    assert '<a href="#sec-fairness">10. Fairness</a>' in html
    assert html.index('id="sec-appendix"') < html.index('<section class="chapter" id="fairness">by group</section>')
