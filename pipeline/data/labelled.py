"""The labelled videos of a cache: labels -> the classes a head knows -> split -> sequences -> class indices.

Used by train-head (and each sweep trial), evaluate and finetune, so that every stage reads labels, leaves out
unknown classes and indexes classes the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.cache import FeatureCache, open_cache
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
            f"CSV manifest with labels, or pass --labels CSV"
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
    """(videos,) class index of each store video."""
    train_sources: list[str] = field(default_factory=list)
    """Source path of each train video (what checkpoints record as the videos they were trained on)."""
    notes: dict = field(default_factory=dict)
    """How the data was prepared beyond the cache (e.g. a reduction), recorded in config.json and checkpoints."""
    stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    """Per-dimension mean and std (D,) the heads standardise their inputs with; from the train rows when None."""

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


def load_labelled(cache: str | Path, cfg: TrainConfig) -> LabelledData:
    """Labels, split (cfg's split settings) and the sequences of `cache`, in RAM or lazy (cfg.memory)."""
    cache_obj = open_cache(cache)
    labels = video_labels(cache_obj, cfg.splitting.labels)
    split = make_split(labels, cfg.splitting, cache_splits=cache_obj.splits(), all_keys=cache_obj.keys())
    classes = sorted({labels[k] for k in split.train})
    keys = split.train + split.val
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
        y=class_indices(keys, labels, classes),
        train_sources=[sources[k][0] for k in split.train],
    )
