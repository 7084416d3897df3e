"""Text data: the table of texts with the columns the contract checks, and the tokenizer.

Sources: parquet/CSV (``governance.data.open_table``) or JSONL, with a text column
(``text.column``, ``--text-column``; default ``text``). :class:`TextTable` adds derived columns
per chunk for the contract: ``text_type`` (the value's Python type), ``text_length`` (characters
after stripping), ``n_tokens`` (without truncation) and ``truncated`` (longer than
``text.max_length``).

The tokenizer: ``text.tokenizer`` (a local folder saved with ``save_pretrained``, or an MLflow
artifact URI such as ``runs:/<id>/tokenizer``), else the tokenizer component of a
transformers-flavour MLflow model (loaded with the model, ``governance.tracking``), else the
``components/tokenizer`` folder under the model's URI. Loaded with ``local_files_only``: it works
offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from governance.config import ConfigError
from governance.data import DataLoadError, FrameSource, TableSource, _input_file, open_table
from governance.errors import InputError

DERIVED = ["text_type", "text_length", "n_tokens", "truncated"]
#: the tokenizer outputs a model may take
TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TokenizerError(InputError):
    """No tokenizer could be found or loaded; the message says where it looked."""


@dataclass(frozen=True)
class TextOptions:
    """The config's ``text:`` section (validated): the text ``column``, the ``tokenizer``
    reference, ``max_length`` (tokens, with special tokens; every text is padded to it so the
    result does not depend on batching), ``min_count`` (samples a word needs to be ranked),
    ``max_truncated_share`` (above it the contract fails), ``lowercase`` words, ``top_words``
    per class, ``inputs``: the tokenizer outputs in the order a model takes them positionally
    (None: the order the model declares)."""

    column: str = "text"
    tokenizer: str | None = None
    max_length: int = 128
    min_count: int = 5
    max_truncated_share: float = 0.05
    lowercase: bool = True
    top_words: int = 10
    inputs: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "TextOptions":
        """Validate ``text:``; a bad value raises ConfigError naming the key."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"text: unknown key(s) {unknown}; known: {sorted(known)}")
        kw = {k: v for k, v in section.items() if v is not None}
        for key in ("max_length", "min_count", "top_words"):
            if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool) or kw[key] < 1):
                raise ConfigError(f"text.{key}: must be a positive integer, got {kw[key]!r}")
        share = kw.get("max_truncated_share")
        if share is not None and (not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1):
            raise ConfigError(f"text.max_truncated_share: must be a number in [0, 1], got {share!r}")
        if "lowercase" in kw and not isinstance(kw["lowercase"], bool):
            raise ConfigError(f"text.lowercase: must be true or false, got {kw['lowercase']!r}")
        if "inputs" in kw:
            given = kw["inputs"]
            if (not isinstance(given, (list, tuple)) or not given or "input_ids" not in given
                    or not set(given) <= set(TOKENIZER_OUTPUTS) or len(set(given)) != len(given)):
                raise ConfigError(f"text.inputs: must list the tokenizer outputs ({', '.join(TOKENIZER_OUTPUTS)}) in "
                                  f"the model's order, with input_ids, each once; got {given!r}")
            kw["inputs"] = tuple(str(g) for g in given)
        for key in ("column", "tokenizer"):
            if key in kw:
                kw[key] = str(kw[key])
        return cls(**kw)


def load_tokenizer(opts: TextOptions, handle: Any) -> tuple[Any, str]:
    """The tokenizer and where it came from (see the module docstring)."""
    ref = opts.tokenizer
    where = None
    if ref is None and getattr(handle, "flavour", None) == "transformers":
        tok = (getattr(handle, "components", None) or {}).get("tokenizer")
        if tok is None:
            raise TokenizerError(f"the transformers model '{handle.uri}' was logged without a tokenizer component: "
                                 "log it with {'model': ..., 'tokenizer': ...}, or set text.tokenizer to a folder "
                                 "saved with save_pretrained or an MLflow artifact URI")
        return _fast(tok, f"{handle.uri} (transformers tokenizer component)")
    if ref is None:
        uri = getattr(handle, "uri", None)
        if uri and "://" in str(uri) or str(uri or "").startswith(("runs:/", "models:/")):
            where = _download(f"{str(uri).rstrip('/')}/components/tokenizer", quiet=True)
        if where is None:
            raise TokenizerError("no tokenizer: set text.tokenizer to a folder saved with save_pretrained or an "
                                 "MLflow artifact URI (runs:/<run-id>/tokenizer), or log the model with the "
                                 "transformers flavour")
        source = f"{uri} (components/tokenizer)"
    else:
        p = Path(ref).expanduser()
        if p.is_dir():
            where, source = p, str(ref)
        elif ":" in ref and not p.exists():
            where, source = _download(ref, quiet=False), ref
        else:
            raise TokenizerError(f"text.tokenizer: {ref} is not a folder saved with save_pretrained")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, use_fast=True)
    except Exception as exc:
        raise TokenizerError(f"cannot load the tokenizer from {source}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return _fast(tok, source)


def _fast(tok: Any, source: str) -> tuple[Any, str]:
    """``(tok, source)``, refusing a slow tokenizer (no word ids to join pieces into words)."""
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"the tokenizer from {source} is not a fast tokenizer (needed to join pieces into words)")
    return tok, source


def _download(uri: str, *, quiet: bool) -> Path | None:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:
        if quiet:
            return None
        raise TokenizerError(f"text.tokenizer: cannot download {uri}: {str(exc).splitlines()[0]}") from exc


def open_texts(data: Any, *, source: str | None = None) -> TableSource:
    """The table behind ``data``: JSONL read whole (one JSON object per line), anything else
    through ``governance.data.open_table``."""
    if isinstance(data, (str, Path)) and str(data).lower().endswith((".jsonl", ".ndjson")):
        p = Path(data).expanduser()
        if not p.is_file():
            raise DataLoadError(f"data file not found: {p}")
        try:
            frame = pd.read_json(p, lines=True, dtype=False) if p.stat().st_size else pd.DataFrame()
        except ValueError as exc:
            raise DataLoadError(f"cannot read JSONL file {p}: {exc}") from exc
        table = FrameSource(frame, source=source or str(data), name=p.stem)
        table.files = [_input_file(p.resolve(), p.resolve())]
        table.start_hashing()
        return table
    return open_table(data, source=source)


class TextTable(TableSource):
    """A table of texts with the contract's derived columns (see the module docstring)."""

    def __init__(self, inner: TableSource, column: str, tokenizer: Any, max_length: int) -> None:
        super().__init__(inner.source, inner.name, inner.files)
        self.inner = inner
        self.column = column
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.columnar = inner.columnar
        self.resolved = inner.resolved
        self._hashing = inner._hashing

    @property
    def columns(self) -> list[str]:
        return self.inner.columns + [c for c in DERIVED if c not in self.inner.columns]

    @property
    def n_rows(self) -> int | None:
        return self.inner.n_rows

    def _derive(self, frame: pd.DataFrame, columns: list[str] | None) -> pd.DataFrame:
        want = columns if columns is not None else self.columns
        if any(c in DERIVED for c in want):
            values = frame[self.column] if self.column in frame.columns else pd.Series([None] * len(frame),
                                                                                      index=frame.index)
            texts = [v if isinstance(v, str) else None for v in values]
            frame = frame.copy()
            frame["text_type"] = pd.Series([None if v is None or (isinstance(v, float) and np.isnan(v))
                                            else type(v).__name__ for v in values], index=frame.index, dtype=object)
            frame["text_length"] = pd.Series([len(t.strip()) if t is not None else None for t in texts],
                                             index=frame.index, dtype="Int64")
            ok = [t for t in texts if t is not None]
            counts = iter([len(ids) for ids in self.tokenizer(ok, add_special_tokens=True)["input_ids"]] if ok else [])
            n_tok = [next(counts) if t is not None else None for t in texts]
            frame["n_tokens"] = pd.Series(n_tok, index=frame.index, dtype="Int64")
            frame["truncated"] = pd.Series([None if n is None else bool(n > self.max_length) for n in n_tok],
                                           index=frame.index, dtype=object)
        return frame[want]

    def _inner_columns(self, columns: list[str] | None) -> list[str] | None:
        if columns is None:
            return None
        need = [c for c in columns if c not in DERIVED or c in self.inner.columns]
        if any(c in DERIVED for c in columns) and self.column not in need and self.column in self.inner.columns:
            need.append(self.column)
        return need

    def schema_frame(self) -> pd.DataFrame:
        return self._derive(self.inner.schema_frame(), None)

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        for frame in self.inner.iter_frames(rows, self._inner_columns(columns)):
            yield self._derive(frame, columns)

    def read_columns(self, columns: list[str], start: int, stop: int) -> pd.DataFrame:
        return self._derive(self.inner.read_columns(self._inner_columns(columns) or [], start, stop), columns)

    def close(self) -> None:
        self.inner.close()

    def file_hashes(self) -> list[Any]:
        return self.inner.file_hashes()

    def start_hashing(self) -> None:
        self.inner.start_hashing()

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()
