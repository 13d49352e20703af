"""A trained head scored on any cache of the same features: top-1, top-5, per-class accuracy, confusion matrix.

pipeline evaluate runs/lstm/best.pt test.h5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import EvalConfig, config_with
from pipeline.data.cache import FeatureCache, open_cache
from pipeline.data.labelled import among_classes, class_indices, video_labels
from pipeline.data.sequences import load_sequences
from pipeline.data.splits import SPLIT_FILE, KeyMatcher, SplitError, read_list, read_split
from pipeline.runtime import cpu_count, pick_device
from pipeline.train_head.checkpoint import HeadCheckpoint, load_checkpoint
from pipeline.train_head.metrics import classification_report, plot_confusion, to_json
from pipeline.train_head.train import score_store

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    checkpoint: Path
    cache: Path
    metrics: dict
    """classification_report of the held-out videos (all scored videos when the head saw none or all of them):
    videos, top1, top5, loss, per_class_accuracy, confusion_matrix, classes."""
    eval: str
    skipped: dict[str, str] = field(default_factory=dict)
    """key -> why it was not scored (a label the head does not know)."""
    seen: dict | None = None
    """classification_report of the videos the head was trained on, when the cache holds some; None otherwise."""
    only_seen: bool = False
    """Every scored video was one the head was trained on: `metrics` is a training score."""

    def summary_line(self) -> str:
        m = self.metrics
        extra = f"; {len(self.skipped)} videos of unknown classes skipped" if self.skipped else ""
        which = (
            "videos the head was TRAINED on"
            if self.only_seen
            else ("held-out videos" if self.seen is not None else "videos")
        )
        return (
            f"top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} on {m['videos']} {which} of {self.cache} "
            f"({self.eval}{extra})"
        )

    def warning(self) -> str | None:
        """What the reader must know when the cache holds videos the head was trained on."""
        if self.only_seen:
            return (
                f"every one of the {self.metrics['videos']} scored videos was in the head's training split: "
                f"this top-1 measures memory, not generalisation; evaluate on held-out videos"
            )
        if self.seen is not None:
            return (
                f"{self.seen['videos']} of the scored videos were in the head's training split (top-1 on them "
                f"{self.seen['top1']:.1%}); they are scored apart, not in the held-out top-1"
            )
        return None


def trained_on(ckpt: HeadCheckpoint, checkpoint: Path, cache: FeatureCache, keys: list[str]) -> set[str]:
    """The keys among `keys` of videos the head was trained on: by source path (checkpoints record them), or, for
    checkpoints that do not, by the run's split.csv beside the checkpoint when `cache` is the one it was trained on."""
    if ckpt.train_videos:
        train = set(ckpt.train_videos)
        sources = cache.sources()
        return {k for k in keys if sources[k][0] in train}
    recorded, split_file = ckpt.config.get("cache"), Path(checkpoint).parent / SPLIT_FILE
    if recorded and Path(recorded).resolve() == Path(cache.path).resolve() and split_file.is_file():
        sides = read_split(split_file)
        return {k for k in keys if sides.get(k) == "train"}
    return set()


def evaluate_checkpoint(
    checkpoint: str | Path, cache: str | Path, *, config: EvalConfig | None = None, **options
) -> EvalReport:
    """Top-1, top-5, per-class accuracy and the confusion matrix of a head on the labelled videos of `cache`.

    Videos the head was trained on are scored apart (`EvalReport.seen`), so that they cannot inflate the score.
    Refuses (FeatureMismatchError) a cache whose features differ from those the head was trained on.
    Options are EvalConfig fields (eval_clips=..., labels=..., keys_list=..., out=...).
    """
    cfg = config_with(EvalConfig, config, {}, options, "evaluate")
    torch.set_num_threads(cfg.runtime.threads or cpu_count())
    device = pick_device(cfg.runtime.device)
    ckpt = load_checkpoint(checkpoint)
    c = open_cache(cache)
    ckpt.check_features(c, checkpoint)
    clips = ckpt.eval_clips_for(cfg.eval_clips)
    labels = video_labels(c, cfg.labels)
    if cfg.keys_list is not None:
        match = KeyMatcher(c.keys())
        listed = {match(e) for e in read_list(cfg.keys_list)} - {None}
        labels = {k: v for k, v in labels.items() if k in listed}
        if not labels:
            raise SplitError(f"no labelled video of {c.path} is named in {cfg.keys_list}")
    labels, skipped = among_classes(labels, ckpt.classes, str(c.path))
    keys = list(labels)
    store = load_sequences(c, keys, cfg.memory, cfg.runtime.progress)
    y = class_indices(keys, labels, ckpt.classes)
    probs = score_store(ckpt, store, clips, cfg.batch_size, device, workers=0 if store.in_memory else cfg.workers)
    seen = trained_on(ckpt, Path(checkpoint), c, keys)
    held = np.array([k not in seen for k in keys])
    report = EvalReport(
        Path(checkpoint),
        Path(cache),
        classification_report(probs, y, ckpt.classes),
        ckpt.describe_eval(clips),
        skipped,
        only_seen=bool(seen) and not held.any(),
    )
    if seen and held.any():
        report.metrics = classification_report(probs[held], y[held], ckpt.classes)
        report.seen = classification_report(probs[~held], y[~held], ckpt.classes)
    if report.warning():
        log.warning("%s", report.warning())
    metrics = report.metrics
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(
            to_json(
                {
                    "checkpoint": str(checkpoint),
                    "cache": str(cache),
                    "eval": report.eval,
                    **metrics,
                    "skipped": len(skipped),
                    "trained_on": report.seen,
                    "only_trained_on": report.only_seen,
                }
            )
        )
        plot_confusion(
            np.array(metrics["confusion_matrix"]),
            ckpt.classes,
            out / "confusion.png",
            f"top-1 {metrics['top1']:.1%} on {Path(cache).name}",
        )
    return report
