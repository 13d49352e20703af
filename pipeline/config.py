"""Every user-facing setting and its default, in one place.

Each setting is a dataclass field whose docstring is its help text: the CLI builds its options from these fields
(pipeline/options.py), the Python API takes them as keyword arguments (`config_with`), and `__post_init__` errors
name the CLI flag to fix. Settings that several commands share live in the groups `Runtime` and `SplitConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from pipeline.spec import Sampling

FEATURE_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
DECODERS = ("auto", "cpu", "nvdec")
PREPROCESS = ("auto", "workers", "device")
HEADS = ("lstm", "gru", "bilstm", "meanpool", "attention", "tcn")
TARGETS = ("auto", "videos", "frames")
LABEL_UNITS = ("frames", "seconds")
ACTIVATIONS = ("gelu", "relu")
MEMORY_MODES = ("auto", "ram", "lazy")
SPLIT_MODES = ("auto", "cache", "random")
CLIP_SAMPLINGS = ("segments", "crop", "whole")
STRATEGIES = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "hyperband", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")

# Defaults that depend on the machine or on another setting (the fields say when they apply).
EXTRACT_BATCH_CPU = 8  # frames per forward pass on a CPU (measured fastest on 2-16 cores)
EXTRACT_BATCH_GPU = 256  # ... and on an accelerator (it needs wide batches)
HEAD_BATCH = 64  # clips per step of a head that labels videos, and per forward pass when predict scores videos
HEAD_EPOCHS = 30  # epochs of a head when --epochs is not given, on a train split big enough for HEAD_MIN_STEPS ...
HEAD_MIN_STEPS = 1200  # ... else as many more epochs as give this many optimiser steps (see head_budget) ...
HEAD_MAX_EPOCHS = 400  # ... up to this many
HEAD_PATIENCE_SHARE = 1 / 3  # --patience when not given: this share of the epochs, and at least ...
HEAD_MIN_PATIENCE = 10  # ... this many epochs
HEAD_HIDDEN = 256  # width of a head when --hidden is not given ...
TCN_HIDDEN = 64  # ... and of a tcn head (MS-TCN's width: a conv layer costs 4 times a linear one of its width)
TCN_LAYERS = 10  # dilated layers per stage of a tcn head when --layers is not given (dilations 1, 2, ..., 512)
FRAME_BATCH = 8  # whole videos per step when a head labels frames (segmentation videos can be thousands of rows)
FRAME_OVERLAPS = (0.10, 0.25, 0.50)  # IoU thresholds of the segmental F1 scores (F1@10, F1@25, F1@50)
VIDEO_METRICS = ("top1", "top5")  # what --metric can pick for a head that labels videos ...
FRAME_METRICS = ("acc", "edit", *(f"f1@{round(100 * o)}" for o in FRAME_OVERLAPS))  # ... and one that labels frames
FINETUNE_CLIP_LEN = 16  # rows per fine-tuning clip when the head was trained on whole sequences
FINETUNE_BACKBONE_LR_FACTOR = 0.1  # the backbone's peak learning rate is this times --lr
FINETUNE_UNFREEZE_LAST = 1  # stages trained when neither --unfreeze nor --unfreeze-last is given
SWEEP_TRIALS = 20  # trials of a tpe or random sweep when --trials is not given (grid: every combination)
SWEEP_PATIENCE_SHARE = 1 / 10  # a sweep's trial stops after this share of its epochs without a better score (>= 10)
SWEEP_STACK = 8  # grid and random sweeps: trials asked at once, mean-pool ones of one shape trained as one model
SWEEP_REFIT = 3  # after a --reduce-dim sweep: the best trials trained again on the full features
SWEEP_SPACE = {
    "head": ["lstm", "gru", "bilstm", "attention", "meanpool"],
    "hidden": [128, 256, 512],
    "lr": [3e-4, 1e-3, 3e-3],
    "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
    "clip_len": [8, 16, 32, None],
}
"""What `pipeline sweep` searches when given neither --space nor --param (a new study): the head kind, its width,
the learning rate, the dropout and the clip length (None: whole sequences); the rest keeps the train-head defaults.
Every entry has a grid (--strategy grid: 1,080 combinations)."""
SWEEP_SPACE_FRAMES = {
    "head": ["tcn", "bilstm", "gru", "lstm", "attention", "meanpool"],
    "hidden": [64, 128, 256],
    "lr": [3e-4, 1e-3, 3e-3],
    "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
    "smoothing": [0.0, 0.15, 0.3],
}
"""... and with --target frames: the head kind, its width, the learning rate, the dropout and the weight of the
smoothing loss; whole videos (--strategy grid: 1,944 combinations)."""


RUNS_DIR = Path("runs")  # where run folders go when --out is not given
RUN_MARKERS = ("config.json", "best.pt", "study.db", "leaderboard.csv")  # a folder holding one of these holds a run


def default_cache_path(inputs: list) -> Path:
    """Where `pipeline extract INPUT...` writes without -o: INPUT's name with .h5, in the current folder
    (videos/ -> videos.h5, list.csv -> list.h5), so that running the same command again resumes."""
    first = Path(inputs[0]).expanduser().resolve()
    return Path((first.stem if first.is_file() else first.name) or "features").with_suffix(".h5")


def default_run_folder(name: str) -> Path:
    """A run folder under RUNS_DIR that holds no run yet: runs/NAME, else runs/NAME-2, runs/NAME-3, ..."""
    for n in range(1, 10_000):
        folder = RUNS_DIR / (name if n == 1 else f"{name}-{n}")
        if not any((folder / marker).exists() for marker in RUN_MARKERS):
            return folder
    raise ValueError(f"{RUNS_DIR}/{name}-* are all taken: pass --out")


def head_budget(train_videos: int, batch_size: int) -> tuple[int, int]:
    """(epochs, patience) of a head when --epochs and --patience are not given: HEAD_EPOCHS epochs, or more where the
    train split is small, so that the head takes at least HEAD_MIN_STEPS optimiser steps (at most HEAD_MAX_EPOCHS
    epochs); the patience is HEAD_PATIENCE_SHARE of the epochs, at least HEAD_MIN_PATIENCE (head_patience).

    Why: the warm-up + cosine schedule spreads over the epochs, and a small split gives few steps per epoch. On the
    order tasks of bench/heads_suite.py (647 train videos: 11 steps an epoch), 30 epochs were 330 steps and val
    top-1 was still rising when the schedule ended; about 1,200 steps gained 1 to 2 points (docs/train-head.md).
    A UCF101-sized split (7,600 videos: 119 steps an epoch) already takes 3,570 steps in 30 epochs: its budget, and
    the seconds of its epochs, do not change."""
    steps_per_epoch = max(1, -(-train_videos // batch_size))
    epochs = min(max(HEAD_EPOCHS, -(-HEAD_MIN_STEPS // steps_per_epoch)), HEAD_MAX_EPOCHS)
    return epochs, head_patience(epochs)


def head_patience(epochs: int, share: float = HEAD_PATIENCE_SHARE) -> int:
    """--patience when not given: HEAD_PATIENCE_SHARE of the epochs, at least HEAD_MIN_PATIENCE (10 of 30 and fewer).
    A sweep's trials use SWEEP_PATIENCE_SHARE: a trial is one of many, and the sweep's time is theirs added up."""
    return max(HEAD_MIN_PATIENCE, round(epochs * share))


def default_of(cls: type, name: str):
    """The default of dataclass field `name`."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _check(flag: str, ok: bool, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{flag} must be {rule}, got {value!r}")


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    _check(flag, value in choices, value, f"one of {', '.join(choices)}")


def _at_least(minimum: int, **values) -> None:
    """Each value (a field name -> value; None allowed) >= minimum; the message names the flag."""
    for name, value in values.items():
        if value is not None:
            _check("--" + name.replace("_", "-"), value >= minimum, value, f">= {minimum}")


# ------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Runtime:
    """Where and how a command runs (no effect on its results beyond floating-point noise)."""

    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    threads: int | None = None
    """Torch threads of this process; default: all CPU cores (decode and reader workers use one each)."""
    progress: bool = True
    """Progress bars (the CLI's --quiet turns them off)."""

    def __post_init__(self):
        _check(
            "--device",
            self.device in DEVICES or self.device.startswith("cuda:"),
            self.device,
            f"one of {', '.join(DEVICES)} or cuda:N",
        )
        _at_least(1, threads=self.threads)


@dataclass(frozen=True)
class SplitConfig:
    """Which labelled videos train and which validate."""

    labels: Path | None = None
    """CSV `key,label` that replaces the labels recorded in the cache (or the inputs')."""
    split: str = "auto"
    """auto: the cache's split column when it has one, else random; cache: require it; random: --val-fraction;
    head (finetune only, its default): the split of the --init run (its split.csv, else its recorded settings)."""
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

    @classmethod
    def from_dict(cls, d: dict) -> SplitConfig:
        """The split settings recorded in a run's flat config (config.json, a checkpoint's `config`)."""
        paths = ("labels", "train_list", "val_list")
        return cls(
            **{
                f.name: (Path(d[f.name]) if f.name in paths else d[f.name])
                for f in fields(cls)
                if d.get(f.name) is not None
            }
        )

    def __post_init__(self):
        _one_of("--split", self.split, (*SPLIT_MODES, "head"))
        _check("--val-fraction", 0.0 < self.val_fraction < 1.0, self.val_fraction, "between 0 and 1 (exclusive)")
        if self.split == "random" and (self.train_list or self.val_list):
            raise ValueError("--split random contradicts --train-list/--val-list; drop one of them")
        if self.split == "head" and (self.train_list or self.val_list):
            raise ValueError("--train-list/--val-list make a new split: pass --split auto with them")
        if self.group_regex is not None:
            import re

            try:
                re.compile(self.group_regex)
            except re.error as e:
                raise ValueError(f"--group-regex {self.group_regex!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True)
class FrameLabelConfig:
    """Where the labels of a head that labels frames come from (--target frames)."""

    frame_labels: Path | None = None
    """Per-frame labels: a folder of one file per video (one label per decoded frame, one per line, matched to the
    cache keys by name), or a segments CSV key,start,end,label (docs/train-head.md)."""
    label_units: str | None = None
    """Units of a segments CSV's start and end: seconds, or frames (0-based decoded frame numbers, end exclusive)."""
    background: str | None = None
    """Background class: rows that no segment covers get it, and its segments are left out of the edit score and
    F1 (e.g. SIL for Breakfast); default for evaluate: the head's."""

    def __post_init__(self):
        if self.frame_labels is not None:
            object.__setattr__(self, "frame_labels", Path(self.frame_labels))
        if self.label_units is not None:
            _one_of("--label-units", self.label_units, LABEL_UNITS)
        if self.background is not None and not self.background.strip():
            raise ValueError("--background must name a class")


def _runtime() -> Runtime:
    return Runtime()


def _splitting() -> SplitConfig:
    return SplitConfig()


def _frame_labelling() -> FrameLabelConfig:
    return FrameLabelConfig()


def resolve_target(target: str, labelling: FrameLabelConfig) -> str:
    """--target auto: frames when --frame-labels is given, else videos; a contradiction names the flags."""
    _one_of("--target", target, TARGETS)
    if target == "auto":
        return "frames" if labelling.frame_labels is not None else "videos"
    if target == "frames" and labelling.frame_labels is None:
        raise ValueError("--target frames needs per-frame labels: pass --frame-labels FOLDER or CSV")
    if target == "videos" and labelling.frame_labels is not None:
        raise ValueError("--frame-labels gives a label per frame: drop --target videos (or pass --target frames)")
    return target


def resolve_metric(metric: str, target: str) -> str:
    """--metric auto: top1 for a head that labels videos, f1@50 for one that labels frames."""
    choices = FRAME_METRICS if target == "frames" else VIDEO_METRICS
    if metric == "auto":
        return "f1@50" if target == "frames" else "top1"
    _check("--metric", metric in choices, metric, f"one of {', '.join(choices)} with --target {target}")
    return metric


class _Settings:
    """What every command's settings share: a flat JSON form and flat attribute names for the groups."""

    def to_dict(self) -> dict:
        """Flat JSON-able data (groups merged in, paths and tuples as strings and lists): config.json, checkpoints."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                out.update(value.to_dict() if isinstance(value, _Settings) else _json_able(value))
            else:
                out[f.name] = _plain(value)
        return out


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _json_able(obj) -> dict:
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}


# ------------------------------------------------------------------------------------------------ stage one
@dataclass(frozen=True)
class ExtractConfig(_Settings):
    """Settings of `pipeline extract`. Fields that change what a feature row means go into the feature spec."""

    output: Path
    """The cache file to create or resume (its finished parts live in OUTPUT.parts/ beside it)."""
    backbone: str = "resnet50"
    """A torchvision classification model (resnet50, one row per frame), a torchvision video model (r3d_18, mc3_18,
    r2plus1d_18, s3d, mvit_v1_b, mvit_v2_s, swin3d_t/s/b: one row per --window of frames) or timm:NAME, any timm
    image model (timm:vit_base_patch16_clip_224.openai, timm:vit_small_patch14_dinov2.lvd142m; needs the package's
    timm extra; one row per frame: its pooled pre-logits features)."""
    weights: str = "DEFAULT"
    """A torchvision weights name (DEFAULT, IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1); for timm:NAME, DEFAULT
    or a pretrained tag (from the local Hugging Face cache, downloaded when online); a local .pth/.safetensors
    state-dict file; or 'none' for a random (seeded) initialisation."""
    resize: int | None = None
    """Resize the shorter side to this many pixels; default: the weights' own value."""
    crop: int | None = None
    """Centre-crop size; default: the weights' own value."""
    mean: tuple[float, float, float] | None = None
    """RGB normalisation mean; default: the weights' own value."""
    std: tuple[float, float, float] | None = None
    """RGB normalisation std; default: the weights' own value."""
    sampling: Sampling = field(default_factory=Sampling)
    window: int | None = None
    """Video backbones: sampled frames per window, one row each; default: the clip length of the weights (16 for
    r3d_18)."""
    window_stride: int | None = None
    """Video backbones: sampled frames from one window's start to the next; default: --window (side by side)."""
    dtype: str = "float16"
    """Storage dtype of the features on disk: float16 or float32."""
    batch_size: int | None = None
    """Frames per forward pass, spanning video boundaries. Every pass has this shape (the last one is padded),
    so a frame's features never depend on how frames were batched; default: EXTRACT_BATCH_CPU on a CPU,
    EXTRACT_BATCH_GPU on an accelerator. Video backbones: windows per pass; default: as many windows as hold that
    many frames (at least one)."""
    workers: int | None = None
    """Decode worker processes; default: 1 on small CPUs, all cores but two with a GPU; 0 decodes
    in-process."""
    decoder: str = "auto"
    """Video decoding: cpu (OpenCV/FFmpeg in the decode workers), nvdec (the GPU's decoder through PyNvVideoCodec,
    the package's nvdec extra, for H.264, HEVC, AV1 and VP9 files; anything else, or any failure, goes to
    the CPU decoder), or auto (on a CUDA device with PyNvVideoCodec installed, both at once: NVDEC and the CPU
    decoder share the videos; else cpu)."""
    preprocess: str = "auto"
    """Where frames are resized and cropped: workers (each frame in its decode worker), device (whole chunks
    on the model's device) or auto (device on CUDA, workers elsewhere). Same operations either way."""
    compile: bool = False
    """torch.compile the backbone (a one-off compilation of a minute or more; then faster forward passes)."""
    cuda_graph: bool = True
    """On CUDA, capture the normalisation and forward pass once as a CUDA graph and replay it for every batch (one
    launch instead of hundreds: the host thread that feeds the GPU is free sooner); not with --compile."""
    max_pixels: int | None = 8192 * 8192
    """Refuse frames larger than this many pixels (from the file's header where it says, before decoding): one
    frame bomb must not exhaust memory (the Python API takes None: no limit)."""
    decode_timeout: float = 120.0
    """Seconds a decode worker may go without a frame (while it has a video and room for frames) before it is
    stopped and its video recorded as failed: a decoder that hangs on a corrupt stream fails its video, not the
    run. Applies to decode workers (not to --workers 0)."""
    overwrite: bool = False
    """Discard an existing cache built with a different feature spec instead of refusing."""
    shard: str | None = None
    """'i/n': extract only share i (0-based) of n of the inputs, balanced by size, e.g. in a Slurm array; then run
    `pipeline merge`. Under torchrun the share comes from RANK/WORLD_SIZE instead."""
    prune: bool = False
    """Remove the cache's videos (and failure records) whose source file or folder no longer exists (deleted
    or renamed). Never done without this flag: sources on a disk that is not mounted look the same."""
    pack: bool = False
    """At the end of the run, make the cache one self-contained file (as `pipeline pack`)."""
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        _one_of("--dtype", self.dtype, FEATURE_DTYPES)
        _at_least(
            1,
            batch_size=self.batch_size,
            resize=self.resize,
            crop=self.crop,
            window=self.window,
            window_stride=self.window_stride,
        )
        _at_least(0, workers=self.workers)
        _one_of("--decoder", self.decoder, DECODERS)
        _one_of("--preprocess", self.preprocess, PREPROCESS)
        _at_least(1, max_pixels=self.max_pixels)
        if not self.decode_timeout > 0:  # also refuses nan
            raise ValueError(f"--decode-timeout must be a positive number of seconds, got {self.decode_timeout}")
        for flag, value in (("--mean", self.mean), ("--std", self.std)):
            if value is not None and len(value) != 3:
                raise ValueError(f"{flag} takes three numbers (R G B), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive, got {self.std}")
        if self.shard is not None:
            parse_shard(self.shard)
            if self.prune or self.pack:
                raise ValueError(
                    "--prune and --pack cannot be combined with --shard: use them after "
                    "`pipeline merge` (an unsharded `extract --prune`, or `pipeline pack`)"
                )
            if self.overwrite:
                raise ValueError(
                    "--overwrite cannot be combined with --shard (shards would delete each other's "
                    "work); delete the cache and its .parts folder first"
                )
        if self.output.suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"-o/--output should name an .h5 file, got {str(self.output)!r}")


# ------------------------------------------------------------------------------------------------ stage two
@dataclass(frozen=True)
class TrainConfig(_Settings):
    """Settings of `pipeline train-head`: the head, its clips, the split and the optimisation."""

    out: Path
    """Run folder for config.json, metrics.csv, summary.json, best.pt, last.pt and plots (a folder holding a run is
    refused unless --overwrite)."""
    head: str = "lstm"
    """lstm, gru, bilstm, meanpool (order-blind baseline), attention (small transformer encoder) or tcn (multi-stage
    dilated temporal convolutions). Labelling frames, lstm and gru are causal (online use), the others look ahead."""
    target: str = "auto"
    """videos: one class per video (its label); frames: one class per row, from --frame-labels (temporal action
    segmentation, event spotting); auto: frames when --frame-labels is given, else videos."""
    metric: str = "auto"
    """The val metric that picks the best epoch (ties: the lower val loss) and that sweeps maximise: top1 or top5
    for videos (default top1); acc, edit, f1@10, f1@25 or f1@50 for frames (default f1@50)."""
    hidden: int | None = None
    """Width of the input projection and of the temporal layers; default: HEAD_HIDDEN, TCN_HIDDEN for tcn."""
    layers: int | None = None
    """Recurrent or transformer layers, or tcn layers per stage (meanpool has none); default: 1, TCN_LAYERS for
    tcn."""
    stages: int = 4
    """tcn: stages (one that predicts, then refinements of the previous stage's probabilities)."""
    dropout: float = 0.3
    """Dropout after the input projection, between temporal layers and before the classifier."""
    activation: str = "gelu"
    """Activation of the input projection (Linear -> LayerNorm -> activation -> dropout): gelu or relu."""
    sampling: str = "auto"
    """Which rows of a video a clip holds. segments: --clip-len rows spread over the whole video (it is cut into
    --clip-len equal segments; training takes a random row of each, evaluation the centres); crop: --clip-len
    consecutive rows at a random start (evaluation: the whole sequence, or --eval-clips crops); whole: every row.
    Videos with fewer rows than --clip-len are used whole by every sampling. auto: segments for videos, whole for
    frames (which take whole or crop, and are always evaluated on whole videos)."""
    clip_len: int | None = 16
    """Rows per clip, at most (shorter videos are used whole); None or 0: whole sequences (--sampling whole)."""
    clip_stride: int = 1
    """Step between the rows a clip is taken from (also applied to whole sequences at evaluation)."""
    eval_clips: int = 0
    """Evaluation: 0 scores one view (segments: their centres; crop, whole: the whole sequence); N >= 1 averages
    the probabilities of N views (segments: N evenly spaced rows of each segment; crop: N evenly spaced crops)."""
    epochs: int | None = None
    """Most epochs to train; default: HEAD_EPOCHS, or enough for HEAD_MIN_STEPS optimiser steps on a small split."""
    batch_size: int | None = None
    """Clips per optimisation step (and per evaluation batch); default: HEAD_BATCH, or FRAME_BATCH whole videos
    for frames."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after the warm-up and decayed to 0 by a cosine."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only)."""
    warmup_epochs: float = 1.0
    """Linear warm-up of the learning rate, in epochs (fractions allowed)."""
    patience: int | None = None
    """Stop after this many epochs without a better val score (ties: lower val loss); 0 never stops; default: a
    third of the epochs, at least 10."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency in the train split."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    smoothing: float = 0.15
    """Frames: weight of the smoothing loss (the truncated squared change of log-probabilities between neighbouring
    rows), which holds back over-segmentation."""
    seed: int = 0
    """Seed of initialisation, clip crops, shuffling and dropout: same seed, same machine -> same result."""
    memory: str = "auto"
    """ram: read the whole cache into memory once (compact, in its stored dtype); lazy: read videos per batch in
    worker processes; auto: ram when it fits comfortably in the available memory."""
    workers: int = 2
    """Reader processes in lazy mode (0 reads in the training process)."""
    plots: bool = True
    """Write curves.png and confusion.png when matplotlib is installed."""
    overwrite: bool = False
    """Replace the run in an --out folder that already holds one (its files are removed first) instead of refusing."""
    frame_labelling: FrameLabelConfig = field(default_factory=_frame_labelling)
    splitting: SplitConfig = field(default_factory=_splitting)
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        # Settings whose default depends on others are resolved here, so that the records hold what was used.
        target = resolve_target(self.target, self.frame_labelling)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "metric", resolve_metric(self.metric, target))
        _one_of("--head", self.head, HEADS)
        if self.hidden is None:
            object.__setattr__(self, "hidden", TCN_HIDDEN if self.head == "tcn" else HEAD_HIDDEN)
        if self.layers is None:
            object.__setattr__(self, "layers", TCN_LAYERS if self.head == "tcn" else 1)
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", FRAME_BATCH if target == "frames" else HEAD_BATCH)
        if self.sampling == "auto":
            object.__setattr__(self, "sampling", "whole" if target == "frames" else "segments")
        _one_of("--sampling", self.sampling, CLIP_SAMPLINGS)
        if target == "frames":
            if self.splitting.labels is not None:
                raise ValueError("--labels gives one label per video; with --frame-labels, drop it")
            if self.sampling == "segments":
                raise ValueError(
                    "--sampling segments takes scattered rows: a head that labels frames trains on whole videos "
                    "(--sampling whole, its default) or on windows of consecutive rows (--sampling crop --clip-len N)"
                )
            if self.clip_stride != 1 or self.eval_clips:
                raise ValueError(
                    "--clip-stride and --eval-clips do not apply to a head that labels frames (it labels every "
                    "row of a whole video); sample frames at extraction instead (extract --stride/--fps)"
                )
        if self.clip_len in (None, 0) or self.sampling == "whole":  # one way to say "whole sequences" in the records
            object.__setattr__(self, "clip_len", None)
            object.__setattr__(self, "sampling", "whole")
        _one_of("--activation", self.activation, ACTIVATIONS)
        _one_of("--memory", self.memory, MEMORY_MODES)
        _check("--split", self.splitting.split != "head", "head", f"one of {', '.join(SPLIT_MODES)}")
        _at_least(
            1,
            hidden=self.hidden,
            layers=self.layers,
            stages=self.stages,
            clip_stride=self.clip_stride,
            epochs=self.epochs,
            batch_size=self.batch_size,
            clip_len=self.clip_len,
        )
        _at_least(0, eval_clips=self.eval_clips, patience=self.patience, workers=self.workers)
        if self.eval_clips and self.clip_len is None:
            raise ValueError(
                "--eval-clips needs --sampling segments or crop and a --clip-len (a whole sequence has one view)"
            )
        _check("--dropout", 0.0 <= self.dropout < 1.0, self.dropout, "in [0, 1)")
        _check("--label-smoothing", 0.0 <= self.label_smoothing < 1.0, self.label_smoothing, "in [0, 1)")
        _check("--smoothing", self.smoothing >= 0, self.smoothing, ">= 0")
        _check("--lr", self.lr > 0, self.lr, "> 0")
        _check("--weight-decay", self.weight_decay >= 0, self.weight_decay, ">= 0")
        _check("--warmup-epochs", self.warmup_epochs >= 0, self.warmup_epochs, ">= 0")

    def with_budget(self, train_videos: int) -> TrainConfig:
        """This config with its epochs and patience set (head_budget for those not given), for `train_videos`."""
        if self.epochs is not None and self.patience is not None:
            return self
        epochs = self.epochs or head_budget(train_videos, self.batch_size)[0]
        return replace(self, epochs=epochs, patience=head_patience(epochs) if self.patience is None else self.patience)


@dataclass(frozen=True)
class EvalConfig(_Settings):
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
    """Clips per forward pass."""
    memory: str = default_of(TrainConfig, "memory")
    """auto, ram (read the cache once into memory) or lazy (read per batch)."""
    workers: int = default_of(TrainConfig, "workers")
    """Reader processes in lazy mode."""
    frame_labelling: FrameLabelConfig = field(default_factory=_frame_labelling)
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        _at_least(0, eval_clips=self.eval_clips, workers=self.workers)
        _at_least(1, batch_size=self.batch_size)
        _one_of("--memory", self.memory, MEMORY_MODES)


@dataclass(frozen=True)
class PredictConfig(_Settings):
    """Settings of `pipeline predict`: extract new videos exactly as the checkpoint's features were, then classify."""

    output: Path = Path("predictions.csv")
    """CSV of path, top-k labels and probabilities (and, with --json, the same as JSON beside it)."""
    top_k: int = 5
    """Classes per video."""
    json: bool = False
    """Also write the predictions as JSON, to OUTPUT with the suffix .json (preds.csv -> preds.json)."""
    weights: Path | None = None
    """The backbone's weights file, when the checkpoint's features came from a local file (checked by sha256)."""
    cache: Path | None = None
    """Feature cache of predicted videos, so repeated predictions do not re-extract; default: beside the
    checkpoint (predict_features.h5)."""
    eval_clips: int | None = None
    """0: whole sequences; N: mean over N clips; default: what the checkpoint was trained with."""
    batch_size: int | None = None
    """Frames per backbone forward pass; default: as `pipeline extract` chooses."""
    workers: int | None = None
    """Decode worker processes; default: as `pipeline extract` chooses; 0 decodes in-process."""
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        if self.json and self.output.suffix.lower() == ".json":
            raise ValueError(
                f"--json writes the JSON to OUTPUT with the suffix .json, which is -o {self.output} "
                f"itself; give -o a .csv name"
            )
        _at_least(1, top_k=self.top_k, batch_size=self.batch_size)
        _at_least(0, eval_clips=self.eval_clips, workers=self.workers)
        if self.cache is not None and Path(self.cache).suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"--cache should name an .h5 file, got {str(self.cache)!r}")


@dataclass(frozen=True)
class SweepConfig(_Settings):
    """Settings of `pipeline sweep`: the search space and strategy, the data every trial shares, the study's storage.

    The trials' own settings (head, hidden, lr, epochs, ...) come from the space; what it leaves out keeps its
    TrainConfig default."""

    out: Path
    """Sweep folder: trials/NNNN/ run folders, leaderboard.csv/.json, best.pt, search.png, sweep.json, and by
    default the study itself (study.db)."""
    space: Path | dict | None = None
    """YAML file (or, from Python, a dict of the same form), one line per setting: NAME: [choices] |
    {low, high, log, step} | value (docs/sweep.md). Without it and without --param: a default space of head, hidden,
    lr, dropout and clip_len, or, with --resume, the study's own space."""
    params: tuple[str, ...] = ()
    """Inline parameters NAME=SPEC, repeatable: hidden=64,128,256 (choices), lr=1e-4:1e-2:log, layers=1:3,
    dropout=0:0.5:0.1 (ranges: low:high[:log or :step]), epochs=10 (fixed). They replace the --space entry of the
    same name (docs/sweep.md)."""
    trials: int | None = None
    """Trials of the whole study, all workers together; default: every combination (grid), else SWEEP_TRIALS."""
    strategy: str = "tpe"
    """tpe (Bayesian, Optuna's TPESampler), random, or grid (every combination once)."""
    pruner: str = "median"
    """Stop weak trials from their per-epoch val top-1: median, halving (successive halving), hyperband or none."""
    prune_warmup: int = 2
    """Epochs every trial runs before it can be pruned (the halving/hyperband minimum resource)."""
    timeout: float | None = None
    """Seconds: no trial starts after it, and the running trial stops at the end of its epoch."""
    reduce_dim: int | None = None
    """PCA to this many dimensions, fit on the train split once; checkpoints fold it into their first layer."""
    refit: int | None = None
    """After a --reduce-dim sweep, train the settings of this many best trials again on the full features
    (OUT/refit/NNNN/, stacked where they can be) and make the best of those runs best.pt; 0: none. Default:
    SWEEP_REFIT with --reduce-dim."""
    stack: int | None = None
    """Trials asked at once; those that are mean-pool heads differing only in lr, weight decay, dropout, label
    smoothing or patience train as one model. Default: SWEEP_STACK for grid and random, 1 (one at a time) for tpe,
    whose next trial learns from the last."""
    storage: str | None = None
    """Optuna storage: an RDB URL (sqlite:///..., postgresql://...), or a journal file (journal:PATH or PATH.log);
    default: sqlite in OUT/study.db."""
    study: str | None = None
    """Study name; default: the name of the out folder."""
    resume: bool = False
    """Continue (or join) an existing study of this name; without it, a study that has trials is refused."""
    heartbeat: int = 15
    """Seconds between the heartbeats of a running trial (RDB storages: SQLite, PostgreSQL, MySQL)."""
    grace: int = 60
    """Seconds without a heartbeat after which other workers take a running trial for one of a killed worker: it is
    failed, and its settings retried once. Every worker of a study should use the same --heartbeat and --grace."""
    seed: int = 0
    """Seed of the sampler (each trial's own seed is the `seed` parameter, default 0)."""
    target: str = default_of(TrainConfig, "target")
    """videos, frames (per-frame heads, from --frame-labels) or auto (frames when --frame-labels is given)."""
    metric: str = default_of(TrainConfig, "metric")
    """The val metric every trial is ranked by: top1 or top5 for videos (default top1); acc, edit, f1@10, f1@25
    or f1@50 for frames (default f1@50)."""
    memory: str = default_of(TrainConfig, "memory")
    """auto, ram or lazy: how the cache is read, once for every trial."""
    plots: bool = True
    """Write search.png (needs matplotlib); trials write no plots."""
    frame_labelling: FrameLabelConfig = field(default_factory=_frame_labelling)
    splitting: SplitConfig = field(default_factory=_splitting)
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "params", tuple(self.params))
        if self.space is not None and not isinstance(self.space, dict):
            object.__setattr__(self, "space", Path(self.space))
        _one_of("--strategy", self.strategy, STRATEGIES)
        _one_of("--pruner", self.pruner, PRUNERS)
        _at_least(1, trials=self.trials, prune_warmup=self.prune_warmup, reduce_dim=self.reduce_dim, stack=self.stack)
        _at_least(0, refit=self.refit)
        if self.timeout is not None:
            _check("--timeout", self.timeout > 0, self.timeout, "> 0 seconds")
        _at_least(1, heartbeat=self.heartbeat)
        _check("--grace", self.grace > self.heartbeat, self.grace, "> --heartbeat (a few heartbeats)")
        target = resolve_target(self.target, self.frame_labelling)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "metric", resolve_metric(self.metric, target))
        if self.reduce_dim is not None and target == "frames":
            raise ValueError("--reduce-dim is for heads that label videos; sweep frame heads on the full features")
        if self.refit and self.reduce_dim is None:
            raise ValueError(
                "--refit trains the best settings again on the full features after a --reduce-dim "
                "sweep; without --reduce-dim the trials already use them (drop --refit)"
            )
        if self.study is not None and not self.study.strip():
            raise ValueError("--study must not be empty")
        # The split and data settings are TrainConfig's: let it check them, with its own flag names.
        self.train_config(self.out)

    @property
    def refits(self) -> int:
        """How many of the best trials are refit on the full features."""
        if self.reduce_dim is None:
            return 0
        return SWEEP_REFIT if self.refit is None else self.refit

    @property
    def stack_size(self) -> int:
        if self.stack is not None:
            return self.stack
        return SWEEP_STACK if self.strategy in ("grid", "random") else 1

    def train_config(self, out: Path, train_videos: int | None = None, **options) -> TrainConfig:
        """The TrainConfig of a trial: the sweep's split and data settings, `options` (its parameters) for the rest.
        Given the train split's size, its epochs are train-head's (head_budget) and its patience, unless the space
        sets it, SWEEP_PATIENCE_SHARE of them: 40 of 400 epochs on a small split instead of train-head's 133, so that
        a sweep of 20 trials takes less time than 20 train-heads (docs/sweep.md)."""
        cfg = TrainConfig(
            out=out,
            target=self.target,
            metric=self.metric,
            frame_labelling=self.frame_labelling,
            splitting=self.splitting,
            memory=self.memory,
            runtime=replace(self.runtime, progress=False),
            plots=False,
            overwrite=True,
            **options,
        )
        if train_videos is None or cfg.patience is not None:
            return cfg
        cfg = cfg.with_budget(train_videos)
        return replace(cfg, patience=head_patience(cfg.epochs, SWEEP_PATIENCE_SHARE))


# ---------------------------------------------------------------------------------------------- stage three
def _finetune_splitting() -> SplitConfig:
    return SplitConfig(split="head")


@dataclass(frozen=True)
class FinetuneConfig(_Settings):
    """Settings of `pipeline finetune`: the backbone of a trained head's features, trained together with the head on
    clips decoded from the videos."""

    init: Path
    """The head checkpoint to start from (best.pt of `pipeline train-head`, or of an earlier fine-tune)."""
    out: Path
    """Run folder: config.json, metrics.csv, summary.json, split.csv, best.pt, last.pt, plots (a folder holding a
    run is refused unless --overwrite)."""
    unfreeze: str | None = None
    """Backbone modules to train: comma-separated names (layer4; layer3,layer4; layer4.1; features.7), 'all' or
    'none'. Default, when --unfreeze-last is not given either: the last FINETUNE_UNFREEZE_LAST stage."""
    unfreeze_last: int | None = None
    """Train the backbone's last N stages (ResNet: layer4, then layer3, ...); 0 trains the head only."""
    train_bn: bool = False
    """Update the BatchNorm running statistics of the unfrozen parts; by default they stay as stage one used them."""
    epochs: int = 10
    """Most epochs to train; 0 evaluates the start and writes it as a fine-tuned checkpoint."""
    batch_size: int = 8
    """Clips per forward/backward pass (and videos per validation batch)."""
    accumulate: int = 1
    """Gradient accumulation: one optimiser step every N batches (N x --batch-size clips per step)."""
    clip_len: int | None = None
    """Feature rows (frames at the cached sampling) per training clip, at most, taken by the head's sampling
    (segments or crop); 0: whole sequences (the backbone then runs on every frame of a video in one step). Default:
    the head's, or FINETUNE_CLIP_LEN consecutive rows for a head trained on whole sequences."""
    clip_stride: int | None = None
    """Rows between the frames of a training clip; default: the head's."""
    lr: float = 1e-4
    """Peak AdamW learning rate of the head (linear warm-up, then cosine to 0)."""
    backbone_lr: float | None = None
    """Peak learning rate of the unfrozen backbone; default: FINETUNE_BACKBONE_LR_FACTOR times --lr."""
    weight_decay: float = default_of(TrainConfig, "weight_decay")
    """AdamW weight decay (matrices only)."""
    warmup_epochs: float = default_of(TrainConfig, "warmup_epochs")
    """Linear warm-up of the learning rate, in epochs (fractions allowed)."""
    patience: int = 5
    """Stop after this many epochs without a better val top-1 (ties: lower val loss); 0 never stops early."""
    label_smoothing: float = default_of(TrainConfig, "label_smoothing")
    """Label smoothing of the cross-entropy loss."""
    augment: bool = True
    """Random resized crop and horizontal flip of training clips, drawn once per clip; validation always gets
    stage one's exact preprocessing."""
    val_clips: int | None = None
    """Validate on the clips of at most this many val videos (evenly spread over the split, the same ones every
    epoch); default: every val video."""
    start_eval: bool = True
    """Score the starting model (the head's own checkpoint) on the val videos before training: epoch 0 of best.pt
    and of the summary. --no-start-eval saves that pass."""
    min_scale: float = 0.35
    """Smallest share of a frame's area that a random crop keeps."""
    flip: bool = True
    """Horizontal flips (turn off when left and right matter, e.g. classes that differ by direction of motion)."""
    grad_checkpointing: bool = False
    """Recompute the unfrozen blocks' activations in the backward pass: less memory, about a third more compute."""
    amp: str = "auto"
    """Mixed precision of the backbone on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off."""
    cache: Path | None = None
    """The head's feature cache, whose frame indices define each video's rows; default: the one recorded in
    --init. Videos it lacks are indexed by one pass of the sampling over the file."""
    weights: Path | None = None
    """The backbone's weights file, when the head's features came from one (checked by sha256)."""
    seed: int = default_of(TrainConfig, "seed")
    """Seed of clip positions, augmentation, shuffling and dropout."""
    workers: int | None = None
    """Decode worker processes (seeking, cropping); default: as `pipeline extract` chooses; 0 decodes in-process."""
    plots: bool = True
    """Write curves.png and confusion.png when matplotlib is installed."""
    overwrite: bool = False
    """Replace the run in an --out folder that already holds one (its files are removed first) instead of refusing."""
    splitting: SplitConfig = field(default_factory=_finetune_splitting)
    runtime: Runtime = field(default_factory=_runtime)

    def __post_init__(self):
        for name in ("init", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.unfreeze is not None and self.unfreeze_last is not None:
            raise ValueError("use either --unfreeze or --unfreeze-last, not both")
        if self.unfreeze is not None and not self.unfreeze.strip():
            raise ValueError("--unfreeze needs module names (e.g. layer4), 'all' or 'none'")
        _one_of("--amp", self.amp, AMP_MODES)
        _at_least(
            1,
            batch_size=self.batch_size,
            accumulate=self.accumulate,
            clip_stride=self.clip_stride,
            val_clips=self.val_clips,
        )
        if self.epochs == 0 and not self.start_eval:
            raise ValueError("--epochs 0 only evaluates the start: drop --no-start-eval")
        _at_least(
            0,
            epochs=self.epochs,
            patience=self.patience,
            unfreeze_last=self.unfreeze_last,
            workers=self.workers,
            clip_len=self.clip_len,
        )
        for flag, value in (("--lr", self.lr), ("--backbone-lr", self.backbone_lr)):
            if value is not None:
                _check(flag, value > 0, value, "> 0")
        _check("--weight-decay", self.weight_decay >= 0, self.weight_decay, ">= 0")
        _check("--warmup-epochs", self.warmup_epochs >= 0, self.warmup_epochs, ">= 0")
        _check("--label-smoothing", 0.0 <= self.label_smoothing < 1.0, self.label_smoothing, "in [0, 1)")
        _check("--min-scale", 0.0 < self.min_scale <= 1.0, self.min_scale, "in (0, 1]")
        if self.cache is not None and Path(self.cache).suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"--cache should name an .h5 file, got {str(self.cache)!r}")


# ------------------------------------------------------------------------------------------------- helpers
def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def group_fields(cls: type) -> dict[str, str]:
    """Setting name -> the group field of `cls` that holds it (sampling, splitting, runtime)."""
    out = {}
    for f in fields(cls):
        group = f.default_factory() if callable(f.default_factory) else None
        if group is not None and is_dataclass(group):
            out.update({g.name: f.name for g in fields(group)})
    return out


def config_with(cls: type, config, required: dict, options: dict, what: str):
    """`config`, or a new `cls`, with `options` and the given `required` fields set: the API's keyword style and
    the CLI's. Options may name a group's settings flat (fps=5, device="cpu", val_fraction=0.3).

    Unknown option names and a missing required field raise TypeError naming them."""
    grouped = group_fields(cls)
    own = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - own - set(grouped))
    if unknown:
        raise TypeError(f"unknown {what} options: {', '.join(unknown)}")
    direct = {k: v for k, v in options.items() if k in own}
    direct.update({k: v for k, v in required.items() if v is not None})
    by_group: dict[str, dict] = {}
    for name, value in options.items():
        if name not in own:
            by_group.setdefault(grouped[name], {})[name] = value
    if config is None:
        missing = [k for k in required if k not in direct]
        if missing:
            raise TypeError(f"{what} needs {' and '.join(f'`{k}`' for k in missing)}, or a config")
        template = {f.name: f.default_factory() for f in fields(cls) if f.name in by_group}
    else:
        template = {name: getattr(config, name) for name in by_group}
    for group, values in by_group.items():
        base = direct.get(group, template[group])
        direct[group] = replace(base, **values)
    return cls(**direct) if config is None else replace(config, **direct)
