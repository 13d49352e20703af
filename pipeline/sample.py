"""A generated sample dataset whose classes differ only in the ORDER of their frames.

Every clip shows a bright square at n positions across a dark frame, growing from left to right as if it approached
(random colours, height and path per clip). The four classes play the very same frames in four orders (the square goes
right, goes left, goes out and comes back, comes back and goes out), so any order-blind model (a mean over frames) is at
chance, while a temporal model can tell them apart. The growth makes the order visible even to a randomly initialised
CNN, whose pooled features barely register where a square is but do register how much of the frame it covers.

    pipeline demo            # generates this sample, extracts it, trains an LSTM and a mean-pool head
"""

from __future__ import annotations

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
