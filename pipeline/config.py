"""Every user-facing setting and its default, in one place.

The CLI reads its defaults from these dataclasses, and `__post_init__` errors name the CLI flag to fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FEATURE_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")


def default_of(cls: type, name: str):
    """The default of dataclass field `name`: the CLI uses this so that no default is written twice."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


@dataclass(frozen=True)
class Sampling:
    """Which decoded frames become feature rows. Part of the feature spec: a cache holds one sampling."""

    fps: float | None = None
    """Keep at most one frame per 1/fps seconds, the first whose decoded timestamp enters each interval."""
    stride: int = 1
    """Keep every stride-th decoded frame (0, K, 2K, ...)."""
    max_frames: int | None = None
    """Keep at most this many frames per video (the first ones, after fps/stride)."""
    num_frames: int | None = None
    """Keep this many frames spread uniformly over the whole video (all frames if it has fewer)."""
    frames_fps: float = 30.0
    """Frame rate assumed for folders of images, which carry no timestamps of their own."""

    def __post_init__(self):
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        if self.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"--num-frames must be >= 1, got {self.num_frames}")
        if self.num_frames is not None and (self.fps is not None or self.stride != 1 or self.max_frames):
            raise ValueError("--num-frames picks frames uniformly over the whole video; "
                             "it cannot be combined with --fps, --stride or --max-frames")
        if self.fps is not None and self.stride != 1:
            raise ValueError("use either --fps or --stride, not both")
        if not self.frames_fps > 0:
            raise ValueError(f"--frames-fps must be > 0, got {self.frames_fps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of `pipeline extract`. Fields that change what a feature row means go into the feature spec."""

    output: Path
    """The cache file to create or resume (its finished parts live in OUTPUT.parts/ beside it)."""
    backbone: str = "resnet50"
    """Any torchvision classification model name (torchvision.models.list_models(module=torchvision.models))."""
    weights: str = "DEFAULT"
    """A torchvision weights name (DEFAULT, IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1), a local
    state-dict file, or 'none' for a random (seeded) initialisation."""
    resize: int | None = None
    """Resize the shorter side to this many pixels; default: the weights' own value."""
    crop: int | None = None
    """Centre-crop size; default: the weights' own value."""
    mean: tuple[float, float, float] | None = None
    """RGB normalisation mean; default: the weights' own value."""
    std: tuple[float, float, float] | None = None
    """RGB normalisation std; default: the weights' own value."""
    sampling: Sampling = field(default_factory=Sampling)
    dtype: str = "float16"
    """Storage dtype of the features on disk."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    batch_size: int | None = None
    """Frames per forward pass, spanning video boundaries; default 8 on CPU, 64 on accelerators."""
    workers: int | None = None
    """Decode/preprocess worker processes; default 1 on small CPUs, up to 8 with a GPU; 0 decodes in-process."""
    threads: int | None = None
    """Torch threads of the model process; default: all CPU cores (decode workers use one thread each)."""
    overwrite: bool = False
    """Discard an existing cache built with a different feature spec instead of refusing."""
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        for flag, value in (("--batch-size", self.batch_size), ("--resize", self.resize), ("--crop", self.crop)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for flag, value in (("--mean", self.mean), ("--std", self.std)):
            if value is not None and len(value) != 3:
                raise ValueError(f"{flag} takes three numbers (R G B), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive, got {self.std}")
        if self.output.suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"-o/--output should name an .h5 file, got {str(self.output)!r}")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
