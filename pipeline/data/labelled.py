"""The labelled videos of a cache: labels -> the classes a head knows -> split -> sequences -> class indices.

Used by train-head (and each sweep trial), evaluate and finetune, so that every stage reads labels, leaves out
unknown classes and indexes classes the same way. A head that labels frames gets a class per row instead
(pipeline.data.frame_labels), aligned to the rows through their frame indices and timestamps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.cache import FeatureCache, open_cache
from pipeline.data.frame_labels import read_frame_labels
from pipeline.data.sequences import SequenceStore, feature_stats, load_sequences
from pipeline.data.splits import Split, SplitError, make_split, read_labels_csv
from pipeline.spec import FeatureSpec

log = logging.getLogger(__name__)


def video_labels(cache: FeatureCache, labels_csv: Path | None = None) -> dict[str, str]:
    """key -> class name of every labelled video: the cache's labels, or those of `labels_csv` when given."""
    if labels_csv is not None:
        labels = read_labels_csv(labels_csv, cache.keys())
    else:
        labels = {k: v for k, v in cache.labels().items() if v}
    if not labels:
        raise SplitError(
            f"no video of {cache.path} has a label; extract from class folders (videos/<class>/...), a "
            f"CSV manifest with labels, or pass --labels CSV (or --frame-labels for a label per frame)"
        )
    unlabelled = len(cache) - len(labels)
    if unlabelled:
        log.warning("%d videos of %s have no label and are left out", unlabelled, cache.path)
    return labels


def among_classes(labels: dict[str, str], classes: list[str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The videos of `labels` whose class is one of `classes` (a head's), and key -> why for the others (warned).
    Raises SplitError when none is left; `where` names the videos' source in messages."""
    known = set(classes)
    kept = {k: v for k, v in labels.items() if v in known}
    skipped = {k: f"label {v!r} is not a class of the head" for k, v in labels.items() if v not in known}
    if skipped:
        unknown = sorted({labels[k] for k in skipped})
        log.warning(
            "%d videos have labels the head was not trained on and are left out (%s)",
            len(skipped),
            ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else ""),
        )
    if not kept:
        raise SplitError(
            f"no video of {where} has a label among the head's {len(classes)} classes "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
        )
    return kept, skipped


def class_indices(keys: list[str], labels: dict[str, str], classes: list[str]) -> np.ndarray:
    """(len(keys),) int64 index in `classes` of each video's label."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[labels[k]] for k in keys], dtype=np.int64)


def row_indices(keys: list[str], rows: dict[str, np.ndarray], classes: list[str], where: str) -> np.ndarray:
    """The class index in `classes` of every row of the videos `keys`, one video after the other: (sum of rows,)
    int64, -1 for a label that is not among `classes` (left out of losses and scores, with a warning)."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.concatenate([np.array([index.get(v, -1) for v in rows[k]], dtype=np.int64) for k in keys])
    unknown = out < 0
    if unknown.any():
        names = sorted({v for k in keys for v in rows[k] if v not in index})
        log.warning(
            "%d rows of %s have labels the head does not know (%s): they are left out of the scores",
            int(unknown.sum()),
            where,
            ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else ""),
        )
    return out


@dataclass
class LabelledData:
    """The labelled videos of a cache, split and loaded: everything `train_head` needs besides its settings.

    `load_labelled` builds it; a sweep builds it once and passes it to every trial (`train_head(data=...)`).
    """

    cache: Path
    spec: FeatureSpec
    """The cache's features (what checkpoints record); `store.dim` may be smaller after a reduction."""
    dtype: str
    labels: dict[str, str]
    split: Split
    classes: list[str]
    store: SequenceStore
    """The train videos first, then the val videos."""
    y: np.ndarray
    """(videos,) class index of each store video (all 0 when the head labels frames)."""
    train_sources: list[str] = field(default_factory=list)
    """Source path of each train video (what checkpoints record as the videos they were trained on)."""
    notes: dict = field(default_factory=dict)
    """How the data was prepared beyond the cache (e.g. a reduction), recorded in config.json and checkpoints."""
    stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    """Per-dimension mean and std (D,) the heads standardise their inputs with; from the train rows when None."""
    target: str = "videos"
    """videos: a class per video (`y`); frames: a class per row (`row_y`)."""
    row_y: np.ndarray | None = field(default=None, repr=False)
    """Frames: (rows of the store,) class index of every row, video after video in store order; -1 for a label the
    head does not know."""
    background: str | None = None
    """Frames: the background class (left out of the edit score and F1)."""

    @property
    def row_offsets(self) -> np.ndarray:
        """(videos,) the first row of each store video in `row_y`."""
        lengths = self.store.lengths
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def row_labels(self, video: int) -> np.ndarray:
        """(rows,) the class index of every row of store video `video` (frames)."""
        start = int(self.row_offsets[video])
        return self.row_y[start : start + int(self.store.lengths[video])]

    @property
    def train_idx(self) -> np.ndarray:
        return np.arange(len(self.split.train))

    @property
    def val_idx(self) -> np.ndarray:
        return np.arange(len(self.split.train), len(self.store.keys))

    def train_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`stats`, computed once from the train rows when not given."""
        if self.stats is None:
            self.stats = feature_stats(self.store, self.train_idx)
        return self.stats


def frame_labels_of(cache: FeatureCache, cfg) -> dict[str, np.ndarray]:
    """key -> (rows,) class name of every row, for the videos of `cache` that cfg.frame_labelling's file labels
    (cfg: a TrainConfig or EvalConfig). Raises SplitError when it labels none."""
    fl = cfg.frame_labelling
    got = read_frame_labels(fl.frame_labels, cache, units=fl.label_units, background=fl.background)
    if not got.rows:
        example = next(iter(cache.keys()), "")
        raise SplitError(
            f"{fl.frame_labels} labels no video of {cache.path}: its file names (or CSV keys) must name cache keys "
            f"such as {example!r} (or their ends, e.g. the file name without its extension)"
        )
    unlabelled = len(cache) - len(got.rows)
    if unlabelled:
        log.warning(
            "%d videos of %s have no frame labels in %s and are left out", unlabelled, cache.path, fl.frame_labels
        )
    return got.rows


def load_labelled(cache: str | Path, cfg: TrainConfig) -> LabelledData:
    """Labels, split (cfg's split settings) and the sequences of `cache`, in RAM or lazy (cfg.memory)."""
    cache_obj = open_cache(cache)
    rows = None
    if cfg.target == "frames":
        rows = frame_labels_of(cache_obj, cfg)
        # The split is by video: stratified by the video's own label where the cache has one.
        recorded = cache_obj.labels()
        labels = {k: recorded.get(k) or "-" for k in rows}
    else:
        labels = video_labels(cache_obj, cfg.splitting.labels)
    split = make_split(labels, cfg.splitting, cache_splits=cache_obj.splits(), all_keys=cache_obj.keys())
    keys = split.train + split.val
    if rows is not None:
        background = cfg.frame_labelling.background
        classes = sorted({v for k in split.train for v in np.unique(rows[k])} | ({background} if background else set()))
    else:
        classes = sorted({labels[k] for k in split.train})
    log.info("split: %s; %d classes", split.sizes(), len(classes))
    store = load_sequences(cache_obj, keys, cfg.memory, cfg.runtime.progress)
    sources = cache_obj.sources()
    return LabelledData(
        cache=Path(cache).resolve(),
        spec=cache_obj.spec,
        dtype=cache_obj.dtype,
        labels=labels,
        split=split,
        classes=classes,
        store=store,
        y=np.zeros(len(keys), dtype=np.int64) if rows is not None else class_indices(keys, labels, classes),
        train_sources=[sources[k][0] for k in split.train],
        target=cfg.target,
        row_y=None if rows is None else row_indices(keys, rows, classes, "the val videos"),
        background=cfg.frame_labelling.background if rows is not None else None,
    )
