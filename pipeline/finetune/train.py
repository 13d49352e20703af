"""Stage three: fine-tune the backbone of a trained head's features together with the head, on clips decoded from the
videos, and write a run folder like train-head's whose checkpoints carry the fine-tuned backbone.

    pipeline finetune videos/ --init runs/lstm/best.pt --out runs/lstm-ft --unfreeze layer4
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import FinetuneConfig, config_with
from pipeline.data.cache import CacheError, open_cache
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
    write_split,
)
from pipeline.extract.backbone import FINETUNED_PREFIX, WeightsError, tensors_sha256
from pipeline.extract.decode import DecodeError
from pipeline.extract.inputs import VideoItem, discover
from pipeline.extract.reproduce import backbone_for_spec
from pipeline.extract.run import default_workers
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
from pipeline.runtime import cpu_count, pick_device
from pipeline.spec import FeatureSpec, Sampling
from pipeline.train_head.checkpoint import HeadCheckpoint, load_checkpoint, save_checkpoint
from pipeline.train_head.metrics import classification_report, plot_confusion, plot_curves, to_json
from pipeline.train_head.train import (
    METRIC_COLUMNS,
    TrainResult,
    eval_description,
    evaluate,
    make_optimizer,
    split_info,
    warmup_cosine,
)

log = logging.getLogger(__name__)

DEFAULT_CLIP_LEN = 16  # training clip of a head that was trained on whole sequences
DEFAULT_UNFREEZE_LAST = 1  # stages trained when neither --unfreeze nor --unfreeze-last is given
COLUMNS = (*METRIC_COLUMNS, "clips_per_s")


class FinetuneResult(TrainResult):
    def summary_line(self) -> str:
        s = self.summary
        return (f"{s['head']} + {s['backbone']} ({s['unfrozen']} trained): val top-1 {s['top1']:.1%} (start "
                f"{s['start']['top1']:.1%}), top-5 {s['top5']:.1%} at epoch {s['best_epoch']}/{s['epochs_run']} "
                f"({s['split']['train']} train / {s['split']['val']} val, {s['train_clips_per_s']:.1f} clips/s, "
                f"{s['seconds']:.1f}s) -> {self.out}")


# ------------------------------------------------------------------------------------------------------- data
def input_labels(items: list[VideoItem], classes: list[str], labels_csv: Path | None) -> dict[str, str]:
    """key -> class of every input whose label is a class of the head (the others are left out, with a warning)."""
    if labels_csv is not None:
        raw = read_labels_csv(labels_csv, [it.key for it in items])
    else:
        raw = {it.key: it.label for it in items if it.label}
    known = set(classes)
    labels = {k: v for k, v in raw.items() if v in known}
    unlabelled, unknown = len(items) - len(raw), sorted({v for v in raw.values() if v not in known})
    if unlabelled:
        log.warning("%d inputs have no label and are left out", unlabelled)
    if unknown:
        log.warning("%d inputs have labels the head does not know (%s) and are left out",
                    sum(v in unknown for v in raw.values()), ", ".join(unknown[:5]))
    if not labels:
        raise SplitError(f"no input has a label among the head's {len(classes)} classes "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); label them by class "
                         f"folders, a CSV manifest or --labels")
    return labels


def choose_split(cfg: FinetuneConfig, ckpt: HeadCheckpoint, labels: dict[str, str],
                 items: list[VideoItem]) -> Split:
    """The split of the --init run (its split.csv, else its recorded split settings applied again), or a new one."""
    manifest_splits = {it.key: it.split for it in items if it.split}
    if cfg.split != "head":
        return make_split(labels, mode=cfg.split, cache_splits=manifest_splits, train_list=cfg.train_list,
                          val_list=cfg.val_list, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                          group_regex=cfg.group_regex, all_keys=[it.key for it in items])
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
        split = Split([k for k in labels if sides.get(k) == "train"], [k for k in labels if sides.get(k) == "val"],
                      f"the head's split ({recorded})",
                      {k: "not in the head's split" for k in labels if k not in sides})
        if split.excluded:
            log.warning("%d inputs were not in the head's split and are left out (e.g. %s)", len(split.excluded),
                        next(iter(split.excluded)))
    else:
        settings = ckpt.config.get("train")
        if not settings:
            raise SplitError(f"{cfg.init} records no split ({recorded} is missing): pass --split auto or random")
        log.warning("%s is missing: applying the head's recorded split settings again", recorded)

        def path(name: str) -> Path | None:
            return Path(settings[name]) if settings.get(name) else None

        split = make_split(labels, mode=settings.get("split", "auto"), cache_splits=manifest_splits,
                           train_list=path("train_list"), val_list=path("val_list"),
                           val_fraction=settings.get("val_fraction", cfg.val_fraction),
                           split_seed=settings.get("split_seed", 0), group_regex=settings.get("group_regex"),
                           all_keys=[it.key for it in items])
        split.method = f"the head's split settings applied again: {split.method}"
    check_split(split, labels)
    return split


def feature_rows(items: list[VideoItem], cache_path: Path | None, sampling: Sampling, workers: int,
                 progress: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str], int]:
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
            for key, found, error in tqdm(pool.map(index, rest), total=len(rest), unit="video", desc="indexing",
                                          disable=not progress, leave=False):
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


def train_one_epoch(model: FinetuneModel, batch_iter, num_batches: int, optimizer: torch.optim.Optimizer,
                    scheduler, loss_fn: nn.Module, device: torch.device, accumulate: int,
                    scaler: torch.amp.GradScaler | None, bar: tqdm) -> dict:
    """One pass over the training clips, one optimiser step per `accumulate` batches. Returns mean loss, clip
    accuracy, clips and how they were read."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    reads = dict.fromkeys(READ_MODES, 0)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batch_iter):
        group_start = i - i % accumulate
        group_size = min(accumulate, num_batches - group_start)  # the last group may be short
        batch = batch.to(device)
        logits = model(batch.x, batch.lengths)
        loss = loss_fn(logits, batch.y)
        scaled = loss / group_size
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if i - group_start == group_size - 1:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        n = len(batch.y)
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(1) == batch.y).sum())
        seen += n
        for mode, count in batch.reads.items():
            reads[mode] += count
        bar.update(n)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "clips": seen,
            "reads": reads}


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


def finetune(inputs: list, init: str | Path | None = None, out: str | Path | None = None, *,
             config: FinetuneConfig | None = None, **options) -> FinetuneResult:
    """Fine-tune the backbone of `init`'s features with its head on the labelled videos `inputs` (folders, files,
    CSV manifests, as `pipeline extract` takes them); write the run folder `out` (see docs/finetune.md).

    Options are FinetuneConfig fields (unfreeze="layer4", epochs=5, backbone_lr=1e-5, amp="bf16", ...). Raises
    SplitError for unusable labels or splits, UnfreezeError (a ValueError) for a bad --unfreeze, WeightsError when
    the backbone of the head's features cannot be rebuilt.
    """
    cfg = build_config(init, out, config, **options)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads or cpu_count())
    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    ckpt = load_checkpoint(cfg.init)
    spec = ckpt.feature_spec
    sampling = spec.sampling
    loaded = backbone_for_spec(spec, ckpt.backbone_state, cfg.weights, str(cfg.init), progress=cfg.progress)
    if loaded.dim != ckpt.dims.in_dim:
        raise WeightsError(f"{cfg.init}: the head takes {ckpt.dims.in_dim}-dim features, but {spec.backbone} gives "
                           f"{loaded.dim}")
    if cfg.unfreeze is None and cfg.unfreeze_last is None:
        unfreeze = resolve_unfreeze(loaded.model, spec.backbone, None, DEFAULT_UNFREEZE_LAST)
    else:
        unfreeze = resolve_unfreeze(loaded.model, spec.backbone, cfg.unfreeze, cfg.unfreeze_last)
    clip_len = cfg.clip_len or ckpt.clip_len or DEFAULT_CLIP_LEN
    clip_stride = cfg.clip_stride or ckpt.clip_stride
    unfrozen = "all" if unfreeze == [""] else ", ".join(unfreeze) or "nothing"
    workers = cfg.workers if cfg.workers is not None else default_workers(device)

    # -- data: the inputs' labels, the head's split, each video's feature rows
    items = discover(inputs)
    labels = input_labels(items, ckpt.classes, cfg.labels)
    split = choose_split(cfg, ckpt, labels, items)
    chosen = set(split.train) | set(split.val)
    cache_path = cfg.cache or (Path(ckpt.config["cache"]) if ckpt.config.get("cache") else None)
    rows, failed, from_cache = feature_rows([it for it in items if it.key in chosen], cache_path, sampling,
                                            max(workers, 1), cfg.progress)
    if failed:
        for key, reason in failed.items():
            log.warning("left out %s: %s", key, reason)
        split = Split([k for k in split.train if k not in failed], [k for k in split.val if k not in failed],
                      split.method, {**split.excluded, **dict.fromkeys(failed, "cannot be decoded")})
        check_split(split, labels)
    path_of = {it.key: it.path for it in items}
    class_index = {c: i for i, c in enumerate(ckpt.classes)}
    keys = split.train + split.val
    records = [VideoRecord(k, path_of[k], class_index[labels[k]], *rows[k]) for k in keys]
    lengths = np.array([len(r.frame_indices) for r in records], dtype=np.int64)
    y = np.array([r.label for r in records], dtype=np.int64)
    n_train = len(split.train)
    train_idx, val_idx = np.arange(n_train), np.arange(n_train, len(keys))
    log.info("split: %s; rows of %d videos from the head's cache, %d indexed", split.sizes(), from_cache,
             len(keys) - from_cache)

    # -- the model: the backbone as stage one ran it + the head as stage two trained it
    torch.manual_seed(cfg.seed)
    head = ckpt.model()
    model = FinetuneModel(loaded.model, head, loaded.preprocessing, unfreeze=unfreeze, train_bn=cfg.train_bn,
                          grad_checkpointing=cfg.grad_checkpointing, autocast_dtype=amp)
    model.backbone.to(device, memory_format=torch.channels_last)
    model.head.to(device)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10
    optimizer = finetune_optimizer(model, cfg.lr, backbone_lr, cfg.weight_decay)
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), max(cfg.epochs, 1) * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    pre = loaded.preprocessing
    augment = ClipAugment(pre.crop, cfg.min_scale, cfg.flip, pre.interpolation, pre.antialias) if cfg.augment else None
    dataset = ClipDataset(records, pre, augment, sampling.frames_fps)
    pin = device.type == "cuda"
    trainable = sum(p.numel() for group in model.trainable() for p in group)

    out_dir = cfg.out
    out_dir.mkdir(parents=True, exist_ok=True)
    run_info = {
        "init": str(cfg.init.resolve()), "init_feature_spec_id": spec.id, "cache": str(cache_path or ""),
        "backbone": spec.backbone, "unfrozen": unfreeze, "clip_len": clip_len, "clip_stride": clip_stride,
        "backbone_lr": backbone_lr, "split": split_info(split, labels, ckpt.classes), "classes": ckpt.classes,
        "rows_from_cache": from_cache, "rows_indexed": len(keys) - from_cache, "trainable_parameters": trainable,
        "device": str(device), "amp": str(amp).replace("torch.", "") if amp else "off", "workers": workers,
        "train": ckpt.config.get("train", {}),
    }
    (out_dir / "config.json").write_text(json.dumps({"finetune": cfg.to_dict(), **run_info}, indent=1) + "\n")
    write_split(out_dir / SPLIT_FILE, split, labels)

    def checkpoint(epoch: int, metrics: dict) -> HeadCheckpoint:
        state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
        new_spec = FeatureSpec(backbone=spec.backbone, weights=f"{FINETUNED_PREFIX}{out_dir.name}",
                               weights_sha256=tensors_sha256(state), preprocessing=spec.preprocessing,
                               sampling=spec.sampling, dim=spec.dim)
        return HeadCheckpoint(dims=ckpt.dims, state_dict=model.head.state_dict(), classes=ckpt.classes,
                              feature_spec=new_spec, feature_dtype=ckpt.feature_dtype, clip_len=ckpt.clip_len,
                              clip_stride=ckpt.clip_stride, eval_clips=ckpt.eval_clips, epoch=epoch, metrics=metrics,
                              config={"finetune": cfg.to_dict(), **run_info}, backbone_state=state,
                              sampling=ckpt.sampling)

    def validate() -> dict:
        plans = eval_plans(val_idx, lengths, y, cfg.batch_size, ckpt.clip_len, ckpt.clip_stride, ckpt.eval_clips,
                           ckpt.sampling)
        jobs = [ClipJob(plan) for plan in plans]
        probs = evaluate(model, clip_batches(dataset, jobs, workers, pin), len(val_idx), device)
        return classification_report(probs, y[val_idx], ckpt.classes)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    start = validate()
    log.info("start: val top-1 %.1f%% (the head's own checkpoint: %s)", 100 * start["top1"], ckpt.metrics)
    start_metrics = {"loss": start["loss"], "top1": start["top1"], "top5": start["top5"],
                     "seconds": time.perf_counter() - t0}
    best = {"top1": start["top1"], "loss": start["loss"], "epoch": 0, "report": start}
    saved = checkpoint(0, {k: start[k] for k in ("loss", "top1", "top5")})
    save_checkpoint(saved, out_dir / "best.pt")
    if cfg.epochs == 0:
        save_checkpoint(saved, out_dir / "last.pt")

    rows_out: list[dict] = []
    reads = dict.fromkeys(READ_MODES, 0)
    clips_total, train_seconds = 0, 0.0
    stale, stopped_early = 0, False
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        f.flush()
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])
            plans = train_plans(lengths[train_idx], y[train_idx], cfg.batch_size, clip_len, clip_stride, rng)
            jobs = [ClipJob(plan, rng.integers(0, 2**63, len(plan.videos))) for plan in plans]
            lr = optimizer.param_groups[0]["lr"]
            with tqdm(total=n_train, unit="clip", desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
                      leave=False) as bar:
                stats = train_one_epoch(model, clip_batches(dataset, jobs, workers, pin), len(jobs), optimizer,
                                        scheduler, loss_fn, device, cfg.accumulate, scaler, bar)
            t1 = time.perf_counter()
            clips_total += stats["clips"]
            train_seconds += t1 - t0
            for mode, count in stats["reads"].items():
                reads[mode] += count
            report = validate()
            row = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                   "val_loss": report["loss"], "val_top1": report["top1"], "val_top5": report["top5"], "lr": lr,
                   "train_seconds": t1 - t0, "val_seconds": time.perf_counter() - t1,
                   "clips_per_s": stats["clips"] / (t1 - t0)}
            rows_out.append(row)
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()
            metrics = {"loss": report["loss"], "top1": report["top1"], "top5": report["top5"]}
            saved = checkpoint(epoch, metrics)
            if report["top1"] > best["top1"] or (report["top1"] == best["top1"] and report["loss"] < best["loss"]):
                best = {"top1": report["top1"], "loss": report["loss"], "epoch": epoch, "report": report}
                save_checkpoint(saved, out_dir / "best.pt")
                stale = 0
            else:
                stale += 1
            save_checkpoint(saved, out_dir / "last.pt")
            log.info("epoch %d: train loss %.4f, val top-1 %.1f%%, %.1f clips/s", epoch, stats["train_loss"],
                     100 * report["top1"], row["clips_per_s"])
            if cfg.patience and stale >= cfg.patience:
                stopped_early = True
                log.info("early stop at epoch %d: no better val top-1 for %d epochs", epoch, cfg.patience)
                break

    report = best["report"]
    best_spec = load_checkpoint(out_dir / "best.pt").feature_spec
    summary = {
        "head": ckpt.dims.head, "backbone": spec.backbone, "unfrozen": unfrozen, "best_epoch": best["epoch"], "epochs_run": len(rows_out),
        "stopped_early": stopped_early, "top1": report["top1"], "top5": report["top5"], "val_loss": report["loss"],
        "videos": report["videos"], "per_class_accuracy": report["per_class_accuracy"],
        "confusion_matrix": report["confusion_matrix"], "classes": ckpt.classes, "split": run_info["split"],
        "eval": eval_description(ckpt.clip_len, ckpt.clip_stride, ckpt.eval_clips, ckpt.sampling),
        "start": start_metrics,
        "head_checkpoint_metrics": ckpt.metrics, "seconds": time.perf_counter() - started,
        "train_clips": clips_total, "train_clips_per_s": clips_total / train_seconds if train_seconds else 0.0,
        "reads": reads, "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                                if device.type == "cuda" else None),
        "parameters": sum(p.numel() for p in model.parameters()), "trainable_parameters": trainable,
        "feature_spec_id": best_spec.id, "feature_weights": best_spec.weights,
        "init_feature_spec_id": spec.id,
    }
    (out_dir / "summary.json").write_text(to_json(summary))
    if cfg.plots:
        if rows_out:
            plot_curves(rows_out, out_dir / "curves.png")
        plot_confusion(np.array(report["confusion_matrix"]), ckpt.classes, out_dir / "confusion.png",
                       f"{ckpt.dims.head} + {spec.backbone}: val top-1 {report['top1']:.1%}")
    return FinetuneResult(out=out_dir, summary=summary)
