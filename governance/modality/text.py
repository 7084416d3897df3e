"""Texts: one explanation unit per word (tokenizer pieces joined by the tokenizer's word ids),
the vocabulary growing with the data. Special tokens and padding get exactly zero relevance and
are left out of every table; their share of the total |relevance| is reported.

Sources and tokenizer: ``governance.modality.text_source``. Every text is tokenized to
``text.max_length`` tokens with padding to that length (recorded), so a text's relevance does not
depend on the other texts of its batch. The model gets the tokenizer's outputs its ``forward``
accepts by name (``input_ids``, ``attention_mask``, ``token_type_ids``), positionally in the
declared order when it takes no keywords (an exported pt2 program: the MLflow signature's order,
or ``text.inputs``), or the ids alone when it takes one positional tensor (embedding + Conv1D /
LSTM models); see :class:`ModelCall`.

Contract: the text column is present and not null, each value a string with at least one
non-blank character, and at most ``text.max_truncated_share`` of the texts longer than
``max_length`` tokens (the truncated share is in the contract's result).

Documents: ``global_importance.json`` with words as features, each with ``count`` (samples
containing it) and ``per_occurrence`` importance; words in fewer than ``text.min_count``
samples are not ranked (their number is reported). A ``text`` block: special-token share,
tokenizer, max length, truncated share, per predicted class the top words for and against.
``token_relevance.parquet`` (sample id, position, token, word, relevance per mode) and
``examples/texts.json`` (token highlights for the report).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from governance.modality.base import InputBatch, InputNotReadable, Modality, ModalityPlan, UnitRelevance
from governance.config import ConfigError
from governance.modality.text_source import TOKENIZER_OUTPUTS, TextOptions, TextTable, load_tokenizer, open_texts
from governance.stage.batch import BatchResult, StageError

#: Example texts kept for the report: the most confident per predicted class, then the first by key.
N_EXAMPLES = 6


@dataclass(frozen=True)
class ModelCall:
    """How the model takes the tokenizer's outputs: ``names`` in the model's order, passed by name,
    or ``positional`` (an exported pt2 program takes no keywords; ``text.inputs`` declares the
    order); a model that takes the ids alone gets them as one tensor (embedding + Conv1D / LSTM).
    ``source`` says where the names and their order came from."""

    names: tuple[str, ...]
    positional: bool = False
    source: str = "the forward's parameters"

    @property
    def single(self) -> bool:
        """True when the model takes the token ids as its one tensor."""
        return self.positional and self.names == ("input_ids",)

    def describe(self) -> str:
        """``input_ids, attention_mask (positional, from the model signature)``."""
        how = "positional" if self.positional else "by name"
        return f"{', '.join(self.names)} ({how}, from {self.source})"

    def arrange(self, tensors: Mapping[str, Any]) -> Any:
        """The model's call arguments from tensors by tokenizer output name: one tensor, a tuple
        in the model's order, or a dict by name."""
        if self.single:
            return tensors["input_ids"]
        if self.positional:
            return tuple(tensors[n] for n in self.names)
        return dict(tensors)

    def __call__(self, model: Any, tensors: Mapping[str, Any]) -> Any:
        """``model`` called on ``tensors`` (see :meth:`arrange`)."""
        args = self.arrange(tensors)
        return model(*args) if isinstance(args, tuple) else model(**args) if isinstance(args, dict) else model(args)


def takes_keywords(model: Any) -> bool:
    """False for an exported program (``torch.export``, MLflow pt2), which takes its inputs
    positionally: its input tree has no keyword leaves."""
    spec = getattr(model, "_in_spec", None)
    try:
        return spec is None or spec.child(1).num_leaves > 0
    except (AttributeError, IndexError):
        return True


def model_call(model: Any, declared: Sequence[Any] | None = None,
               configured: Sequence[str] | None = None) -> ModelCall:
    """How ``model`` takes the tokenizer outputs (see :class:`ModelCall`): ``configured``
    (``text.inputs``, positional) first; else the names the model declares (``declared``: the
    handle's inputs, from the MLflow signature; else the forward's parameters), passed by name
    when the model takes keywords and positionally when it does not. Raises ConfigError when a
    model takes several positional inputs that are not all tokenizer outputs."""
    if configured:
        return ModelCall(tuple(configured), positional=True, source="config text.inputs")
    try:
        found = [q for q in inspect.signature(model.forward).parameters.values()
                 if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError, AttributeError):
        return ModelCall(("input_ids", "attention_mask"), source="default (the forward has no readable signature)")
    params = [q.name for q in found]
    if takes_keywords(model):
        names = tuple(n for n in params if n in TOKENIZER_OUTPUTS)
        if "input_ids" in names:
            return ModelCall(names)
        required = [q.name for q in found if q.default is q.empty]
        if len(required) > 1:
            raise _positional_error(model, required)
        return ModelCall(("input_ids",), positional=True)
    names_declared = [str(getattr(d, "name", d)) for d in declared or []]
    source = "the model signature" if names_declared else "the exported program's parameters"
    names = tuple(names_declared or params)
    if len(names) <= 1:
        return ModelCall(("input_ids",), positional=True, source=source)
    if "input_ids" not in names or not set(names) <= set(TOKENIZER_OUTPUTS):
        raise _positional_error(model, list(names))
    return ModelCall(names, positional=True, source=source)


def _positional_error(model: Any, names: Sequence[str]) -> ConfigError:
    return ConfigError(f"the model takes {len(names)} inputs ({', '.join(names)}) that are not all tokenizer outputs "
                       f"({', '.join(TOKENIZER_OUTPUTS)}): set text.inputs to the tokenizer outputs in the model's "
                       "order, e.g. [input_ids, attention_mask]")


def ids_only(model: Any, call: ModelCall, pad_id: int) -> Any:
    """``model`` called with the token ids alone (see ``_IdsOnly``)."""
    from governance.stage.output_tasks import ModelWrapper

    class _IdsOnly(ModelWrapper):
        """A model taking several tokenizer outputs, called with the ids alone (the quality metrics
        perturb one tensor): the attention mask marks the non-padding positions, token types are 0;
        a model output object gives its logits."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any) -> Any:
            tensors = {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
                       "token_type_ids": input_ids * 0}
            out = call(self.model, {k: tensors[k] for k in call.names})
            return getattr(out, "logits", out)

    return _IdsOnly()


class WordStats:
    """Per word: samples containing it and occurrences; per predicted class and word: signed
    share sums and samples; the special-token |relevance| and the total; the example texts."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.count: dict[str, int] = {}
        self.occurrences: dict[str, int] = {}
        self.class_signed: dict[str, dict[str, float]] = {}
        self.class_n: dict[str, int] = {}
        self.special_abs = 0.0
        self.total_abs = 0.0
        self.truncated = 0
        self.n = 0
        self.examples: list[dict[str, Any]] = []

    def update(self, batch: BatchResult, draws: Any) -> None:
        r = batch.modes[self.mode]
        occ = batch.extras["occurrences"]  # (n, U) occurrences of each batch word per sample
        present = occ > 0
        for j, w in enumerate(r.unit_names):
            self.count[w] = self.count.get(w, 0) + int(present[:, j].sum())
            self.occurrences[w] = self.occurrences.get(w, 0) + int(occ[:, j].sum())
        if batch.predictions is not None:
            for c in np.unique(batch.predictions).tolist():
                m = batch.predictions == c
                k = str(c)
                self.class_n[k] = self.class_n.get(k, 0) + int(m.sum())
                sums = r.shares[m].sum(0)
                d = self.class_signed.setdefault(k, {})
                for j in np.flatnonzero(present[m].any(0)):
                    d[r.unit_names[j]] = d.get(r.unit_names[j], 0.0) + float(sums[j])
        self.special_abs += float(r.detail["special_abs"].sum())
        self.total_abs += float(r.detail["total_abs"].sum())
        self.truncated += int(batch.extras["truncated"].sum())
        self.n += len(batch)
        self._keep_examples(batch, r.detail["tokens"])

    def _keep_examples(self, batch: BatchResult, detail: np.ndarray) -> None:
        pred = batch.predictions if batch.predictions is not None else np.zeros(len(batch), dtype=np.int64)
        new = []
        for i in range(len(batch)):
            keep = batch.extras["kept"][i]
            new.append({"id": str(batch.sample_ids[i]), "key": int(batch.keys[i]), "prediction": str(pred[i]),
                        "score": float(batch.scores[i]), "tokens": [batch.extras["tokens"][i][p] for p in keep],
                        "relevance": [float(detail[i, p]) for p in keep]})
        self.examples = self._select(self.examples + new)

    @staticmethod
    def _select(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        chosen: dict[int, dict[str, Any]] = {}
        for cls in sorted({c["prediction"] for c in cands}):
            best = min((c for c in cands if c["prediction"] == cls), key=lambda c: (-c["score"], c["key"]))
            chosen[best["key"]] = best
        for c in sorted(cands, key=lambda c: c["key"]):
            if len(chosen) >= N_EXAMPLES:
                break
            chosen.setdefault(c["key"], c)
        return sorted(chosen.values(), key=lambda c: (c["prediction"], -c["score"], c["key"]))

    def merge(self, other: "WordStats") -> None:
        for src, dst in ((other.count, self.count), (other.occurrences, self.occurrences)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        for c, d in other.class_signed.items():
            mine = self.class_signed.setdefault(c, {})
            for k, v in d.items():
                mine[k] = mine.get(k, 0.0) + v
            self.class_n[c] = self.class_n.get(c, 0) + other.class_n[c]
        self.special_abs += other.special_abs
        self.total_abs += other.total_abs
        self.truncated += other.truncated
        self.n += other.n
        self.examples = self._select(self.examples + other.examples)

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        words = sorted(self.count)
        arrays = {"count": np.array([self.count[w] for w in words], dtype=np.int64),
                  "occurrences": np.array([self.occurrences[w] for w in words], dtype=np.int64)}
        classes = sorted(self.class_signed)
        for i, c in enumerate(classes):
            arrays[f"class/{i}"] = np.array([self.class_signed[c].get(w, np.nan) for w in words])
        meta = {"words": words, "classes": classes, "class_n": [self.class_n[c] for c in classes],
                "special_abs": self.special_abs, "total_abs": self.total_abs, "truncated": self.truncated,
                "n": self.n, "examples": self.examples}
        return meta, arrays

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        words = list(meta["words"])
        self.count = dict(zip(words, arrays["count"].tolist()))
        self.occurrences = dict(zip(words, arrays["occurrences"].tolist()))
        self.class_signed = {c: {w: float(v) for w, v in zip(words, arrays[f"class/{i}"]) if not np.isnan(v)}
                             for i, c in enumerate(meta["classes"])}
        self.class_n = dict(zip(meta["classes"], meta["class_n"]))
        self.special_abs, self.total_abs = float(meta["special_abs"]), float(meta["total_abs"])
        self.truncated, self.n = int(meta["truncated"]), int(meta["n"])
        self.examples = list(meta["examples"])


class TextModality(Modality):
    """Texts (see the module docstring)."""

    name = "text"
    quality_kind = "token"
    unit_noun = "word"
    fixed_units = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = TextOptions.from_config(cfg.text or {})
        self.tokenizer: Any = None
        self.tokenizer_source: str | None = None
        self.call = ModelCall(("input_ids", "attention_mask"))

    def open(self, data: Any, *, source: str | None = None) -> TextTable:
        return TextTable(open_texts(data, source=source), self.opts.column, None, self.opts.max_length)

    def plan(self, table: TextTable, handle: Any) -> ModalityPlan:  # type: ignore[override]
        o = self.opts
        self.tokenizer, self.tokenizer_source = load_tokenizer(o, handle)
        table.tokenizer = self.tokenizer
        model = getattr(handle, "model", None)
        if model is not None:
            self.call = model_call(model, getattr(handle, "inputs", None), o.inputs)
        missing = [n for n in self.call.names if n not in self.tokenizer.model_input_names]
        if missing and self.call.positional:
            raise ConfigError(f"the model takes {', '.join(missing)} but the tokenizer ({self.tokenizer_source}) "
                              f"gives only {', '.join(self.tokenizer.model_input_names)}: set text.inputs")
        self.call = ModelCall(tuple(n for n in self.call.names if n not in missing), self.call.positional,
                              self.call.source)
        col = o.column
        exp: list[dict[str, Any]] = [
            {"type": "expect_table_row_count_to_be_between", "min_value": 1},
            {"type": "expect_column_to_exist", "column": col},
            {"type": "expect_column_values_to_not_be_null", "column": col},
            {"type": "expect_column_values_to_be_in_set", "column": "text_type", "value_set": ["str"]},
            {"type": "expect_column_values_to_be_between", "column": "text_length", "min_value": 1},
            {"type": "expect_column_values_to_be_in_set", "column": "truncated", "value_set": [False],
             **({"mostly": 1.0 - o.max_truncated_share} if o.max_truncated_share > 0 else {})},
        ]
        read = [col] + ([self.cfg.target_column] if self.cfg.target_column in table.inner.columns else [])
        notes = [f"tokenizer: {self.tokenizer_source}; max_length {o.max_length}, truncation on, padding to "
                 f"max_length; model inputs: {self.call.describe()}"]
        return ModalityPlan(units=None, columns=read, expectations=exp,
                            contract_source="text modality (string, non-empty, not null, truncated share)",
                            independent=True, notes=notes)

    def batches(self, table: TextTable, plan: ModalityPlan, batch_size: int) -> Iterator[InputBatch]:  # type: ignore[override]
        target = self.cfg.target_column
        for frame in table.inner.iter_frames(batch_size, plan.columns):
            yield self.input_batch(frame, plan, target)

    def input_batch(self, frame: Any, plan: ModalityPlan, target: str | None) -> InputBatch:
        """One frame of texts as model inputs, with the tokens, words and occurrence counts."""
        texts = frame[self.opts.column].tolist()
        bad = [i for i, t in zip(frame.index, texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise InputNotReadable(f"row {bad[0]}: the text is empty or not a string")
        enc = self.tokenizer(texts, max_length=self.opts.max_length, truncation=True, padding="max_length",
                             return_offsets_mapping=True, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        inputs: Any = ids if self.call.single else {k: enc[k].astype(np.int64) for k in self.call.names}
        tokens, words, kept = [], [], []
        special = np.zeros(ids.shape, dtype=bool)
        for i, text in enumerate(texts):
            wid = enc.word_ids(i)
            offs = enc["offset_mapping"][i]
            toks = self.tokenizer.convert_ids_to_tokens(ids[i].tolist())
            spans: dict[int, list[int]] = {}
            for p, w in enumerate(wid):
                if w is None:
                    special[i, p] = True
                else:
                    spans.setdefault(w, []).append(p)
            row_words = [""] * len(wid)
            for w, ps in spans.items():
                word = text[int(offs[ps[0]][0]):int(offs[ps[-1]][1])]
                word = word.lower() if self.opts.lowercase else word
                for p in ps:
                    row_words[p] = word
            tokens.append(toks)
            words.append(row_words)
            kept.append([p for p in range(len(wid)) if not special[i, p]])
        vocab = sorted({row[p] for row, keep in zip(words, kept) for p in keep})
        index = {w: j for j, w in enumerate(vocab)}
        occ = np.zeros((len(texts), len(vocab)), dtype=np.int64)  # occurrences of each word per text
        for i, (row, keep) in enumerate(zip(words, kept)):
            for p in keep:
                if p == 0 or special[i, p - 1] or enc.word_ids(i)[p - 1] != enc.word_ids(i)[p]:
                    occ[i, index[row[p]]] += 1
        targets = frame[target].to_numpy() if target and target in frame.columns else None
        lengths = np.asarray([len(x) for x in self.tokenizer(texts, add_special_tokens=True)["input_ids"]])
        extras = {"tokens": tokens, "words": words, "special": special, "kept": kept, "vocab": vocab,
                  "index": index, "occurrences": occ,
                  "truncated": lengths > self.opts.max_length}
        return InputBatch(sample_ids=frame.index.to_numpy(dtype=np.int64), inputs=inputs, targets=targets,
                          extras=extras)

    def to_model(self, inputs: Any, device: str) -> Any:
        import torch

        if isinstance(inputs, dict):  # a tuple in the model's order for a positional model (ModelCall)
            return self.call.arrange({k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                                      for k, v in inputs.items()})
        return torch.from_numpy(np.ascontiguousarray(inputs)).to(device)

    def units(self, batch: InputBatch, plan: ModalityPlan, relevance: Any) -> UnitRelevance:
        if isinstance(relevance, dict):  # by the forward's names; a positional model's by position
            rel = relevance.get("input_ids")
            if rel is None:
                rel = list(relevance.values())[self.call.names.index("input_ids")]
        else:
            rel = relevance
        rel = np.asarray(rel, dtype=np.float64)
        if rel.ndim == 3:  # relevance per embedding dimension: summed per token
            rel = rel.sum(-1)
        if rel.shape != batch.extras["special"].shape:
            raise StageError(f"the model's input relevance has shape {rel.shape}, the tokens {batch.extras['special'].shape}")
        special = batch.extras["special"]
        total = np.abs(rel).sum(1)
        special_abs = np.abs(np.where(special, rel, 0.0)).sum(1)
        rel = np.where(special, 0.0, rel)  # special tokens and padding: exactly zero, left out
        vocab, index = batch.extras["vocab"], batch.extras["index"]
        out = np.zeros((len(rel), len(vocab)))
        for i, (row, keep) in enumerate(zip(batch.extras["words"], batch.extras["kept"])):
            for p in keep:
                out[i, index[row[p]]] += rel[i, p]
        return UnitRelevance(names=vocab, relevance=out, detail={"tokens": rel.astype(np.float32),
                                                                 "special_abs": special_abs, "total_abs": total})

    def sample_tables(self, result: BatchResult, plan: ModalityPlan) -> Mapping[str, Any]:
        """``token_relevance.parquet``: one row per kept token (no special tokens, no padding)."""
        import pyarrow as pa

        ids, pos, toks, words = [], [], [], []
        rel: dict[str, list[float]] = {m: [] for m in result.modes}
        for i, keep in enumerate(result.extras["kept"]):
            for p in keep:
                ids.append(result.sample_ids[i])
                pos.append(p)
                toks.append(result.extras["tokens"][i][p])
                words.append(result.extras["words"][i][p])
                for m, r in result.modes.items():
                    rel[m].append(float(r.detail["tokens"][i, p]))
        cols = {"sample_id": pa.array(np.asarray(ids, dtype=np.int64)), "position": pa.array(pos, pa.int32()),
                "token": pa.array(toks, pa.string()), "word": pa.array(words, pa.string())}
        cols.update({f"relevance_{m}": pa.array(np.asarray(v, dtype=np.float32)) for m, v in rel.items()})
        return {"token_relevance.parquet": pa.table(cols)}

    def quality_inputs(self, sample: Mapping[str, np.ndarray], n: int) -> Any:
        import torch

        ids = sample.get("inputs/input_ids", sample.get("inputs"))
        return None if ids is None else torch.from_numpy(np.ascontiguousarray(ids[:n]).astype(np.int64))

    def quality_setup(self, model: Any) -> tuple[Any, dict[str, Any]]:
        """Token deletion: the ids are replaced by [MASK] (the tokenizer's special ids are never
        deleted); a model that takes an attention mask gets the one of the unperturbed padding."""
        if self.call.single:
            return model, {"tokenizer": self.tokenizer}
        return ids_only(model, self.call, int(self.tokenizer.pad_token_id or 0)), {"tokenizer": self.tokenizer}

    def accumulators(self) -> Mapping[str, WordStats]:
        return {"words": WordStats(self.cfg.primary_mode)}

    def amend_documents(self, docs: Any, state: Any, plan: ModalityPlan) -> None:
        ws: WordStats = state.extra("words")  # type: ignore[assignment]
        gi = docs.global_importance
        n = max(state.n_samples, 1)
        keep = {w for w, c in ws.count.items() if c >= self.opts.min_count}

        def filtered(recs: list[dict[str, Any]], extra: bool) -> list[dict[str, Any]]:
            out = []
            for r in recs:
                w = r["feature"]
                if w not in keep:
                    continue
                if extra:
                    r["count"] = ws.count[w]
                    r["per_occurrence"] = float(r["importance"]) * n / max(ws.occurrences[w], 1)
                out.append(r)
            return out

        for mode, doc in gi.get("modes", {}).items():
            doc["features"] = filtered(doc["features"], True)
            for cls in doc.get("by_class", {}).values():
                cls["features"] = filtered(cls["features"], False)
        primary = gi["modes"][gi["primary_mode"]]
        gi["features"], gi["by_class"] = primary["features"], primary["by_class"]
        if not gi["features"]:
            raise StageError(f"no word occurs in at least text.min_count={self.opts.min_count} samples; lower "
                             "text.min_count or explain more texts")
        top = self.opts.top_words
        by_class = {}
        for c, d in sorted(ws.class_signed.items()):
            cn = max(ws.class_n[c], 1)
            ranked = sorted(((w, v / cn) for w, v in d.items() if w in keep), key=lambda t: (-t[1], t[0]))
            by_class[c] = {"n_samples": ws.class_n[c],
                           "for": [{"word": w, "mean_share": v} for w, v in ranked[:top] if v > 0],
                           "against": [{"word": w, "mean_share": v} for w, v in reversed(ranked[-top:]) if v < 0]}
        gi["text"] = {
            "tokenizer": self.tokenizer_source, "max_length": self.opts.max_length, "truncation": True,
            "padding": "max_length", "min_count": self.opts.min_count, "n_words": len(ws.count),
            "n_ranked": len(keep), "n_unranked": len(ws.count) - len(keep),
            "special_token_share": ws.special_abs / ws.total_abs if ws.total_abs > 0 else 0.0,
            "special_tokens_zeroed": True, "truncated_share": ws.truncated / n, "by_class": by_class,
        }

    def write_documents(self, state: Any, plan: ModalityPlan, out_dir: Path) -> None:
        from governance.stage.writers import write_json

        ws: WordStats = state.extra("words")  # type: ignore[assignment]
        ex = out_dir / "examples"
        ex.mkdir(parents=True, exist_ok=True)
        write_json(ex / "texts.json", [{k: v for k, v in e.items() if k != "key"} for e in ws.examples])
