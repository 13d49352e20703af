"""Test helpers: tiny generated videos and frame folders, synthetic feature caches, small fast settings.

Imported by the tests as `from helpers import ...` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.sample import write_video

# The same as command-line arguments.
FAST_ARGS = ["--backbone", "resnet18", "--weights", "none", "--resize", "64", "--crop", "56"]

# Small settings that keep a ResNet-18 forward at about a millisecond a frame.
FAST = dict(backbone="resnet18", weights="none", resize=64, crop=56, progress=False, workers=0)


def pattern_frame(i: int, width: int = 96, height: int = 72) -> np.ndarray:
    """An RGB frame unique to index i: a red-dominant background (so BGR/RGB mix-ups change it a lot), a bright
    block whose position and colour depend on i, and a gradient so crops and flips are visible."""
    rng = np.random.default_rng(1000 + i)
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 0] = 200
    frame[..., 1] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    frame[..., 2] = np.linspace(0, 60, height, dtype=np.uint8)[:, None]
    x = (i * 7) % (width - 20)
    frame[10:40, x : x + 20] = rng.integers(0, 256, 3)
    return frame


def make_video(path: Path, n: int, fps: float = 25.0, width: int = 96, height: int = 72, offset: int = 0) -> Path:
    write_video(path, [pattern_frame(offset + i, width, height) for i in range(n)], fps=fps)
    return path


def make_frame_folder(
    folder: Path, n: int, ext: str = ".png", width: int = 96, height: int = 72, name: str = "img_{}"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(
            str(folder / (name.format(i + 1) + ext)), cv2.cvtColor(pattern_frame(i, width, height), cv2.COLOR_RGB2BGR)
        )
    return folder


def decode_all_rgb(path: Path) -> list[np.ndarray]:
    """Independent reference decode: every frame, BGR -> RGB, straight from OpenCV."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[:, :, ::-1].copy())
    cap.release()
    return frames


def separable_videos(
    seed: int = 0, classes: int = 3, per_class: int = 8, dim: int = 16, lengths: tuple[int, int] = (5, 12)
) -> list[tuple]:
    """(key, features (T, D), label, split) of videos whose class shows in every frame (a class mean plus noise),
    with lengths drawn from [lengths[0], lengths[1]]."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(1234).normal(0, 2.0, (classes, dim))
    videos = []
    for c in range(classes):
        for k in range(per_class):
            t = int(rng.integers(lengths[0], lengths[1] + 1))
            videos.append((f"class{c}/vid_{k:03d}.mp4", means[c] + rng.normal(0, 1.0, (t, dim)), f"class{c}", None))
    return videos


def order_videos(seed: int = 0, base_clips: int = 24, frames: int = 16, dim: int = 32) -> list[tuple]:
    """The order-only sample as features: every base clip's frames (a per-clip offset plus a smooth code of the
    position along the path, plus noise) appear in the four class orders of pipeline.sample."""
    from pipeline.sample import CLASSES, class_order

    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(0, 1.0, dim)
    position = np.linspace(0.0, 1.0, frames)[:, None]
    videos = []
    for k in range(base_clips):
        base = rng.normal(0, 1.0, dim) + 2.0 * position * direction + rng.normal(0, 0.05, (frames, dim))
        for label in CLASSES:
            videos.append((f"{label}/clip_{k:03d}.avi", base[class_order(label, frames)], label, None))
    return videos


def feature_cache(path: Path, videos: list[tuple], dtype: str = "float16", **spec_fields) -> Path:
    """Write `videos` as a feature cache of a synthetic spec (its fields overridable to build mismatches)."""
    from pipeline.data.synthetic import synthetic_spec, write_feature_cache

    dim = videos[0][1].shape[1]
    return write_feature_cache(path, videos, synthetic_spec(dim, **spec_fields), dtype=dtype)


# A sweep trial: a few epochs of a small head on 18 short sequences (a tenth of a second or so), and quiet settings.
SWEEP_TRIAL = ["epochs=3", "batch_size=8", "clip_len=5"]
SWEEP_QUICK = {"threads": 2, "progress": False, "plots": False}


def study_trials(out: Path, name: str | None = None):
    """The Optuna trials of the sweep in `out` (its study.db; the study is named after the folder by default)."""
    import optuna

    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    return optuna.load_study(study_name=name or out.name, storage=storage).get_trials()


def metric_rows(run: Path) -> list[dict]:
    """A run folder's metrics.csv, one dict per epoch."""
    import csv

    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


# Small, fast head settings for tests (a few epochs of a 32-wide head on a few dozen short sequences).
TINY_HEAD = dict(
    hidden=32, epochs=12, batch_size=8, lr=1e-2, clip_len=5, patience=0, progress=False, plots=False, threads=2
)


def segment_videos(
    seed: int = 0,
    videos: int = 16,
    classes: int = 3,
    dim: int = 16,
    rows: tuple[int, int] = (30, 50),
    noise: float = 1.0,
) -> tuple[list[tuple], dict[str, list[str]]]:
    """Videos made of segments (4-12 rows each) of classes act0, act1, ... in a random order: (key, features (T, D),
    None, None) tuples whose rows show their segment's class (a class mean plus noise), and key -> the label of
    every row."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(4321).normal(0, 2.0, (classes, dim))
    out, labels = [], {}
    for v in range(videos):
        n = int(rng.integers(rows[0], rows[1] + 1))
        row_class = []
        while len(row_class) < n:
            c = int(rng.integers(classes))
            if row_class and c == row_class[-1]:
                continue
            row_class += [c] * int(rng.integers(4, 13))
        row_class = np.array(row_class[:n])
        key = f"vid_{v:03d}.mp4"
        out.append((key, means[row_class] + rng.normal(0, noise, (n, dim)), None, None))
        labels[key] = [f"act{c}" for c in row_class]
    return out, labels


def write_label_folder(folder: Path, labels: dict[str, list[str]]) -> Path:
    """One file per video, KEY-without-extension.txt, one label per line (the segmentation datasets' format)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, rows in labels.items():
        (folder / (Path(key).stem + ".txt")).write_text("\n".join(rows) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ processes of a run
def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def survivors(pids: list[int], within_s: float) -> list[int]:
    """The processes of `pids` still running (zombies have exited) after waiting up to `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in pids if (stat := _stat(p)) is not None and stat[1] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_mid_run(proc, ready, children: int = 1, timeout_s: float = 120) -> list[int]:
    """SIGKILL `proc` (only the main process, as the OOM killer would) once `ready()` holds and it has at least
    `children` processes below it; returns the processes of the run still alive 2 s later (after killing them,
    so that a failing test leaves nothing behind)."""
    start = time.monotonic()
    below: list[int] = []
    while proc.poll() is None and time.monotonic() - start < timeout_s:
        below = descendants(proc.pid)
        if len(below) >= children and ready():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-run"
    proc.kill()
    proc.wait()
    left = survivors(below, within_s=2.0)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left
