"""The interface every data modality implements, shared by the stage, the quality metrics and the
report: how a source becomes batches of model inputs, which contract checks it carries, how input
relevance reduces to *explanation units*, which per-sample files it writes, how units are named.

A modality never sees MLflow and never aggregates: it turns rows into model inputs and relevance
into units; the stage (``governance.stage``) does the rest, identically for every modality.

Units are named by strings. A modality with ``fixed_units`` (tables: one unit per feature
column; images: one per grid region) declares them in its plan; one without (text: words)
names each batch's units in :class:`UnitRelevance` and the accumulators grow by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

import numpy as np

from governance.data import DataLoadError

if TYPE_CHECKING:
    from governance.config import GovernanceConfig
    from governance.data import TableSource
    from governance.stage.batch import BatchResult
    from governance.stage.documents import StageDocuments
    from governance.stage.state import Accumulator, StageState

class InputNotReadable(DataLoadError):
    """A batch of the data cannot become model inputs (e.g. a non-numeric value in a feature
    column); the data contract names the problem, so the stage stops explaining and reports it."""


#: Unit kinds of the quality metrics' feature spaces (``governance.quality.features``).
QUALITY_KINDS = ("tabular", "image", "token", "generic")


def detect_modality(x: Any) -> str:
    """The quality metrics' unit kind of a model input tensor: ``token`` for integer inputs,
    ``tabular`` for (N, F) floats, ``image`` for (N, C, H, W), ``generic`` (one unit per
    element) otherwise."""
    import torch

    if not torch.is_floating_point(x):
        if x.dim() != 2:
            raise ValueError(f"token inputs must be (N, T) ids, got shape {tuple(x.shape)}")
        return "token"
    if x.dim() == 2:
        return "tabular"
    if x.dim() == 4:
        return "image"
    return "generic"


@dataclass
class InputBatch:
    """One batch of model inputs read by a modality.

    ``sample_ids``: (n,) the samples' ids (row positions, or an id column's values);
    ``inputs``: what the model takes, as numpy (an array, or a dict of arrays by argument name);
    ``targets``: (n,) labels when the data has them; ``unit_values``: (n, U) the input value of
    each unit when every unit has one (a table's feature values), else None; ``extras``:
    anything else the modality needs later for this batch (token offsets, image sizes...)."""

    sample_ids: np.ndarray
    inputs: Any
    targets: np.ndarray | None = None
    unit_values: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class UnitRelevance:
    """Signed relevance per sample and unit: ``relevance`` (n, U) float64 over ``names`` (U);
    ``detail``: finer relevance the modality's accumulators and files need (per-pixel maps,
    per-token relevance), carried to ``ModeResult.detail``; None when there is none."""

    names: list[str]
    relevance: np.ndarray
    detail: Any = None


@dataclass
class ModalityPlan:
    """What a modality decided for one data source: the units (None when data-dependent), the
    columns it reads, the data contract and where it came from (``independent`` is False when
    the contract was derived from the data it checks), and notes for validation_result.json.

    ``feature_order``: how a table's feature order is known (a
    ``governance.feature_order.FeatureOrder``; None where units have no order to verify);
    ``mapping``: the columns of each input of a model with several inputs; ``remarks``: what the
    stage says once on stderr (what it could not be sure of, what it ignored)."""

    units: list[str] | None
    columns: list[str]
    expectations: list[dict[str, Any]]
    contract_source: str
    independent: bool = True
    notes: list[str] = field(default_factory=list)
    feature_order: Any = None
    mapping: list[Any] | None = None
    remarks: list[str] = field(default_factory=list)


class Modality(ABC):
    """One data modality (see the module docstring). Subclasses set the class attributes and
    implement the abstract methods; ``accumulators`` and ``write_documents`` add their own
    tables (image heatmaps, word statistics) when the shared ones are not enough."""

    #: the name in the config and in ``global_importance.json`` ("tabular", "image", "text")
    name: ClassVar[str]
    #: the unit kind of the quality metrics (one of ``QUALITY_KINDS``)
    quality_kind: ClassVar[str]
    #: what one unit is called in documents and the report ("feature", "region", "word")
    unit_noun: ClassVar[str] = "feature"
    #: True when the set of units is known before reading (the plan names them)
    fixed_units: ClassVar[bool] = True

    def __init__(self, cfg: "GovernanceConfig") -> None:
        self.cfg = cfg

    @abstractmethod
    def open(self, data: Any, *, source: str | None = None) -> "TableSource":
        """The data as a streamed table (``governance.data.open_table`` for table formats; an
        image folder or an ``.npz`` as a table of one row per image)."""

    @abstractmethod
    def plan(self, table: "TableSource", handle: Any) -> ModalityPlan:
        """Units, columns and contract for this table and model (``handle``: a
        ``governance.tracking.ModelHandle``; its training data may define the contract)."""

    @abstractmethod
    def batches(self, table: "TableSource", plan: ModalityPlan, batch_size: int) -> Iterator[InputBatch]:
        """The model inputs in batches of at most ``batch_size`` samples, in reading order."""

    @abstractmethod
    def to_model(self, inputs: Any, device: str) -> Any:
        """Model inputs (numpy, from :class:`InputBatch`) as tensors on ``device``."""

    @abstractmethod
    def units(self, batch: InputBatch, plan: ModalityPlan, relevance: Any) -> UnitRelevance:
        """Input relevance (numpy, shaped like the inputs) reduced to explanation units."""

    def sample_tables(self, result: "BatchResult", plan: ModalityPlan) -> Mapping[str, Any]:
        """Per-sample rows of one batch as Arrow tables by file name (under ``explanations/``);
        the stage streams each to a parquet file (one row group per batch)."""
        return {}

    def accumulators(self) -> Mapping[str, "Accumulator"]:
        """Modality-specific mergeable tables added to the stage state (default: none)."""
        return {}

    def amend_documents(self, docs: "StageDocuments", state: "StageState", plan: ModalityPlan) -> None:
        """Add the modality's own entries to the shared documents before they are written (e.g.
        per-word ``count`` and ``per_occurrence``, an image concentration block); default: none."""

    def write_documents(self, state: "StageState", plan: ModalityPlan, out_dir: Path) -> None:
        """Write the modality's own documents from a (merged) state (default: none)."""

    def quality_inputs(self, sample: Mapping[str, np.ndarray], n: int) -> Any:
        """The first ``n`` reservoir samples' model inputs as the tensor the quality metrics take
        (``sample``: the reservoir's columns, ``inputs`` or ``inputs/<argument>``); None when the
        modality has none."""
        import torch

        inputs = sample.get("inputs")
        return None if inputs is None else torch.from_numpy(np.ascontiguousarray(inputs[:n]))

    def calibrated(self, threshold: float | None) -> None:
        """Told the decision threshold the stage calibrated on its probe batch (an output task's
        mask), so that :meth:`quality_setup` measures the same quantity; default: not needed."""

    def quality_setup(self, model: Any) -> tuple[Any, dict[str, Any]]:
        """The model the quality metrics call on :meth:`quality_inputs` (one tensor in) and extra
        ``quality_report`` arguments (a tokenizer, a patch size); default: the model as is."""
        return model, {}
