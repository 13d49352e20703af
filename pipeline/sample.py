"""Generated sample datasets (real short videos) for the demos: one whose classes differ only in the ORDER of their
frames, and one with a label per frame whose segments differ only in the order of their frames.

The order sample (`make_order_sample`): every clip shows a bright square at n positions across a dark frame, growing
from left to right as if it approached (random colours, height and path per clip). The four classes play the very same
frames in four orders (the square goes right, goes left, goes out and comes back, comes back and goes out), so any
order-blind model (a mean over frames) is at chance, while a temporal model can tell them apart. The growth makes the
order visible even to a randomly initialised CNN, whose pooled features barely register where a square is but do
register how much of the frame it covers.

The segment sample (`make_segment_sample`): every video (40-80 frames) is a random sequence of segments of 8-20
frames, each labelled idle (the dark, noisy background alone), approach (a bright square grows from a small to a large
side) or leave (a square shrinks: the same sizes played backwards), never one class twice in a row. Each segment draws
its own square (shade, centre, sizes), so approach and leave show the same kind of frames in opposite orders: a head
that labels each frame alone (meanpool) confuses them, while a temporal head (tcn, bilstm) reads the direction of the
change. Ground truth comes as per-frame label files (groundTruth/<video>.txt) and as a segments CSV (frames).

    pipeline demo            # the order sample: an LSTM and a mean-pool head
    pipeline demo --frames   # the segment sample: a tcn and a per-frame mean-pool head
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("left_to_right", "right_to_left", "out_and_back", "back_and_out")


def class_order(label: str, n: int) -> list[int]:
    """The order in which a clip of class `label` shows its n positions (a permutation of range(n)).

    Position 0 is the leftmost (smallest) square: the classes rise, fall, rise then fall, and fall then rise."""
    forward = list(range(n))
    evens, odds = forward[0::2], forward[1::2]
    if label == "left_to_right":
        return forward
    if label == "right_to_left":
        return forward[::-1]
    if label == "out_and_back":  # out to the right over the even positions, back over the odd ones
        return evens + odds[::-1]
    if label == "back_and_out":  # from the right back to the left over the odd positions, out again over the even ones
        return odds[::-1] + evens
    raise ValueError(f"unknown sample class {label!r}")


def clip_frames(rng: np.random.Generator, n: int, width: int, height: int) -> list[np.ndarray]:
    """n RGB frames (H, W, 3) uint8 of one clip, in left-to-right order of the square (which grows on its way)."""
    background = rng.integers(0, 112, 3)
    colour = rng.integers(200, 256, 3)
    sides = np.linspace(height / 8, height / 2, n).round().astype(int)
    y_centre = int(rng.integers(height // 4, height - height // 4))
    left, right = int(rng.integers(0, width // 8)), width - int(rng.integers(0, width // 8))
    noise = rng.integers(-12, 13, (height, width, 3))
    frames = []
    for j, side in enumerate(sides):
        x = round(left + (right - side - left) * j / max(n - 1, 1))
        y = min(max(y_centre - side // 2, 0), height - side)
        frame = np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)
        frame[y : y + side, x : x + side] = colour
        frames.append(frame)
    return frames


def write_video(path: Path, frames_rgb: list[np.ndarray], fps: float = 10.0) -> None:
    """Write RGB frames as MJPG .avi or mp4v .mp4 (the codecs every OpenCV wheel can write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for frame in frames_rgb:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def make_order_sample(
    out: str | Path,
    per_class: int = 24,
    frames: int = 16,
    width: int = 128,
    height: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> list[Path]:
    """Write out/<class>/clip_<k>.avi for every class; returns the paths. Same seed -> same files."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(per_class):
        base = clip_frames(rng, frames, width, height)
        for label in classes:
            path = out / label / f"clip_{k:03d}.avi"
            write_video(path, [base[j] for j in class_order(label, frames)])
            paths.append(path)
    return paths


SEGMENT_CLASSES = ("idle", "approach", "leave")


def segment_plan(
    rng: np.random.Generator, frames: tuple[int, int], segment: tuple[int, int], classes: tuple[str, ...]
) -> list[tuple[str, int]]:
    """A random sequence of (class, length) segments: n frames in all (n drawn from `frames`), each segment of
    `segment[0]`..`segment[1]` frames, and no class twice in a row (neighbours of one class would be one segment)."""
    low, high = segment
    if low < 1 or high < 2 * low - 1:
        raise ValueError(f"segment lengths {segment}: need 1 <= low and high >= 2 * low - 1, so any total can be cut")
    if frames[0] < low or frames[1] < frames[0]:
        raise ValueError(f"video lengths {frames}: need {low} <= the shortest <= the longest")
    n = int(rng.integers(frames[0], frames[1] + 1))
    plan: list[tuple[str, int]] = []
    total = 0
    while total < n:
        rest = n - total
        # the last segment takes what is left; before it, leave at least `low` frames for it
        length = rest if rest <= high else int(rng.integers(low, min(high, rest - low) + 1))
        previous = plan[-1][0] if plan else None
        label = str(rng.choice([c for c in classes if c != previous]))
        plan.append((label, length))
        total += length
    return plan


def segment_frames(
    rng: np.random.Generator, plan: list[tuple[str, int]], width: int, height: int
) -> tuple[list[np.ndarray], list[str]]:
    """The RGB frames (H, W, 3) uint8 of one video that plays `plan`, and the label of every frame.

    One background colour and noise pattern per video (plus a little fresh noise per frame). Each approach or leave
    segment has its own square (a bright shade, its centre, its smallest and largest side): approach grows it from
    the smallest to the largest side over the segment, leave plays the very same sizes backwards."""
    background = rng.integers(16, 72, 3)
    still = rng.integers(-12, 13, (height, width, 3))
    frames, labels = [], []
    for label, length in plan:
        sides = np.zeros(length, dtype=int)
        if label != "idle":
            small = rng.uniform(0.15, 0.25) * height
            large = rng.uniform(0.6, 0.9) * height
            sides = np.linspace(small, large, length).round().astype(int)
            if label == "leave":
                sides = sides[::-1]
            elif label != "approach":
                raise ValueError(f"unknown segment class {label!r}")
            colour = rng.integers(220, 256, 3)
            cx = rng.uniform(0.3, 0.7) * width
            cy = rng.uniform(0.3, 0.7) * height
        for side in sides:
            noise = still + rng.integers(-6, 7, (height, width, 3))
            frame = np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)
            if side > 0:
                x = min(max(round(cx - side / 2), 0), width - side)
                y = min(max(round(cy - side / 2), 0), height - side)
                frame[y : y + side, x : x + side] = colour
            frames.append(frame)
            labels.append(label)
    return frames, labels


def make_segment_sample(
    out: str | Path,
    videos: int = 24,
    seed: int = 0,
    frames: tuple[int, int] = (40, 80),
    segment: tuple[int, int] = (8, 20),
    width: int = 96,
    height: int = 72,
    fps: float = 10.0,
) -> list[Path]:
    """Write out/videos/video_<k>.avi, their per-frame labels out/groundTruth/video_<k>.txt (one label per frame,
    one per line) and the same as segments, out/segments.csv (key,start,end,label in frame numbers, end exclusive);
    returns the video paths. Same seed -> same files."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "groundTruth").mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for k in range(videos):
        plan = segment_plan(rng, frames, segment, SEGMENT_CLASSES)
        images, labels = segment_frames(rng, plan, width, height)
        path = out / "videos" / f"video_{k:03d}.avi"
        write_video(path, images, fps=fps)
        (out / "groundTruth" / f"{path.stem}.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        start = 0
        for label, length in plan:
            rows.append((path.name, start, start + length, label))
            start += length
        paths.append(path)
    with open(out / "segments.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "start", "end", "label"])
        writer.writerows(rows)
    return paths
