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
    shard: str | None = None
    """'i/n': extract only share i (0-based) of n of the inputs, balanced by size, e.g. in a Slurm array; then run
    `pipeline merge`. Under torchrun the share comes from RANK/WORLD_SIZE instead."""
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
        if self.shard is not None:
            parse_shard(self.shard)
            if self.overwrite:
                raise ValueError("--overwrite cannot be combined with --shard (shards would delete each other's "
                                 "work); delete the cache and its .parts folder first")
        if self.output.suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"-o/--output should name an .h5 file, got {str(self.output)!r}")



HEADS = ("lstm", "gru", "bilstm", "meanpool", "attention")
ACTIVATIONS = ("gelu", "relu")
MEMORY_MODES = ("auto", "ram", "lazy")
SPLIT_MODES = ("auto", "cache", "random")


def _check_device(device: str) -> None:
    if not (device in DEVICES or device.startswith("cuda:")):
        raise ValueError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `pipeline train-head`: the head, its clips, the split and the optimisation."""

    out: Path
    """Run folder for config.json, metrics.csv, summary.json, best.pt, last.pt and plots (files are replaced)."""
    head: str = "lstm"
    """lstm, gru, bilstm, meanpool (order-blind baseline) or attention (small transformer encoder)."""
    hidden: int = 256
    """Width of the input projection and of the temporal layers."""
    layers: int = 1
    """Recurrent or transformer layers (meanpool has none)."""
    dropout: float = 0.3
    """Dropout after the input projection, between temporal layers and before the classifier."""
    activation: str = "gelu"
    """Activation of the input projection (Linear -> LayerNorm -> activation -> dropout)."""
    clip_len: int | None = 16
    """Frames per training clip, cropped at a random start each epoch; None or 0: whole sequences."""
    clip_stride: int = 1
    """Step between the frames of a clip (also applied to whole sequences at evaluation)."""
    eval_clips: int = 0
    """Evaluation: 0 runs the whole sequence at once; N >= 1 averages the probabilities of N evenly spaced clips."""
    epochs: int = 30
    batch_size: int = 64
    """Clips per optimisation step (and per evaluation batch)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after the warm-up and decayed to 0 by a cosine."""
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    """Linear warm-up of the learning rate, in epochs (fractions allowed)."""
    patience: int = 10
    """Stop after this many epochs without a better val top-1 (ties: lower val loss); 0 never stops early."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency in the train split."""
    label_smoothing: float = 0.0
    labels: Path | None = None
    """CSV `key,label` that overrides the labels recorded in the cache."""
    split: str = "auto"
    """auto: the cache's split column when it has one, else random; cache: require it; random: --val-fraction."""
    train_list: Path | None = None
    """Official split file of train videos, one key per line (UCF101 trainlist01.txt style)."""
    val_list: Path | None = None
    """Official split file of val/test videos (UCF101 testlist01.txt style)."""
    val_fraction: float = 0.2
    """Share of each class held out for validation when the split is random."""
    split_seed: int = 0
    """Seed of the random split; each video's side depends only on hash(seed, its key or group)."""
    group_regex: str | None = None
    """Videos whose keys give the same match (its first group if it has one) go to the same side, e.g. '_g(\\d+)_'."""
    seed: int = 0
    """Seed of initialisation, clip crops, shuffling and dropout: same seed, same machine -> same result."""
    memory: str = "auto"
    """ram: read the whole cache into memory once (compact, in its stored dtype); lazy: read videos per batch in
    worker processes; auto: ram when it fits comfortably in the available memory."""
    workers: int = 2
    """Reader processes in lazy mode (0 reads in the training process)."""
    threads: int | None = None
    """Torch threads; default: all CPU cores."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    plots: bool = True
    """Write curves.png and confusion.png when matplotlib is installed."""
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.clip_len == 0:
            object.__setattr__(self, "clip_len", None)
        if self.head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {self.split!r}")
        _check_device(self.device)
        for flag, value in (("--hidden", self.hidden), ("--layers", self.layers), ("--clip-stride", self.clip_stride),
                            ("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.clip_len is not None and self.clip_len < 1:
            raise ValueError(f"--clip-len must be >= 1 (or 0 for whole sequences), got {self.clip_len}")
        for flag, value in (("--eval-clips", self.eval_clips), ("--patience", self.patience),
                            ("--workers", self.workers)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.eval_clips and self.clip_len is None:
            raise ValueError("--eval-clips needs a --clip-len (clips of whole sequences are the whole sequence)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.split == "random" and (self.train_list or self.val_list):
            raise ValueError("--split random contradicts --train-list/--val-list; drop one of them")
        if self.group_regex is not None:
            import re

            try:
                re.compile(self.group_regex)
            except re.error as e:
                raise ValueError(f"--group-regex {self.group_regex!r} is not a valid regular expression: {e}") from None

    def to_dict(self) -> dict:
        """JSON-able: paths as strings."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `pipeline evaluate`: a checkpoint on any cache of the same features."""

    eval_clips: int | None = None
    """0: whole sequences; N: mean over N clips; default: what the checkpoint was trained with."""
    labels: Path | None = None
    """CSV `key,label` that overrides the labels recorded in the cache."""
    keys_list: Path | None = None
    """Evaluate only the videos named in this list file (e.g. UCF101 testlist01.txt)."""
    out: Path | None = None
    """Folder for eval.json and the confusion-matrix plot."""
    batch_size: int = 64
    memory: str = "auto"
    workers: int = 2
    threads: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.eval_clips is not None and self.eval_clips < 0:
            raise ValueError(f"--eval-clips must be >= 0, got {self.eval_clips}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        _check_device(self.device)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of `pipeline predict`: extract new videos exactly as the checkpoint's features were, then classify."""

    output: Path = Path("predictions.csv")
    """CSV of path, top-k labels and probabilities (and, with --json, the same as JSON beside it)."""
    top_k: int = 5
    json: bool = False
    """Also write the predictions as JSON (OUTPUT with the suffix .json)."""
    weights: Path | None = None
    """The backbone's weights file, when the checkpoint's features came from a local file (checked by sha256)."""
    cache: Path | None = None
    """Feature cache of predicted videos, so repeated predictions do not re-extract; default: beside the
    checkpoint (predict_features.h5)."""
    eval_clips: int | None = None
    """0: whole sequences; N: mean over N clips; default: what the checkpoint was trained with."""
    device: str = "auto"
    batch_size: int | None = None
    """Frames per backbone forward pass [default: 8 on CPU, 64 on GPU]."""
    workers: int | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.eval_clips is not None and self.eval_clips < 0:
            raise ValueError(f"--eval-clips must be >= 0, got {self.eval_clips}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.cache is not None and Path(self.cache).suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"--cache should name an .h5 file, got {str(self.cache)!r}")
        _check_device(self.device)

def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
