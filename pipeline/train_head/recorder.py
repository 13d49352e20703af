"""A training run's folder and bookkeeping, shared by train-head, the sweep's stacked trials and finetune.

OUT/config.json   the settings and what the data was          OUT/split.csv     which video was on which side
OUT/metrics.csv   one row per epoch, written as it ends       OUT/best.pt       the best epoch (val --metric, then loss)
OUT/last.pt       the latest epoch                            OUT/summary.json  the final report; curves.png, ...
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import VIDEO_METRICS
from pipeline.data.splits import SPLIT_FILE, Split, write_split
from pipeline.train_head.checkpoint import HeadCheckpoint, save_checkpoint
from pipeline.train_head.metrics import plot_confusion, plot_curves, to_json

log = logging.getLogger(__name__)

RUN_FILES = (
    "config.json",
    "split.csv",
    "metrics.csv",
    "best.pt",
    "last.pt",
    "summary.json",
    "curves.png",
    "confusion.png",
    "strips.png",
)  # what a run folder holds; --overwrite removes them before a new run


def metric_columns(scores: Sequence[str] = VIDEO_METRICS) -> tuple[str, ...]:
    """The columns of metrics.csv for val `scores` (top1, top5; or acc, edit, f1@10, ...)."""
    return (
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        *(f"val_{s}" for s in scores),
        "lr",
        "train_seconds",
        "val_seconds",
    )


METRIC_COLUMNS = metric_columns()  # those of a head that labels videos


class RunExistsError(FileExistsError):
    """A run folder that already holds a run, and no --overwrite."""


def claim_run_folder(out: Path, overwrite: bool) -> None:
    """Make `out` an empty run folder: refuse one that holds a run's files (RunExistsError) unless `overwrite`,
    which removes them, so that no file of the old run is taken for one of the new."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(found)}): pass --overwrite to replace it, or choose another --out"
        )
    for name in found:
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def is_better(score: float, loss: float, best: dict) -> bool:
    """The one rule for a better epoch: a higher val score (--metric), ties broken by a lower val loss."""
    return score > best["score"] or (score == best["score"] and loss < best["loss"])


class RunRecorder:
    """Writes a run folder as the run goes: config.json and split.csv at the start, a metrics.csv row and the
    checkpoints (best.pt when better, last.pt always) at each epoch's end, summary.json and plots at the end; applies
    the patience and calls `on_epoch` with each row (its exception stops the run).

    `scores` are the report's metrics recorded per epoch (val_<name> columns), `metric` the one that picks the best
    epoch."""

    def __init__(
        self,
        out: Path,
        config: dict,
        split: Split,
        labels: dict[str, str],
        *,
        patience: int = 0,
        on_epoch: Callable[[dict], None] | None = None,
        columns: Sequence[str] | None = None,
        overwrite: bool = False,
        scores: Sequence[str] = VIDEO_METRICS,
        metric: str = "top1",
    ):
        self.out = Path(out)
        claim_run_folder(self.out, overwrite)
        (self.out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        write_split(self.out / SPLIT_FILE, split, labels)  # which video was on which side, for `finetune`
        self.patience, self.on_epoch = patience, on_epoch
        self.scores, self.metric = tuple(scores), metric
        self.rows: list[dict] = []
        self.best = {"score": -1.0, "loss": math.inf, "epoch": 0}
        self.best_report: dict | None = None
        self.stale = 0
        self.stopped_early = False
        self._file = open(self.out / "metrics.csv", "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns or metric_columns(self.scores)))
        self._writer.writeheader()
        self._file.flush()

    def start(self, report: dict, checkpoint: HeadCheckpoint, epochs: int) -> None:
        """Epoch 0 (a model that starts trained, as in finetune): it is the best so far, and the last too when no
        epoch follows."""
        self.best = {"score": report[self.metric], "loss": report["loss"], "epoch": 0}
        self.best_report = report
        save_checkpoint(checkpoint, self.out / "best.pt")
        if epochs == 0:
            save_checkpoint(checkpoint, self.out / "last.pt")

    def end_epoch(
        self,
        epoch: int,
        stats: dict,
        report: dict,
        lr: float,
        seconds: tuple[float, float],
        checkpoint: Callable[[dict], HeadCheckpoint],
        **extra,
    ) -> bool:
        """Record an epoch: its training `stats` (train_loss, train_acc), its val `report` (classification_report),
        the learning rate it started with, its (train, val) seconds, `extra` columns, and its checkpoint, made once
        here from the epoch's val metrics. False when the patience has run out."""
        row = {
            "epoch": epoch,
            **stats,
            "val_loss": report["loss"],
            **{f"val_{s}": report[s] for s in self.scores},
            "lr": lr,
            "train_seconds": seconds[0],
            "val_seconds": seconds[1],
            **extra,
        }
        self.rows.append(row)
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()
        saved = checkpoint({"loss": report["loss"], **{s: report[s] for s in self.scores}})
        if is_better(report[self.metric], report["loss"], self.best):
            self.best = {"score": report[self.metric], "loss": report["loss"], "epoch": epoch}
            self.best_report = report
            save_checkpoint(saved, self.out / "best.pt")
            self.stale = 0
        else:
            self.stale += 1
        save_checkpoint(saved, self.out / "last.pt")
        if self.on_epoch is not None:
            self.on_epoch(dict(row))
        if self.patience and self.stale >= self.patience:
            self.stopped_early = True
            log.info("early stop at epoch %d: no better val %s for %d epochs", epoch, self.metric, self.patience)
            return False
        return True

    def close(self) -> None:
        self._file.close()

    def finish(self, summary: dict, report: dict, classes: list[str], title: str, plots: bool) -> dict:
        """Write summary.json (`summary` after the common fields) and, with `plots`, curves.png and confusion.png."""
        self.close()
        summary = {
            "best_epoch": self.best["epoch"],
            "epochs_run": len(self.rows),
            "stopped_early": self.stopped_early,
            "metric": self.metric,
            **{s: report[s] for s in self.scores},
            "val_loss": report["loss"],
            **{k: v for k, v in report.items() if k not in (*self.scores, "loss", "classes")},
            "classes": classes,
            **summary,
        }
        (self.out / "summary.json").write_text(to_json(summary))
        if plots:
            if self.rows:
                plot_curves(self.rows, self.out / "curves.png")
            plot_confusion(
                np.array(report["confusion_matrix"]),
                classes,
                self.out / "confusion.png",
                f"{title}: val {self.metric} {report[self.metric]:.1%}",
            )
        return summary
