"""Image data as a table of one row per image: where each image comes from, how it decodes, and
its preprocessing into model inputs.

Sources: a folder in class-subfolder layout (``root/<label>/<file>.png|jpg``; labels are the
sorted subfolder names, the target is the label's index), a parquet/CSV table with a column of
image paths (relative to the table's folder) or encoded bytes (``image.column``, default
``image``) plus the target column, or an ``.npz`` with ``x`` (N,H,W / N,H,W,C / N,C,H,W) and an
optional ``y``. Files are decoded with Pillow.

:class:`ImageTable` is a :class:`governance.data.TableSource` whose columns are the per-image
metadata the data contract checks (``decode_error``, ``height``, ``width``, ``channels``,
``pixel_min``, ``pixel_max``, ``sha256``, ``label``): each chunk decodes its images, so memory
is bounded by the chunk. The explanation reads the same records through :meth:`ImageTable.pixels`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from governance.config import ConfigError
from governance.data import DataLoadError, InputFile, TableSource, _input_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODES = {"L": 1, "RGB": 3}
META_COLUMNS = ["image", "decode_error", "height", "width", "channels", "pixel_min", "pixel_max", "sha256"]


@dataclass(frozen=True)
class ImageOptions:
    """The config's ``image:`` section (validated). ``size`` (H, W) resizes, ``mode`` (L|RGB)
    converts decoded files, pixel values are divided by ``scale`` then normalised per channel by
    ``mean`` / ``std``; ``grid`` (rows, cols) names the regions; ``pixel_range`` bounds the raw
    pixel values in the contract; ``unique`` adds a no-duplicates-by-hash check; ``top_share``,
    ``fixed_region_share`` and ``fixed_region_fraction`` define the concentration block."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grid: tuple[int, int] = (8, 8)
    column: str = "image"
    pixel_range: tuple[float, float] | None = None
    unique: bool = False
    top_share: float = 0.05
    fixed_region_share: float = 0.3
    fixed_region_fraction: float = 0.5
    background_class: int | None = 0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "ImageOptions":
        """Validate ``image:``; a bad value raises ConfigError naming the key."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"image: unknown key(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for key in ("size", "grid"):
            if section.get(key) is not None:
                v = section[key]
                if (not isinstance(v, (list, tuple)) or len(v) != 2
                        or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)):
                    raise ConfigError(f"image.{key}: must be two positive integers [rows, cols], got {v!r}")
                kw[key] = (int(v[0]), int(v[1]))
        if section.get("mode") is not None:
            if section["mode"] not in MODES:
                raise ConfigError(f"image.mode: must be L or RGB, got {section['mode']!r}")
            kw["mode"] = section["mode"]
        for key in ("scale", "top_share", "fixed_region_share", "fixed_region_fraction"):
            if section.get(key) is not None:
                v = section[key]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"image.{key}: must be a positive number, got {v!r}")
                kw[key] = float(v)
        for key in ("mean", "std", "pixel_range"):
            if section.get(key) is not None:
                v = section[key]
                v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                if not isinstance(v, (list, tuple)) or not v or not all(
                        isinstance(i, (int, float)) and not isinstance(i, bool) for i in v):
                    raise ConfigError(f"image.{key}: must be a number or a list of numbers, got {section[key]!r}")
                kw[key] = tuple(float(i) for i in v)
        if "std" in kw and any(s == 0 for s in kw["std"]):
            raise ConfigError("image.std: must not contain 0")
        if "pixel_range" in kw and (len(kw["pixel_range"]) != 2 or kw["pixel_range"][0] > kw["pixel_range"][1]):
            raise ConfigError(f"image.pixel_range: must be [low, high], got {section['pixel_range']!r}")
        if section.get("column") is not None:
            kw["column"] = str(section["column"])
        if section.get("unique") is not None:
            if not isinstance(section["unique"], bool):
                raise ConfigError(f"image.unique: must be true or false, got {section['unique']!r}")
            kw["unique"] = section["unique"]
        if "background_class" in section:
            v = section["background_class"]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"image.background_class: must be a class index >= 0 or null, got {v!r}")
            kw["background_class"] = v
        return cls(**kw)

    def record(self) -> dict[str, Any]:
        """The preprocessing as recorded in the run."""
        return {"size": list(self.size) if self.size else None, "mode": self.mode, "scale": self.scale,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "grid": list(self.grid)}


@dataclass
class ImageRecord:
    """One image: a file path, encoded bytes, or an index into an array; and its label."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    index: int | None = None
    label: Any = None


def _channels_last(x: np.ndarray) -> np.ndarray:
    """An ``.npz`` image array as (N, H, W, C)."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
            return np.moveaxis(x, 1, -1)
        return x
    raise DataLoadError(f"the .npz array 'x' must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {x.shape}")


class ImageTable(TableSource):
    """Images as a table of per-image metadata (see the module docstring)."""

    columnar = True

    def __init__(self, records: list[ImageRecord], opts: ImageOptions, *, source: str, name: str,
                 files: list[InputFile], array: np.ndarray | None = None, classes: list[str] | None = None,
                 labelled: bool = False) -> None:
        super().__init__(source, name, files)
        self.records = records
        self.opts = opts
        self.array = array
        self.classes = classes
        self.labelled = labelled

    @property
    def columns(self) -> list[str]:
        return META_COLUMNS + (["label"] if self.labelled else [])

    @property
    def n_rows(self) -> int:
        return len(self.records)

    # -- decoding ---------------------------------------------------------------------------
    def raw(self, i: int) -> tuple[np.ndarray | None, str | None, bytes | None]:
        """Image ``i`` as decoded (H, W, C) pixel values, or an error; and its encoded bytes."""
        rec = self.records[i]
        if rec.index is not None:
            assert self.array is not None
            a = self.array[rec.index]
            return a, None, np.ascontiguousarray(a).tobytes()
        from PIL import Image, UnidentifiedImageError

        try:
            data = rec.data if rec.data is not None else rec.path.read_bytes()  # type: ignore[union-attr]
        except OSError as exc:
            return None, f"{rec.name}: cannot be read ({exc.strerror or exc})", None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode not in ("L", "RGB", "RGBA", "LA", "I", "F", "I;16"):
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            return None, f"{rec.name}: not a decodable image ({type(exc).__name__})", data
        return (a[..., None] if a.ndim == 2 else a), None, data

    def pixels(self, i: int, channels: int, size: tuple[int, int]) -> np.ndarray:
        """Image ``i`` preprocessed as the model's (C, H, W) float32 input (mode, size, scale,
        mean, std); raises DataLoadError when it cannot be."""
        from PIL import Image

        a, err, _ = self.raw(i)
        if err is not None:
            raise DataLoadError(err)
        assert a is not None
        o = self.opts
        name = self.records[i].name
        if a.shape[-1] != channels:
            if o.mode is None or self.records[i].index is not None:
                raise DataLoadError(f"{name}: {a.shape[-1]} channel(s), the model takes {channels}")
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[-1]]
            a = np.asarray(Image.fromarray(a[..., 0] if mode == "L" else a, mode=mode).convert(o.mode))
            a = a[..., None] if a.ndim == 2 else a
        x = a.astype(np.float32)
        if x.shape[:2] != tuple(size):
            if o.size is None:
                raise DataLoadError(f"{name}: {x.shape[0]}x{x.shape[1]} pixels, the others are {size[0]}x{size[1]}; "
                                    "set image.size to resize")
            x = np.stack([np.asarray(Image.fromarray(x[..., c], mode="F").resize((size[1], size[0]),
                                                                                  Image.Resampling.BILINEAR))
                          for c in range(x.shape[-1])], axis=-1)
        if o.scale:
            x = x / np.float32(o.scale)
        if o.mean:
            x = x - np.asarray(o.mean, dtype=np.float32)
        if o.std:
            x = x / np.asarray(o.std, dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32)

    def _meta(self, start: int, stop: int) -> pd.DataFrame:
        rows = []
        for i in range(start, min(stop, len(self.records))):
            a, err, data = self.raw(i)
            rec = self.records[i]
            row: dict[str, Any] = {"image": rec.name, "decode_error": err, "height": None, "width": None,
                                   "channels": None, "pixel_min": None, "pixel_max": None,
                                   "sha256": hashlib.sha256(data).hexdigest() if data is not None else None}
            if a is not None:
                row.update(height=int(a.shape[0]), width=int(a.shape[1]), channels=int(a.shape[2]),
                           pixel_min=float(a.min()) if a.size else None, pixel_max=float(a.max()) if a.size else None)
            if self.labelled:
                row["label"] = rec.label
            rows.append(row)
        frame = pd.DataFrame(rows, columns=self.columns)
        for c in ("height", "width", "channels"):
            frame[c] = frame[c].astype("Int64")
        for c in ("pixel_min", "pixel_max"):
            frame[c] = frame[c].astype("float64")
        for c in ("image", "decode_error", "sha256"):
            frame[c] = frame[c].astype(object)
        frame.index = pd.RangeIndex(start, start + len(frame))
        return frame

    def schema_frame(self) -> pd.DataFrame:
        return self._meta(0, 0)

    def read_columns(self, columns: list[str], start: int, stop: int) -> pd.DataFrame:
        return self._meta(start, stop)[columns]

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        for start in range(0, len(self.records), rows):
            frame = self._meta(start, start + rows)
            yield frame if columns is None else frame[columns]

    def labels(self, start: int, stop: int) -> np.ndarray | None:
        """The targets of images ``start .. stop - 1`` (None when the data has none)."""
        if not self.labelled:
            return None
        return np.asarray([r.label for r in self.records[start:stop]])


# ----------------------------------------------------------------------------- opening


def _folder(root: Path, opts: ImageOptions, source: str) -> ImageTable:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataLoadError(f"image folder {root} has no class subfolders: lay it out as {root}/<label>/<image>")
    records, files = [], []
    for idx, d in enumerate(subdirs):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rel = f.relative_to(root).as_posix()
                records.append(ImageRecord(name=rel, path=f, label=idx))
                files.append(_input_file(f, root))
    if not records:
        raise DataLoadError(f"image folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return ImageTable(records, opts, source=source, name=root.name, files=files,
                      classes=[d.name for d in subdirs], labelled=True)


def _npz(path: Path, source: str, opts: ImageOptions) -> ImageTable:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataLoadError(f"{path}: an image .npz needs an array 'x' (and optionally 'y'); it has "
                                    f"{z.files}")
            x = _channels_last(z["x"])
            y = z["y"] if "y" in z.files else None
    except (ValueError, OSError) as exc:
        raise DataLoadError(f"cannot read {path} as an .npz of arrays: {exc}") from exc
    if y is not None and len(y) != len(x):
        raise DataLoadError(f"{path}: 'x' has {len(x)} images but 'y' has {len(y)} labels")
    records = [ImageRecord(name=f"x[{i}]", index=i, label=None if y is None else y[i].item())
               for i in range(len(x))]
    return ImageTable(records, opts, source=source, name=path.stem, files=[_input_file(path, path)], array=x,
                      labelled=y is not None)


def _table(table: TableSource, opts: ImageOptions, target: str | None, source: str) -> ImageTable:
    if opts.column not in table.columns:
        raise DataLoadError(f"the image table {source} has no column '{opts.column}' (it has {table.columns[:10]}); "
                            "set image.column to the column of image paths or bytes")
    labelled = bool(target) and target in table.columns
    cols = [opts.column] + ([target] if labelled else [])
    base = table.files[0].path.parent if table.files else Path.cwd()
    records, files = [], list(table.files)
    for frame in table.iter_frames(1 << 14, cols):
        for pos, value in zip(frame.index, frame[opts.column]):
            label = frame.at[pos, target] if labelled else None
            label = label.item() if hasattr(label, "item") else label
            if isinstance(value, (bytes, bytearray)):
                records.append(ImageRecord(name=f"row {pos}", data=bytes(value), label=label))
            elif isinstance(value, str) and value:
                p = (base / value).resolve()
                records.append(ImageRecord(name=value, path=p, label=label))
                if p.is_file():
                    files.append(InputFile(path=p, relative=value, size=p.stat().st_size,
                                           mtime_ns=p.stat().st_mtime_ns))
            else:
                records.append(ImageRecord(name=f"row {pos}", data=b"", label=label))
    return ImageTable(records, opts, source=source, name=table.name, files=files, labelled=labelled)


def open_images(data: Any, opts: ImageOptions, *, target_column: str | None, source: str | None = None) -> ImageTable:
    """An :class:`ImageTable` over a class-subfolder folder, an ``.npz``, or a parquet/CSV table
    of image paths or bytes (any reference ``governance.data.open_table`` takes)."""
    if isinstance(data, (str, Path)) and "://" not in str(data) and not str(data).startswith("mlflow-dataset:"):
        p = Path(data).expanduser()
        label = source or str(data)
        if p.is_dir() and not any(q.suffix.lower() in (".parquet", ".pq", ".csv") for q in p.iterdir()):
            table = _folder(p.resolve(), opts, label)
            table.start_hashing()
            return table
        if p.is_file() and p.suffix.lower() == ".npz":
            table = _npz(p.resolve(), label, opts)
            table.start_hashing()
            return table
    from governance.data import open_table

    inner = open_table(data, source=source)
    try:
        table = _table(inner, opts, target_column, inner.source)
    finally:
        inner.close()
    table.start_hashing()
    return table


def expected_channels(model: Any, opts: ImageOptions, table: ImageTable) -> int:
    """The channels the model takes: the configured mode's, the first 2-D convolution's input
    channels, or the first decodable image's."""
    if opts.mode:
        return MODES[opts.mode]
    try:
        from torch import nn

        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return int(m.in_channels)
    except Exception:
        pass
    return _first(table)[2]


def _first(table: ImageTable) -> tuple[int, int, int]:
    for i in range(min(len(table.records), 64)):
        a, _, _ = table.raw(i)
        if a is not None:
            return int(a.shape[0]), int(a.shape[1]), int(a.shape[2])
    return 0, 0, 0


def expected_size(opts: ImageOptions, table: ImageTable) -> tuple[int, int]:
    """The input size: the configured one, else the first decodable image's."""
    if opts.size:
        return opts.size
    h, w, _ = _first(table)
    return h, w


def default_pixel_range(opts: ImageOptions, table: ImageTable) -> tuple[float, float]:
    """The raw pixel values' bounds: configured, else [0, 255] for integer pixels, [0, 1] for floats."""
    if opts.pixel_range:
        return opts.pixel_range  # type: ignore[return-value]
    if table.array is not None and np.issubdtype(table.array.dtype, np.floating):
        return 0.0, float(opts.scale) if opts.scale else 1.0
    return 0.0, 255.0 if not opts.scale or opts.scale <= 255 else float(opts.scale)


def region_edges(n: int, parts: int) -> np.ndarray:
    """Start indices of ``parts`` near-equal bins over ``n`` pixels."""
    return np.round(np.linspace(0, n, parts + 1)).astype(np.int64)[:-1]


def region_names(grid: Sequence[int]) -> list[str]:
    """``r{row}c{col}`` for every region, row-major."""
    return [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]
