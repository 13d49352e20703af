"""GPU check: ResNet-50 extraction on CUDA (speed against forward-only) and CUDA features against CPU features.

Nothing is downloaded: weights are the seeded random initialisation ('none'), so the CPU and CUDA models are identical.
Run it through bench/gpu_check.sh, which checks the environment first; exit status 0 means every check passed.

    python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cpu --resolutions 320x240 --clips 2 --frames 16   # a dry run without a GPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from extract import machine, make_videos, measure, parse_resolution  # bench/extract.py, beside this script

from pipeline.data.cache import open_cache
from pipeline.extract import run
from pipeline.extract.backbone import pick_device

MODEL = "resnet50"


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
    args = p.parse_args(argv)
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # weights 'none' is the point here: no warning

    device = pick_device(args.device)
    batch_size = args.batch_size or (8 if device.type == "cpu" else 64)
    print(f"machine: {machine(device)}")
    print(f"{MODEL} (weights none, seed fixed) on {device}, batch size {batch_size}, decode workers "
          f"{args.workers if args.workers is not None else run._default_workers(device)}, features stored as float32; "
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

    print()
    print(f"{'model':<9} {'resolution':>10} {'frames':>6} {'e2e frames/s':>13} {'forward frames/s':>17} {'ratio':>6} "
          f"{'min cosine':>11} {'rows':>5}")
    for row, cosine, rows in results:
        print(f"{row.model:<9} {row.resolution:>10} {row.frames:>6} {row.e2e_fps:>13.1f} {row.forward_fps:>17.1f} "
              f"{row.ratio:>6.2f} {cosine:>11.6f} {rows:>5}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nOK: every video extracted on {device}; every compared row has cosine >= {args.min_cosine} with the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
