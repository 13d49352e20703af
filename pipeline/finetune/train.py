"""Stage three: fine-tune the backbone of a trained head's features together with the head, on clips decoded from the
videos, and write a run folder like train-head's whose checkpoints carry the fine-tuned backbone.

    pipeline finetune videos/ --init runs/lstm/best.pt --out runs/lstm-ft --unfreeze layer4
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

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
from pipeline.extract.backbone import FINETUNED_PREFIX, WeightsError, tensors_sha256
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
from pipeline.runtime import cpu_count, default_workers, pick_device
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
            for key, found, error in tqdm(
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
    amp = autocast_dtype(cfg.amp, device)
    ckpt = load_checkpoint(cfg.init)
    if ckpt.target != "videos":
        raise ValueError(
            f"{cfg.init} is a head that labels frames: finetune trains heads that label whole videos (its clips "
            f"carry one label each); train the frame head on a cache of the features instead"
        )
    spec = ckpt.feature_spec
    if spec.window is not None:
        raise ValueError(
            f"{cfg.init} was trained on window rows of the video model {spec.backbone}: finetune trains backbones "
            f"that embed each frame on its own (torchvision classifiers, timm image models)"
        )
    sampling = spec.sampling
    loaded = backbone_for_spec(spec, ckpt.backbone_state, cfg.weights, str(cfg.init), progress=cfg.runtime.progress)
    if loaded.dim != ckpt.dims.in_dim:
        raise WeightsError(
            f"{cfg.init}: the head takes {ckpt.dims.in_dim}-dim features, but {spec.backbone} gives {loaded.dim}"
        )
    if cfg.unfreeze is None and cfg.unfreeze_last is None:
        unfreeze = resolve_unfreeze(loaded.model, spec.backbone, None, FINETUNE_UNFREEZE_LAST)
    else:
        unfreeze = resolve_unfreeze(loaded.model, spec.backbone, cfg.unfreeze, cfg.unfreeze_last)
    # clip_len 0: whole sequences; None: the head's clip length, or FINETUNE_CLIP_LEN for a whole-sequence head
    clip_len = cfg.clip_len if cfg.clip_len is not None else (ckpt.clip_len or FINETUNE_CLIP_LEN)
    clip_len = clip_len or None
    clip_stride = cfg.clip_stride or ckpt.clip_stride
    unfrozen = "all" if unfreeze == [""] else ", ".join(unfreeze) or "nothing"
    workers = cfg.workers if cfg.workers is not None else default_workers(device)

    # -- data: the inputs' labels, the head's split, each video's feature rows
    items = discover(inputs)
    labels = input_labels(items, ckpt.classes, cfg.splitting.labels)
    split = choose_split(cfg, ckpt, labels, items)
    chosen = set(split.train) | set(split.val)
    cache_path = cfg.cache or (Path(ckpt.config["cache"]) if ckpt.config.get("cache") else None)
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
    lengths = np.array([len(r.frame_indices) for r in records], dtype=np.int64)
    n_train = len(split.train)
    train_idx, val_idx = np.arange(n_train), np.arange(n_train, len(keys))
    log.info(
        "split: %s; rows of %d videos from the head's cache, %d indexed",
        split.sizes(),
        from_cache,
        len(keys) - from_cache,
    )

    # -- the model: the backbone as stage one ran it + the head as stage two trained it
    torch.manual_seed(cfg.seed)
    head = ckpt.model()
    model = FinetuneModel(
        loaded.model,
        head,
        loaded.preprocessing,
        unfreeze=unfreeze,
        train_bn=cfg.train_bn,
        grad_checkpointing=cfg.grad_checkpointing,
        autocast_dtype=amp,
    )
    model.backbone.to(device, memory_format=torch.channels_last)
    model.head.to(device)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr * FINETUNE_BACKBONE_LR_FACTOR
    optimizer = finetune_optimizer(model, cfg.lr, backbone_lr, cfg.weight_decay)
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), max(cfg.epochs, 1) * steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    objective = ClassifyVideos(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))
    pre = loaded.preprocessing
    augment = ClipAugment(pre.crop, cfg.min_scale, cfg.flip, pre.interpolation, pre.antialias) if cfg.augment else None
    dataset = ClipDataset(records, pre, augment, sampling.frames_fps)
    pin = device.type == "cuda"
    trainable = sum(p.numel() for group in model.trainable() for p in group)

    out_dir = cfg.out
    run_info = {
        "init": str(cfg.init.resolve()),
        "init_feature_spec_id": spec.id,
        "cache": str(cache_path or ""),
        "backbone": spec.backbone,
        "unfrozen": unfreeze,
        "clip_len": clip_len,
        "clip_stride": clip_stride,
        "backbone_lr": backbone_lr,
        "split": split_info(split, labels, ckpt.classes),
        "classes": ckpt.classes,
        "rows_from_cache": from_cache,
        "rows_indexed": len(keys) - from_cache,
        "trainable_parameters": trainable,
        "device": str(device),
        "amp": str(amp).replace("torch.", "") if amp else "off",
        "workers": workers,
        "train": ckpt.config.get("train", {}),
    }
    recorder = RunRecorder(
        out_dir,
        {"finetune": cfg.to_dict(), **run_info},
        split,
        labels,
        overwrite=cfg.overwrite,
        patience=cfg.patience,
        columns=COLUMNS,
    )

    def checkpoint(epoch: int, metrics: dict) -> HeadCheckpoint:
        state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
        new_spec = FeatureSpec(
            backbone=spec.backbone,
            weights=f"{FINETUNED_PREFIX}{out_dir.name}",
            weights_sha256=tensors_sha256(state),
            preprocessing=spec.preprocessing,
            sampling=spec.sampling,
            dim=spec.dim,
        )
        return HeadCheckpoint(
            dims=ckpt.dims,
            state_dict=model.head.state_dict(),
            classes=ckpt.classes,
            feature_spec=new_spec,
            feature_dtype=ckpt.feature_dtype,
            clip_len=ckpt.clip_len,
            clip_stride=ckpt.clip_stride,
            eval_clips=ckpt.eval_clips,
            epoch=epoch,
            metrics=metrics,
            config={"finetune": cfg.to_dict(), **run_info},
            backbone_state=state,
            train_videos=[str(path_of[k].resolve()) for k in split.train],
            sampling=ckpt.sampling,
        )

    if cfg.val_clips is not None and cfg.val_clips < len(val_idx):
        # the same evenly spread videos every epoch, so that epochs stay comparable
        val_idx = val_idx[np.unique(np.linspace(0, len(val_idx) - 1, cfg.val_clips).round().astype(np.int64))]
        log.info("validating on %d of the %d val videos (--val-clips)", len(val_idx), len(split.val))

    def validate(what: str) -> dict:
        plans = eval_plans(
            val_idx, lengths, y, cfg.batch_size, ckpt.clip_len, ckpt.clip_stride, ckpt.eval_clips, ckpt.sampling
        )
        jobs = [ClipJob(plan) for plan in plans]
        with tqdm(
            total=sum(len(plan.videos) for plan in plans),
            unit="clip",
            desc=what,
            disable=not cfg.runtime.progress,
            leave=False,
        ) as bar:

            def counted(batches):
                for batch in batches:
                    bar.update(len(batch.y))
                    yield batch

            probs = evaluate(model, counted(clip_batches(dataset, jobs, workers, pin)), len(val_idx), device)
        return classification_report(probs, y[val_idx], ckpt.classes)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_metrics = None
    if cfg.start_eval:
        t0 = time.perf_counter()
        start = validate("validate the start")
        log.info("start: val top-1 %.1f%% (the head's own checkpoint: %s)", 100 * start["top1"], ckpt.metrics)
        start_metrics = {
            "loss": start["loss"],
            "top1": start["top1"],
            "top5": start["top5"],
            "seconds": time.perf_counter() - t0,
        }
        recorder.start(start, checkpoint(0, {k: start[k] for k in ("loss", "top1", "top5")}), cfg.epochs)

    reads = dict.fromkeys(READ_MODES, 0)
    clips_total, train_seconds = 0, 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])
            plans = train_plans(lengths[train_idx], y[train_idx], cfg.batch_size, clip_len, clip_stride, rng)
            jobs = [ClipJob(plan, rng.integers(0, 2**63, len(plan.videos))) for plan in plans]
            lr = optimizer.param_groups[0]["lr"]
            with tqdm(
                total=n_train,
                unit="clip",
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=not cfg.runtime.progress,
                leave=False,
            ) as bar:

                def on_batch(batch, mean_loss: float) -> None:
                    for mode, count in batch.reads.items():
                        reads[mode] += count
                    bar.update(len(batch.y))
                    bar.set_postfix(loss=f"{mean_loss:.3f}")

                stats = train_one_epoch(
                    model,
                    clip_batches(dataset, jobs, workers, pin),
                    optimizer,
                    scheduler,
                    objective,
                    device,
                    accumulate=cfg.accumulate,
                    num_batches=len(jobs),
                    scaler=scaler,
                    on_batch=on_batch,
                )
            t1 = time.perf_counter()
            clips = len(train_idx)
            clips_total += clips
            train_seconds += t1 - t0
            report = validate(f"validate epoch {epoch}")
            clips_per_s = clips / (t1 - t0)
            log.info(
                "epoch %d: train loss %.4f, val top-1 %.1f%%, %.1f clips/s",
                epoch,
                stats["train_loss"],
                100 * report["top1"],
                clips_per_s,
            )
            seconds = (t1 - t0, time.perf_counter() - t1)
            if not recorder.end_epoch(
                epoch, stats, report, lr, seconds, lambda metrics: checkpoint(epoch, metrics), clips_per_s=clips_per_s
            ):
                break
    finally:
        recorder.close()

    report = recorder.best_report
    best_spec = load_checkpoint(out_dir / "best.pt").feature_spec
    summary = recorder.finish(
        {
            "head": ckpt.dims.head,
            "backbone": spec.backbone,
            "unfrozen": unfrozen,
            "split": run_info["split"],
            "eval": eval_description(ckpt.clip_len, ckpt.clip_stride, ckpt.eval_clips, ckpt.sampling),
            "start": start_metrics,
            "head_checkpoint_metrics": ckpt.metrics,
            "seconds": time.perf_counter() - started,
            "train_clips": clips_total,
            "train_clips_per_s": clips_total / train_seconds if train_seconds else 0.0,
            "reads": reads,
            "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": trainable,
            "feature_spec_id": best_spec.id,
            "feature_weights": best_spec.weights,
            "init_feature_spec_id": spec.id,
        },
        report,
        ckpt.classes,
        f"{ckpt.dims.head} + {spec.backbone}",
        cfg.plots,
    )
    return FinetuneResult(out=out_dir, summary=summary)
