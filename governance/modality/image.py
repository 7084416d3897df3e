"""Images: one explanation unit per grid region ``r{row}c{col}`` (``image.grid``, default 8x8),
plus per-pixel relevance (summed over channels) for heatmaps and the concentration block.

Sources and preprocessing: ``governance.modality.image_source``. The contract checks the
per-image metadata table with great-expectations: every image decodes, has the model's channels
(files are converted when ``image.mode`` is set) and one size (any size when ``image.size``
resizes), raw pixel values within ``image.pixel_range``, and no duplicates by hash when
``image.unique`` is set.

Documents: ``global_importance.json`` with regions as features and an ``image`` block (share of
|relevance| on the top ``top_share`` of pixels, on the border, per region, and ``fixed_region``:
one region holding at least ``fixed_region_share`` of a sample's |relevance| in at least
``fixed_region_fraction`` of the samples, overall or of one predicted class, the signature of a shortcut such as a watermark);
``heatmaps/mean.npy`` and ``heatmaps/class_<c>.npy`` (mean per-pixel share of |relevance|, overall
and per predicted class) with PNGs; ``examples/images.npz`` (the most confident sample per
class, misclassified and least confident samples, with their signed pixel relevance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from governance.modality.base import InputBatch, InputNotReadable, Modality, ModalityPlan, UnitRelevance
from governance.modality.image_source import (
    ImageOptions,
    ImageTable,
    default_pixel_range,
    expected_channels,
    expected_size,
    open_images,
    region_edges,
    region_names,
)
from governance.stage.batch import BatchResult, StageError
from governance.tasks import IMAGE_OUTPUT_TASKS

#: Examples kept per kind: most confident per class (1 each), misclassified, least confident.
N_MISCLASSIFIED = 3
N_BORDERLINE = 3
#: The fixed-region rule is checked in a predicted class only when it has this many samples.
MIN_CLASS_SAMPLES = 10
#: What segmentation and box regression skip, and why (named in the run and the report).
QUALITY_SKIPPED = {
    "ground_truth": "needs named tabular drivers",
}
EXAMPLES_SKIPPED = {"misclassified examples": "no class decision to compare with the labels"}
#: What each output task explains, as the report says it.
TASK_EXPLAINED = {
    "segmentation": "the predicted mask: each mask pixel's predicted-class score (background class {bg} left out)",
    "box-regression": "the predicted box: the model's four box outputs",
}


def output_task_block(task: str, opts: ImageOptions, maps: "ImageMaps") -> dict[str, Any]:
    """``global_importance.json["image"]["task"]``: what was explained, the mean prediction
    columns over the samples, and what does not apply (skipped)."""
    n = max(maps.n, 1)
    means = {k: v / n for k, v in sorted(maps.prediction_sums.items())}
    return {"name": task, "explained": TASK_EXPLAINED[task].format(bg=opts.background_class),
            "background_class": opts.background_class if task == "segmentation" else None,
            "mean_prediction": means,
            "skipped": {**{f"quality: {k}": v for k, v in QUALITY_SKIPPED.items()}, **EXAMPLES_SKIPPED}}


def unit_relevance_table(result: BatchResult) -> Any:
    """``local_relevance.parquet`` rows: sample_id, prediction, the output task's prediction columns
    (segmentation: ``mask_share_<c>``, ``mask_pixels``; box regression: ``box_0..3`` and no
    ``prediction``), score, target, relevance_l1, then one float32 column of primary-mode relevance
    per unit."""
    import pyarrow as pa

    p = result.primary
    columns = result.extras.get("prediction_columns") or {}
    head: dict[str, Any] = {"sample_id": result.sample_ids}
    if result.predictions is not None or not columns:  # a box regressor has no class to write
        head["prediction"] = result.decisions
    head.update(columns)
    head["score"] = result.scores
    if result.targets is not None:
        head["target"] = result.targets
    head["relevance_l1"] = p.relevance_l1.astype(np.float32)
    rel32 = p.relevance.astype(np.float32)
    arrays = [pa.array(v) for v in head.values()] + [pa.array(rel32[:, j]) for j in range(rel32.shape[1])]
    return pa.Table.from_arrays(arrays, names=list(head) + list(p.unit_names))


def concentration(pixel_abs: np.ndarray, top_share: float, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the share of |relevance| on the top ``top_share`` of pixels, and on the border
    ``border`` pixels wide (``pixel_abs``: (n, H, W) non-negative)."""
    n, h, w = pixel_abs.shape
    flat = pixel_abs.reshape(n, -1)
    total = flat.sum(1)
    safe = np.where(total > 0, total, 1.0)
    k = max(1, int(np.ceil(top_share * h * w)))
    top = -np.sort(-flat, axis=1)[:, :k].sum(1) / safe
    inner = pixel_abs[:, border:h - border, border:w - border].reshape(n, -1).sum(1) if h > 2 * border and \
        w > 2 * border else np.zeros(n)
    return top, (total - inner) / safe


class ImageMaps:
    """The image modality's accumulator: per-pixel share sums (overall and per predicted class),
    concentration sums, per-region hit counts and the example images. Mergeable; examples are
    chosen by (criterion, sample key), so any batching keeps the same ones."""

    def __init__(self, opts: ImageOptions, grid: tuple[int, int], mode: str, compare_labels: bool = True) -> None:
        self.opts, self.grid, self.mode = opts, grid, mode
        self.compare_labels = compare_labels  # misclassified examples (classifiers only)
        self.n = 0
        self.sum_share: np.ndarray | None = None
        self.by_class: dict[str, np.ndarray] = {}
        self.class_n: dict[str, int] = {}
        self.top_sum = 0.0
        self.border_sum = 0.0
        self.region_hits = np.zeros(grid[0] * grid[1], dtype=np.int64)
        self.region_share = np.zeros(grid[0] * grid[1])
        self.class_hits: dict[str, np.ndarray] = {}
        self.examples: dict[str, np.ndarray] = {}
        self.prediction_sums: dict[str, float] = {}  # output tasks' prediction columns, summed

    # -- update ------------------------------------------------------------------------------
    def update(self, batch: BatchResult, draws: Any) -> None:
        pix = batch.modes[self.mode].detail
        if pix is None:
            return
        pabs = np.abs(pix.astype(np.float64))
        n, h, w = pabs.shape
        total = pabs.reshape(n, -1).sum(1)
        share = pabs / np.where(total > 0, total, 1.0)[:, None, None]
        self.sum_share = share.sum(0) if self.sum_share is None else self.sum_share + share.sum(0)
        if batch.predictions is not None:
            for c in np.unique(batch.predictions).tolist():
                m = batch.predictions == c
                k = str(c)
                self.by_class[k] = self.by_class.get(k, 0.0) + share[m].sum(0)
                self.class_n[k] = self.class_n.get(k, 0) + int(m.sum())
        top, border = concentration(pabs, self.opts.top_share, max(1, round(min(h, w) / 16)))
        self.top_sum += float(top.sum())
        self.border_sum += float(border.sum())
        re, ce = region_edges(h, self.grid[0]), region_edges(w, self.grid[1])
        regions = np.add.reduceat(np.add.reduceat(share, re, axis=1), ce, axis=2).reshape(n, -1)
        self.region_share += regions.sum(0)
        hits = regions >= self.opts.fixed_region_share
        self.region_hits += hits.sum(0)
        if batch.predictions is not None:
            for c in np.unique(batch.predictions).tolist():
                k = str(c)
                self.class_hits[k] = self.class_hits.get(k, 0) + hits[batch.predictions == c].sum(0)
        self.n += n
        for k, v in (batch.extras.get("prediction_columns") or {}).items():
            if k != "box_class":
                self.prediction_sums[k] = self.prediction_sums.get(k, 0.0) + float(np.asarray(v, np.float64).sum())
        self._keep_examples(batch, pix)

    def _keep_examples(self, batch: BatchResult, pix: np.ndarray) -> None:
        if not isinstance(batch.inputs, np.ndarray):
            return
        n = len(batch)
        pred = batch.predictions if batch.predictions is not None else np.zeros(n, dtype=np.int64)
        score = np.asarray(batch.scores, dtype=np.float64)
        kinds = np.array(["confident"] * n, dtype="U16")
        cand = {"inputs": batch.inputs.astype(np.float32), "relevance": pix.astype(np.float32),
                "ids": np.asarray(batch.sample_ids).astype(str), "predictions": np.asarray(pred).astype(np.int64),
                "scores": score, "keys": np.asarray(batch.keys, dtype=np.uint64), "kinds": kinds}
        parts = [cand]
        if self.compare_labels and batch.targets is not None and batch.predictions is not None:
            wrong = np.asarray(batch.targets).astype(str) != np.asarray(pred).astype(str)
            if wrong.any():
                parts.append({k: v[wrong] for k, v in cand.items()} | {"kinds": np.array(["misclassified"] * int(
                    wrong.sum()), dtype="U16")})
        parts.append({**cand, "kinds": np.array(["borderline"] * n, dtype="U16")})
        if self.examples:
            parts.append(self.examples)
        self.examples = self._select({k: np.concatenate([p[k] for p in parts]) for k in cand})

    @staticmethod
    def _select(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep: list[int] = []
        kinds, pred, score, keys = c["kinds"], c["predictions"], c["scores"], c["keys"]
        for kind, limit, sign in (("confident", 1, -1.0), ("misclassified", N_MISCLASSIFIED, -1.0),
                                  ("borderline", N_BORDERLINE, 1.0)):
            idx = np.flatnonzero(kinds == kind)
            groups = [idx[pred[idx] == p] for p in np.unique(pred[idx])] if kind == "confident" else [idx]
            for g in groups:
                order = np.lexsort((keys[g], sign * score[g]))
                keep.extend(g[order[:limit]].tolist())
        keep_a = np.asarray(keep, dtype=np.int64)
        return {k: v[keep_a] for k, v in c.items()}

    # -- merge / serialise -------------------------------------------------------------------
    def merge(self, other: "ImageMaps") -> None:
        if other.n == 0:
            return
        self.sum_share = other.sum_share.copy() if self.sum_share is None else self.sum_share + other.sum_share
        for k, v in other.by_class.items():
            self.by_class[k] = self.by_class.get(k, 0.0) + v
            self.class_n[k] = self.class_n.get(k, 0) + other.class_n[k]
            self.class_hits[k] = self.class_hits.get(k, 0) + other.class_hits[k]
        self.top_sum += other.top_sum
        self.border_sum += other.border_sum
        self.region_hits += other.region_hits
        self.region_share += other.region_share
        self.n += other.n
        for k, v in other.prediction_sums.items():
            self.prediction_sums[k] = self.prediction_sums.get(k, 0.0) + v
        if other.examples:
            both = [e for e in (self.examples, other.examples) if e]
            self.examples = self._select({k: np.concatenate([e[k] for e in both]) for k in other.examples})

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"region_hits": self.region_hits, "region_share": self.region_share}
        if self.sum_share is not None:
            arrays["sum_share"] = self.sum_share
        classes = sorted(self.by_class)
        for i, k in enumerate(classes):
            arrays[f"class/{i}"] = self.by_class[k]
            arrays[f"class_hits/{i}"] = np.asarray(self.class_hits[k], dtype=np.int64)
        arrays.update({f"ex/{k}": v for k, v in self.examples.items()})
        meta = {"n": self.n, "top_sum": self.top_sum, "border_sum": self.border_sum, "classes": classes,
                "class_n": [self.class_n[k] for k in classes], "examples": sorted(self.examples),
                "prediction_sums": dict(sorted(self.prediction_sums.items()))}
        return meta, arrays

    def load(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.n, self.top_sum, self.border_sum = int(meta["n"]), float(meta["top_sum"]), float(meta["border_sum"])
        self.region_hits, self.region_share = arrays["region_hits"], arrays["region_share"]
        self.sum_share = arrays.get("sum_share")
        self.by_class = {k: arrays[f"class/{i}"] for i, k in enumerate(meta["classes"])}
        self.class_n = dict(zip(meta["classes"], meta["class_n"]))
        self.class_hits = {k: arrays[f"class_hits/{i}"] for i, k in enumerate(meta["classes"])}
        self.examples = {k: arrays[f"ex/{k}"] for k in meta["examples"]}
        self.prediction_sums = {k: float(v) for k, v in (meta.get("prediction_sums") or {}).items()}

    # -- documents ---------------------------------------------------------------------------
    def block(self, names: list[str]) -> dict[str, Any]:
        """The concentration block of ``global_importance.json`` (see the module docstring): the
        fixed-region rule is checked over all samples and within each predicted class (a
        shortcut often marks one class only, as a watermark on one class's images)."""
        n = max(self.n, 1)
        share = self.region_share / n
        lead = int(np.lexsort((np.arange(len(share)), -share))[0]) if len(share) else 0
        groups = {"all": (self.region_hits, self.n)}
        groups.update({k: (self.class_hits[k], self.class_n[k]) for k in sorted(self.class_hits)})
        found = None
        for group, (hits, count) in groups.items():
            if count < MIN_CLASS_SAMPLES or not len(hits):
                continue
            frac = np.asarray(hits) / count
            r = int(np.argmax(frac))
            if frac[r] >= self.opts.fixed_region_fraction and (found is None or frac[r] > found[2]):
                found = (group, r, float(frac[r]))
        return {
            "top_pixels": self.opts.top_share, "top_pixel_share": self.top_sum / n, "border_share": self.border_sum / n,
            "region_shares": {name: float(s) for name, s in zip(names, share)},
            "leading_region": names[lead] if names else None,
            "fixed_region": found is not None, "fixed_region_name": names[found[1]] if found else None,
            "fixed_region_group": found[0] if found else None,
            "fixed_region_samples": found[2] if found else float((self.region_hits / n).max(initial=0.0)),
            "fixed_region_rule": {"share": self.opts.fixed_region_share, "fraction": self.opts.fixed_region_fraction,
                                  "min_samples": MIN_CLASS_SAMPLES},
        }


class ImageModality(Modality):
    """Images (see the module docstring)."""

    name = "image"
    quality_kind = "image"
    unit_noun = "region"
    fixed_units = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = ImageOptions.from_config(cfg.image or {})
        self.grid = self.opts.grid
        self.channels = 0
        self.size = (0, 0)
        self.classes: list[str] | None = None
        self._threshold: float | None = None  # an output task's, from the stage's probe batch

    def open(self, data: Any, *, source: str | None = None) -> ImageTable:
        return open_images(data, self.opts, target_column=self.cfg.target_column, source=source)

    def plan(self, table: ImageTable, handle: Any) -> ModalityPlan:  # type: ignore[override]
        o = self.opts
        self.channels = expected_channels(getattr(handle, "model", None), o, table)
        self.size = expected_size(o, table)
        self.classes = table.classes
        self.grid = (min(o.grid[0], max(self.size[0], 1)), min(o.grid[1], max(self.size[1], 1)))
        lo, hi = default_pixel_range(o, table)
        allowed = [self.channels] if (o.mode is None or table.array is not None) else [1, 2, 3, 4]
        exp: list[dict[str, Any]] = [
            {"type": "expect_table_row_count_to_be_between", "min_value": 1},
            {"type": "expect_column_values_to_be_null", "column": "decode_error"},
            {"type": "expect_column_values_to_be_in_set", "column": "channels", "value_set": allowed},
            {"type": "expect_column_values_to_be_between", "column": "pixel_min", "min_value": lo},
            {"type": "expect_column_values_to_be_between", "column": "pixel_max", "max_value": hi},
        ]
        if o.size is None:
            exp += [{"type": "expect_column_values_to_be_in_set", "column": "height", "value_set": [self.size[0]]},
                    {"type": "expect_column_values_to_be_in_set", "column": "width", "value_set": [self.size[1]]}]
        if o.unique:
            exp.append({"type": "expect_column_values_to_be_unique", "column": "sha256"})
        notes = [f"image preprocessing: {o.record()}; the model takes {self.channels} channel(s) at "
                 f"{self.size[0]}x{self.size[1]} pixels"]
        return ModalityPlan(units=region_names(self.grid), columns=["image"], expectations=exp,
                            contract_source="image modality (decodable, channels, size, pixel range)",
                            independent=True, notes=notes)

    def batches(self, table: ImageTable, plan: ModalityPlan, batch_size: int) -> Iterator[InputBatch]:  # type: ignore[override]
        for start in range(0, table.n_rows, batch_size):
            stop = min(start + batch_size, table.n_rows)
            try:
                x = np.stack([table.pixels(i, self.channels, self.size) for i in range(start, stop)])
            except Exception as exc:
                raise InputNotReadable(str(exc)) from exc
            yield InputBatch(sample_ids=np.arange(start, stop, dtype=np.int64), inputs=x,
                             targets=table.labels(start, stop))

    def to_model(self, inputs: Any, device: str) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(inputs)).to(device)

    def units(self, batch: InputBatch, plan: ModalityPlan, relevance: Any) -> UnitRelevance:
        rel = np.asarray(relevance, dtype=np.float64)
        if rel.ndim != 4:
            raise StageError(f"the image modality needs (N, C, H, W) input relevance, got shape {rel.shape}")
        pix = rel.sum(1)
        h, w = pix.shape[1:]
        regions = np.add.reduceat(np.add.reduceat(pix, region_edges(h, self.grid[0]), axis=1),
                                  region_edges(w, self.grid[1]), axis=2)
        return UnitRelevance(names=plan.units or [], relevance=regions.reshape(len(pix), -1),
                             detail=pix.astype(np.float32))

    def sample_tables(self, result: BatchResult, plan: ModalityPlan) -> Mapping[str, Any]:
        return {"local_relevance.parquet": unit_relevance_table(result)}

    def quality_setup(self, model: Any) -> tuple[Any, dict[str, Any]]:
        """Patch flipping: square patches about the size of a grid region (pixel flipping when a
        region is one pixel). Segmentation and box regression are measured on what the stage
        explains, summed to one output per sample (the predicted mask's scores, the box
        outputs) as regression; the metrics that need class labels or named drivers are skipped."""
        h, w = self.size
        extra: dict[str, Any] = {"patch_size": max(1, min(h // self.grid[0], w // self.grid[1]))}
        if self.cfg.task not in IMAGE_OUTPUT_TASKS:
            return model, extra
        from governance.quality.report import METRIC_GROUPS
        from governance.stage.output_tasks import summed_output

        extra.update(task="regression", metrics=[g for g in METRIC_GROUPS if g not in QUALITY_SKIPPED])
        return summed_output(model, self.cfg.task, self.opts.background_class, self._threshold), extra

    def calibrated(self, threshold: float | None) -> None:
        self._threshold = threshold

    def accumulators(self) -> Mapping[str, ImageMaps]:
        return {"maps": ImageMaps(self.opts, self.grid, self.cfg.primary_mode,
                                  compare_labels=self.cfg.task not in IMAGE_OUTPUT_TASKS)}

    def amend_documents(self, docs: Any, state: Any, plan: ModalityPlan) -> None:
        maps: ImageMaps = state.extra("maps")  # type: ignore[assignment]
        block = maps.block(plan.units or [])
        block.update(height=self.size[0], width=self.size[1], channels=self.channels, grid=list(self.grid),
                     preprocessing=self.opts.record(), classes=self.classes)
        docs.global_importance["image"] = block
        docs.global_importance["task"] = self.cfg.task
        if self.cfg.task in IMAGE_OUTPUT_TASKS:
            block["task"] = output_task_block(self.cfg.task, self.opts, maps)

    def write_documents(self, state: Any, plan: ModalityPlan, out_dir: Path) -> None:
        from governance.stage.writers import write_json

        maps: ImageMaps = state.extra("maps")  # type: ignore[assignment]
        if maps.sum_share is None:
            return
        heat = out_dir / "heatmaps"
        heat.mkdir(parents=True, exist_ok=True)
        maps_out = {"mean": maps.sum_share / maps.n}
        maps_out.update({f"class_{k}": v / maps.class_n[k] for k, v in sorted(maps.by_class.items())})
        for name, m in maps_out.items():
            np.save(heat / f"{name}.npy", m.astype(np.float64), allow_pickle=False)
            (heat / f"{name}.png").write_bytes(heatmap_png(m, name))
        write_json(heat / "index.json", {"maps": sorted(maps_out), "n": {"mean": maps.n, **{
            f"class_{k}": v for k, v in sorted(maps.class_n.items())}}})
        if maps.examples:
            ex = out_dir / "examples"
            ex.mkdir(parents=True, exist_ok=True)
            e = maps.examples
            with open(ex / "images.npz", "wb") as f:
                np.savez(f, inputs=e["inputs"], relevance=e["relevance"], ids=e["ids"], predictions=e["predictions"],
                         scores=e["scores"], kinds=e["kinds"])


def heatmap_png(m: np.ndarray, title: str) -> bytes:
    """A mean relevance-share map as a PNG (deterministic bytes)."""
    from governance.report.plots import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.4, 2.4))
    ax.imshow(m, cmap="magma", interpolation="nearest")
    ax.set_title(title.replace("_", " "), fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)
