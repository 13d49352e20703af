"""Every user-facing setting and its default, in one place.

The CLI reads its defaults from these dataclasses, and `__post_init__` errors name the CLI flag to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from pipeline.spec import Sampling

FEATURE_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")


def default_of(cls: type, name: str):
    """The default of dataclass field `name`: the CLI uses this so that no default is written twice."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


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
CLIP_SAMPLINGS = ("segments", "crop", "whole")


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
    sampling: str = "segments"
    """Which rows of a video a clip holds. segments: --clip-len rows spread over the whole video (it is cut into
    --clip-len equal segments; training takes a random row of each, evaluation the centres); crop: --clip-len
    consecutive rows at a random start (evaluation: the whole sequence, or --eval-clips crops); whole: every row.
    Videos with fewer rows than --clip-len are used whole by every sampling."""
    clip_len: int | None = 16
    """Rows per clip, at most (shorter videos are used whole); None or 0: whole sequences (--sampling whole)."""
    clip_stride: int = 1
    """Step between the rows a clip is taken from (also applied to whole sequences at evaluation)."""
    eval_clips: int = 0
    """Evaluation: 0 scores one view (segments: their centres; crop, whole: the whole sequence); N >= 1 averages
    the probabilities of N views (segments: N evenly spaced rows of each segment; crop: N evenly spaced crops)."""
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
        if self.sampling not in CLIP_SAMPLINGS:
            raise ValueError(f"--sampling must be one of {', '.join(CLIP_SAMPLINGS)}, got {self.sampling!r}")
        if self.clip_len in (None, 0) or self.sampling == "whole":  # one way to say "whole sequences" in the records
            object.__setattr__(self, "clip_len", None)
            object.__setattr__(self, "sampling", "whole")
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
            raise ValueError("--eval-clips needs --sampling segments or crop and a --clip-len (a whole sequence has "
                             "one view)")
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
        _check_regex("--group-regex", self.group_regex)

    def to_dict(self) -> dict:
        return _json_able(self)


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
    """Also write the predictions as JSON, to OUTPUT with the suffix .json (preds.csv -> preds.json)."""
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
        if self.json and self.output.suffix.lower() == ".json":
            raise ValueError(f"--json writes the JSON to OUTPUT with the suffix .json, which is -o {self.output} "
                             f"itself; give -o a .csv name")
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

STRATEGIES = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "hyperband", "none")
SWEEP_TRIALS = 20  # trials of a tpe or random sweep when --trials is not given (grid: every combination)
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


@dataclass(frozen=True)
class SweepConfig:
    """Settings of `pipeline sweep`: the search space and strategy, the data every trial shares, the study's storage.

    The trials' own settings (head, hidden, lr, epochs, ...) come from the space; what it leaves out keeps its
    TrainConfig default."""

    out: Path
    """Sweep folder: trials/NNNN/ run folders, leaderboard.csv/.json, best.pt, search.png, sweep.json, and by
    default the study itself (study.db)."""
    space: Path | dict | None = None
    """YAML file (or, from Python, a dict of the same form): parameter -> a list of choices, a range
    {low, high, log, step}, or one value for every trial. Without it and without params: SWEEP_SPACE (or, with
    --resume, the study's own space)."""
    params: tuple[str, ...] = ()
    """Inline parameters NAME=SPEC: hidden=64,128,256 (choices), lr=1e-4:1e-2:log, layers=1:3, dropout=0:0.5:0.1
    (ranges: low:high[:log or :step]), epochs=10 (fixed). They replace the file's entry of the same name."""
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
    seed: int = 0
    """Seed of the sampler (each trial's own seed is the `seed` parameter, default 0)."""
    labels: Path | None = default_of(TrainConfig, "labels")
    split: str = default_of(TrainConfig, "split")
    train_list: Path | None = default_of(TrainConfig, "train_list")
    val_list: Path | None = default_of(TrainConfig, "val_list")
    val_fraction: float = default_of(TrainConfig, "val_fraction")
    split_seed: int = default_of(TrainConfig, "split_seed")
    group_regex: str | None = default_of(TrainConfig, "group_regex")
    memory: str = default_of(TrainConfig, "memory")
    threads: int | None = default_of(TrainConfig, "threads")
    device: str = default_of(TrainConfig, "device")
    plots: bool = True
    """Write search.png (needs matplotlib); trials write no plots."""
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "params", tuple(self.params))
        if self.space is not None and not isinstance(self.space, dict):
            object.__setattr__(self, "space", Path(self.space))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if self.prune_warmup < 1:
            raise ValueError(f"--prune-warmup must be >= 1, got {self.prune_warmup}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.reduce_dim is not None and self.reduce_dim < 1:
            raise ValueError(f"--reduce-dim must be >= 1, got {self.reduce_dim}")
        if self.refit is not None and self.refit < 0:
            raise ValueError(f"--refit must be >= 0, got {self.refit}")
        if self.refit and self.reduce_dim is None:
            raise ValueError("--refit trains the best settings again on the full features after a --reduce-dim "
                             "sweep; without --reduce-dim the trials already use them (drop --refit)")
        if self.stack is not None and self.stack < 1:
            raise ValueError(f"--stack must be >= 1, got {self.stack}")
        if self.study is not None and not self.study.strip():
            raise ValueError("--study must not be empty")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
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

    def train_config(self, out: Path, **options) -> TrainConfig:
        """The TrainConfig of a trial: the sweep's split and data settings, `options` (its parameters) for the rest."""
        return TrainConfig(out=out, labels=self.labels, split=self.split, train_list=self.train_list,
                           val_list=self.val_list, val_fraction=self.val_fraction, split_seed=self.split_seed,
                           group_regex=self.group_regex, memory=self.memory, threads=self.threads,
                           device=self.device, plots=False, progress=False, **options)

    def to_dict(self) -> dict:
        """JSON-able: paths as strings."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


AMP_MODES = ("auto", "bf16", "fp16", "off")
FINETUNE_SPLIT_MODES = ("head", *SPLIT_MODES)


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `pipeline finetune`: the backbone of a trained head's features, trained together with the head on
    clips decoded from the videos."""

    init: Path
    """The head checkpoint to start from (best.pt of `pipeline train-head`, or of an earlier fine-tune)."""
    out: Path
    """Run folder: config.json, metrics.csv, summary.json, split.csv, best.pt, last.pt, plots (files are replaced)."""
    unfreeze: str | None = None
    """Backbone modules to train: comma-separated names (layer4; layer3,layer4; layer4.1; features.7), 'all' or
    'none'. Default, when --unfreeze-last is not given either: the last stage."""
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
    """Feature rows (frames at the cached sampling) per training clip; default: the head's, or 16 for a head trained
    on whole sequences."""
    clip_stride: int | None = None
    """Rows between the frames of a training clip; default: the head's."""
    lr: float = 1e-4
    """Peak AdamW learning rate of the head (linear warm-up, then cosine to 0)."""
    backbone_lr: float | None = None
    """Peak learning rate of the unfrozen backbone; default: a tenth of --lr."""
    weight_decay: float = default_of(TrainConfig, "weight_decay")
    warmup_epochs: float = default_of(TrainConfig, "warmup_epochs")
    patience: int = 5
    """Stop after this many epochs without a better val top-1 (ties: lower val loss); 0 never stops early."""
    label_smoothing: float = default_of(TrainConfig, "label_smoothing")
    augment: bool = True
    """Random resized crop and horizontal flip of training clips, drawn once per clip; validation always gets
    stage one's exact preprocessing."""
    min_scale: float = 0.35
    """Smallest share of a frame's area that a random crop keeps."""
    flip: bool = True
    """Horizontal flips (turn off when left and right matter, e.g. classes that differ by direction of motion)."""
    grad_checkpointing: bool = False
    """Recompute the unfrozen blocks' activations in the backward pass: less memory, about a third more compute."""
    amp: str = "auto"
    """Mixed precision of the backbone on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off."""
    labels: Path | None = default_of(TrainConfig, "labels")
    """CSV `key,label` that overrides the labels of the inputs."""
    split: str = "head"
    """head: the split of the --init run (its split.csv, else recomputed from its recorded settings); auto, cache or
    random: a new split as `train-head --split` makes it."""
    train_list: Path | None = default_of(TrainConfig, "train_list")
    val_list: Path | None = default_of(TrainConfig, "val_list")
    val_fraction: float = default_of(TrainConfig, "val_fraction")
    split_seed: int = default_of(TrainConfig, "split_seed")
    group_regex: str | None = default_of(TrainConfig, "group_regex")
    cache: Path | None = None
    """The head's feature cache, whose frame indices define each video's rows; default: the one recorded in
    --init. Videos it lacks are indexed by one pass of the sampling over the file."""
    weights: Path | None = None
    """The backbone's weights file, when the head's features came from one (checked by sha256)."""
    seed: int = default_of(TrainConfig, "seed")
    """Seed of clip positions, augmentation, shuffling and dropout."""
    workers: int | None = None
    """Decode worker processes (seeking, cropping); default: as `pipeline extract` chooses; 0 decodes in-process."""
    threads: int | None = None
    """Torch threads; default: all CPU cores."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    plots: bool = True
    """Write curves.png and confusion.png when matplotlib is installed."""
    progress: bool = True

    def __post_init__(self):
        for name in ("init", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.clip_len == 0:
            raise ValueError("--clip-len must be >= 1: fine-tuning trains on clips (whole sequences would run the "
                             "backbone on every frame of a video in one step)")
        if self.unfreeze is not None and self.unfreeze_last is not None:
            raise ValueError("use either --unfreeze or --unfreeze-last, not both")
        if self.unfreeze is not None and not self.unfreeze.strip():
            raise ValueError("--unfreeze needs module names (e.g. layer4), 'all' or 'none'")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.split not in FINETUNE_SPLIT_MODES:
            raise ValueError(f"--split must be one of {', '.join(FINETUNE_SPLIT_MODES)}, got {self.split!r}")
        if self.split == "head" and (self.train_list or self.val_list):
            raise ValueError("--train-list/--val-list make a new split: pass --split auto with them")
        _check_device(self.device)
        for flag, value in (("--batch-size", self.batch_size), ("--accumulate", self.accumulate),
                            ("--clip-len", self.clip_len), ("--clip-stride", self.clip_stride)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--epochs", self.epochs), ("--patience", self.patience),
                            ("--unfreeze-last", self.unfreeze_last), ("--workers", self.workers)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--lr", self.lr), ("--backbone-lr", self.backbone_lr)):
            if value is not None and not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.cache is not None and Path(self.cache).suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"--cache should name an .h5 file, got {str(self.cache)!r}")

        _check_regex("--group-regex", self.group_regex)

    def to_dict(self) -> dict:
        return _json_able(self)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def config_with(cls: type, config, required: dict, options: dict, what: str):
    """`config`, or a new `cls`, with `options` and the given `required` fields set (the API's keyword style).

    Unknown option names and a missing required field raise TypeError naming them."""
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        raise TypeError(f"unknown {what} options: {', '.join(unknown)}")
    options = {**options, **{k: v for k, v in required.items() if v is not None}}
    if config is None:
        missing = [k for k in required if k not in options]
        if missing:
            raise TypeError(f"{what} needs {' and '.join(f'`{k}`' for k in missing)}, or a config")
        return cls(**options)
    return replace(config, **options)


def _check_regex(flag: str, pattern: str | None) -> None:
    if pattern is not None:
        import re

        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def _json_able(config) -> dict:
    """A config as JSON-able data: paths as strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
