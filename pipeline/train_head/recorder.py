"""A training run's folder and bookkeeping, shared by train-head, the sweep's stacked trials and finetune.

OUT/config.json   the settings and what the data was          OUT/split.csv     which video was on which side
OUT/metrics.csv   one row per epoch, written as it ends       OUT/best.pt       the best epoch (val top-1, then loss)
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
)  # what a run folder holds; --overwrite removes them before a new run
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "train_seconds",
    "val_seconds",
)


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


def is_better(report: dict, best: dict) -> bool:
    """The one rule for a better epoch: a higher val top-1, ties broken by a lower val loss."""
    return report["top1"] > best["top1"] or (report["top1"] == best["top1"] and report["loss"] < best["loss"])


class RunRecorder:
    """Writes a run folder as the run goes: config.json and split.csv at the start, a metrics.csv row and the
    checkpoints (best.pt when better, last.pt always) at each epoch's end, summary.json and plots at the end; applies
    the patience and calls `on_epoch` with each row (its exception stops the run)."""

    def __init__(
        self,
        out: Path,
        config: dict,
        split: Split,
        labels: dict[str, str],
        *,
        patience: int = 0,
        on_epoch: Callable[[dict], None] | None = None,
        columns: Sequence[str] = METRIC_COLUMNS,
        overwrite: bool = False,
    ):
        self.out = Path(out)
        claim_run_folder(self.out, overwrite)
        (self.out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        write_split(self.out / SPLIT_FILE, split, labels)  # which video was on which side, for `finetune`
        self.patience, self.on_epoch = patience, on_epoch
        self.rows: list[dict] = []
        self.best = {"top1": -1.0, "loss": math.inf, "epoch": 0}
        self.best_report: dict | None = None
        self.stale = 0
        self.stopped_early = False
        self._file = open(self.out / "metrics.csv", "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns))
        self._writer.writeheader()
        self._file.flush()

    def start(self, report: dict, checkpoint: HeadCheckpoint, epochs: int) -> None:
        """Epoch 0 (a model that starts trained, as in finetune): it is the best so far, and the last too when no
        epoch follows."""
        self.best = {"top1": report["top1"], "loss": report["loss"], "epoch": 0}
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
            "val_top1": report["top1"],
            "val_top5": report["top5"],
            "lr": lr,
            "train_seconds": seconds[0],
            "val_seconds": seconds[1],
            **extra,
        }
        self.rows.append(row)
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()
        saved = checkpoint({"loss": report["loss"], "top1": report["top1"], "top5": report["top5"]})
        if is_better(report, self.best):
            self.best = {"top1": report["top1"], "loss": report["loss"], "epoch": epoch}
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
            log.info("early stop at epoch %d: no better val top-1 for %d epochs", epoch, self.patience)
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
            "top1": report["top1"],
            "top5": report["top5"],
            "val_loss": report["loss"],
            "videos": report["videos"],
            "per_class_accuracy": report["per_class_accuracy"],
            "confusion_matrix": report["confusion_matrix"],
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
                f"{title}: val top-1 {report['top1']:.1%}",
            )
        return summary
