"""What the benchmark scripts share: the machine they ran on, the load, a generated cache.

The scripts import it from beside them."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pipeline.data.synthetic import synthetic_spec, write_feature_cache
from pipeline.runtime import cpu_count

PROGRESS_EVERY = 500  # generated videos between two progress lines


def machine(device: torch.device | None = None) -> str:
    """CPU model, usable cores, torch version, and the GPU's name when `device` is a CUDA one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {cpu_count()} cores; torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        text += f"; {torch.cuda.get_device_name(device)}"
    return text


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ('?' where the system has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def write_resnet50_sized(path: Path, videos: Iterable[tuple], dim: int, total: int | None = None) -> None:
    """Write generated (key, features (T, dim), label, split) videos as a float16 cache whose spec names ResNet-50
    (the default backbone), streamed video by video, with a progress line every PROGRESS_EVERY videos."""

    def counted():
        for i, video in enumerate(videos, start=1):
            yield video
            if i % PROGRESS_EVERY == 0:
                print(f"  generated {i}/{total or '?'} videos", file=sys.stderr, flush=True)

    spec = synthetic_spec(dim, backbone="resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")
    write_feature_cache(path, counted(), spec, dtype="float16")


def ensure_cache(path: Path, what: str, generate: Callable[[Path], None]) -> None:
    """Run `generate(path)` unless the cache exists, saying what and how long on stderr."""
    if path.exists():
        return
    print(f"generating {what} into {path} ...", file=sys.stderr)
    t = time.perf_counter()
    generate(path)
    print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
