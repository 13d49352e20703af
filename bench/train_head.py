"""Training heads on a UCF101-sized cache: seconds per epoch against the machine's matmul limit, a naive per-sample
h5py DataLoader, and the frozen-ResNet-50-every-epoch recipe this project replaces; peak memory against the cache size.

    python bench/train_head.py                          # 9,500 videos x ~180 rows x 2048 float16 (~6.5 GB on disk)
    python bench/train_head.py --videos 1000 --keep     # a quick run; --cache PATH reuses a generated cache
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import ensure_cache, machine, write_resnet50_sized  # bench/common.py, beside this script
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import HEAD_BATCH, HEAD_HIDDEN, TrainConfig, default_of
from pipeline.data.cache import open_cache, video_id
from pipeline.data.sequences import batches, feature_stats, load_sequences, train_plans
from pipeline.runtime import cpu_count
from pipeline.train_head.model import HeadDims, build_head
from pipeline.train_head.train import ClassifyVideos, make_optimizer, train_one_epoch, warmup_cosine

UCF101_VIDEOS, UCF101_CLASSES, MEAN_ROWS = 9_500, 101, 180  # UCF101 split 1 train+test: 13,320 clips of ~7 s
NOISE_BANK_ROWS = 8192  # generated rows are slices of one random bank plus a class mean: fast, still learnable


# ------------------------------------------------------------------------------------------------------ the cache
def generate(path: Path, videos: int, dim: int, classes: int, seed: int = 0) -> None:
    """A cache of `videos` sequences of 120..240 rows (mean 180) in float16, streamed video by video."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((NOISE_BANK_ROWS, dim), dtype=np.float32)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * 0.5

    def rows():
        for i in range(videos):
            c = i % classes
            t = int(rng.integers(MEAN_ROWS - 60, MEAN_ROWS + 61))
            start = int(rng.integers(0, NOISE_BANK_ROWS - t))
            yield f"class{c:03d}/video_{i:05d}", bank[start : start + t] + means[c], f"class{c:03d}", None

    write_resnet50_sized(path, rows(), dim, videos)


# ---------------------------------------------------------------------------------------------------- measures
def matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """float32 GEMM throughput of this machine with `threads` threads (best of a few runs)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * n**3 / best / 1e9


def epoch_flops(frames: int, videos: int, dim: int, hidden: int, classes: int) -> tuple[float, float]:
    """(projection, LSTM + classifier) FLOPs of one training epoch, forward and backward.

    Projection: forward 2*D*H per frame and the weight gradient 2*D*H (the cached features need no gradient).
    LSTM: 4 gates of (H + H) x H per step, 2 FLOPs per MAC: 16*H^2 forward, twice that backward.
    """
    projection = 4.0 * dim * hidden * frames
    recurrence = 48.0 * hidden * hidden * frames + 6.0 * hidden * classes * videos
    return projection, recurrence


def new_model(dim: int, classes: int, hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_head(
        HeadDims(
            head="lstm",
            in_dim=dim,
            num_classes=classes,
            hidden=hidden,
            layers=1,
            dropout=default_of(TrainConfig, "dropout"),
            activation="gelu",
        )
    )


def time_epochs(store, y: np.ndarray, args, epochs: int) -> list[float]:
    """Seconds of each epoch of the library's own training loop (RAM store, random clips, AdamW, cosine)."""
    model = new_model(store.dim, args.classes, args.hidden)
    model.proj[0].set_stats(*feature_stats(store, np.arange(len(store.keys))))
    optimizer = make_optimizer(model, 1e-3, 0.01)
    steps = math.ceil(len(store.keys) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps * epochs))
    objective = ClassifyVideos(nn.CrossEntropyLoss())
    seconds = []
    for epoch in range(epochs):
        plans = train_plans(store.lengths, y, args.batch_size, args.clip_len, 1, np.random.default_rng([0, epoch]))
        t = time.perf_counter()
        stats = train_one_epoch(model, batches(store, plans), optimizer, scheduler, objective, torch.device("cpu"))
        seconds.append(time.perf_counter() - t)
        print(
            f"  epoch {epoch + 1}: {seconds[-1]:.2f} s, loss {stats['train_loss']:.3f}, clip accuracy "
            f"{stats['train_acc']:.1%}",
            file=sys.stderr,
            flush=True,
        )
    return seconds


class NaiveClips(Dataset):
    """What one would write first: one HDF5 read of one clip per sample, the file opened lazily in each worker."""

    def __init__(self, path: Path, ids: list[str], lengths: np.ndarray, y: np.ndarray, clip_len: int):
        self.path, self.ids, self.lengths, self.y, self.clip_len = path, ids, lengths, y, clip_len
        self.file = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        if self.file is None:
            self.file = h5py.File(self.path, "r")
        start = np.random.randint(0, self.lengths[i] - self.clip_len + 1)
        x = self.file["videos"][self.ids[i]]["features"][start : start + self.clip_len]
        return torch.from_numpy(x.astype(np.float32)), int(self.y[i])


def time_naive(path: Path, args, y: np.ndarray, lengths: np.ndarray, max_batches: int) -> tuple[float, int, int]:
    """Seconds of the naive loader + the same training step, for max_batches batches (0: a whole epoch).
    Returns (seconds, batches timed, batches per epoch)."""
    cache = open_cache(path)
    ids = [video_id(k) for k in cache]  # the HDF5 group of each video (videos/<id>), see docs/cache-format.md
    data = NaiveClips(path, ids, lengths, y, args.clip_len)
    loader = DataLoader(
        data, batch_size=args.batch_size, shuffle=True, num_workers=args.naive_workers, persistent_workers=False
    )
    model = new_model(cache.spec.dim, args.classes, args.hidden)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(loader)
    limit = per_epoch if max_batches <= 0 else min(max_batches, per_epoch)
    model.train()
    t = time.perf_counter()
    for n, (x, target) in enumerate(loader):
        if n == limit:
            break
        loss = loss_fn(model(x, torch.full((len(x),), x.shape[1])), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t, limit, per_epoch


def resnet50_seconds_per_frame(threads: int, batch: int = 8, repeats: int = 3) -> float:
    """Forward time of a frozen ResNet-50 per 224x224 frame (eval, inference mode, channels_last, as stage one)."""
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - t) / (repeats * batch)


def rss(field: str = "VmHWM") -> int:
    """Bytes of this process's resident memory: VmHWM is the peak so far, VmRSS the current size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, in KiB on Linux


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--videos", type=int, default=UCF101_VIDEOS, help="videos in the synthetic cache")
    p.add_argument("--dim", type=int, default=2048, help="feature size (ResNet-50: 2048)")
    p.add_argument("--classes", type=int, default=UCF101_CLASSES)
    p.add_argument("--hidden", type=int, default=HEAD_HIDDEN, help="LSTM head width")
    p.add_argument("--clip-len", type=int, default=default_of(TrainConfig, "clip_len"))
    p.add_argument("--batch-size", type=int, default=HEAD_BATCH)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (the first one also warms oneDNN up)")
    p.add_argument("--naive-batches", type=int, default=40, help="naive loader batches to time (0: a whole epoch)")
    p.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive loader")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: all cores")
    p.add_argument("--cache", type=Path, default=None, help="reuse (or create) the synthetic cache here")
    p.add_argument("--keep", action="store_true", help="keep a generated cache (default: delete it at the end)")
    args = p.parse_args(argv)
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)

    workdir = None
    path = args.cache
    if path is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-train-head-"))
        path = workdir / "ucf101_like.h5"
    try:
        ensure_cache(path, f"{args.videos} videos", lambda p: generate(p, args.videos, args.dim, args.classes))
        cache = open_cache(path)
        keys = cache.keys()
        labels = sorted(set(cache.labels().values()))
        y = np.array([labels.index(cache.label(k)) for k in keys], dtype=np.int64)
        args.classes = len(labels)
        rows = sum(cache.num_frames(k) for k in keys)
        cache_bytes = rows * cache.spec.dim * np.dtype(cache.dtype).itemsize

        # 1. the library's loop on the RAM store
        gc.collect()
        rss_before = rss("VmRSS")
        peak_before = matmul_gflops(threads)
        t = time.perf_counter()
        store = load_sequences(cache, keys, "ram", progress=False)
        load_s = time.perf_counter() - t
        seconds = time_epochs(store, y, args, args.epochs)
        rss_peak = rss("VmHWM")
        # the machine's limit: the better of two GEMM measurements around the epochs (other load only lowers it)
        peak = max(peak_before, matmul_gflops(threads))
        epoch_s = min(seconds[1:]) if len(seconds) > 1 else seconds[0]
        frames = int(np.minimum(store.lengths, args.clip_len).sum())
        projection, recurrence = epoch_flops(frames, len(keys), store.dim, args.hidden, args.classes)
        lengths = store.lengths.copy()
        del store
        gc.collect()

        limit_s = (projection + recurrence) / (peak * 1e9)

        # 2. the naive per-sample loader
        naive_s, naive_batches, per_epoch = time_naive(path, args, y, lengths, args.naive_batches)
        naive_epoch_s = naive_s * per_epoch / naive_batches

        # 3. the recipe: a frozen ResNet-50 on every frame of every clip, every epoch
        r50 = resnet50_seconds_per_frame(threads)
        recipe_s = frames * r50

        gib = 2**30
        print()
        print(
            f"Training heads on a synthetic UCF101-sized cache: {len(keys):,} videos, {rows:,} rows of "
            f"{cache.spec.dim} {cache.dtype} ({cache_bytes / gib:.2f} GiB); LSTM hidden {args.hidden}, clips of "
            f"{args.clip_len}, batch {args.batch_size}; {threads} threads on {machine()}"
        )
        print()
        table = [
            ("read the cache into RAM (once)", f"{load_s:.1f} s", ""),
            (
                "seconds per epoch (RAM store, library loop)",
                f"{epoch_s:.2f} s (epochs: {', '.join(f'{s:.2f}' for s in seconds)})",
                "",
            ),
            (
                "FLOPs per epoch, forward + backward",
                f"{(projection + recurrence) / 1e9:.0f} GFLOP (projection "
                f"{projection / 1e9:.0f}, LSTM {recurrence / 1e9:.0f})",
                "",
            ),
            ("matmul limit (2048^3 float32 GEMM)", f"{peak:.0f} GFLOP/s -> {limit_s:.2f} s per epoch", ""),
            ("share of the matmul limit", f"{limit_s / epoch_s:.0%}", ">= 60%"),
            (
                "naive per-sample h5py Dataset + DataLoader",
                f"{naive_epoch_s:.1f} s per epoch "
                f"({naive_batches}/{per_epoch} batches timed, {args.naive_workers} workers)",
                "",
            ),
            ("  naive / RAM store", f"{naive_epoch_s / epoch_s:.1f}x slower", ""),
            ("frozen ResNet-50 forward per 224 px frame", f"{r50 * 1000:.0f} ms", ""),
            ("recipe epoch: ResNet-50 on every clip frame", f"{recipe_s:,.0f} s ({frames:,} frames)", ""),
            ("  recipe / RAM store", f"{recipe_s / epoch_s:,.0f}x", ">= 1,000x"),
            (
                "peak RSS while training",
                f"{rss_peak / gib:.2f} GiB = {rss_peak / cache_bytes:.2f}x the float16 cache "
                f"(before loading: {rss_before / gib:.2f} GiB)",
                "<= 2x",
            ),
        ]
        width = max(len(r[0]) for r in table)
        vwidth = max(len(r[1]) for r in table)
        print(f"| {'measure':<{width}} | {'value':<{vwidth}} | target |")
        print(f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|--------|")
        for name, value, target in table:
            print(f"| {name:<{width}} | {value:<{vwidth}} | {target:<6} |")
    finally:
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir is not None:
            print(f"kept {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
