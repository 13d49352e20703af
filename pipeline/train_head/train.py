"""Stage two: train a temporal head on the cached sequences, in seconds on a CPU.

The cache is read once (into RAM when it fits); every epoch draws a clip of each training video (by default 16 rows
spread over the whole video, one random row of each of 16 segments), steps AdamW under a warm-up + cosine schedule,
evaluates the val split, and keeps the best checkpoint.

    pipeline train-head cache.h5 --out runs/lstm --head lstm
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import FRAME_METRICS, VIDEO_METRICS, TrainConfig, config_with
from pipeline.data.labelled import LabelledData, load_labelled
from pipeline.data.sequences import (
    Batch,
    SequenceStore,
    batches,
    eval_plans,
    train_plans,
    with_row_targets,
)
from pipeline.data.splits import Split
from pipeline.runtime import cpu_count, pick_device, progress_bar
from pipeline.train_head.checkpoint import HeadCheckpoint, eval_description, load_checkpoint
from pipeline.train_head.losses import frame_loss
from pipeline.train_head.metrics import classification_report, scores_line
from pipeline.train_head.model import Head, HeadDims, build_head
from pipeline.train_head.recorder import RunRecorder
from pipeline.train_head.segmentation import plot_strips, segmentation_report

log = logging.getLogger(__name__)

STRIP_VIDEOS = 6  # val videos drawn in a frame head's strips.png


@dataclass
class TrainResult:
    """What a run produced; `summary` is the content of summary.json."""

    out: Path
    summary: dict

    @property
    def top1(self) -> float:
        """Val top-1 of a head that labels videos."""
        return self.summary["top1"]

    def summary_line(self) -> str:
        s = self.summary
        return (
            f"{s['head']}: val {scores_line(s, s.get('target', 'videos'))} at epoch {s['best_epoch']}/"
            f"{s['epochs_run']} ({s['split']['train']} train / "
            f"{s['split']['val']} val, {s['seconds']:.1f}s) -> {self.out}"
        )


# ------------------------------------------------------------------------------------------------ the loops
class ClassifyVideos:
    """The objective of a head that labels videos: `loss_fn` (cross-entropy) of its (B, C) logits; clips right."""

    def __init__(self, loss_fn: nn.Module):
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        logits = model(batch.x, batch.lengths)
        return self.loss_fn(logits, batch.y), int((logits.detach().argmax(1) == batch.y).sum()), len(batch.y)


class LabelFrames:
    """The objective of a head that labels frames: `frame_loss` of every stage's logits (cross-entropy of the
    labelled real rows, plus the smoothing term); rows right. Batch y: (B, T), -1 where padded or unlabelled."""

    def __init__(self, smoothing: float, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.smoothing, self.weight, self.label_smoothing = smoothing, weight, label_smoothing

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        stages = model.forward_stages(batch.x, batch.lengths)  # (S, B, T, C)
        loss = frame_loss(
            stages, batch.y, smoothing=self.smoothing, weight=self.weight, label_smoothing=self.label_smoothing
        )
        labelled = batch.y >= 0
        correct = int(((stages[-1].detach().argmax(-1) == batch.y) & labelled).sum())
        return loss, correct, int(labelled.sum())


def train_one_epoch(
    model: nn.Module,
    batch_iter,
    optimizer: torch.optim.Optimizer,
    scheduler,
    objective: Callable[[nn.Module, Batch], tuple[torch.Tensor, int, int]],
    device: torch.device,
    *,
    accumulate: int = 1,
    num_batches: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: Callable[[Batch, float], None] | None = None,
) -> dict:
    """One pass over the training clips: one optimiser (and schedule) step every `accumulate` batches, the last group
    of `num_batches` possibly shorter; losses scaled by `scaler` (fp16) when given. `objective(model, batch)` gives
    the batch's loss and how many of how many predictions were right (ClassifyVideos, LabelFrames). `on_batch(batch,
    mean loss so far)` follows every batch. Returns the mean loss and the accuracy (of clips, or of rows)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batch_iter):
        group_start = i - i % accumulate
        group_size = accumulate if num_batches is None else min(accumulate, num_batches - group_start)
        batch = batch.to(device)
        loss, right, n = objective(model, batch)
        scaled = loss / group_size if group_size > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if i - group_start == group_size - 1:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total_loss += float(loss.detach()) * n
        correct += right
        seen += n
        if on_batch is not None:
            on_batch(batch, total_loss / max(seen, 1))
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


@torch.inference_mode()
def evaluate_frames(model: Head, batch_iter, num_samples: int, device: torch.device) -> list[np.ndarray]:
    """Class probabilities of every row of each sample (a whole video, one view). Shapes: -> [(T_i, C)] float32."""
    model.eval()
    out: list[np.ndarray | None] = [None] * num_samples
    for batch in batch_iter:
        batch: Batch = batch.to(device)
        probs = torch.softmax(model(batch.x, batch.lengths).float(), dim=2).cpu().numpy()  # (B, T, C)
        for owner, p, n in zip(batch.owners.tolist(), probs, batch.lengths.tolist(), strict=True):
            out[owner] = p[:n]
    return out


def predict_store(
    model: Head,
    store: SequenceStore,
    videos: np.ndarray,
    *,
    clip_len: int | None,
    clip_stride: int,
    eval_clips: int,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    sampling: str = "crop",
) -> np.ndarray | list[np.ndarray]:
    """Probabilities of the store's videos `videos` (store indices): (len(videos), C), scored on the views
    `eval_plans` gives for these clip settings; for a head that labels frames, [(T_i, C)] of every row of each
    whole video."""
    y = np.zeros(len(store.keys), dtype=np.int64)
    if model.dims.target == "frames":
        plans = eval_plans(videos, store.lengths, y, batch_size, None, 1, 0, "whole")
        return evaluate_frames(model, batches(store, plans, workers), len(videos), device)
    plans = eval_plans(videos, store.lengths, y, batch_size, clip_len, clip_stride, eval_clips, sampling)
    return evaluate(model, batches(store, plans, workers), len(videos), device)


def score_store(
    ckpt: HeadCheckpoint, store: SequenceStore, clips: int, batch_size: int, device: torch.device, workers: int = 0
) -> np.ndarray | list[np.ndarray]:
    """Probabilities (videos, C) of every video of `store` under the head of `ckpt`, viewed as it was trained
    (its clip length, stride and sampling) with `clips` views per video; [(T_i, C)] for a head that labels
    frames."""
    return predict_store(
        ckpt.model(device),
        store,
        np.arange(len(store.keys)),
        clip_len=ckpt.clip_len,
        clip_stride=ckpt.clip_stride,
        eval_clips=clips,
        batch_size=batch_size,
        device=device,
        workers=workers,
        sampling=ckpt.sampling,
    )


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


def train_head(
    cache: str | Path,
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    data: LabelledData | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    **options,
) -> TrainResult:
    """Train a head on the labelled videos of `cache`; write the run folder `out` (see docs/train-head.md).

    Options are TrainConfig fields (head="gru", clip_len=16, epochs=20, val_fraction=0.2, target="frames",
    frame_labels="gt/", ...). Raises SplitError for unusable labels or splits, ValueError for settings that do not
    fit the cache. `data` (from `load_labelled`) skips reading the cache, and its split settings replace cfg's.
    `on_epoch` is called with each epoch's metrics row after its checkpoints are written; an exception it raises
    stops the run.
    """
    cfg = build_config(out, config, **options)
    started = time.perf_counter()
    torch.set_num_threads(cfg.runtime.threads or cpu_count())
    device = pick_device(cfg.runtime.device)
    if data is None:
        data = load_labelled(cache, cfg)
    run = HeadRun(cfg, data, device, on_epoch, started)
    bar = progress_bar(range(1, run.cfg.epochs + 1), desc=cfg.head, unit="epoch", disable=not cfg.runtime.progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(
                run.model,
                batches(data.store, run.epoch_plans(epoch), run.workers),
                run.optimizer,
                run.scheduler,
                run.objective,
                device,
            )
            t1 = time.perf_counter()
            if not run.end_epoch(epoch, stats, run.validate(), lr, t1 - t0, time.perf_counter() - t1):
                break
            bar.set_postfix(run.postfix(), refresh=False)
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

    def __init__(
        self,
        cfg: TrainConfig,
        data: LabelledData,
        device: torch.device,
        on_epoch: Callable[[dict], None] | None = None,
        started: float | None = None,
    ):
        cfg = cfg.with_budget(len(data.split.train))  # epochs and patience not given: from the train split's size
        self.cfg, self.data, self.device, self.on_epoch = cfg, data, device, on_epoch
        self.started = time.perf_counter() if started is None else started
        self.workers = 0 if data.store.in_memory else cfg.workers
        store, y, split = data.store, data.y, data.split
        classes = data.classes
        if data.target != cfg.target:
            raise ValueError(f"the data was loaded for a head that labels {data.target}, not {cfg.target}")
        self.frames = cfg.target == "frames"

        torch.manual_seed(cfg.seed)
        self.dims = HeadDims(
            head=cfg.head,
            in_dim=store.dim,
            num_classes=len(classes),
            hidden=cfg.hidden,
            layers=cfg.layers,
            dropout=cfg.dropout,
            activation=cfg.activation,
            target=cfg.target,
            stages=cfg.stages if cfg.head == "tcn" and self.frames else 1,
        )
        model = build_head(self.dims)
        model.proj[0].set_stats(*data.train_stats())
        self.model = model.to(device)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        steps_per_epoch = math.ceil(len(split.train) / cfg.batch_size)
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup, cfg.epochs * steps_per_epoch)
        )
        if self.frames:
            train_rows = data.row_y[: int(store.lengths[data.train_idx].sum())]
            train_rows = train_rows[train_rows >= 0]
            weight = class_weight_tensor(train_rows, len(classes)).to(device) if cfg.class_weights else None
            self.objective = LabelFrames(cfg.smoothing, weight, cfg.label_smoothing)
            self.background = [classes.index(data.background)] if data.background in classes else []
        else:
            weight = class_weight_tensor(y[data.train_idx], len(classes)).to(device) if cfg.class_weights else None
            self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
            self.objective = ClassifyVideos(self.loss_fn)

        self.out = cfg.out
        self.run_info = {
            "cache": str(data.cache),
            "split": split_info(split, data.labels, classes, count_classes=not self.frames),
            "classes": classes,
            "feature_spec_id": data.spec.id,
            "feature_dim": data.spec.dim,
            "in_memory": store.in_memory,
            "device": str(device),
            **data.notes,
        }
        self.recorder = RunRecorder(
            self.out,
            {"train": cfg.to_dict(), **self.run_info},
            split,
            data.labels,
            overwrite=cfg.overwrite,
            patience=cfg.patience,
            on_epoch=on_epoch,
            scores=FRAME_METRICS if self.frames else VIDEO_METRICS,
            metric=cfg.metric,
        )

    def epoch_plans(self, epoch: int) -> list:
        """The epoch's training batches: one random clip of each train video, shuffled ([seed, epoch] stream)."""
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, epoch])
        plans = train_plans(
            data.store.lengths[data.train_idx],
            data.y[data.train_idx],
            cfg.batch_size,
            cfg.clip_len,
            cfg.clip_stride,
            rng,
            cfg.sampling,
        )
        return with_row_targets(plans, data.row_y, data.row_offsets) if self.frames else plans

    def validate(self) -> np.ndarray | list[np.ndarray]:
        """The val videos' probabilities under the model as it is: (val videos, C), or [(T_i, C)] per row."""
        cfg = self.cfg
        return predict_store(
            self.model,
            self.data.store,
            self.data.val_idx,
            clip_len=cfg.clip_len,
            clip_stride=cfg.clip_stride,
            eval_clips=cfg.eval_clips,
            batch_size=cfg.batch_size,
            device=self.device,
            workers=self.workers,
            sampling=cfg.sampling,
        )

    def report(self, probs: np.ndarray | list[np.ndarray]) -> dict:
        """The val metrics of `validate`'s probabilities: classification_report, or segmentation_report."""
        data = self.data
        if not self.frames:
            return classification_report(probs, data.y[data.val_idx], data.classes)
        trues = [data.row_labels(v) for v in data.val_idx]
        return segmentation_report(
            [p.argmax(1) for p in probs],
            trues,
            data.classes,
            [data.store.keys[v] for v in data.val_idx],
            self.background,
            probs,
        )

    def checkpoint(self, epoch: int, metrics: dict) -> HeadCheckpoint:
        cfg = self.cfg
        return HeadCheckpoint(
            dims=self.dims,
            state_dict=self.model.state_dict(),
            classes=self.data.classes,
            feature_spec=self.data.spec,
            feature_dtype=self.data.dtype,
            clip_len=cfg.clip_len,
            clip_stride=cfg.clip_stride,
            eval_clips=cfg.eval_clips,
            epoch=epoch,
            metrics=metrics,
            config={"train": cfg.to_dict(), **self.run_info},
            train_videos=self.data.train_sources,
            sampling=cfg.sampling,
            background=self.data.background,
        )

    def end_epoch(
        self,
        epoch: int,
        stats: dict,
        probs: np.ndarray | list[np.ndarray],
        lr: float,
        train_seconds: float,
        val_seconds: float,
    ) -> bool:
        """Record an epoch (train metrics, val probabilities): metrics.csv, best.pt when better, last.pt, then
        `on_epoch` (whose exception stops the run). False when the patience has run out."""
        return self.recorder.end_epoch(
            epoch,
            stats,
            self.report(probs),
            lr,
            (train_seconds, val_seconds),
            lambda metrics: self.checkpoint(epoch, metrics),
        )

    @property
    def best(self) -> dict:
        """The best epoch so far: {"score": its val --metric, "loss", "epoch"}."""
        return self.recorder.best

    def postfix(self) -> dict:
        row, metric = self.recorder.rows[-1], self.cfg.metric
        return {
            "loss": f"{row['train_loss']:.3f}",
            "val": f"{row['val_' + metric]:.1%}",
            "best": f"{self.best['score']:.1%}",
        }

    def close(self) -> None:
        self.recorder.close()

    def finish(self) -> TrainResult:
        """Validate the best checkpoint again (final metrics), write summary.json and the plots."""
        cfg, data = self.cfg, self.data
        self.close()
        self.model.load_state_dict(load_checkpoint(self.out / "best.pt").state_dict)
        probs = self.validate()
        report = self.report(probs)
        summary = self.recorder.finish(
            {
                "head": cfg.head,
                "target": cfg.target,
                "split": self.run_info["split"],
                "eval": eval_description(cfg.clip_len, cfg.clip_stride, cfg.eval_clips, cfg.sampling, cfg.target),
                "seconds": time.perf_counter() - self.started,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "feature_spec_id": data.spec.id,
            },
            report,
            data.classes,
            cfg.head,
            cfg.plots,
        )
        if cfg.plots and self.frames:
            shown = data.val_idx[:STRIP_VIDEOS]
            plot_strips(
                [(data.store.keys[v], data.row_labels(v), p.argmax(1)) for v, p in zip(shown, probs, strict=False)],
                data.classes,
                self.out / "strips.png",
                f"{cfg.head}: ground truth (upper) and prediction (lower) of {len(shown)} val videos",
            )
        return TrainResult(out=self.out, summary=summary)


def split_info(split: Split, labels: dict[str, str], classes: list[str], count_classes: bool = True) -> dict:
    """The split's sizes (for config.json and summary.json); `count_classes`: how many classes the val side has
    (video labels; not for a head that labels frames)."""
    info = {
        "method": split.method,
        "train": len(split.train),
        "val": len(split.val),
        "excluded": len(split.excluded),
        "classes": len(classes),
    }
    if count_classes:
        info["val_classes"] = len({labels[k] for k in split.val})
    return info
