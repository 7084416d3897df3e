"""Tables to the tensors a model with several inputs takes (numeric features plus a categorical
index, say), and relevance back to columns.

The configuration maps each of the model's inputs to columns::

    inputs:
      numeric: [income, debt_to_income, utilisation]    # float32, shape (N, 3)
      category: {columns: [region], dtype: int64}        # shape (N,) when the model takes (N,)

dtype and shape default to what the model records (the MLflow signature's tensor specs of a pt2
model), else float32 and (N, columns). Without the mapping a model with more than one input is
refused with one line naming the inputs it expects. Importing this module needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from governance.errors import InputError

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
# MLflow signature dtype names (numpy) to torch names
_SIGNATURE_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "int64": "int64",
                     "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


class InputMappingError(InputError):
    """The model's inputs and the configured mapping do not fit; the message says how to fix it."""


@dataclass(frozen=True)
class InputMapping:
    """One model input fed from columns: its name, the columns in order, the dtype (None: the
    model's, else float32) and whether one column is given as (N,) (None: as the model records)."""

    name: str
    columns: tuple[str, ...]
    dtype: str | None = None
    squeeze: bool | None = None


def _config_error(message: str) -> Exception:
    from governance.config import ConfigError  # config validates through this module: import late

    return ConfigError(message)


def parse_input_mapping(value: Any) -> list[InputMapping]:
    """The ``inputs:`` section as :class:`InputMapping` s, in the order given; raises
    :class:`governance.config.ConfigError` naming ``inputs.<name>`` when an entry is malformed."""
    if not isinstance(value, Mapping) or not value:
        raise _config_error("inputs: must map each model input to its columns, e.g. "
                            "{numeric: [a, b], category: {columns: [c], dtype: int64}}")
    out: list[InputMapping] = []
    seen: dict[str, str] = {}
    for name, spec in value.items():
        key = f"inputs.{name}"
        if isinstance(spec, (list, tuple)):
            spec = {"columns": list(spec)}
        if isinstance(spec, str):
            spec = {"columns": [spec]}
        if not isinstance(spec, Mapping):
            raise _config_error(f"{key}: give a list of columns or {{columns: [...], dtype: ...}}")
        unknown = sorted(set(spec) - {"columns", "dtype", "squeeze"})
        if unknown:
            raise _config_error(f"{key}: unknown key(s) {unknown}; known: columns, dtype, squeeze")
        cols = spec.get("columns")
        if not isinstance(cols, (list, tuple)) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise _config_error(f"{key}.columns: must be a non-empty list of column names")
        for c in cols:
            if c in seen:
                raise _config_error(f"{key}.columns: column '{c}' is already fed to inputs.{seen[c]}")
            seen[c] = str(name)
        dtype = spec.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise _config_error(f"{key}.dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
        squeeze = spec.get("squeeze")
        if squeeze is not None and not isinstance(squeeze, bool):
            raise _config_error(f"{key}.squeeze: must be true or false")
        if squeeze and len(cols) != 1:
            raise _config_error(f"{key}.squeeze: only one column can be given as a vector (N,)")
        out.append(InputMapping(str(name), tuple(cols), dtype, squeeze))
    return out


def _describe(expected: Sequence[Any]) -> str:
    return "; ".join(e.describe() if hasattr(e, "describe") else str(e.name) for e in expected)


def check_inputs(expected: Sequence[Any], mapping: Sequence[InputMapping] | None, model_uri: str) -> None:
    """Raise :class:`InputMappingError` when a model with several inputs has no mapping, or the
    mapping names inputs the model does not take (or misses some). ``expected``: the handle's
    :attr:`governance.tracking.ModelHandle.inputs`."""
    names = [e.name for e in expected]
    if not mapping:
        if len(expected) > 1:
            example = ", ".join(f"{n}: [column, ...]" for n in names)
            raise InputMappingError(
                f"model '{model_uri}' takes {len(expected)} inputs ({_describe(expected)}); map columns to "
                f"them in the config, inputs: {{{example}}}, or with --set 'inputs.{names[0]}=[a, b]'")
        return
    given = [m.name for m in mapping]
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        parts = ([f"no columns for {', '.join(missing)}"] if missing else []) + (
            [f"the model has no input {', '.join(extra)}"] if extra else [])
        raise InputMappingError(f"inputs: {'; '.join(parts)}; model '{model_uri}' takes {_describe(expected)}")


def ordered(mapping: Sequence[InputMapping], expected: Sequence[Any]) -> list[InputMapping]:
    """The mapping in the order of the model's inputs (the order its forward takes them)."""
    by_name = {m.name: m for m in mapping}
    return [by_name[e.name] for e in expected if e.name in by_name] or list(mapping)


def input_columns(mapping: Sequence[InputMapping]) -> list[str]:
    """Every mapped column, input by input (the feature columns of a multi-input model)."""
    return [c for m in mapping for c in m.columns]


def _plan(m: InputMapping, spec: Any | None) -> tuple[str, bool]:
    model_dtype = _SIGNATURE_DTYPES.get(str(getattr(spec, "dtype", None) or ""))
    dtype = m.dtype or model_dtype or "float32"
    shape = getattr(spec, "shape", None)
    squeeze = m.squeeze if m.squeeze is not None else (shape is not None and len(shape) == 1 and len(m.columns) == 1)
    return dtype, bool(squeeze)


def resolve_mapping(mapping: Sequence[InputMapping], expected: Sequence[Any] = ()) -> list[InputMapping]:
    """``mapping`` with each input's dtype and squeeze decided from the model's specs
    (``expected``), so the columns can become tensors without the model at hand (a Spark
    executor gets the plan only)."""
    specs = {e.name: e for e in expected}
    out = []
    for m in mapping:
        dtype, squeeze = _plan(m, specs.get(m.name))
        out.append(InputMapping(m.name, m.columns, dtype, squeeze))
    return out


def build_inputs(frame: Any, mapping: Sequence[InputMapping], expected: Sequence[Any] = ()) -> dict[str, Any]:
    """The model's inputs from ``frame`` (a DataFrame), keyed by input name in the model's order:
    ``tuple(result.values())`` is the positional call (exported pt2 modules take positional
    arguments only); the engine's ``input_relevance`` comes back keyed by the same names.
    Raises :class:`InputMappingError` naming a missing column or a non-integer value fed to an
    integer input."""
    import numpy as np
    import torch

    specs = {e.name: e for e in expected}
    missing = [c for c in input_columns(mapping) if c not in frame.columns]
    if missing:
        raise InputMappingError(f"inputs: column(s) {missing} are not in the data")
    out: dict[str, Any] = {}
    for m in ordered(mapping, expected) if expected else mapping:
        dtype, squeeze = _plan(m, specs.get(m.name))
        values = frame[list(m.columns)].to_numpy()
        if dtype.startswith(("int", "uint")):
            as_float = values.astype(np.float64)
            bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
            if bad.any():
                col = m.columns[int(np.argwhere(bad)[0][1])]
                raise InputMappingError(f"inputs.{m.name}: column '{col}' holds non-integer values, "
                                        f"but the input is {dtype} (an index)")
        tensor = torch.from_numpy(np.ascontiguousarray(values.astype(np.dtype(dtype) if dtype != "bfloat16"
                                                                     else np.float32)))
        if dtype == "bfloat16":
            tensor = tensor.to(torch.bfloat16)
        out[m.name] = tensor[:, 0] if squeeze else tensor
    return out


def column_relevance(input_relevance: Mapping[str, Any], mapping: Sequence[InputMapping]) -> dict[str, Any]:
    """Per-column relevance (N,) from the engine's per-input relevance: an input of shape (N, k)
    gives its k columns; (N,) its one column; extra trailing dimensions are summed per column."""
    import numpy as np

    out: dict[str, Any] = {}
    for m in mapping:
        r = input_relevance[m.name]
        r = r.detach().cpu().numpy() if hasattr(r, "detach") else np.asarray(r)
        r = r.astype(np.float64)
        if r.ndim == 1:
            r = r[:, None]
        if r.shape[1] != len(m.columns):
            raise InputMappingError(f"inputs.{m.name}: relevance has {r.shape[1]} columns, "
                                    f"the mapping {len(m.columns)}")
        r = r.reshape(r.shape[0], r.shape[1], -1).sum(2)
        for j, c in enumerate(m.columns):
            out[c] = r[:, j]
    return out
