"""Stage two: train a temporal head on the cached sequences, in seconds on a CPU.

The cache is read once (into RAM when it fits); every epoch draws a clip of each training video (by default 16 rows
spread over the whole video, one random row of each of 16 segments), steps AdamW under a warm-up + cosine schedule,
evaluates the val split, and keeps the best checkpoint.

    pipeline train-head cache.h5 --out runs/lstm --head lstm
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig, config_with
from pipeline.data.cache import FeatureCache, open_cache
from pipeline.data.sequences import (
    Batch,
    SequenceStore,
    batches,
    eval_plans,
    feature_stats,
    load_sequences,
    train_plans,
)
from pipeline.data.splits import SPLIT_FILE, Split, SplitError, make_split, read_labels_csv, write_split
from pipeline.runtime import cpu_count, pick_device
from pipeline.spec import FeatureSpec
from pipeline.train_head.checkpoint import HeadCheckpoint, eval_description, load_checkpoint, save_checkpoint
from pipeline.train_head.metrics import classification_report, plot_confusion, plot_curves, to_json
from pipeline.train_head.model import Head, HeadDims, build_head

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "train_seconds",
                  "val_seconds")


@dataclass
class TrainResult:
    """What a run produced; `summary` is the content of summary.json."""

    out: Path
    summary: dict

    @property
    def top1(self) -> float:
        return self.summary["top1"]

    def summary_line(self) -> str:
        s = self.summary
        return (f"{s['head']}: val top-1 {s['top1']:.1%}, top-5 {s['top5']:.1%} at epoch {s['best_epoch']}/"
                f"{s['epochs_run']} ({s['split']['train']} train / {s['split']['val']} val, {s['seconds']:.1f}s) "
                f"-> {self.out}")


# --------------------------------------------------------------------------------------------------- labels
def video_labels(cache: FeatureCache, labels_csv: Path | None = None) -> dict[str, str]:
    """key -> class name of every labelled video: the cache's labels, or those of `labels_csv` when given."""
    if labels_csv is not None:
        labels = read_labels_csv(labels_csv, cache.keys())
    else:
        labels = {k: v for k, v in cache.labels().items() if v}
    if not labels:
        raise SplitError(f"no video of {cache.path} has a label; extract from class folders (videos/<class>/...), a "
                         f"CSV manifest with labels, or pass --labels CSV")
    unlabelled = len(cache) - len(labels)
    if unlabelled:
        log.warning("%d videos of %s have no label and are left out", unlabelled, cache.path)
    return labels


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """The labelled videos of a cache, split and loaded: everything `train_head` needs besides its settings.

    `load_train_data` builds it; a sweep builds it once and passes it to every trial (`train_head(data=...)`).
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


def load_train_data(cache: str | Path, cfg: TrainConfig) -> TrainData:
    """Labels, split (cfg's split settings) and the sequences of `cache`, in RAM or lazy (cfg.memory)."""
    cache_obj = open_cache(cache)
    labels = video_labels(cache_obj, cfg.labels)
    split = make_split(labels, mode=cfg.split, cache_splits=cache_obj.splits(), train_list=cfg.train_list,
                       val_list=cfg.val_list, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                       group_regex=cfg.group_regex, all_keys=cache_obj.keys())
    classes = sorted({labels[k] for k in split.train})
    keys = split.train + split.val
    log.info("split: %s; %d classes", split.sizes(), len(classes))
    store = load_sequences(cache_obj, keys, cfg.memory, cfg.progress)
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[labels[k]] for k in keys], dtype=np.int64)
    return TrainData(cache=Path(cache).resolve(), spec=cache_obj.spec, dtype=cache_obj.dtype, labels=labels,
                     split=split, classes=classes, store=store, y=y)


# ------------------------------------------------------------------------------------------------ the loops
def train_one_epoch(model: Head, batch_iter, optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module,
                    device: torch.device) -> dict:
    """One pass over the training clips. Returns mean loss and clip accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in batch_iter:
        batch = batch.to(device)
        logits = model(batch.x, batch.lengths)
        loss = loss_fn(logits, batch.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(batch.y)
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(1) == batch.y).sum())
        seen += n
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: Head, batch_iter, num_samples: int, device: torch.device) -> np.ndarray:
    """Class probabilities per sample, averaged over its clips. Shapes: -> (num_samples, C) float64."""
    model.eval()
    sums = torch.zeros(num_samples, model.dims.num_classes, dtype=torch.float64)
    counts = torch.zeros(num_samples, dtype=torch.float64)
    for batch in batch_iter:
        batch: Batch = batch.to(device)
        probs = torch.softmax(model(batch.x, batch.lengths).float(), dim=1).double().cpu()
        sums.index_add_(0, batch.owners, probs)
        counts.index_add_(0, batch.owners, torch.ones(len(batch.owners), dtype=torch.float64))
    return (sums / counts.clamp(min=1)[:, None]).numpy()


def predict_store(model: Head, store: SequenceStore, videos: np.ndarray, *, clip_len: int | None, clip_stride: int,
                  eval_clips: int, batch_size: int, device: torch.device, workers: int = 0,
                  sampling: str = "crop") -> np.ndarray:
    """Probabilities (len(videos), C) of the store's videos `videos` (store indices), scored on the views
    `eval_plans` gives for these clip settings."""
    y = np.zeros(len(store.keys), dtype=np.int64)
    plans = eval_plans(videos, store.lengths, y, batch_size, clip_len, clip_stride, eval_clips, sampling)
    return evaluate(model, batches(store, plans, workers), len(videos), device)


# --------------------------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm scales); the fused kernel where this torch
    and device have one (one pass over the parameters instead of a dozen small ops per tensor)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW for this device or torch version
        return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR factor: linear from 1/warmup to 1 over the warm-up, then cosine down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def class_weight_tensor(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced split gets weight 1 everywhere."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------- the run
def build_config(out, config: TrainConfig | None = None, **options) -> TrainConfig:
    return config_with(TrainConfig, config, {"out": out}, options, "train_head")


def train_head(cache: str | Path, out: str | Path | None = None, *, config: TrainConfig | None = None,
               data: TrainData | None = None, on_epoch: Callable[[dict], None] | None = None,
               **options) -> TrainResult:
    """Train a head on the labelled videos of `cache`; write the run folder `out` (see docs/train-head.md).

    Options are TrainConfig fields (head="gru", clip_len=16, epochs=20, val_fraction=0.2, ...). Raises SplitError for
    unusable labels or splits, ValueError for settings that do not fit the cache.
    `data` (from `load_train_data`) skips reading the cache, and its split settings replace cfg's. `on_epoch` is
    called with each epoch's metrics row after its checkpoints are written; an exception it raises stops the run.
    """
    cfg = build_config(out, config, **options)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads or cpu_count())
    device = pick_device(cfg.device)
    if data is None:
        data = load_train_data(cache, cfg)
    run = HeadRun(cfg, data, device, on_epoch, started)
    bar = tqdm(range(1, cfg.epochs + 1), desc=cfg.head, unit="epoch", disable=not cfg.progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(run.model, batches(data.store, run.epoch_plans(epoch), run.workers),
                                    run.optimizer, run.scheduler, run.loss_fn, device)
            t1 = time.perf_counter()
            if not run.end_epoch(epoch, stats, run.validate(), lr, t1 - t0, time.perf_counter() - t1):
                break
            bar.set_postfix(run.postfix())
    finally:
        bar.close()
        run.close()
    return run.finish()


class HeadRun:
    """One head's run: its model, optimizer and schedule, and its run folder (config.json, split.csv, metrics.csv,
    best.pt, last.pt, summary.json, plots).

    `train_head` drives one; `pipeline.sweep.stack` drives several that share their batches. The caller trains an
    epoch and hands its metrics and val probabilities to `end_epoch`, which writes the row and the checkpoints,
    calls `on_epoch` and applies the patience; `finish` re-validates the best checkpoint and writes the summary.
    """

    def __init__(self, cfg: TrainConfig, data: TrainData, device: torch.device,
                 on_epoch: Callable[[dict], None] | None = None, started: float | None = None):
        self.cfg, self.data, self.device, self.on_epoch = cfg, data, device, on_epoch
        self.started = time.perf_counter() if started is None else started
        self.workers = 0 if data.store.in_memory else cfg.workers
        store, y, split = data.store, data.y, data.split
        classes = data.classes

        torch.manual_seed(cfg.seed)
        self.dims = HeadDims(head=cfg.head, in_dim=store.dim, num_classes=len(classes), hidden=cfg.hidden,
                             layers=cfg.layers, dropout=cfg.dropout, activation=cfg.activation)
        model = build_head(self.dims)
        model.proj[0].set_stats(*data.train_stats())
        self.model = model.to(device)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        steps_per_epoch = math.ceil(len(split.train) / cfg.batch_size)
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(warmup, cfg.epochs * steps_per_epoch))
        weight = class_weight_tensor(y[data.train_idx], len(classes)).to(device) if cfg.class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

        self.out = cfg.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_info = {"cache": str(data.cache), "split": split_info(split, data.labels, classes),
                         "classes": classes, "feature_spec_id": data.spec.id, "feature_dim": data.spec.dim,
                         "in_memory": store.in_memory, "device": str(device), **data.notes}
        (self.out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), **self.run_info}, indent=1) + "\n")
        write_split(self.out / SPLIT_FILE, split, data.labels)  # which video was on which side, for `finetune`
        self.rows: list[dict] = []
        self.best = {"top1": -1.0, "loss": math.inf, "epoch": 0}
        self.stale = 0
        self.stopped_early = False
        self._metrics_file = open(self.out / "metrics.csv", "w", newline="")
        self._writer = csv.DictWriter(self._metrics_file, fieldnames=METRIC_COLUMNS)
        self._writer.writeheader()
        self._metrics_file.flush()

    def epoch_plans(self, epoch: int) -> list:
        """The epoch's training batches: one random clip of each train video, shuffled ([seed, epoch] stream)."""
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, epoch])
        return train_plans(data.store.lengths[data.train_idx], data.y[data.train_idx], cfg.batch_size, cfg.clip_len,
                           cfg.clip_stride, rng, cfg.sampling)

    def validate(self) -> np.ndarray:
        """(val videos, C) probabilities of the model as it is."""
        cfg = self.cfg
        return predict_store(self.model, self.data.store, self.data.val_idx, clip_len=cfg.clip_len,
                             clip_stride=cfg.clip_stride, eval_clips=cfg.eval_clips, batch_size=cfg.batch_size,
                             device=self.device, workers=self.workers, sampling=cfg.sampling)

    def checkpoint(self, epoch: int, metrics: dict) -> HeadCheckpoint:
        cfg = self.cfg
        return HeadCheckpoint(dims=self.dims, state_dict=self.model.state_dict(), classes=self.data.classes,
                              feature_spec=self.data.spec, feature_dtype=self.data.dtype, clip_len=cfg.clip_len,
                              clip_stride=cfg.clip_stride, eval_clips=cfg.eval_clips, epoch=epoch, metrics=metrics,
                              config={"train": cfg.to_dict(), **self.run_info}, sampling=cfg.sampling)

    def end_epoch(self, epoch: int, stats: dict, probs: np.ndarray, lr: float, train_seconds: float,
                  val_seconds: float) -> bool:
        """Record an epoch (train metrics, val probabilities): metrics.csv, best.pt when better, last.pt, then
        `on_epoch` (whose exception stops the run). False when the patience has run out."""
        report = classification_report(probs, self.data.y[self.data.val_idx], self.data.classes)
        row = {"epoch": epoch, **stats, "val_loss": report["loss"], "val_top1": report["top1"],
               "val_top5": report["top5"], "lr": lr, "train_seconds": train_seconds, "val_seconds": val_seconds}
        self.rows.append(row)
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._metrics_file.flush()
        metrics = {"loss": report["loss"], "top1": report["top1"], "top5": report["top5"]}
        best = self.best
        if report["top1"] > best["top1"] or (report["top1"] == best["top1"] and report["loss"] < best["loss"]):
            self.best = {"top1": report["top1"], "loss": report["loss"], "epoch": epoch}
            save_checkpoint(self.checkpoint(epoch, metrics), self.out / "best.pt")
            self.stale = 0
        else:
            self.stale += 1
        save_checkpoint(self.checkpoint(epoch, metrics), self.out / "last.pt")
        if self.on_epoch is not None:
            self.on_epoch(dict(row))
        if self.cfg.patience and self.stale >= self.cfg.patience:
            self.stopped_early = True
            log.info("early stop at epoch %d: no better val top-1 for %d epochs", epoch, self.cfg.patience)
            return False
        return True

    def postfix(self) -> dict:
        row = self.rows[-1]
        return {"loss": f"{row['train_loss']:.3f}", "val": f"{row['val_top1']:.1%}", "best": f"{self.best['top1']:.1%}"}

    def close(self) -> None:
        self._metrics_file.close()

    def finish(self) -> TrainResult:
        """Validate the best checkpoint again (final metrics), write summary.json and the plots."""
        cfg, data = self.cfg, self.data
        self.close()
        self.model.load_state_dict(load_checkpoint(self.out / "best.pt").state_dict)
        report = classification_report(self.validate(), data.y[data.val_idx], data.classes)
        summary = {
            "head": cfg.head, "best_epoch": self.best["epoch"], "epochs_run": len(self.rows),
            "stopped_early": self.stopped_early, "top1": report["top1"], "top5": report["top5"],
            "val_loss": report["loss"], "videos": report["videos"],
            "per_class_accuracy": report["per_class_accuracy"], "confusion_matrix": report["confusion_matrix"],
            "classes": data.classes, "split": self.run_info["split"],
            "eval": eval_description(cfg.clip_len, cfg.clip_stride, cfg.eval_clips, cfg.sampling),
            "seconds": time.perf_counter() - self.started,
            "parameters": sum(p.numel() for p in self.model.parameters()), "feature_spec_id": data.spec.id,
        }
        (self.out / "summary.json").write_text(to_json(summary))
        if cfg.plots:
            plot_curves(self.rows, self.out / "curves.png")
            plot_confusion(np.array(report["confusion_matrix"]), data.classes, self.out / "confusion.png",
                           f"{cfg.head}: val top-1 {report['top1']:.1%}")
        return TrainResult(out=self.out, summary=summary)


def split_info(split: Split, labels: dict[str, str], classes: list[str]) -> dict:
    return {"method": split.method, "train": len(split.train), "val": len(split.val),
            "excluded": len(split.excluded), "classes": len(classes),
            "val_classes": len({labels[k] for k in split.val})}
