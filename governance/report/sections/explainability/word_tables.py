"""Part: texts (``modality: text``): per predicted class, the words that pushed the decision for
it and against it (``global_importance.json["text"]["by_class"]``: mean signed share of the
sample's |relevance|), and the text block's facts (tokenizer, max length, truncation, the share
of relevance the special tokens received before it was zeroed, the words left unranked)."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, ftext
from governance.report.inputs import ReportInputs


def _words(entries: Any) -> list[dict[str, str]]:
    """Word rows in the stage's order (already ranked, ties by word: deterministic)."""
    return [{"word": ftext(e.get("word")), "share": fnum(e.get("mean_share"))}
            for e in entries or [] if isinstance(e, dict)]


def _class_key(c: str) -> tuple[int, Any]:
    """Numeric class labels in numeric order, others after them by text."""
    try:
        return 0, int(c)
    except ValueError:
        return 1, c


def build(inp: ReportInputs) -> dict[str, Any] | None:
    """None unless the run explained texts."""
    gi = inp.ev.global_importance
    block = gi.get("text")
    if gi.get("modality") != "text" or not isinstance(block, dict):
        return None
    by_class = block.get("by_class") if isinstance(block.get("by_class"), dict) else {}
    classes = []
    for c in sorted(by_class, key=_class_key):
        d = by_class[c] if isinstance(by_class[c], dict) else {}
        for_, against = _words(d.get("for")), _words(d.get("against"))
        rows = [{"for": for_[i] if i < len(for_) else None, "against": against[i] if i < len(against) else None}
                for i in range(max(len(for_), len(against)))]
        classes.append({"name": f"Predicted class {c}", "n_samples": fnum(d.get("n_samples")), "rows": rows})
    facts = [
        ("Tokenizer", ftext(block.get("tokenizer"))),
        ("Max length (tokens), truncation, padding",
         f"{ftext(block.get('max_length'))}, {'on' if block.get('truncation') else 'off'}, "
         f"{ftext(block.get('padding'))}"),
        ("Share of texts truncated", fnum(block.get("truncated_share"))),
        ("Share of |relevance| the special tokens and padding received (then set to 0)",
         fnum(block.get("special_token_share"))),
        ("Words seen / ranked", f"{fnum(block.get('n_words'))} / {fnum(block.get('n_ranked'))} "
                                f"(a word is ranked when it occurs in at least {fnum(block.get('min_count'))} texts)"),
    ]
    return {"word_tables": {"facts": [{"name": a, "value": b} for a, b in facts], "classes": classes,
                            "missing": None if classes else "the run recorded no per-class words "
                                                            "(global_importance.json text.by_class is empty)"}}
