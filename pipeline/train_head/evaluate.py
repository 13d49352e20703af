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
from pipeline.data.cache import open_cache
from pipeline.data.sequences import load_sequences
from pipeline.data.splits import KeyMatcher, SplitError, read_list
from pipeline.runtime import cpu_count, pick_device
from pipeline.train_head.checkpoint import load_checkpoint
from pipeline.train_head.metrics import classification_report, plot_confusion, to_json
from pipeline.train_head.train import predict_store, video_labels

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    checkpoint: Path
    cache: Path
    metrics: dict
    """classification_report: videos, top1, top5, loss, per_class_accuracy, confusion_matrix, classes."""
    eval: str
    skipped: dict[str, str] = field(default_factory=dict)
    """key -> why it was not scored (a label the head does not know)."""

    def summary_line(self) -> str:
        m = self.metrics
        extra = f"; {len(self.skipped)} videos of unknown classes skipped" if self.skipped else ""
        return (f"top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} on {m['videos']} videos of {self.cache} "
                f"({self.eval}{extra})")


def evaluate_checkpoint(checkpoint: str | Path, cache: str | Path, *, config: EvalConfig | None = None,
                        **options) -> EvalReport:
    """Top-1, top-5, per-class accuracy and the confusion matrix of a head on the labelled videos of `cache`.

    Refuses (FeatureMismatchError) a cache whose features differ from those the head was trained on.
    Options are EvalConfig fields (eval_clips=..., labels=..., keys_list=..., out=...).
    """
    cfg = config_with(EvalConfig, config, {}, options, "evaluate")
    torch.set_num_threads(cfg.threads or cpu_count())
    device = pick_device(cfg.device)
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
    known = set(ckpt.classes)
    skipped = {k: f"label {v!r} is not a class of the head" for k, v in labels.items() if v not in known}
    if skipped:
        log.warning("%d videos have labels the head was not trained on and are skipped (e.g. %r)", len(skipped),
                    labels[next(iter(skipped))])
    keys = [k for k in labels if k not in skipped]
    if not keys:
        raise SplitError(f"no video of {c.path} has a label among the head's {len(known)} classes "
                         f"({', '.join(ckpt.classes[:5])}{', ...' if len(known) > 5 else ''})")
    store = load_sequences(c, keys, cfg.memory, cfg.progress)
    index = {name: i for i, name in enumerate(ckpt.classes)}
    y = np.array([index[labels[k]] for k in keys], dtype=np.int64)
    probs = predict_store(ckpt.model(device), store, np.arange(len(keys)), clip_len=ckpt.clip_len,
                          clip_stride=ckpt.clip_stride, eval_clips=clips, batch_size=cfg.batch_size, device=device,
                          workers=0 if store.in_memory else cfg.workers, sampling=ckpt.sampling)
    metrics = classification_report(probs, y, ckpt.classes)
    report = EvalReport(Path(checkpoint), Path(cache), metrics, ckpt.describe_eval(clips), skipped)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(to_json(
            {"checkpoint": str(checkpoint), "cache": str(cache), "eval": report.eval, **metrics,
             "skipped": len(skipped)}))
        plot_confusion(np.array(metrics["confusion_matrix"]), ckpt.classes, out / "confusion.png",
                       f"top-1 {metrics['top1']:.1%} on {Path(cache).name}")
    return report
