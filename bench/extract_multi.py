"""Extraction with 1 process vs N torchrun ranks on the same inputs: speed-up and equality of the merged cache.

On a CPU each rank gets cores/N threads; on a machine with N GPUs each rank gets its own GPU (--device cuda).

    OMP_WAIT_POLICY=PASSIVE python bench/extract_multi.py --nprocs 1,2 --clips 16 --frames 48
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.cache import open_cache
from pipeline.runtime import cpu_count
from pipeline.sample import write_video


def make_videos(root: Path, clips: int, frames: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(clips):
        n = frames + int(rng.integers(-frames // 3, frames // 3 + 1))  # uneven lengths, as in real folders
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        clip = [np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8)) for i in range(n)]
        write_video(root / f"class{k % 4}" / f"clip{k:03d}.mp4", clip, fps=25.0)


def run(nproc: int, videos: Path, out: Path, args) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    common = [
        "extract",
        str(videos),
        "-o",
        str(out),
        "--backbone",
        args.backbone,
        "--weights",
        "none",
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "-q",
    ]
    if args.device == "cpu":
        common += ["--threads", str(max(1, args.threads // nproc))]
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline", *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "pipeline",
            *common,
        ]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts; the first is the baseline")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=cpu_count(), help="CPU threads in all, split between ranks")
    args = p.parse_args()
    nprocs = [int(x) for x in args.nprocs.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", args.clips, args.frames, args.width, args.height)
        rows, caches = [], {}
        for n in nprocs:
            out = tmp / f"n{n}.h5"
            seconds = run(n, tmp / "videos", out, args)
            cache = open_cache(out)
            frames = sum(cache.num_frames(k) for k in cache.keys())
            caches[n] = cache
            rows.append((n, frames, seconds))
        base = caches[nprocs[0]]
        print(
            f"\n{args.backbone} on {args.device}, {args.clips} clips {args.width}x{args.height}, "
            f"{cpu_count()} CPU cores, threads split between ranks"
        )
        print(
            f"{'processes':>9} {'frames':>7} {'wall s':>8} {'frames/s':>9} {'speed-up':>9} {'same keys':>10} "
            f"{'max |diff|':>11}"
        )
        for n, frames, seconds in rows:
            cache = caches[n]
            same = sorted(cache.keys()) == sorted(base.keys())
            diff = (
                max(
                    float(np.abs(cache.features(k).astype(np.float32) - base.features(k).astype(np.float32)).max())
                    for k in base.keys()
                )
                if same
                else float("nan")
            )
            print(
                f"{n:>9} {frames:>7} {seconds:>8.1f} {frames / seconds:>9.1f} {rows[0][2] / seconds:>8.2f}x "
                f"{str(same):>10} {diff:>11.2e}"
            )
        print("wall time includes start-up (imports, model build, torchrun rendezvous) and the final merge")


if __name__ == "__main__":
    main()
