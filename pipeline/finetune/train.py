"""Stage three: fine-tune the backbone of a trained head's features together with the head, on clips decoded from the
videos, and write a run folder like train-head's whose checkpoints carry the fine-tuned backbone.

    pipeline finetune videos/ --init runs/lstm/best.pt --out runs/lstm-ft --unfreeze layer4
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import (
    FINETUNE_BACKBONE_LR_FACTOR,
    FINETUNE_CLIP_LEN,
    FINETUNE_UNFREEZE_LAST,
    FinetuneConfig,
    SplitConfig,
    config_with,
)
from pipeline.data.cache import CacheError, open_cache
from pipeline.data.labelled import among_classes, class_indices
from pipeline.data.sequences import eval_plans, train_plans
from pipeline.data.splits import (
    SPLIT_FILE,
    KeyMatcher,
    Split,
    SplitError,
    check_split,
    make_split,
    read_labels_csv,
    read_split,
)
from pipeline.extract.backbone import FINETUNED_PREFIX, LoadedBackbone, WeightsError, tensors_sha256
from pipeline.extract.decode import DecodeError
from pipeline.extract.inputs import VideoItem, discover
from pipeline.extract.reproduce import backbone_for_spec
from pipeline.finetune.clips import (
    READ_MODES,
    ClipAugment,
    ClipDataset,
    ClipJob,
    VideoRecord,
    clip_batches,
    sampled_rows,
)
from pipeline.finetune.model import FinetuneModel, resolve_unfreeze
from pipeline.runtime import cpu_count, default_workers, pick_device, progress_bar
from pipeline.spec import FeatureSpec, Sampling
from pipeline.train_head.checkpoint import HeadCheckpoint, eval_description, load_checkpoint
from pipeline.train_head.metrics import classification_report
from pipeline.train_head.recorder import METRIC_COLUMNS, RunRecorder
from pipeline.train_head.train import (
    ClassifyVideos,
    TrainResult,
    evaluate,
    make_optimizer,
    split_info,
    train_one_epoch,
    warmup_cosine,
)

log = logging.getLogger(__name__)

COLUMNS = (*METRIC_COLUMNS, "clips_per_s")


class FinetuneResult(TrainResult):
    def summary_line(self) -> str:
        s = self.summary
        start = f" (start {s['start']['top1']:.1%})" if s["start"] else ""
        return (
            f"{s['head']} + {s['backbone']} ({s['unfrozen']} trained): val top-1 {s['top1']:.1%}{start}, "
            f"top-5 {s['top5']:.1%} at epoch {s['best_epoch']}/{s['epochs_run']} "
            f"({s['split']['train']} train / {s['split']['val']} val, {s['train_clips_per_s']:.1f} clips/s, "
            f"{s['seconds']:.1f}s) -> {self.out}"
        )


# ------------------------------------------------------------------------------------------------------- data
def input_labels(items: list[VideoItem], classes: list[str], labels_csv: Path | None) -> dict[str, str]:
    """key -> class of every input whose label is a class of the head (the others are left out, with a warning)."""
    if labels_csv is not None:
        raw = read_labels_csv(labels_csv, [it.key for it in items])
    else:
        raw = {it.key: it.label for it in items if it.label}
    unlabelled = len(items) - len(raw)
    if unlabelled:
        log.warning("%d inputs have no label and are left out", unlabelled)
    try:
        return among_classes(raw, classes, "the inputs")[0]
    except SplitError as e:
        raise SplitError(f"{e}; label them by class folders, a CSV manifest or --labels") from None


def choose_split(cfg: FinetuneConfig, ckpt: HeadCheckpoint, labels: dict[str, str], items: list[VideoItem]) -> Split:
    """The split of the --init run (its split.csv, else its recorded split settings applied again), or a new one."""
    manifest_splits = {it.key: it.split for it in items if it.split}
    if cfg.splitting.split != "head":
        return make_split(labels, cfg.splitting, cache_splits=manifest_splits, all_keys=[it.key for it in items])
    recorded = cfg.init.parent / SPLIT_FILE
    if recorded.is_file():
        sides: dict[str, str] = {}
        match = KeyMatcher(list(labels))
        unmatched = 0
        for key, side in read_split(recorded).items():
            found = match(key)
            if found is None:
                unmatched += 1
            else:
                sides[found] = side
        if unmatched:
            log.warning("%d videos of %s are not among the inputs", unmatched, recorded)
        split = Split(
            [k for k in labels if sides.get(k) == "train"],
            [k for k in labels if sides.get(k) == "val"],
            f"the head's split ({recorded})",
            {k: "not in the head's split" for k in labels if k not in sides},
        )
        if split.excluded:
            log.warning(
                "%d inputs were not in the head's split and are left out (e.g. %s)",
                len(split.excluded),
                next(iter(split.excluded)),
            )
    else:
        settings = ckpt.config.get("train")
        if not settings:
            raise SplitError(f"{cfg.init} records no split ({recorded} is missing): pass --split auto or random")
        log.warning("%s is missing: applying the head's recorded split settings again", recorded)

        split = make_split(
            labels, SplitConfig.from_dict(settings), cache_splits=manifest_splits, all_keys=[it.key for it in items]
        )
        split.method = f"the head's split settings applied again: {split.method}"
    check_split(split, labels)
    return split


def feature_rows(
    items: list[VideoItem], cache_path: Path | None, sampling: Sampling, workers: int, progress: bool
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str], int]:
    """key -> (frame indices, timestamps) of each video's feature rows, and key -> reason for videos that failed.

    The head's cache holds the rows stage one made (its frame_indices and timestamps) for every video whose source is
    unchanged; other videos are indexed by one pass of the sampling over the file. Also returns the count from
    the cache."""
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache_path is not None and Path(cache_path).exists():
        try:
            cache = open_cache(cache_path)
        except (CacheError, OSError) as e:
            log.warning("cannot read %s for the cached frame indices (%s): indexing the videos again", cache_path, e)
        else:
            if cache.spec.sampling != sampling:
                log.warning("%s was sampled otherwise than the head's features: indexing the videos again", cache_path)
            else:
                by_source = {path: (key, size, mtime) for key, (path, size, mtime) in cache.sources().items()}
                for item in items:
                    hit = by_source.get(str(item.path.resolve()))
                    if hit is not None and item.signature() == hit[1:]:
                        rows[item.key] = (cache.frame_indices(hit[0]), cache.timestamps(hit[0]))
            cache.close()
    from_cache = len(rows)
    rest = [item for item in items if item.key not in rows]
    failed: dict[str, str] = {}
    if rest:
        log.info("indexing %d videos that the head's cache does not hold", len(rest))

        def index(item: VideoItem):
            try:
                return item.key, sampled_rows(item.path, sampling), None
            except Exception as e:  # a bad input is left out, not fatal
                return item.key, None, str(e) if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"

        # OpenCV releases the GIL while it decodes: threads index several files at once.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for key, found, error in progress_bar(
                pool.map(index, rest), total=len(rest), unit="video", desc="indexing", disable=not progress, leave=False
            ):
                if error is None:
                    rows[key] = found
                else:
                    failed[key] = error
    return rows, failed, from_cache


# ------------------------------------------------------------------------------------------------ the loops
def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a CUDA device (this run is on {device}); use --amp off or auto")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def finetune_optimizer(model: FinetuneModel, lr: float, backbone_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """train-head's AdamW over the head (at lr), plus the unfrozen backbone (at backbone_lr); weight decay on matrices
    only. The scheduler scales every group's rate by the same factor."""
    optimizer = make_optimizer(model.head, lr, weight_decay)
    _, backbone = model.trainable()
    matrices, others = [p for p in backbone if p.ndim >= 2], [p for p in backbone if p.ndim < 2]
    for params, decay in ((matrices, weight_decay), (others, 0.0)):
        if params:
            optimizer.add_param_group({"params": params, "lr": backbone_lr, "weight_decay": decay})
    return optimizer


# --------------------------------------------------------------------------------------------------- the run
def build_config(init, out, config: FinetuneConfig | None = None, **options) -> FinetuneConfig:
    return config_with(FinetuneConfig, config, {"init": init, "out": out}, options, "finetune")


def finetune(
    inputs: list,
    init: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: FinetuneConfig | None = None,
    **options,
) -> FinetuneResult:
    """Fine-tune the backbone of `init`'s features with its head on the labelled videos `inputs` (folders, files,
    CSV manifests, as `pipeline extract` takes them); write the run folder `out` (see docs/finetune.md).

    Options are FinetuneConfig fields (unfreeze="layer4", epochs=5, backbone_lr=1e-5, amp="bf16", ...). Raises
    SplitError for unusable labels or splits, UnfreezeError (a ValueError) for a bad --unfreeze, WeightsError when
    the backbone of the head's features cannot be rebuilt.
    """
    cfg = build_config(init, out, config, **options)
    started = time.perf_counter()
    torch.set_num_threads(cfg.runtime.threads or cpu_count())
    device = pick_device(cfg.runtime.device)
    ckpt = load_checkpoint(cfg.init)
    if ckpt.target != "videos":
        raise ValueError(
            f"{cfg.init} is a head that labels frames: finetune trains heads that label whole videos (its clips "
            f"carry one label each); train the frame head on a cache of the features instead"
        )
    loaded, unfreeze = start_backbone(cfg, ckpt)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    data = load_data(inputs, cfg, ckpt, workers)
    run = FinetuneRun(cfg, ckpt, loaded, unfreeze, data, device, workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if cfg.start_eval:
        run.score_start()
    try:
        for epoch in range(1, cfg.epochs + 1):
            lr = run.optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            stats = run.train_epoch(epoch)
            t1 = time.perf_counter()
            report = run.validate(f"validate epoch {epoch}")
            clips_per_s = len(data.train_idx) / (t1 - t0)
            log.info(
                "epoch %d: train loss %.4f, val top-1 %.1f%%, %.1f clips/s",
                epoch,
                stats["train_loss"],
                100 * report["top1"],
                clips_per_s,
            )
            seconds = (t1 - t0, time.perf_counter() - t1)
            checkpoint = lambda metrics, epoch=epoch: run.checkpoint(epoch, metrics)  # noqa: E731
            if not run.recorder.end_epoch(epoch, stats, report, lr, seconds, checkpoint, clips_per_s=clips_per_s):
                break
    finally:
        run.recorder.close()
    return run.finish(started)


def start_backbone(cfg: FinetuneConfig, ckpt: HeadCheckpoint) -> tuple[LoadedBackbone, list[str]]:
    """The backbone of the head's features, as stage one ran it, and the names of the modules to train."""
    spec = ckpt.feature_spec
    if spec.window is not None:
        raise ValueError(
            f"{cfg.init} was trained on window rows of the video model {spec.backbone}: finetune trains backbones "
            f"that embed each frame on its own (torchvision classifiers, timm image models)"
        )
    loaded = backbone_for_spec(spec, ckpt.backbone_state, cfg.weights, str(cfg.init), progress=cfg.runtime.progress)
    if loaded.dim != ckpt.dims.in_dim:
        raise WeightsError(
            f"{cfg.init}: the head takes {ckpt.dims.in_dim}-dim features, but {spec.backbone} gives {loaded.dim}"
        )
    if cfg.unfreeze is None and cfg.unfreeze_last is None:
        return loaded, resolve_unfreeze(loaded.model, spec.backbone, None, FINETUNE_UNFREEZE_LAST)
    return loaded, resolve_unfreeze(loaded.model, spec.backbone, cfg.unfreeze, cfg.unfreeze_last)


# -------------------------------------------------------------------------------------------- data and split
@dataclass
class FinetuneData:
    """The labelled videos of a fine-tune: train videos first (store indices 0..n_train-1), then val videos."""

    labels: dict[str, str]
    split: Split
    records: list[VideoRecord]  # each video's path, class and feature rows (frame indices, timestamps)
    lengths: np.ndarray  # (videos,) feature rows of each
    y: np.ndarray  # (videos,) class indices
    train_idx: np.ndarray
    val_idx: np.ndarray  # the val videos validated (all, or --val-clips of them)
    path_of: dict[str, Path]
    cache_path: Path | None
    from_cache: int  # videos whose rows came from the head's cache (the others were indexed)


def load_data(inputs: list, cfg: FinetuneConfig, ckpt: HeadCheckpoint, workers: int) -> FinetuneData:
    """The inputs' labels (the head's classes), the head's split, and each video's feature rows; videos that cannot
    be decoded are left out with a warning."""
    items = discover(inputs)
    labels = input_labels(items, ckpt.classes, cfg.splitting.labels)
    split = choose_split(cfg, ckpt, labels, items)
    chosen = set(split.train) | set(split.val)
    cache_path = cfg.cache or (Path(ckpt.config["cache"]) if ckpt.config.get("cache") else None)
    sampling = ckpt.feature_spec.sampling
    rows, failed, from_cache = feature_rows(
        [it for it in items if it.key in chosen], cache_path, sampling, max(workers, 1), cfg.runtime.progress
    )
    if failed:
        for key, reason in failed.items():
            log.warning("left out %s: %s", key, reason)
        split = Split(
            [k for k in split.train if k not in failed],
            [k for k in split.val if k not in failed],
            split.method,
            {**split.excluded, **dict.fromkeys(failed, "cannot be decoded")},
        )
        check_split(split, labels)
    path_of = {it.key: it.path for it in items}
    keys = split.train + split.val
    y = class_indices(keys, labels, ckpt.classes)
    records = [VideoRecord(k, path_of[k], int(c), *rows[k]) for k, c in zip(keys, y)]
    n_train = len(split.train)
    val_idx = np.arange(n_train, len(keys))
    if cfg.val_clips is not None and cfg.val_clips < len(val_idx):
        # the same evenly spread videos every epoch, so that epochs stay comparable
        val_idx = val_idx[np.unique(np.linspace(0, len(val_idx) - 1, cfg.val_clips).round().astype(np.int64))]
        log.info("validating on %d of the %d val videos (--val-clips)", len(val_idx), len(split.val))
    log.info(
        "split: %s; rows of %d videos from the head's cache, %d indexed",
        split.sizes(),
        from_cache,
        len(keys) - from_cache,
    )
    lengths = np.array([len(r.frame_indices) for r in records], dtype=np.int64)
    return FinetuneData(
        labels, split, records, lengths, y, np.arange(n_train), val_idx, path_of, cache_path, from_cache
    )


@dataclass(frozen=True)
class ClipSampling:
    """Which rows of a video a training clip holds: the head's sampling, so that training sees what validation
    scores, unless the settings say otherwise (`why` then says so, in the summary)."""

    sampling: str  # segments, crop or whole
    clip_len: int | None
    clip_stride: int
    why: str | None = None

    @classmethod
    def of(cls, cfg: FinetuneConfig, ckpt: HeadCheckpoint) -> ClipSampling:
        # --clip-len 0: whole sequences; None: the head's clip length, or FINETUNE_CLIP_LEN for a whole-sequence head
        clip_len = (cfg.clip_len if cfg.clip_len is not None else (ckpt.clip_len or FINETUNE_CLIP_LEN)) or None
        stride = cfg.clip_stride or ckpt.clip_stride
        if clip_len is None:
            why = None if ckpt.sampling == "whole" else "--clip-len 0: whole sequences (validation: the head's views)"
            return cls("whole", None, stride, why)
        if ckpt.sampling == "whole":
            why = (
                f"the head trained on whole sequences, which would run the backbone on every frame of a video in one "
                f"step: training takes crops of {clip_len} consecutive rows (--clip-len 0 trains on whole sequences); "
                f"validation scores whole sequences"
            )
            return cls("crop", clip_len, stride, why)
        changed = [
            f"{flag} {mine}"
            for flag, mine, head in (
                ("--clip-len", clip_len, ckpt.clip_len),
                ("--clip-stride", stride, ckpt.clip_stride),
            )
            if mine != head
        ]
        why = f"{', '.join(changed)}: validation keeps the head's views" if changed else None
        return cls(ckpt.sampling, clip_len, stride, why)

    def describe(self) -> str:
        return eval_description(self.clip_len, self.clip_stride, 0, self.sampling).replace(
            "centres of", "a random row of"
        )


# --------------------------------------------------------------------------------------- model and optimiser
class FinetuneRun:
    """One fine-tune: the backbone as stage one ran it + the head as stage two trained it, its optimiser groups and
    schedule, the clips it decodes, and its run folder (RunRecorder)."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        ckpt: HeadCheckpoint,
        loaded: LoadedBackbone,
        unfreeze: list[str],
        data: FinetuneData,
        device: torch.device,
        workers: int,
    ):
        self.cfg, self.ckpt, self.data, self.device, self.workers = cfg, ckpt, data, device, workers
        self.spec = ckpt.feature_spec
        self.amp = autocast_dtype(cfg.amp, device)
        self.unfreeze = unfreeze
        self.clips = ClipSampling.of(cfg, ckpt)
        if self.clips.why:
            log.info("training clips: %s (%s)", self.clips.describe(), self.clips.why)
        self.model = self._model(loaded)
        self.backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr * FINETUNE_BACKBONE_LR_FACTOR
        self.optimizer = finetune_optimizer(self.model, cfg.lr, self.backbone_lr, cfg.weight_decay)
        steps_per_epoch = math.ceil(math.ceil(len(data.train_idx) / cfg.batch_size) / cfg.accumulate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), max(cfg.epochs, 1) * steps_per_epoch),
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.objective = ClassifyVideos(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))
        pre = loaded.preprocessing
        augment = ClipAugment(pre.crop, cfg.min_scale, cfg.flip, pre.interpolation, pre.antialias)
        self.dataset = ClipDataset(data.records, pre, augment if cfg.augment else None, self.spec.sampling.frames_fps)
        self.pin = device.type == "cuda"
        self.reads = dict.fromkeys(READ_MODES, 0)
        self.clips_total, self.train_seconds, self.start_metrics = 0, 0.0, None
        self.run_info = self._run_info()
        self.recorder = RunRecorder(
            cfg.out,
            {"finetune": cfg.to_dict(), **self.run_info},
            data.split,
            data.labels,
            overwrite=cfg.overwrite,
            patience=cfg.patience,
            columns=COLUMNS,
        )

    def _model(self, loaded) -> FinetuneModel:
        torch.manual_seed(self.cfg.seed)
        model = FinetuneModel(
            loaded.model,
            self.ckpt.model(),
            loaded.preprocessing,
            unfreeze=self.unfreeze,
            train_bn=self.cfg.train_bn,
            grad_checkpointing=self.cfg.grad_checkpointing,
            autocast_dtype=self.amp,
        )
        model.backbone.to(self.device, memory_format=torch.channels_last)
        model.head.to(self.device)
        return model

    @property
    def unfrozen(self) -> str:
        return "all" if self.unfreeze == [""] else ", ".join(self.unfreeze) or "nothing"

    def _run_info(self) -> dict:
        data, amp = self.data, self.amp
        return {
            "init": str(self.cfg.init.resolve()),
            "init_feature_spec_id": self.spec.id,
            "cache": str(data.cache_path or ""),
            "backbone": self.spec.backbone,
            "unfrozen": self.unfreeze,
            "clip_len": self.clips.clip_len,
            "clip_stride": self.clips.clip_stride,
            "train_sampling": self.clips.sampling,
            "backbone_lr": self.backbone_lr,
            "split": split_info(data.split, data.labels, self.ckpt.classes),
            "classes": self.ckpt.classes,
            "rows_from_cache": data.from_cache,
            "rows_indexed": len(data.records) - data.from_cache,
            "trainable_parameters": sum(p.numel() for group in self.model.trainable() for p in group),
            "device": str(self.device),
            "amp": str(amp).replace("torch.", "") if amp else "off",
            "workers": self.workers,
            "train": self.ckpt.config.get("train", {}),
        }

    def checkpoint(self, epoch: int, metrics: dict) -> HeadCheckpoint:
        """The head and the backbone as they are, under a new feature spec that names the tuned weights."""
        ckpt, spec = self.ckpt, self.spec
        state = {k: v.detach().cpu() for k, v in self.model.backbone.state_dict().items()}
        new_spec = FeatureSpec(
            backbone=spec.backbone,
            weights=f"{FINETUNED_PREFIX}{self.cfg.out.name}",
            weights_sha256=tensors_sha256(state),
            preprocessing=spec.preprocessing,
            sampling=spec.sampling,
            dim=spec.dim,
        )
        return HeadCheckpoint(
            dims=ckpt.dims,
            state_dict=self.model.head.state_dict(),
            classes=ckpt.classes,
            feature_spec=new_spec,
            feature_dtype=ckpt.feature_dtype,
            clip_len=ckpt.clip_len,
            clip_stride=ckpt.clip_stride,
            eval_clips=ckpt.eval_clips,
            epoch=epoch,
            metrics=metrics,
            config={"finetune": self.cfg.to_dict(), **self.run_info},
            backbone_state=state,
            train_videos=[str(self.data.path_of[k].resolve()) for k in self.data.split.train],
            sampling=ckpt.sampling,
        )

    # ------------------------------------------------------------------------------------------ the epoch loop
    def validate(self, what: str) -> dict:
        """The val videos scored as the head scores them (its clip length, stride, sampling and views)."""
        ckpt, data = self.ckpt, self.data
        plans = eval_plans(
            data.val_idx,
            data.lengths,
            data.y,
            self.cfg.batch_size,
            ckpt.clip_len,
            ckpt.clip_stride,
            ckpt.eval_clips,
            ckpt.sampling,
        )
        total = sum(len(plan.videos) for plan in plans)
        with progress_bar(
            total=total, unit="clip", desc=what, disable=not self.cfg.runtime.progress, leave=False
        ) as bar:

            def counted(batches):
                for batch in batches:
                    bar.update(len(batch.y))
                    yield batch

            jobs = [ClipJob(plan) for plan in plans]
            batches = counted(clip_batches(self.dataset, jobs, self.workers, self.pin))
            probs = evaluate(self.model, batches, len(data.val_idx), self.device)
        return classification_report(probs, data.y[data.val_idx], ckpt.classes)

    def score_start(self) -> None:
        """Epoch 0: the head's own checkpoint on the val videos."""
        t0 = time.perf_counter()
        start = self.validate("validate the start")
        log.info("start: val top-1 %.1f%% (the head's own checkpoint: %s)", 100 * start["top1"], self.ckpt.metrics)
        scores = {k: start[k] for k in ("loss", "top1", "top5")}
        self.start_metrics = {**scores, "seconds": time.perf_counter() - t0}
        self.recorder.start(start, self.checkpoint(0, scores), self.cfg.epochs)

    def train_epoch(self, epoch: int) -> dict:
        """One clip of each train video (the sampling of `self.clips`), augmented, through train_one_epoch."""
        cfg, data, clips = self.cfg, self.data, self.clips
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        plans = train_plans(
            data.lengths[data.train_idx],
            data.y[data.train_idx],
            cfg.batch_size,
            clips.clip_len,
            clips.clip_stride,
            rng,
            clips.sampling,
        )
        jobs = [ClipJob(plan, rng.integers(0, 2**63, len(plan.videos))) for plan in plans]
        desc = f"epoch {epoch}/{cfg.epochs}"
        with progress_bar(
            total=len(data.train_idx), unit="clip", desc=desc, disable=not cfg.runtime.progress, leave=False
        ) as bar:

            def on_batch(batch, mean_loss: float) -> None:
                for mode, count in batch.reads.items():
                    self.reads[mode] += count
                bar.update(len(batch.y))
                bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)

            stats = train_one_epoch(
                self.model,
                clip_batches(self.dataset, jobs, self.workers, self.pin),
                self.optimizer,
                self.scheduler,
                self.objective,
                self.device,
                accumulate=cfg.accumulate,
                num_batches=len(jobs),
                scaler=self.scaler,
                on_batch=on_batch,
            )
        self.clips_total += len(data.train_idx)
        self.train_seconds += time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------------------------------------ summary
    def finish(self, started: float) -> FinetuneResult:
        """summary.json (the best epoch's val scores, speeds, what was trained) and the plots."""
        ckpt, spec, device = self.ckpt, self.spec, self.device
        best_spec = load_checkpoint(self.cfg.out / "best.pt").feature_spec
        summary = self.recorder.finish(
            {
                "head": ckpt.dims.head,
                "backbone": spec.backbone,
                "unfrozen": self.unfrozen,
                "split": self.run_info["split"],
                "eval": eval_description(ckpt.clip_len, ckpt.clip_stride, ckpt.eval_clips, ckpt.sampling),
                "train_clips_sampling": self.clips.describe(),
                "train_clips_differ_because": self.clips.why,
                "start": self.start_metrics,
                "head_checkpoint_metrics": ckpt.metrics,
                "seconds": time.perf_counter() - started,
                "train_clips": self.clips_total,
                "train_clips_per_s": self.clips_total / self.train_seconds if self.train_seconds else 0.0,
                "reads": self.reads,
                "peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20
                if device.type == "cuda"
                else None,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "trainable_parameters": self.run_info["trainable_parameters"],
                "feature_spec_id": best_spec.id,
                "feature_weights": best_spec.weights,
                "init_feature_spec_id": spec.id,
            },
            self.recorder.best_report,
            ckpt.classes,
            f"{ckpt.dims.head} + {spec.backbone}",
            self.cfg.plots,
        )
        return FinetuneResult(out=self.cfg.out, summary=summary)
