"""Head checkpoints that describe themselves and cannot run code.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, saved with torch.save and loaded with
torch.load(weights_only=True): head dims (with what it labels: videos or frames), weights, class names, the clip
settings, and the identity of the features it was trained on (the cache's FeatureSpec: backbone, weights and their
sha256, preprocessing, sampling, dim).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline.data.cache import FeatureCache
from pipeline.spec import FeatureSpec
from pipeline.train_head.model import Head, HeadDims, build_head

FORMAT_NAME = "pipeline-head-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A file that is not a usable head checkpoint (unreadable, unsafe, another format or version)."""


class FeatureMismatchError(CheckpointError):
    """A cache whose features are not the ones the head was trained on."""


@dataclass
class HeadCheckpoint:
    dims: HeadDims
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    feature_spec: FeatureSpec
    feature_dtype: str
    """dtype of the training cache (new features for this head are stored the same way)."""
    clip_len: int | None
    clip_stride: int
    eval_clips: int
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    """Validation metrics at this epoch (loss, top1, top5; or loss, acc, edit, f1@10, f1@25, f1@50)."""
    config: dict = field(default_factory=dict)
    """The TrainConfig of the run, the cache path and the split sizes."""
    train_videos: list[str] = field(default_factory=list)
    """Source paths of the videos the head was trained on (so that `evaluate` can keep them apart); empty in
    checkpoints of pipeline 0.1."""
    backbone_state: dict[str, torch.Tensor] | None = None
    """The fine-tuned backbone (classifier removed) of a `pipeline finetune` checkpoint; its feature_spec names it
    'finetuned:<run>' with the sha256 of these tensors. None for a head trained on a cache."""
    sampling: str = "crop"
    """How clips were drawn (TrainConfig.sampling): segments, crop or whole. Checkpoints written before the field
    existed were trained on crops, and load as 'crop'."""
    background: str | None = None
    """A head that labels frames: its background class (left out of the edit score and F1), if any."""

    @property
    def target(self) -> str:
        """What the head labels: videos (one class each) or frames (one class per row)."""
        return self.dims.target

    def require_target(self, target: str, path: str | os.PathLike = "the checkpoint") -> None:
        """Raise ValueError, saying what to do instead, when the head labels something else than `target`."""
        if self.target == target:
            return
        if self.target == "frames":
            raise ValueError(
                f"{path} is a head that labels frames (trained with --target frames): score it against per-frame "
                f"labels (--frame-labels FOLDER or CSV), and use `pipeline predict` for per-frame labels and segments"
            )
        raise ValueError(
            f"{path} is a head that labels whole videos (one class each); per-frame labels need a head trained with "
            f"--target frames (drop --frame-labels to score it on video labels)"
        )

    def model(self, device: torch.device | str = "cpu") -> Head:
        """The head with these weights, in eval mode."""
        head = build_head(self.dims)
        head.load_state_dict(self.state_dict)
        return head.to(device).eval()

    def eval_clips_for(self, requested: int | None) -> int:
        """The evaluation clips to use: `requested`, or what the head was trained with when None."""
        clips = self.eval_clips if requested is None else requested
        if clips and self.target == "frames":
            raise ValueError("--eval-clips does not apply to a head that labels frames: it labels every row once")
        if clips and (self.clip_len is None or self.sampling == "whole"):
            raise ValueError("--eval-clips needs a head trained on clips; this one was trained on whole sequences")
        return clips

    def describe_eval(self, clips: int) -> str:
        """How a video is scored: 'whole sequences', 'centres of L segments' or 'mean of N clips of L rows'."""
        return eval_description(self.clip_len, self.clip_stride, clips, self.sampling, self.target)

    def to_dict(self) -> dict:
        plain = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dims": self.dims.to_dict(),
            "classes": list(self.classes),
            "feature_spec": self.feature_spec.to_dict(),
            "feature_spec_id": self.feature_spec.id,
            "feature_dtype": self.feature_dtype,
            "clip_len": self.clip_len,
            "clip_stride": self.clip_stride,
            "eval_clips": self.eval_clips,
            "sampling": self.sampling,
            "background": self.background,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "config": self.config,
            "versions": _versions(),
            "train_videos": self.train_videos,
        }
        # A JSON round trip turns numpy scalars, paths and tuples into the plain types weights_only accepts.
        plain = json.loads(json.dumps(plain, default=str))
        plain["state_dict"] = {k: v.detach().cpu().clone() for k, v in self.state_dict.items()}
        if self.backbone_state is not None:
            plain["backbone_state_dict"] = {k: v.detach().cpu().clone() for k, v in self.backbone_state.items()}
        return plain

    def check_features(self, cache: FeatureCache, checkpoint_path: str | os.PathLike = "the checkpoint") -> None:
        """Raise FeatureMismatchError naming both sides when `cache` holds features of another spec."""
        diffs = self.feature_spec.differences(cache.spec)
        if diffs:
            raise FeatureMismatchError(
                f"{checkpoint_path} was trained on features {self.feature_spec.describe()} (spec "
                f"{self.feature_spec.id}), but {cache.path} holds {cache.spec.describe()} (spec {cache.spec.id}); "
                f"checkpoint != cache:\n  "
                + "\n  ".join(diffs)
                + "\nExtract the videos again with the checkpoint's backbone, weights, preprocessing and sampling."
            )


def eval_description(
    clip_len: int | None, clip_stride: int, eval_clips: int, sampling: str = "crop", target: str = "videos"
) -> str:
    """How a video is scored, in words: 'whole sequences', 'centres of 16 segments', 'mean of N clips of L rows',
    'every row of whole videos' (a head that labels frames)."""
    if target == "frames":
        return "every row of whole videos"
    stride = f", stride {clip_stride}" if clip_stride > 1 else ""
    if clip_len is not None and sampling == "segments":
        where = f"mean of {eval_clips} views" if eval_clips > 1 else "centres"
        return f"{where} of {clip_len} segments{stride} (shorter videos whole)"
    if eval_clips and clip_len is not None and sampling != "whole":
        return f"mean of {eval_clips} clips of {clip_len} rows{stride}"
    return f"whole sequences{stride}"


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("framecache", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def save_checkpoint(ckpt: HeadCheckpoint, path: str | os.PathLike) -> None:
    """Write atomically (a temporary file renamed into place), so a killed run never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ckpt.to_dict(), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> HeadCheckpoint:
    """Load a head checkpoint without executing anything it contains (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects beyond tensors and plain data, and loading those could "
            f"run code. Head checkpoints never do; was it made by `pipeline train-head`? ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # not a torch file at all, truncated, ...
        raise CheckpointError(f"cannot read {path} as a head checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a pipeline head checkpoint (best.pt / last.pt of `pipeline train-head`)")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {obj['format_version']}; this pipeline reads up to "
            f"{FORMAT_VERSION}: upgrade the package"
        )
    try:
        return HeadCheckpoint(
            dims=HeadDims(**obj["dims"]),
            state_dict=obj["state_dict"],
            classes=list(obj["classes"]),
            feature_spec=FeatureSpec.from_dict(obj["feature_spec"]),
            feature_dtype=obj["feature_dtype"],
            clip_len=obj["clip_len"],
            clip_stride=obj["clip_stride"],
            eval_clips=obj["eval_clips"],
            epoch=obj.get("epoch", 0),
            metrics=obj.get("metrics", {}),
            config=obj.get("config", {}),
            train_videos=list(obj.get("train_videos", [])),
            backbone_state=obj.get("backbone_state_dict"),
            sampling=obj.get("sampling", "crop"),
            background=obj.get("background"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged head checkpoint ({type(e).__name__}: {e})") from None
