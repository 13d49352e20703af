"""A trained head scored on any cache of the same features: top-1, top-5, per-class accuracy, confusion matrix; or,
for a head that labels frames, frame accuracy, edit score and F1@{10,25,50}, overall and per video.

    pipeline evaluate runs/lstm/best.pt test.h5
    pipeline evaluate runs/tcn/best.pt test.h5 --frame-labels groundTruth/
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import EvalConfig, config_with, resolve_metric
from pipeline.data.cache import FeatureCache, open_cache
from pipeline.data.labelled import among_classes, class_indices, frame_labels_of, row_indices, video_labels
from pipeline.data.sequences import load_sequences
from pipeline.data.splits import SPLIT_FILE, KeyMatcher, SplitError, read_list, read_split
from pipeline.runtime import cpu_count, pick_device
from pipeline.train_head.checkpoint import HeadCheckpoint, load_checkpoint
from pipeline.train_head.metrics import classification_report, plot_confusion, scores_line, to_json
from pipeline.train_head.segmentation import plot_strips, segmentation_report
from pipeline.train_head.train import STRIP_VIDEOS, score_store

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    checkpoint: Path
    cache: Path
    metrics: dict
    """The report of the held-out videos (all scored videos when the head saw none or all of them): a head that labels
    videos, classification_report (videos, top1, top5, loss, per_class_accuracy, confusion_matrix, classes); one
    that labels frames, segmentation_report (videos, frames, acc, edit, f1@10, f1@25, f1@50, loss, per_video, ...)."""
    eval: str
    skipped: dict[str, str] = field(default_factory=dict)
    """key -> why it was not scored (a label the head does not know)."""
    seen: dict | None = None
    """The same report of the videos the head was trained on, when the cache holds some; None otherwise."""
    only_seen: bool = False
    """Every scored video was one the head was trained on: `metrics` is a training score."""
    target: str = "videos"
    """What the head labels: videos or frames."""

    @property
    def main(self) -> str:
        """The headline metric: --metric's default for what the head labels (top1, f1@50)."""
        return resolve_metric("auto", self.target)

    def scores(self, m: dict) -> str:
        return scores_line(m, self.target)

    def summary_line(self) -> str:
        m = self.metrics
        extra = f"; {len(self.skipped)} videos of unknown classes skipped" if self.skipped else ""
        which = (
            "videos the head was TRAINED on"
            if self.only_seen
            else ("held-out videos" if self.seen is not None else "videos")
        )
        return f"{self.scores(m)} on {m['videos']} {which} of {self.cache} ({self.eval}{extra})"

    def warning(self) -> str | None:
        """What the reader must know when the cache holds videos the head was trained on."""
        if self.only_seen:
            return (
                f"every one of the {self.metrics['videos']} scored videos was in the head's training split: "
                f"this score measures memory, not generalisation; evaluate on held-out videos"
            )
        if self.seen is not None:
            return (
                f"{self.seen['videos']} of the scored videos were in the head's training split "
                f"({self.scores(self.seen)} on them); they are scored apart, not in the held-out score"
            )
        return None

    def to_dict(self) -> dict:
        """What eval.json and `evaluate --json` hold."""
        return {
            "checkpoint": str(self.checkpoint),
            "cache": str(self.cache),
            "eval": self.eval,
            "target": self.target,
            **self.metrics,
            "skipped": len(self.skipped),
            "trained_on": self.seen,
            "only_trained_on": self.only_seen,
        }


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
    """Score a head on the labelled videos of `cache`: top-1, top-5, per-class accuracy and the confusion matrix of
    a head that labels videos; frame accuracy, edit score and F1@{10,25,50}, overall and per video, of one that
    labels frames (its labels from frame_labels=...).

    Videos the head was trained on are scored apart (`EvalReport.seen`), so that they cannot inflate the score.
    Refuses (FeatureMismatchError) a cache whose features differ from those the head was trained on, and
    (ValueError) per-frame labels for a head that labels videos, or their absence for one that labels frames.
    Options are EvalConfig fields (eval_clips=..., labels=..., keys_list=..., out=..., frame_labels=...).
    """
    cfg = config_with(EvalConfig, config, {}, options, "evaluate")
    torch.set_num_threads(cfg.runtime.threads or cpu_count())
    device = pick_device(cfg.runtime.device)
    ckpt = load_checkpoint(checkpoint)
    frames = cfg.frame_labelling.frame_labels is not None
    ckpt.require_target("frames" if frames else "videos", checkpoint)
    c = open_cache(cache)
    ckpt.check_features(c, checkpoint)
    clips = ckpt.eval_clips_for(cfg.eval_clips)
    listed = None
    if cfg.keys_list is not None:
        match = KeyMatcher(c.keys())
        listed = {match(e) for e in read_list(cfg.keys_list)} - {None}
    skipped: dict[str, str] = {}
    if frames:
        labelling = replace(cfg.frame_labelling, background=cfg.frame_labelling.background or ckpt.background)
        rows = frame_labels_of(c, replace(cfg, frame_labelling=labelling))
        keys = [k for k in rows if listed is None or k in listed]
    else:
        labels = video_labels(c, cfg.labels)
        if listed is not None:
            labels = {k: v for k, v in labels.items() if k in listed}
        keys = list(labels)
    if not keys:
        raise SplitError(f"no labelled video of {c.path} is named in {cfg.keys_list}")
    if not frames:
        labels, skipped = among_classes(labels, ckpt.classes, str(c.path))
        keys = list(labels)
    store = load_sequences(c, keys, cfg.memory, cfg.runtime.progress)
    probs = score_store(ckpt, store, clips, cfg.batch_size, device, workers=0 if store.in_memory else cfg.workers)
    seen = trained_on(ckpt, Path(checkpoint), c, keys)
    held = np.array([k not in seen for k in keys])

    if frames:
        background = [ckpt.classes.index(labelling.background)] if labelling.background in ckpt.classes else []
        trues = np.split(row_indices(keys, rows, ckpt.classes, str(c.path)), np.cumsum(store.lengths)[:-1])

        def report_of(sel: np.ndarray) -> dict:
            idx = np.flatnonzero(sel)
            return segmentation_report(
                [probs[i].argmax(1) for i in idx],
                [trues[i] for i in idx],
                ckpt.classes,
                [keys[i] for i in idx],
                background,
                [probs[i] for i in idx],
            )
    else:
        y = class_indices(keys, labels, ckpt.classes)

        def report_of(sel: np.ndarray) -> dict:
            return classification_report(probs[sel], y[sel], ckpt.classes)

    everything = np.ones(len(keys), dtype=bool)
    report = EvalReport(
        Path(checkpoint),
        Path(cache),
        report_of(everything),
        ckpt.describe_eval(clips),
        skipped,
        only_seen=bool(seen) and not held.any(),
        target=ckpt.target,
    )
    if seen and held.any():
        report.metrics = report_of(held)
        report.seen = report_of(~held)
    if report.warning():
        log.warning("%s", report.warning())
    metrics = report.metrics
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(to_json(report.to_dict()))
        plot_confusion(
            np.array(metrics["confusion_matrix"]),
            ckpt.classes,
            out / "confusion.png",
            f"{report.main} {metrics[report.main]:.1%} on {Path(cache).name}",
        )
        if frames:
            shown = np.flatnonzero(held if held.any() else everything)[:STRIP_VIDEOS]
            plot_strips(
                [(keys[i], trues[i], probs[i].argmax(1)) for i in shown],
                ckpt.classes,
                out / "strips.png",
                f"ground truth (upper) and prediction (lower) of {len(shown)} videos of {Path(cache).name}",
            )
    return report
