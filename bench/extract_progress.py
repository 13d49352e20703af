"""The extraction bar's first total on a folder mixing frame folders (PNG), MJPG .avi and mp4v .mp4 videos: the
frame-count estimate of pipeline/extract/progress.py against the rows a full decode keeps, and against the earlier
estimate from bytes (the rows per byte of the first finished video, applied to the bytes of the others).

    python bench/extract_progress.py                      # 800 inputs of 5-40 frames
    python bench/extract_progress.py --inputs 200 --fps 5
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from common import machine  # bench/common.py, beside this script

from pipeline.extract.decode import FrameSelector, open_source
from pipeline.extract.inputs import discover
from pipeline.extract.progress import Progress
from pipeline.spec import Sampling

SIZE = (96, 72)


def frames(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8) for _ in range(n)]


def make_inputs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(5, 41))
        kind = i % 3
        if kind == 0:
            folder = root / f"input_{i:04d}"
            folder.mkdir(parents=True)
            for j, image in enumerate(frames(rng, n)):
                cv2.imwrite(str(folder / f"img_{j:04d}.png"), image)
            continue
        path, fourcc = (root / f"input_{i:04d}.avi", "MJPG") if kind == 1 else (root / f"input_{i:04d}.mp4", "mp4v")
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, SIZE)
        for image in frames(rng, n):
            writer.write(image)
        writer.release()


def kept_rows(item, sampling: Sampling) -> int:
    source = open_source(item.path, sampling.frames_fps)
    keep = FrameSelector(sampling, source.count() if sampling.num_frames else None)
    return sum(1 for index, t, _ in source.frames(lambda i, t: False) if keep(index, t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=800)
    p.add_argument("--fps", type=float, default=None, help="extract's --fps (default: every frame)")
    args = p.parse_args(argv)
    sampling = Sampling(fps=args.fps)
    root = Path(tempfile.mkdtemp(prefix="bench-progress-"))
    try:
        make_inputs(root, args.inputs)
        items = discover([root])
        truth = [kept_rows(item, sampling) for item in items]
        t = time.perf_counter()
        progress = Progress(items, sampling, enabled=False)
        first = None
        while not progress.probed.wait(0.005):
            if first is None and progress.total is not None:
                first = (time.perf_counter() - t, progress.total)
        done_s = time.perf_counter() - t
        first = first or (done_s, progress.total)
        progress.close()
        sizes = [max(item.signature()[0], 1) for item in items]
        by_bytes = truth[0] + sum(sizes[1:]) * truth[0] / sizes[0]
        print(f"machine: {machine()}")
        print(
            f"{len(items)} inputs (frame folders, MJPG, mp4v), {sum(truth):,} rows ({sampling.describe()}): "
            f"first total {first[1]:,} after {first[0]:.3f} s ({100 * (first[1] / sum(truth) - 1):+.1f}%), "
            f"{progress.total:,} when every input is probed after {done_s:.2f} s "
            f"({100 * (progress.total / sum(truth) - 1):+.1f}%); from bytes after the first video: {by_bytes:,.0f} "
            f"({100 * (by_bytes / sum(truth) - 1):+.1f}%)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
