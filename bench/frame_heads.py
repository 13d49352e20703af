"""Heads that label frames on a UCF101-sized cache: seconds per epoch and the segmentation scores of every head kind,
trained through the real `train_head(..., frame_labels=...)` API.

The synthetic cache holds --videos sequences of 120..240 rows (mean 180) of --dim float16 features, each a random
sequence of segments (15..45 rows) of 10 classes, with one label per row in a label folder (groundTruth/<video>.txt).
Four classes (still0..still3) show their class in every row (a class mean plus noise). The other six come in three
pairs, up<k> and down<k>: both classes of a pair add to the pair's mean the same drifting component, a direction
scaled from -1 to +1 over the segment (up) or from +1 to -1 (down), so their rows have the very same distribution and
only their order tells the two apart. An order-blind head (meanpool labels each row alone) confuses every pair.

    python bench/frame_heads.py                                   # 9,500 videos x ~180 rows x 2048 (~6.5 GB)
    python bench/frame_heads.py --videos 300 --epochs 1           # a quick run
    python bench/frame_heads.py --cache /tmp/frames.h5 --keep     # keep the cache (and its labels) to reuse them
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ensure_cache, load_average, machine, write_resnet50_sized  # bench/common.py, beside this script

from pipeline.config import HEADS
from pipeline.data.labelled import load_labelled
from pipeline.runtime import cpu_count, pick_device
from pipeline.train_head.train import build_config, train_head

UCF101_VIDEOS, MEAN_ROWS = 9_500, 180  # as bench/train_head.py: UCF101 split 1 train+test, ~7 s at 25 fps
SEGMENT_ROWS = (15, 45)
PAIRS, STILL = 3, 4  # order-only class pairs (up<k>, down<k>) and classes that every row shows
CLASSES = [f"{d}{k}" for k in range(PAIRS) for d in ("up", "down")] + [f"still{k}" for k in range(STILL)]
NOISE_BANK_ROWS = 8192  # a video's noise is a slice of one random bank: fast, still unique enough per row
BENCH_HEADS = ("lstm", "gru", "bilstm", "attention", "meanpool", "tcn")


def labels_folder(cache: Path) -> Path:
    """Where the per-row labels of a generated cache live: beside it, CACHE.groundTruth/."""
    return cache.with_name(cache.stem + ".groundTruth")


# ------------------------------------------------------------------------------------------------------ the cache
def video_rows(rng: np.random.Generator, length: int) -> np.ndarray:
    """Class indices (length,) of one video: segments of SEGMENT_ROWS rows, no class twice in a row."""
    out: list[int] = []
    while len(out) < length:
        c = int(rng.integers(len(CLASSES)))
        if out and c == out[-1]:
            continue
        out += [c] * int(rng.integers(SEGMENT_ROWS[0], SEGMENT_ROWS[1] + 1))
    return np.asarray(out[:length])


def row_means(rows: np.ndarray, means: np.ndarray, drifts: np.ndarray) -> np.ndarray:
    """(T, D) float32: each row's class mean, plus for an up/down class its pair's drift scaled by the row's place in
    its segment (-1 -> +1 for up, +1 -> -1 for down)."""
    out = means[rows].copy()
    change = np.flatnonzero(np.diff(rows)) + 1
    for start, end in zip(np.r_[0, change], np.r_[change, len(rows)]):
        c = int(rows[start])
        if c >= 2 * PAIRS:
            continue
        scale = np.linspace(-1.0, 1.0, end - start, dtype=np.float32)
        if c % 2:  # down<k>
            scale = scale[::-1]
        out[start:end] += scale[:, None] * drifts[c // 2]
    return out


def generate(path: Path, videos: int, dim: int, seed: int = 0) -> None:
    """The cache at `path` (streamed video by video) and its label folder (labels_folder(path))."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((NOISE_BANK_ROWS, dim), dtype=np.float32)
    pair_means = rng.standard_normal((PAIRS, dim), dtype=np.float32) * 0.5
    # both classes of a pair share its mean: their rows differ only in the order of the drift
    means = np.concatenate(
        [np.repeat(pair_means, 2, axis=0), rng.standard_normal((STILL, dim), dtype=np.float32) * 0.5]
    )
    drifts = rng.standard_normal((PAIRS, dim), dtype=np.float32) * 0.5
    folder = labels_folder(path)
    folder.mkdir(parents=True, exist_ok=True)

    def sequences():
        for i in range(videos):
            t = int(rng.integers(MEAN_ROWS - 60, MEAN_ROWS + 61))
            rows = video_rows(rng, t)
            start = int(rng.integers(0, NOISE_BANK_ROWS - t))
            key = f"video_{i:05d}"
            (folder / f"{key}.txt").write_text("\n".join(CLASSES[c] for c in rows) + "\n")
            yield key, bank[start : start + t] + row_means(rows, means, drifts), None, None

    write_resnet50_sized(path, sequences(), dim, videos)


# ---------------------------------------------------------------------------------------------------------- main
def train_seconds(run: Path) -> list[float]:
    """The train part of each epoch, from the run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["train_seconds"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--videos", type=int, default=UCF101_VIDEOS, help="videos in the synthetic cache")
    p.add_argument("--dim", type=int, default=2048, help="feature size (ResNet-50: 2048)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per head (the first one also warms up)")
    p.add_argument("--heads", nargs="+", default=list(BENCH_HEADS), choices=HEADS, help="head kinds, in order")
    p.add_argument("--hidden", type=int, default=None, help="width of the heads; default: train-head's")
    p.add_argument("--tcn-hidden", type=int, default=None, help="width of the tcn head; default: --hidden")
    p.add_argument("--batch-size", type=int, default=None, help="whole videos per step; default: train-head's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: all cores")
    p.add_argument("--cache", type=Path, default=None, help="reuse (or create) the synthetic cache here")
    p.add_argument("--keep", action="store_true", help="keep a generated cache (default: delete it at the end)")
    args = p.parse_args(argv)
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-frame-heads-"))
    path = args.cache or workdir / "frames.h5"
    try:
        if not labels_folder(path).is_dir() and path.exists():
            raise SystemExit(f"{path} has no label folder {labels_folder(path)}: it was not made by this script")
        ensure_cache(path, f"{args.videos} videos with per-row labels", lambda q: generate(q, args.videos, args.dim))
        common = dict(
            frame_labels=labels_folder(path),
            epochs=args.epochs,
            patience=0,
            plots=False,
            progress=False,
            device=args.device,
            threads=threads,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        t = time.perf_counter()
        data = load_labelled(path, build_config(workdir / "load", **common))  # read once, shared by every head
        load_s = time.perf_counter() - t
        rows = int(data.store.lengths.sum())

        results = []
        for head in args.heads:
            hidden = args.tcn_hidden if head == "tcn" and args.tcn_hidden else args.hidden
            out = workdir / "runs" / head
            print(f"training {head} ...", file=sys.stderr, flush=True)
            run = train_head(path, out, data=data, head=head, hidden=hidden, **common)
            s = run.summary
            seconds = train_seconds(out)
            cfg = build_config(out, head=head, hidden=hidden, **common)
            results.append(
                {
                    "head": head,
                    "shape": f"{cfg.hidden}" + (f" x {cfg.layers} x {cfg.stages}" if head == "tcn" else ""),
                    "params": s["parameters"],
                    "epoch_s": min(seconds[1:]) if len(seconds) > 1 else seconds[0],
                    "epochs": seconds,
                    **{k: s[k] for k in ("acc", "edit", "f1@10", "f1@25", "f1@50")},
                }
            )

        device = pick_device(args.device)
        print()
        print(
            f"Heads that label frames on a synthetic cache: {len(data.store.keys):,} videos ({len(data.split.train):,} "
            f"train / {len(data.split.val):,} val), {rows:,} rows of {data.spec.dim} {data.dtype}, {len(CLASSES)} "
            f"classes ({PAIRS} pairs that differ only in order); {args.epochs} epoch{'s' * (args.epochs > 1)} each, "
            f"batch {build_config(workdir, **common).batch_size} whole videos, on {device}; cache read once in "
            f"{load_s:.1f} s"
        )
        print(f"{threads} threads on {machine(device)}; load average {load_average()}")
        print()
        base = next((r["epoch_s"] for r in results if r["head"] == "lstm"), None)
        print(
            "| head | hidden (x layers x stages) | parameters | s / epoch (train) | vs lstm | val frame acc | edit | "
            "F1@10 | F1@25 | F1@50 |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            ratio = f"{r['epoch_s'] / base:.2f}x" if base else "-"
            print(
                f"| {r['head']} | {r['shape']} | {r['params']:,} | {r['epoch_s']:.2f} | {ratio} | {r['acc']:.1%} "
                f"| {r['edit']:.1%} | {r['f1@10']:.1%} | {r['f1@25']:.1%} | {r['f1@50']:.1%} |"
            )
        print()
        print(
            "s / epoch: "
            + ("the fastest epoch after the first" if args.epochs > 1 else "the one epoch")
            + " (train part of metrics.csv); scores: the best epoch's, on the val videos. Epochs: "
            + "; ".join(f"{r['head']} " + ", ".join(f"{s:.2f}" for s in r["epochs"]) for r in results)
        )
    finally:
        if args.cache is None and args.keep:
            print(f"kept {path} and {labels_folder(path)}", file=sys.stderr)
            shutil.rmtree(workdir / "runs", ignore_errors=True)
            shutil.rmtree(workdir / "load", ignore_errors=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
