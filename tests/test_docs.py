"""The README and docs/ stand on their own: every relative link resolves inside the repository,
and nothing points at files outside it (the team's shared folder, an external spec)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", flags=re.M)


def _links(text: str) -> list[str]:
    out = [a or b for a, b in LINK.findall(text)]
    return out + REFERENCE.findall(text)


def _anchors(path: Path) -> set[str]:
    """GitHub-style anchors of a Markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+)$", path.read_text(encoding="utf-8"), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_resolves_inside_the_repository():
    checked = 0
    for doc in DOCS:
        for target in _links(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} points outside the repository"
            assert resolved.exists(), f"{doc.name}: {target} does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{doc.name}: no heading #{anchor} in {path or doc.name}"
            checked += 1
    assert checked >= 5  # the README links the docs, the docs link each other


def test_no_reference_to_files_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for bad in ("../shared", "shared/design.md", "spec/backtrace-rules.md", "../seed"):
            assert bad not in text, f"{doc.name} mentions {bad}"


def test_the_relevance_rules_are_documented_in_the_repository():
    text = (ROOT / "docs" / "relevance-rules.md").read_text(encoding="utf-8")
    for formula in ("R_i = Σ_j R_j · |z_ji| / (P_j + N_j + |b_j|)", "R_i = Σ_j R_j · z_ji / (P_j + N_j + |b_j|)",
                    "stab(v) = v + 10⁻⁹ · sign(v)", "R_token = Σ_d R_d"):
        assert formula in text
    # every rule module of the engine is named on the page
    for module in sorted((ROOT / "governance" / "backtrace" / "rules").glob("*.py")):
        if module.name != "__init__.py":
            assert f"rules/{module.name}" in text, module.name


def test_the_readme_documents_the_exit_codes_and_keeps_its_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "    bash scripts/demo.sh\n" in text and "    bash scripts/test.sh\n" in text
    usage = text[text.index("## Using it"):]
    for phrase in ("`1` bad input", "`2` the data broke its contract", "`3` a policy refused",
                   "`2` nothing could be verified"):
        assert phrase in usage


def test_the_readme_documents_every_explain_option_and_data_form():
    """Every option `mlflow-governance explain --help` lists is in the README's explain section."""
    from governance.cli.explain import explain_command

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### `explain`"):text.index("### The other commands")]
    options = [o for p in explain_command.params for o in p.opts if o.startswith("--") and o != "--help"]
    assert len(options) >= 15
    for option in options:
        assert f"`{option}" in section, option
    for form in ("runs:/", "mlflow-artifacts:/", "models:/", "mlflow-dataset:", "folder of parquet files",
                 'evaluators=["governance"]', "opt-in", "nested keys with dots"):
        assert form in section, form
    assert "`130`" in text and "`143`" in text and "MLFLOW_GOVERNANCE_DEBUG" in text
