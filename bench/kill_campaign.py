"""Kill campaign: real `pipeline extract` runs killed at random moments, then rerun; nothing may be left behind.

Each trial starts the command a user types on generated videos, SIGKILLs at a random moment either the main process
(as the OOM killer or a scheduler's preemption would) or one random decode worker (as a codec's crash would), and
then reruns the same command. It counts the processes of the run still alive 2 s after a main-process kill, the
exit codes, reruns refused (a lock still held), and videos whose features differ from an uninterrupted run's bytes.

    python bench/kill_campaign.py                      # 20 trials: 10 main-process kills, 10 worker kills
    python bench/kill_campaign.py --trials 6 --videos 8
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine  # bench/common.py, beside this script

import pipeline
from pipeline.sample import write_video

ARGS = ["--backbone", "resnet18", "--weights", "none", "--resize", "112", "--crop", "112", "--batch-size", "8", "-q"]


def frame(i: int, k: int, width: int = 160, height: int = 120):
    import numpy as np

    rng = np.random.default_rng(1000 * k + i)
    image = np.full((height, width, 3), 40 + 10 * k, np.uint8)
    x = (i * 5) % (width - 24)
    image[20:60, x : x + 24] = rng.integers(0, 256, 3)
    return image


def children(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = _state(int(entry))
            if state is not None:
                parent_of[int(entry)] = state[0]
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for child, parent in parent_of.items():
            if parent == p:
                found.append(child)
                todo.append(child)
    return found


def _state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if (s := _state(p)) is not None and s[1] != "Z"]


def launch(videos: Path, out: Path, workers: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "extract", str(videos), "-o", str(out), *ARGS]
    return subprocess.Popen(
        [*command, "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def features(cache: Path) -> dict[str, bytes]:
    c = pipeline.open_cache(cache)
    return {k: c.features(k).tobytes() + c.frame_indices(k).tobytes() for k in c.keys()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="half kill the main process, half a decode worker")
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_campaign_"))
    try:
        videos = root / "videos"
        for k in range(args.videos):
            suffix = (".avi", ".mp4")[k % 2]
            write_video(videos / f"c{k % 3}" / f"v{k}{suffix}", [frame(i, k) for i in range(args.frames + 3 * k)])
        started = time.perf_counter()
        ref = launch(videos, root / "ref.h5", args.workers)
        assert ref.wait() == 0, ref.stderr.read().decode()
        duration = time.perf_counter() - started
        reference = features(root / "ref.h5")
        print(f"{machine()}\nreference run: {len(reference)} videos in {duration:.1f}s\n")
        header = ("trial", 5), ("kill", 6), ("at s", 5), ("survivors", 9), ("run exit", 8), ("rerun exit", 10)
        print(" ".join(f"{name:>{width}}" for name, width in header) + " identical")
        totals = {"survivors": 0, "refused": 0, "identical": 0, "trials": 0}
        for trial in range(args.trials):
            target = "main" if trial % 2 == 0 else "worker"
            out = root / f"t{trial}.h5"
            proc = launch(videos, out, args.workers)
            at = rng.uniform(0.3, duration * 0.9)
            deadline = time.monotonic() + at
            below: list[int] = []
            while time.monotonic() < deadline and proc.poll() is None:
                below = children(proc.pid) or below
                time.sleep(0.01)
            survivors, run_exit = [], "-"
            if proc.poll() is not None:
                run_exit = str(proc.returncode)  # it finished before the kill
            elif target == "main":
                proc.kill()
                proc.wait()
                time.sleep(2.0)
                survivors = alive(below)
                for pid in survivors:
                    os.kill(pid, signal.SIGKILL)
                run_exit = "killed"
            else:
                workers = alive(children(proc.pid))
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                run_exit = str(proc.wait())  # 3: the worker's video failed, the rest went on
            rerun = launch(videos, out, args.workers)
            rerun_exit = rerun.wait()
            err = rerun.stderr.read().decode()
            refused = "another extraction is writing" in err
            got = features(out) if rerun_exit == 0 else {}
            same = sum(got.get(k) == v for k, v in reference.items())
            identical = same == len(reference)
            totals["survivors"] += len(survivors)
            totals["refused"] += refused
            totals["identical"] += identical
            totals["trials"] += 1
            print(
                f"{trial:>5} {target:>6} {at:>5.1f} {len(survivors):>9} {run_exit:>8} {rerun_exit:>10} "
                f"{same:>4}/{len(reference):<4}"
            )
        print(
            f"\n{totals['identical']}/{totals['trials']} reruns bytes-identical to the uninterrupted run, "
            f"{totals['survivors']} surviving processes, {totals['refused']} refused reruns"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
