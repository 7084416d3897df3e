"""The audit report: PDF content, layout and attachment; self-contained, escaped, deterministic HTML."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from report_fixtures import FEATURES

SECTION_TITLES = [
    "Cover and control block",
    "System description",
    "Data and data quality",
    "Performance",
    "Explainability",
    "Individual decisions",
    "Risks, limitations and human oversight",
    "Change log",
    "Appendix",
]


def _pdf(out: Path) -> Path:
    return out / "governance" / "reports" / "audit_report.pdf"


def _html(out: Path) -> str:
    return (out / "governance" / "reports" / "audit_report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pdf_text(published) -> str:
    return subprocess.run(["pdftotext", "-layout", str(_pdf(published.out_v2)), "-"], check=True,
                          capture_output=True, text=True).stdout


def test_pdf_text_has_every_section_heading_and_the_top_features(published, pdf_text):
    for i, title in enumerate(SECTION_TITLES, start=1):
        assert f"{i}. {title}" in pdf_text, title
    gi = json.loads((published.out_v2 / "governance/explanations/global_importance.json").read_text())
    top = [f["feature"] for f in gi["features"][:3]]
    for name in top:
        assert name in pdf_text
    # the table lists them in rank order
    positions = [pdf_text.index(f"{k}   {name}") if f"{k}   {name}" in pdf_text else pdf_text.index(name)
                 for k, name in enumerate(top, start=1)]
    assert positions == sorted(positions)


def test_pdf_pages_are_not_blank(published, tmp_path):
    from PIL import Image

    subprocess.run(["pdftoppm", "-png", "-r", "30", str(_pdf(published.out_v2)), str(tmp_path / "p")], check=True)
    pages = sorted(tmp_path.glob("p-*.png"))
    assert len(pages) >= 9  # one chapter per section at least
    for page in pages:
        im = Image.open(page).convert("L")
        # the body, without the running header and footer margins (22 mm top, 20 mm bottom of 297)
        top, bottom = int(im.height * 22 / 297), int(im.height * (297 - 20) / 297)
        body = im.crop((0, top, im.width, bottom))
        dark = sum(1 for px in body.getdata() if px < 200)
        assert dark > 100, f"{page.name} has no content ({dark} dark pixels)"
        header = im.crop((0, 0, im.width, top))
        assert page.name == "p-01.png" or min(header.getdata()) < 200, f"{page.name} has no running header"


def test_pdf_has_the_evidence_json_attached(published, tmp_path):
    pdf = _pdf(published.out_v2)
    listing = subprocess.run(["pdfdetach", "-list", str(pdf)], check=True, capture_output=True, text=True).stdout
    assert "governance_evidence.json" in listing
    subprocess.run(["pdfdetach", "-save", "1", "-o", str(tmp_path / "ev.json"), str(pdf)], check=True)
    evidence = json.loads((tmp_path / "ev.json").read_text())
    gi = json.loads((published.out_v2 / "governance/explanations/global_importance.json").read_text())
    assert evidence["global_importance"] == gi
    assert evidence["layer_ranking"]["layers"][0]["module"] == "0"
    assert evidence["validation_result"]["success"] is True
    inputs = evidence["manifest_inputs"]
    assert inputs["model_uri"] == f"models:/credit-risk/{published.store.versions['v2']}"
    assert inputs["model_id"].startswith("m-") and inputs["dataset_digest"]
    assert "mlflow" in inputs["package_versions"]


def test_pdf_is_a4_pdfa3b_with_running_header_page_x_of_y_and_toc(published, pdf_text):
    from pypdf import PdfReader

    pdf = _pdf(published.out_v2)
    reader = PdfReader(str(pdf))
    n = len(reader.pages)
    for page in reader.pages:
        w, h = float(page.mediabox.width), float(page.mediabox.height)
        assert abs(w - 595.28) < 1 and abs(h - 841.89) < 1  # A4 in points
    xmp = reader.trailer["/Root"]["/Metadata"].get_object().get_data().decode()
    assert 'pdfaid:part="3"' in xmp or "<pdfaid:part>3</pdfaid:part>" in xmp
    assert 'pdfaid:conformance="B"' in xmp or "<pdfaid:conformance>B</pdfaid:conformance>" in xmp
    assert "/AF" in reader.trailer["/Root"]  # PDF/A-3 associated file
    assert "/StructTreeRoot" in reader.trailer["/Root"]  # tagged for screen readers
    pages = pdf_text.split("\f")
    for k in range(1, n + 1):
        assert f"Page {k} of {n}" in pages[k - 1]
    # running header from page 2 on: the document title and the current section
    assert "Model audit report: credit-risk v2" in pages[1].splitlines()[0]
    assert "5. Explainability" in next(p for p in pages if "5. Explainability\n" in p or "Global importance" in p)
    # table of contents on page 1 with the page number of each section
    toc = dict(re.findall(r"(\d)\. [A-Z][^\n.]*?\.{3,}\s*(\d+)", pages[0]))
    assert len(toc) == 9
    for number, page in toc.items():
        assert f"{number}. {SECTION_TITLES[int(number) - 1]}" in pages[int(page) - 1]


def test_pdf_metadata_dates_come_from_the_run_not_the_clock(published, tracking):
    import mlflow
    from pypdf import PdfReader

    run = mlflow.MlflowClient().get_run(published.store.explain_run_ids["v2"])
    start = run.info.start_time // 1000
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(start, tz=dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    meta = PdfReader(str(_pdf(published.out_v2))).metadata
    assert stamp in str(meta.get("/CreationDate")) and stamp in str(meta.get("/ModDate"))


def test_html_is_self_contained_without_script_or_external_url(published):
    for out in (published.out_v2, published.out_v3):
        html = _html(out)
        assert "<script" not in html.lower()
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.I)
        refs += re.findall(r"url\(\s*['\"]?([^'\")]*)", html, flags=re.I)
        assert refs, "expected embedded images and anchors"
        for ref in refs:
            assert not re.match(r"\s*(https?:)?//", ref, flags=re.I), ref
            assert ref.startswith(("data:image/png;base64,", "#")), ref
        assert "<style>" in html and "<link" not in html.lower()
        # accessibility: every image has alt text, tables have header cells
        for img in re.findall(r"<img [^>]*>", html):
            assert re.search(r'alt="[^"]+"', img), img
        assert "<th scope=" in html


def test_untrusted_feature_name_is_escaped(published):
    assert "<script>alert(1)</script>" in FEATURES
    for out in (published.out_v2,):
        html = _html(out)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>alert(1)" not in html
        card_html = (out / "governance/model_card/model_card.html").read_text()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card_html and "<script>" not in card_html
        card_md = (out / "governance/model_card/model_card.md").read_text()
        assert "<script>" not in card_md and "&lt;script&gt;alert(1)&lt;/script&gt;" in card_md


def test_rendering_twice_gives_identical_bytes(published):
    for rel in ("reports/audit_report.html", "reports/audit_report.pdf", "model_card/model_card.md",
                "model_card/model_card.json", "model_card/model_card.html", "manifest.json"):
        a = (published.out_v2 / "governance" / rel).read_bytes()
        b = (published.out_v2_again / "governance" / rel).read_bytes()
        assert a == b, rel


def test_sections_without_data_say_not_provided(published):
    html = _html(published.out_v2)
    # the --config file sets no risks, limitations or human oversight, and the run has no examples
    assert "Not provided: set report.risks" in html
    assert "Not provided: set report.human_oversight" in html
    assert "Not provided: the run logged no example images" in html
    assert "Not provided: no sign-off has been recorded yet" in html


def test_individual_decisions_show_adverse_sample_with_plain_language(published):
    html = _html(published.out_v2)
    section = html[html.index('id="sec-decisions"'):html.index('id="sec-risks"')]
    assert "adverse decisions (prediction in 1)" in section
    assert "the first 5 by sample id are shown" in section
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\w+)</td>", section)
    assert len(rows) == 5 and all(p == "1" for _, p in rows)
    assert "Income is too low for the amount requested" in section
    assert "Plain-language dictionary" in section
    leaders = section[section.index("Features leading the reason codes"):section.index("Plain-language dictionary")]
    assert re.search(r"<td>\w[^<]*</td><td class=\"num\">\d+ \(\d+\.\d%\)</td>", leaders)


def test_crosswalk_maps_sections_to_the_frameworks(published):
    html = _html(published.out_v2)
    appendix = html[html.index('id="sec-appendix"'):]
    for ref in ("Annex IV", "Art. 13", "Art. 86", "SR 11-7", "SR 26-2", "1002.9", "Art. 22", "15(1)(h)"):
        assert ref in appendix, ref
    for i, title in enumerate(SECTION_TITLES, start=1):
        assert f"<td>{i}. {title}</td>" in appendix.replace("&amp;", "&")


def test_change_log_against_the_previous_audited_version(published):
    html = _html(published.out_v2)
    section = html[html.index('id="sec-changes"'):html.index('id="sec-appendix"')]
    assert "Compared with version 1" in section
    assert "Importance rank shifts" in section and "accuracy" in section
    # version 1's own report would have no previous audited version
    assert "Not provided" not in section


def test_failed_gate_is_flagged(published):
    html = _html(published.out_v3)
    assert "Policy gate(s) failed" in html
    assert re.search(r'class="alert">FAILED<', html)


def test_performance_and_architecture_come_from_mlflow(published, tracking):
    import mlflow

    html = _html(published.out_v2)
    train = mlflow.MlflowClient().get_run(published.store.train_run_ids["v2"])
    acc = f"{train.data.metrics['accuracy']:.4f}"
    assert acc in html
    assert "precision" in html and "(n=" in html  # per-class metrics and per-class importance
    assert "Parameters</th><td>97</td>" in html  # 6*8+8 + 8*4+4 + 4*1+1


def test_report_is_logged_to_the_run_with_manifest(published, tracking):
    import mlflow

    client = mlflow.MlflowClient()
    rid = published.store.explain_run_ids["v2"]
    names = {f.path for f in client.list_artifacts(rid, "governance/reports")}
    assert {"governance/reports/audit_report.html", "governance/reports/audit_report.pdf"} <= names
    assert {f.path for f in client.list_artifacts(rid, "governance/model_card")} == {
        f"governance/model_card/model_card.{e}" for e in ("md", "json", "html")}
    assert "governance/manifest.json" in {f.path for f in client.list_artifacts(rid, "governance")}
    run = client.get_run(rid)
    assert run.data.tags["governance.status"] == "reported"
    mv = client.get_model_version("credit-risk", published.store.versions["v2"])
    assert mv.tags["governance.run_id"] == rid


def test_render_time_and_size_are_reasonable(published):
    assert published.pdf_bytes < 2_000_000
    assert published.seconds < 120


def test_unknown_run_and_run_without_explanations_fail_clearly(tracking):
    from governance.report import ReportError, publish_report

    with pytest.raises(ReportError, match="not found"):
        publish_report("0123456789abcdef0123456789abcdef", log=False)
    with pytest.raises(ReportError, match="has no governance/explanations"):
        publish_report(tracking.train_run_ids["v1"], log=False)


def test_cli_report_error_exit_code(tracking):
    from click.testing import CliRunner

    from governance.cli import main

    res = CliRunner().invoke(main, ["report", "--run-id", "doesnotexist"])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and "not found" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- issue 10 / 9


def _listing(client, rid):
    out, todo = set(), ["governance"]
    while todo:
        for f in client.list_artifacts(rid, todo.pop()):
            (todo.append(f.path) if f.is_dir else out.add((f.path, f.file_size)))
    return out


def test_output_dir_never_deletes_a_users_file(published, tracking, tmp_path, monkeypatch):
    """`report --output-dir DIR` used to wipe DIR/governance/ (with `.` at a repository root, the
    package itself). A folder holding anything is refused before anything is written or logged."""
    import mlflow
    from click.testing import CliRunner

    from governance.cli import main

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v3"]
    before = _listing(client, rid)
    repo = tmp_path / "repo"
    (repo / "governance").mkdir(parents=True)
    (repo / "governance" / "__init__.py").write_text("# the user's package\n")
    (repo / "notes.txt").write_text("mine")
    monkeypatch.chdir(repo)
    for target in (".", str(repo)):
        res = CliRunner().invoke(main, ["report", "--run-id", rid, "--output-dir", target])
        assert res.exit_code == 1, res.output
        assert res.output.startswith("error: --output-dir") and "is not empty" in res.output
    assert (repo / "governance" / "__init__.py").read_text() == "# the user's package\n"
    assert sorted(p.name for p in repo.rglob("*")) == ["__init__.py", "governance", "notes.txt"]
    assert _listing(client, rid) == before
    # a new folder (or an empty one) receives the complete governance/ folder
    res = CliRunner().invoke(main, ["report", "--run-id", rid, "--output-dir", str(tmp_path / "new" / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new" / "out" / "governance" / "manifest.json").is_file()


def test_report_on_a_run_whose_contract_failed_says_so(tracking, tmp_path):
    """No "run explain first": the run has no explanation because its data broke the contract."""
    import mlflow
    from click.testing import CliRunner

    from governance.cli import main
    from report_fixtures import validation_result

    doc = validation_result(160, success=False)
    folder = tmp_path / "governance" / "data_quality"
    folder.mkdir(parents=True)
    (folder / "validation_result.json").write_text(json.dumps(doc))
    with mlflow.start_run(run_name="explain-contract-failed") as run:
        mlflow.log_artifacts(str(tmp_path / "governance"), "governance")
        mlflow.set_tags({"governance.status": "failed", "governance.contract_source": doc["contract_source"]})
    res = CliRunner().invoke(main, ["report", "--run-id", run.info.run_id])
    assert res.exit_code == 2, res.output
    assert "its data broke the contract (training data 'train' of the model's run)" in res.output
    assert "expect_column_values_to_be_between on income (3 values outside [-6.0, 6.0])" in res.output
    assert "run `mlflow-governance explain` on it first" not in res.output


def test_performance_is_the_models_own_metrics_and_quality_is_named_in_words(published):
    html = _html(published.out_v2)
    performance = html[html.index('id="sec-performance"'):html.index('id="sec-explainability"')]
    assert "accuracy" in performance and "governance_" not in performance
    assert "governance_quality_" not in html  # not in the change log either
    quality = html[html.index("<h3>Explanation quality</h3>"):html.index("Gates of the explanation run")]
    assert quality.count("Deletion gap, LeRF minus MoRF") == 1
    assert "Rank similarity after randomising every layer (MPRT)" in quality
    assert "DLBacktrace, signed mode" in quality and "Gradient \u00d7 input" in quality
    assert re.search(r"Deletion gap, LeRF minus MoRF[^<]*<span class=\"mono\">delta_\u200bauc</span></td><td>higher</td>",
                     quality)


def test_effect_column_follows_the_value_relevance_correlation(published):
    """debt_to_income raises default risk; the old Effect column (sign of the mean signed share)
    called it "lowers the output". The recorded direction is used, with its rho."""
    gi = json.loads((published.out_v2 / "governance/explanations/global_importance.json").read_text())
    dti = next(f for f in gi["features"] if f["feature"] == "debt_to_income")
    assert dti["signed"] < 0 and dti["direction"] == "raises"
    html = _html(published.out_v2)
    importance = html[html.index("<h3>Global importance</h3>"):html.index("<h3>Comparison of modes</h3>")]
    row = re.search(r"<td>debt_to_income</td>.*?</tr>", importance).group(0)
    assert f"raises (\u03c1 {dti['value_relevance_correlation']:+.2f})" in row
    assert "lowers the output" not in row
    decisions = html[html.index('id="sec-decisions"'):html.index('id="sec-risks"')]
    assert "higher values raise the output (\u03c1" in decisions or "higher values lower the output (\u03c1" in decisions


def test_dataset_hashes_come_from_explain_time_one_per_input(published, tracking, tmp_path):
    """Each input keeps the hash explain took; a file changed afterwards does not change it."""
    from governance.report.context import build_context, manifest_inputs
    from governance.report.evidence import load_run_evidence

    recorded = json.loads((published.out_v2 / "governance/data_quality/datasets.json").read_text())["datasets"]
    hashes = {d["name"]: d["sha256"] for d in recorded}
    assert len(set(hashes.values())) == 2
    html = _html(published.out_v2)
    data = html[html.index('id="sec-data"'):html.index('id="sec-performance"')]
    for h in hashes.values():
        assert h in data
    manifest = json.loads((published.out_v2 / "governance/manifest.json").read_text())
    assert {d["name"]: d["sha256"] for d in manifest["inputs"]["datasets"]} == hashes
    # the source file changes after explain: the report still shows what explain read
    source = Path(next(d["source"] for d in recorded if d["name"] == "validation"))
    saved = source.read_bytes()
    source.write_bytes(saved + b"changed later")
    try:
        ev = load_run_evidence(tracking.explain_run_ids["v2"], workdir=tmp_path / "ev")
        rows = build_context(ev)["data"]["datasets"]
        assert {r["name"]: r["sha256"] for r in rows} == hashes
        assert {d["name"]: d["sha256"] for d in manifest_inputs(ev)["datasets"]} == hashes
    finally:
        source.write_bytes(saved)
    # a run explained before datasets.json existed says so instead of hashing anything now
    old = load_run_evidence(tracking.explain_run_ids["v1"], workdir=tmp_path / "old")
    assert [r["sha256"] for r in build_context(old)["data"]["datasets"]] == ["not recorded at explain time"]
