"""What the per-chunk Fletcher-32 checksums of the cache cost: writing, reading every video, and a head epoch that
reads from disk (`--memory lazy`) or loads the cache once (`--memory ram`), with and without checksums.

    python bench/checksums.py                       # 1,000 videos x ~180 rows x 2048 float16 (~0.7 GB per cache)
    python bench/checksums.py --videos 300 --cold   # smaller; drop the page cache before each read (root)

Both caches hold the same generated rows; the one without checksums is written as caches were before them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine  # bench/common.py, beside this script

import pipeline
from pipeline.data import cache as cache_format
from pipeline.data.synthetic import synthetic_spec, write_feature_cache


def generate(path: Path, videos: int, dim: int, checksums: bool) -> float:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((8192, dim)).astype(np.float32)

    def rows():
        for v in range(videos):
            t = int(rng.integers(120, 241))
            start = int(rng.integers(0, len(bank) - t))
            yield f"class{v % 20:02d}/video_{v:05d}.avi", bank[start : start + t], f"class{v % 20:02d}", None

    saved = cache_format.CHECKSUM
    cache_format.CHECKSUM = saved if checksums else {}
    try:
        started = time.perf_counter()
        write_feature_cache(path, rows(), synthetic_spec(dim))
        return time.perf_counter() - started
    finally:
        cache_format.CHECKSUM = saved


def drop_caches(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> float:
    started = time.perf_counter()
    cache = pipeline.open_cache(path)
    for key in cache:
        cache.features(key)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each read (needs root)")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="checksums_", dir=args.dir))
    try:
        rows = {}
        for checksums in (False, True):
            path = root / f"{'sum' if checksums else 'plain'}.h5"
            write = generate(path, args.videos, args.dim, checksums)
            reads, lazy, ram = [], [], []
            for _ in range(args.repeats):
                drop_caches(args.cold)
                reads.append(read_all(path))
                drop_caches(args.cold)
                started = time.perf_counter()
                pipeline.train_head(
                    path,
                    root / "run",
                    memory="lazy",
                    epochs=1,
                    patience=0,
                    workers=2,
                    progress=False,
                    plots=False,
                    overwrite=True,
                )
                lazy.append(time.perf_counter() - started)
                drop_caches(args.cold)
                started = time.perf_counter()
                pipeline.train_head(
                    path, root / "run", memory="ram", epochs=1, patience=0, progress=False, plots=False, overwrite=True
                )
                ram.append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in cache_format.parts_dir(path).iterdir())
            rows[checksums] = (write, min(reads), min(lazy), min(ram), size)
        print(machine())
        print(
            f"{args.videos} videos, {args.dim}-d float16, best of {args.repeats}, {'cold' if args.cold else 'warm'}"
            " page cache\n"
        )
        print(f"{'':<22}{'write s':>9}{'read all s':>12}{'lazy run s':>12}{'ram run s':>11}{'MB':>8}")
        for checksums, (write, read, lazy, ram, size) in rows.items():
            name = "fletcher32 chunks" if checksums else "no checksums"
            print(f"{name:<22}{write:>9.2f}{read:>12.2f}{lazy:>12.2f}{ram:>11.2f}{size / 1e6:>8.0f}")
        base, summed = rows[False], rows[True]
        print(
            "\nratio (checksums / none): "
            + ", ".join(
                f"{name} {summed[i] / base[i]:.3f}x"
                for i, name in enumerate(("write", "read all", "lazy run", "ram run"))
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
