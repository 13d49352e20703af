"""GPU check: ResNet-50 extraction on CUDA (speed against forward-only) and CUDA features against CPU features, then a
short ResNet-50 fine-tune in bf16 (clips/s, peak GPU memory, the loss going down).

Nothing is downloaded: weights are the seeded random initialisation ('none'), so the CPU and CUDA models are identical.
Run it through bench/gpu_check.sh, which checks the environment first; exit status 0 means every check passed.

    python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cpu --resolutions 320x240 --clips 2 --frames 16 --finetune-per-class 8 \
        --finetune-frames 16 --finetune-resolution 160x120 --finetune-crop 64   # a dry run without a GPU (~3 min)
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import load_average, machine  # bench/common.py, beside this script
from extract import make_videos, measure, parse_resolution  # bench/extract.py

import pipeline
from pipeline.config import EXTRACT_BATCH_CPU, EXTRACT_BATCH_GPU
from pipeline.data.cache import open_cache
from pipeline.extract import run
from pipeline.runtime import pick_device
from pipeline.sample import CLASSES, class_order, clip_frames, write_video

MODEL = "resnet50"
FINETUNE_UNFREEZE = "layer4"


def min_cosine(reference: Path, other: Path) -> tuple[float, int]:
    """Smallest cosine similarity between rows of the same (video, frame index) in two caches, and rows compared.

    Every row of `reference` must be in `other`."""
    worst, rows = 1.0, 0
    with open_cache(reference) as ref, open_cache(other) as oth:
        for key in ref:
            a, b = ref.features(key).astype(np.float64), oth.features(key).astype(np.float64)  # (T, D)
            where = {int(f): row for row, f in enumerate(oth.frame_indices(key))}
            b = b[[where[int(f)] for f in ref.frame_indices(key)]]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            worst, rows = min(worst, float(cos.min())), rows + len(cos)
    return worst, rows


TINTS = ((112, 0, 0), (0, 112, 0), (0, 0, 112), (112, 112, 0))  # RGB added to every frame of a class


def tinted_videos(folder: Path, per_class: int, frames: int, width: int, height: int) -> None:
    """The demo's sample (a growing square, classes in four frame orders) with a colour tint per class, so that a
    randomly initialised backbone separates the classes within a few epochs; alternately mp4v .mp4 and MJPG .avi,
    in folder/<class>/clip_<k>.<ext>."""
    rng = np.random.default_rng(0)
    for k in range(per_class):
        base = clip_frames(rng, frames, width, height)
        for label, tint in zip(CLASSES, TINTS, strict=True):
            suffix = (".mp4", ".avi")[k % 2]
            shown = [np.clip(base[j].astype(np.int16) + tint, 0, 255).astype(np.uint8)
                     for j in class_order(label, frames)]
            write_video(folder / label / f"clip_{k:03d}{suffix}", shown, fps=25.0)


def finetune_check(args, device, work: Path) -> tuple[list[str], list[str]]:
    """Extract a generated sample, train an LSTM head for one epoch, fine-tune layer4 (BatchNorm statistics too) +
    head (bf16 on CUDA); table lines and failures. The head is left under-trained on purpose, so that fine-tuning has a loss to bring down."""
    w, h = parse_resolution(args.finetune_resolution)
    start = time.perf_counter()
    videos = work / "finetune_videos"
    tinted_videos(videos, args.finetune_per_class, args.finetune_frames, w, h)
    n = args.finetune_per_class * len(CLASSES)
    crop = args.finetune_crop
    sizes = {"resize": crop * 8 // 7, "crop": crop} if crop else {}
    report = pipeline.extract_videos([videos], work / "finetune.h5", backbone=MODEL, weights="none", device=str(device),
                                     workers=args.workers, progress=False, **sizes)
    print(f"fine-tune data: {n} clips x {args.finetune_frames} frames at {args.finetune_resolution} generated and "
          f"extracted in {time.perf_counter() - start:.1f}s", flush=True)
    if not report.ok:
        return [], [f"fine-tune: extraction failed: {report.failed}"]
    clip_len = min(args.finetune_clip_len, args.finetune_frames)
    head = pipeline.train_head(work / "finetune.h5", work / "head", head="lstm", hidden=128, clip_len=clip_len, epochs=1,
                               batch_size=16, lr=1e-3, group_regex=r"clip_(\d+)", val_fraction=0.25, patience=0,
                               plots=False, progress=False, device=str(device))
    amp = "bf16" if device.type == "cuda" else "off"
    start = time.perf_counter()
    # Random weights have no BatchNorm statistics worth keeping (running mean 0, variance 1: no normalisation at
    # all), and with them frozen the random ResNet-50 barely learns; so this check trains them (--train-bn).
    result = pipeline.finetune([videos], head.out / "best.pt", work / "head-ft", unfreeze=FINETUNE_UNFREEZE, amp=amp,
                               train_bn=True,
                               epochs=args.finetune_epochs, batch_size=args.finetune_batch_size,
                               clip_len=clip_len, lr=3e-3, backbone_lr=3e-4, flip=False, patience=0,
                               workers=args.workers, device=str(device), plots=False, progress=False)
    s = result.summary
    with open(result.out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows]
    print(f"  fine-tune {MODEL} {FINETUNE_UNFREEZE} + lstm, amp {amp}, {s['train_clips']} training clips of "
          f"{clip_len} frames in {time.perf_counter() - start:.1f}s (incl. validation); reads {s['reads']}")
    for r in rows:
        print(f"    epoch {r['epoch']}: train loss {float(r['train_loss']):.4f}, val top-1 {float(r['val_top1']):.1%}, "
              f"{float(r['clips_per_s']):.1f} clips/s")
    failures = []
    if len(losses) < 2 or not losses[-1] < losses[0]:
        failures.append(f"fine-tune: the train loss did not go down over {len(losses)} epochs: {losses}")
    head_loss = head.summary["val_loss"]
    if abs(s["start"]["loss"] - head_loss) > 0.1 * head_loss + 1e-3:
        failures.append(f"fine-tune: the start's val loss {s['start']['loss']:.4f} is not the head's {head_loss:.4f} "
                        f"(backbone + head before any step should compute the cached path)")
    peak = s["peak_gpu_memory_mib"]
    line = (f"{MODEL:<9} {FINETUNE_UNFREEZE:>8} {amp:>5} {args.finetune_batch_size:>5}x{clip_len:<3} "
            f"{s['train_clips_per_s']:>8.1f} {s['train_clips_per_s'] * clip_len:>9.1f} "
            f"{(f'{peak:.0f}' if peak is not None else '-'):>9} {losses[0]:>8.4f} {losses[-1]:>8.4f} "
            f"{s['start']['top1']:>8.1%} {s['top1']:>8.1%}")
    return [line], failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="the device under test (cpu makes a dry run of this script)")
    p.add_argument("--resolutions", default="320x240,1280x720", help="comma-separated WxH of the generated videos")
    p.add_argument("--clips", type=int, default=16, help="clips per resolution (alternately mp4v .mp4 and MJPG .avi)")
    p.add_argument("--frames", type=int, default=96, help="frames per clip")
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's own (64 on a GPU)")
    p.add_argument("--workers", type=int, default=None, help="decode workers; default: extract's own")
    p.add_argument("--cpu-clips", type=int, default=2, help="clips per resolution also extracted on the CPU")
    p.add_argument("--cpu-frames", type=int, default=16, help="frames per clip extracted on the CPU (the first ones)")
    p.add_argument("--min-cosine", type=float, default=0.999, help="smallest cosine allowed between CPU and device rows")
    p.add_argument("--finetune-per-class", type=int, default=24,
                   help="fine-tune check: clips per class of the 4 generated classes (0 skips the check)")
    p.add_argument("--finetune-frames", type=int, default=32, help="fine-tune check: frames per clip")
    p.add_argument("--finetune-resolution", default="320x240", help="fine-tune check: WxH of the generated clips")
    p.add_argument("--finetune-crop", type=int, default=None, help="fine-tune check: crop size; default: the weights' "
                                                                   "own (224)")
    p.add_argument("--finetune-epochs", type=int, default=6, help="fine-tune check: epochs")
    p.add_argument("--finetune-batch-size", type=int, default=8, help="fine-tune check: clips per step")
    p.add_argument("--finetune-clip-len", type=int, default=16, help="fine-tune check: frames per training clip")
    args = p.parse_args(argv)
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # weights 'none' is the point here: no warning

    device = pick_device(args.device)
    batch_size = args.batch_size or (EXTRACT_BATCH_CPU if device.type == "cpu" else EXTRACT_BATCH_GPU)
    print(f"machine: {machine(device)}; load average {load_average()}")
    print(f"{MODEL} (weights none, seed fixed) on {device}, batch size {batch_size}, decode workers "
          f"{args.workers if args.workers is not None else run.default_workers(device)}, features stored as float32; "
          f"CPU reference on {args.cpu_clips} clips x {args.cpu_frames} frames per resolution", flush=True)
    failures = []
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for resolution in [r.strip() for r in args.resolutions.split(",") if r.strip()]:
            w, h = parse_resolution(resolution)
            start = time.perf_counter()
            videos = make_videos(work / f"videos_{w}x{h}", w, h, args.clips, args.frames)
            print(f"generated {len(videos)} clips x {args.frames} frames at {resolution} in "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
            cache = work / f"device_{w}x{h}.h5"
            row = measure(MODEL, resolution, videos, cache, device, batch_size, workers=args.workers, dtype="float32")
            expected = args.clips * args.frames
            if row.frames != expected:
                failures.append(f"{resolution}: {row.frames} frames extracted, {expected} expected")
            start = time.perf_counter()
            reference = work / f"cpu_{w}x{h}.h5"
            report = run.extract_videos(videos[:args.cpu_clips], reference, backbone=MODEL, weights="none",
                                        device="cpu", dtype="float32", max_frames=args.cpu_frames, progress=False)
            if not report.ok:
                failures.append(f"{resolution}: CPU extraction failed: {report.failed}")
            cosine, rows = min_cosine(reference, cache)
            print(f"  {resolution}: e2e {row.e2e_fps:.1f} frames/s, forward {row.forward_fps:.1f} frames/s; CPU "
                  f"reference {report.frames} frames in {time.perf_counter() - start:.1f}s, min cosine {cosine:.6f}",
                  flush=True)
            if not cosine >= args.min_cosine:
                failures.append(f"{resolution}: min cosine {cosine:.6f} < {args.min_cosine} between CPU and {device}")
            results.append((row, cosine, rows))
        finetune_lines = []
        if args.finetune_per_class:
            finetune_lines, problems = finetune_check(args, device, work)
            failures += problems

    print()
    print(f"{'model':<9} {'resolution':>10} {'frames':>6} {'e2e frames/s':>13} {'forward frames/s':>17} {'ratio':>6} "
          f"{'min cosine':>11} {'rows':>5}")
    for row, cosine, rows in results:
        print(f"{row.model:<9} {row.resolution:>10} {row.frames:>6} {row.e2e_fps:>13.1f} {row.forward_fps:>17.1f} "
              f"{row.ratio:>6.2f} {cosine:>11.6f} {rows:>5}")
    if finetune_lines:
        print(f"\n{'model':<9} {'unfrozen':>8} {'amp':>5} {'batch':>9} {'clips/s':>8} {'frames/s':>9} "
              f"{'peak MiB':>9} {'loss 1st':>8} {'loss end':>8} {'val start':>8} {'val best':>8}")
        print("\n".join(finetune_lines))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nOK: every video extracted on {device}; every compared row has cosine >= {args.min_cosine} with the CPU"
          + ("; the fine-tune's loss went down" if finetune_lines else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
