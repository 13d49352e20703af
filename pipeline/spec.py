"""What one feature row means: how frames were sampled, how each was preprocessed, which backbone embedded it.

The bottom of the package: frozen dataclasses that every stage shares, converted to JSON only where they are stored
(the cache's index and parts, head checkpoints). Two caches with equal spec ids hold interchangeable features.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass


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
        # isfinite: an infinite rate would keep every frame under a spec that claims a rate, NaN compares
        # false
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"--fps must be a finite number > 0, got {self.fps}")
        if self.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"--num-frames must be >= 1, got {self.num_frames}")
        if self.num_frames is not None and (self.fps is not None or self.stride != 1 or self.max_frames):
            raise ValueError(
                "--num-frames picks frames uniformly over the whole video; "
                "it cannot be combined with --fps, --stride or --max-frames"
            )
        if self.fps is not None and self.stride != 1:
            raise ValueError("use either --fps or --stride, not both")
        if not (math.isfinite(self.frames_fps) and self.frames_fps > 0):
            raise ValueError(f"--frames-fps must be a finite number > 0, got {self.frames_fps}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        if self.fps:
            parts.append(f"fps={self.fps:g}")
        if self.stride != 1:
            parts.append(f"stride={self.stride}")
        if self.max_frames:
            parts.append(f"max_frames={self.max_frames}")
        if self.num_frames:
            parts.append(f"num_frames={self.num_frames}")
        return ", ".join(parts) or "every frame"


@dataclass(frozen=True)
class Preprocessing:
    """Frame -> network input: resize (the shorter side, or to an exact size), centre-crop, scale to [0, 1],
    normalise RGB.

    Exactly the operations (and order) of the preset that ships with the weights: torchvision's ImageClassification
    or VideoClassification, or timm's eval transform of the model's pretrained config.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True
    color: str = "RGB"
    resize_hw: tuple[int, int] | None = None
    """Resize every frame to exactly (H, W), ignoring its aspect ratio, instead of its shorter side to `resize`
    (torchvision's video presets, timm's 'squash' crop mode). None in the stored spec is left out, so the ids of
    specs without it are unchanged."""

    def __post_init__(self):
        if self.resize_hw is not None:
            object.__setattr__(self, "resize_hw", tuple(int(x) for x in self.resize_hw))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.resize_hw is None:
            del d["resize_hw"]
        else:
            d["resize_hw"] = list(self.resize_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def describe(self) -> str:
        size = f"resize {self.resize_hw[0]}x{self.resize_hw[1]}" if self.resize_hw else f"resize {self.resize}"
        return f"{size} crop {self.crop}"

    # The two operations, for the stages that run them (torchvision is imported here, on first use, so that the spec
    # itself stays light).
    def crop_frame(self, frame):
        """Shapes: (3, H, W) or (N, 3, H, W) uint8 -> (..., 3, crop, crop) uint8. Runs in decode workers."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        size = list(self.resize_hw) if self.resize_hw else [self.resize]
        frame = F.resize(frame, size, interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)
        return F.center_crop(frame, [self.crop])

    def normalize(self, batch):
        """Shapes: (..., 3, crop, crop) uint8 -> float32, normalised. Runs next to the model (on its device)."""
        import torch
        from torchvision.transforms import functional as F

        return F.normalize(F.convert_image_dtype(batch, torch.float32), mean=list(self.mean), std=list(self.std))


@dataclass(frozen=True)
class Window:
    """Clip-level rows (video backbones): one row per window of `size` consecutive sampled frames, a window
    starting every `stride` sampled frames. Part of the feature spec of such a cache."""

    size: int
    """Sampled frames per window (the clip the video model sees)."""
    stride: int
    """Sampled frames between the starts of consecutive windows (= size: windows side by side)."""

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"--window must be >= 1, got {self.size}")
        if self.stride < 1:
            raise ValueError(f"--window-stride must be >= 1, got {self.stride}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"windows of {self.size} frames every {self.stride}"


@dataclass(frozen=True)
class FeatureSpec:
    """What one feature row means. Two caches with equal spec ids hold interchangeable features."""

    backbone: str
    """A torchvision model name (resnet50, r3d_18), or timm:<model>.<pretrained tag> for a timm image model."""
    weights: str
    """torchvision weights enum name (e.g. ResNet50_Weights.IMAGENET1K_V2), timm's hf-hub:<repo> of a pretrained
    tag, a file name, or 'none(seed=0)'."""
    weights_sha256: str | None
    preprocessing: Preprocessing
    sampling: Sampling
    dim: int
    window: Window | None = None
    """Video backbones: the windows of sampled frames that make one row each; None: one row per sampled frame
    (left out of the stored spec, so the ids of per-frame specs are unchanged)."""

    def to_dict(self) -> dict:
        """Plain JSON-able data (the stored form)."""
        d = {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "sampling": self.sampling.to_dict(),
            "dim": self.dim,
        }
        if self.window is not None:
            d["window"] = self.window.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        """The spec of stored data (a cache's index or parts, a checkpoint), old ones included."""
        return cls(
            backbone=d["backbone"],
            weights=d["weights"],
            weights_sha256=d.get("weights_sha256"),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            sampling=Sampling(**d["sampling"]),
            dim=int(d["dim"]),
            window=Window(**d["window"]) if d.get("window") else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls.from_dict(json.loads(text))

    @property
    def id(self) -> str:
        """Short stable hash of the fields that define a feature row."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def differences(self, other: FeatureSpec) -> list[str]:
        """Human-readable 'field: ours != theirs' lines."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{name}: {a.get(name)!r} != {b.get(name)!r}" for name in {**a, **b} if a.get(name) != b.get(name)]

    def describe(self) -> str:
        rows = f", {self.window.describe()}" if self.window else ""
        return (
            f"{self.backbone} [{self.weights}] dim={self.dim}, {self.preprocessing.describe()}, "
            f"sampling {self.sampling.describe()}{rows}"
        )
