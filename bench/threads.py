"""The `pipeline` command with and without OMP_WAIT_POLICY=PASSIVE, idle and next to a CPU-heavy process.

Runs a short `pipeline train-head` (3 epochs) and a short `pipeline extract` (MobileNetV2 on a folder of images) as
the user would, in a fresh process each time, with the variable unset: with this package (which then sets PASSIVE
itself) and, with --before, with a checkout of the package from before it did (OpenMP's own default: idle threads
spin for a while before they sleep). "loaded" runs them next to one busy process (a Python loop on one core).

    python bench/order_task.py                     # once: makes the cache and the image folder this script uses
    python bench/threads.py --repeats 2 --before ../old-checkout
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, machine  # bench/common.py, beside this script

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "order_task"
BUSY = "while True:\n    pass\n"


def timed(command: list[str], env: dict, cwd: Path) -> float:
    """Seconds `command` ran. It runs in `cwd`, away from any checkout: `python -m` puts the working directory
    before PYTHONPATH, and the variant's PYTHONPATH must choose the package."""
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=WORK / "order_15-30.h5")
    parser.add_argument("--images", type=Path, default=WORK / "pool")
    parser.add_argument("--before", type=Path, help="a checkout of the package from before it set the variable")
    args = parser.parse_args()
    args.cache, args.images = args.cache.resolve(), args.images.resolve()
    if not args.cache.is_file() or not args.images.is_dir():
        sys.exit(f"{args.cache} or {args.images} is missing: run bench/order_task.py first")
    tmp = Path(tempfile.mkdtemp(prefix="threads-"))
    pipeline = [sys.executable, "-m", "pipeline"]
    workloads = {
        "train-head, 3 epochs": [
            *pipeline,
            "train-head",
            str(args.cache),
            "--out",
            str(tmp / "run"),
            "--epochs",
            "3",
            "--no-plots",
            "-q",
        ],
        "extract, MobileNetV2": [
            *pipeline,
            "extract",
            str(args.images),
            "-o",
            str(tmp / "c.h5"),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            "IMAGENET1K_V1",
            "--overwrite",
            "-q",
        ],
    }
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    base.setdefault("TORCH_HOME", str(HERE / ".cache" / "torch"))
    variants = {"unset, this package (PASSIVE)": {**base, "PYTHONPATH": str(HERE.parent)}}
    if args.before is not None:
        variants["unset, before (OpenMP default)"] = {**base, "PYTHONPATH": str(args.before.resolve())}
    print(f"machine: {machine()}; load average before: {load_average()}")
    for condition in ("idle", "loaded"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if condition == "loaded" else None
        try:
            for name, command in workloads.items():
                for variant, env in variants.items():
                    times = []
                    for _ in range(args.repeats):
                        for old in ("c.h5", "c.h5.parts", "run"):  # every run starts from nothing
                            shutil.rmtree(tmp / old, ignore_errors=True)
                            (tmp / old).unlink(missing_ok=True) if (tmp / old).is_file() else None
                        times.append(timed(command, env, tmp))
                    print(
                        f"  {condition:<6} {name:<22} {variant:<34} " + ", ".join(f"{t:.1f}s" for t in times),
                        flush=True,
                    )
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    print(f"load average after: {load_average()}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
