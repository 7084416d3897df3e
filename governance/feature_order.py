"""Which columns a tabular model takes, in which order, and how the stage knows it.

The validation file's own column order is never trusted: a file whose columns are in another
order would otherwise be explained as garbage with exit 0. The names come from what the model
carries, in this order:

1. a column mapping of a model with several inputs (config ``inputs:``);
2. the MLflow signature's column names (``input_example`` given as a DataFrame);
3. the configuration (``feature_columns``);
4. the stored schema of the training dataset the model's run logged (available even when its
   rows cannot be loaded), less the target and id columns.

Validation columns are then selected by name. When none of these is known the validation file's
order is used, and the decision says so (``verified=False``: the stage notes it on stderr and
tags ``governance.feature_order=unverified``). Pure functions, no MLflow or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from governance.errors import InputError

SIGNATURE = "model signature"
TRAINING_SCHEMA = "training dataset schema"
CONFIG = "config"
NONE = "none"


class FeatureOrderError(InputError):
    """The data or the configuration does not fit the columns the model takes."""


@dataclass
class FeatureOrder:
    """The feature columns in the model's order, where that order came from (``source``, the
    ``governance.feature_order_source`` tag), whether it was verified, and what to say once on
    stderr (columns ignored, the order assumed)."""

    names: list[str]
    source: str
    remarks: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.source != NONE

    def tags(self) -> dict[str, str]:
        """The run tags ``feature_order`` and ``feature_order_source``."""
        return {"feature_order": "verified" if self.verified else "unverified", "feature_order_source": self.source}


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def decide_feature_order(columns: Sequence[str], *, target_column: str | None, id_column: str | None,
                         configured: Sequence[str] | None, signature: Sequence[str] | None,
                         schema: Sequence[str] | None, mapped: Sequence[str] | None = None,
                         input_width: int | None = None) -> FeatureOrder:
    """The model's feature columns for a table with ``columns`` (see the module docstring).

    ``signature``: names from the model signature; ``configured``: ``feature_columns``;
    ``schema``: the training dataset's stored columns; ``mapped``: the columns of a multi-input
    mapping; ``input_width``: the number of features the model's one input takes, when known.
    A column the model takes that the data lacks is left to the data contract (its column-set
    check names it, and the failed contract is logged as evidence). Raises
    :class:`FeatureOrderError` (one line) when the configuration contradicts the signature or the
    count does not fit the model's input."""
    reserved = {c for c in (target_column, id_column) if c}
    if mapped:
        names, source = list(mapped), CONFIG
    elif signature:
        names, source = list(signature), SIGNATURE
        if configured and list(configured) != names:
            raise FeatureOrderError(
                f"feature_columns [{_listed(list(configured))}] differ from the model signature's columns "
                f"[{_listed(names)}]; leave feature_columns out (the signature gives the order) or correct it")
    elif configured:
        names, source = list(configured), CONFIG
    elif schema:
        names, source = [c for c in schema if c not in reserved], TRAINING_SCHEMA
    else:
        names, source = [str(c) for c in columns if c not in reserved], NONE
    if input_width is not None and len(names) != input_width:
        what = (f"the data has {len(names)} columns besides the target and id columns" if source == NONE
                else f"the {source} names {len(names)} feature columns")
        hint = "set --target-column to the label column, " if source in (NONE, TRAINING_SCHEMA) and not target_column \
            else ""
        raise FeatureOrderError(f"{what} but the model takes {input_width} inputs per row; {hint}or list the "
                                "model's columns with --feature-columns")
    remarks: list[str] = []
    if source == NONE:
        remarks.append(
            "the model carries no feature names (no signature with column names, no logged training dataset "
            "schema, no feature_columns in the config), so the validation file's column order is assumed; if "
            "it differs from the training order the explanation is of the wrong features. Log the model with a "
            "DataFrame input_example, log its training data, or set --feature-columns")
        return FeatureOrder(names, source, remarks)
    extra = [c for c in columns if c not in names and c not in reserved]
    if extra:
        remarks.append(f"column(s) {_listed(extra)} of the data are not features of the model ({source}); "
                       "they are ignored")
    return FeatureOrder(names, source, remarks)


def input_width(inputs: Sequence[Any] | None) -> int | None:
    """Features per row of a model with one (N, F) input whose width is recorded, else None."""
    if not inputs or len(inputs) != 1:
        return None
    shape = getattr(inputs[0], "shape", None)
    if shape is None or len(shape) != 2 or int(shape[1]) < 1:
        return None
    return int(shape[1])
