"""The `pipeline` command: parse options, build a config, call one library function, map the result to an exit code.

Exit codes: 0 success; 1 an error stopped the command (message on stderr, finished work kept); 2 bad command-line
usage; 3 the run finished but some inputs failed (listed, recorded in the cache, retried by the next run).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import (
    EvalConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    Sampling,
    SweepConfig,
    TrainConfig,
    default_of,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUTS_FAILED = 0, 1, 2, 3

app = typer.Typer(
    help="Embed every video frame once with a frozen torchvision CNN into an HDF5 cache, then train temporal heads "
         "on the cached sequences.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _e(name: str):
    return default_of(ExtractConfig, name)


def _s(name: str):
    return default_of(Sampling, name)


def _t(name: str):
    return default_of(TrainConfig, name)


def _v(name: str):
    return default_of(EvalConfig, name)


def _p(name: str):
    return default_of(PredictConfig, name)


def _f(name: str):
    return default_of(FinetuneConfig, name)


def _w(name: str):
    return default_of(SweepConfig, name)


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@contextlib.contextmanager
def _errors(interrupted: str = "interrupted", usage: tuple[type[Exception], ...] = ()):
    """Turn the library's exceptions into a message and an exit code, so that a command states only its work.

    ValueError and its kin (bad settings, inputs, splits, spaces) -> 2; RuntimeError and its kin (weights, caches,
    checkpoints, studies) and OS errors -> 1; Ctrl-C -> 130 after saying what was kept."""
    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: let the command's own exits through
        raise
    except (ValueError, *usage) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except (OSError, RuntimeError) as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(130) from None


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s: %(message)s")


@app.command()
def extract(
    inputs: Annotated[list[Path], typer.Argument(help="Folders (searched recursively for videos and image folders), "
                                                      "video files, image folders, or CSV manifests (path,label[,split]).",
                                                 show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="The cache file to create or resume.")],
    backbone: Annotated[str, typer.Option(help="torchvision classification model.")] = _e("backbone"),
    weights: Annotated[str, typer.Option(help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a local "
                                              "state-dict file, or 'none' (random init).")] = _e("weights"),
    fps: Annotated[Optional[float], typer.Option(help="Keep at most this many frames per second of video time.")] = _s("fps"),
    stride: Annotated[int, typer.Option(help="Keep every K-th decoded frame.")] = _s("stride"),
    max_frames: Annotated[Optional[int], typer.Option(help="Keep at most N frames per video (the first ones).")] = _s("max_frames"),
    num_frames: Annotated[Optional[int], typer.Option(help="Keep N frames spread uniformly over each video.")] = _s("num_frames"),
    frames_fps: Annotated[float, typer.Option(help="Frame rate assumed for folders of images.")] = _s("frames_fps"),
    resize: Annotated[Optional[int], typer.Option(help="Shorter-side resize; default: the weights' own.")] = _e("resize"),
    crop: Annotated[Optional[int], typer.Option(help="Centre-crop size; default: the weights' own.")] = _e("crop"),
    mean: Annotated[Optional[tuple[float, float, float]], typer.Option(help="RGB mean; default: the weights' own.")] = _e("mean"),
    std: Annotated[Optional[tuple[float, float, float]], typer.Option(help="RGB std; default: the weights' own.")] = _e("std"),
    dtype: Annotated[str, typer.Option(help="Feature storage: float16 or float32.")] = _e("dtype"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _e("device"),
    batch_size: Annotated[Optional[int], typer.Option(help="Frames per forward pass \\[default: 8 on CPU, 64 on GPU].")] = _e("batch_size"),
    workers: Annotated[Optional[int], typer.Option(help="Decode worker processes (0 = in-process).")] = _e("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads of the model process.")] = _e("threads"),
    overwrite: Annotated[bool, typer.Option(help="Discard a cache of another feature spec instead of refusing.")] = _e("overwrite"),
    shard: Annotated[Optional[str], typer.Option(help="i/n: extract share i of n of the inputs (Slurm arrays, plain "
                                                      "processes); then `pipeline merge`. Not needed under torchrun.")] = _e("shard"),
    backbone_checkpoint: Annotated[Optional[Path], typer.Option(
        help="Extract exactly the features of this checkpoint: the fine-tuned backbone of a `pipeline finetune` "
             "run (or a head's backbone and weights). Backbone, preprocessing and sampling come from it.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, errors only.")] = False,
) -> None:
    """Extract per-frame features of videos into an HDF5 cache (resumable; failed inputs are reported and skipped)."""
    _setup_logging(quiet)
    with _errors():
        sampling = Sampling(fps=fps, stride=stride, max_frames=max_frames, num_frames=num_frames, frames_fps=frames_fps)
        config = ExtractConfig(output=output, backbone=backbone, weights=weights, resize=resize, crop=crop, mean=mean,
                               std=std, sampling=sampling, dtype=dtype, device=device, batch_size=batch_size,
                               workers=workers, threads=threads, overwrite=overwrite, shard=shard,
                               progress=not quiet)

    from pipeline.extract.run import extract_videos
    from pipeline.predict import extract_with_checkpoint

    with _errors("interrupted: finished videos are kept; rerun the same command to resume"):
        if backbone_checkpoint is not None:
            weights_file = None if weights == _e("weights") else Path(weights)
            report = extract_with_checkpoint(backbone_checkpoint, inputs, output, config=config, weights=weights_file)
        else:
            report = extract_videos(inputs, output, config=config)

    if not quiet or report.failed:
        typer.echo(report.summary())
    if report.failed:
        typer.echo(f"{len(report.failed)} inputs failed (they are retried by the next run):", err=True)
        for key, (path, reason) in sorted(report.failed.items()):
            typer.echo(f"  {path}: {reason}", err=True)
        raise typer.Exit(EXIT_INPUTS_FAILED)


@app.command()
def info(cache: Annotated[Path, typer.Argument(help="A feature cache (.h5).")],
         failures: Annotated[bool, typer.Option(help="List every failed input with its reason.")] = True) -> None:
    """Summarise a feature cache: videos, frames, dim, backbone and weights, labels, failures."""
    from collections import Counter

    from pipeline.data.cache import open_cache

    with _errors():
        c = open_cache(cache)

    spec = c.spec
    frames = sum(c.num_frames(k) for k in c.keys())
    labels = Counter(c.label(k) or "(none)" for k in c.keys())
    typer.echo(f"cache      {c.path}  (schema {c.schema_version}, features {c.dtype})")
    typer.echo(f"videos     {len(c)}   frames {frames}   dim {spec.dim}")
    typer.echo(f"backbone   {spec.backbone}   weights {spec.weights}"
               + (f"   sha256 {spec.weights_sha256[:16]}..." if spec.weights_sha256 else ""))
    pre = spec.preprocessing
    typer.echo(f"preprocess resize {pre.resize} crop {pre.crop} {pre.interpolation} {pre.color} "
               f"mean {list(pre.mean)} std {list(pre.std)}")
    typer.echo(f"sampling   {spec.sampling.describe()}   spec id {spec.id}")
    typer.echo(f"labels     {len([k for k in labels if k != '(none)'])}")
    for label, n in sorted(labels.items()):
        typer.echo(f"  {label:<28} {n}")
    bad = c.failures()
    typer.echo(f"failures   {len(bad)}")
    if failures:
        for f in bad:
            typer.echo(f"  {f['source_path']}: {f['reason']}")
    shards = c.shards()
    if shards:
        typer.echo(f"shards     {len(shards)}   " + "   ".join(f"{s}: {n} videos" for s, n in shards.items()))
    pending = c.unindexed_parts()
    if pending:
        typer.echo(f"note       {pending} finished videos are not indexed yet: rerun the extract command to resume")


@app.command()
def merge(cache: Annotated[Path, typer.Argument(help="The cache that sharded runs wrote parts for.")]) -> None:
    """Build the cache index from every finished part (after `extract --shard i/n` runs; torchrun does it itself)."""
    from pipeline.data.cache import merge as merge_parts

    with _errors():
        n = merge_parts(cache)

    typer.echo(f"{cache}: {n} videos")


@app.command()
def train_head(
    cache: Annotated[Path, typer.Argument(help="Feature cache (.h5) made by `pipeline extract`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: config.json, metrics.csv, summary.json, "
                                                         "best.pt, last.pt, plots.", show_default=False)],
    head: Annotated[str, typer.Option(help="lstm, gru, bilstm, meanpool (order-blind baseline) or attention.")] = _t("head"),
    hidden: Annotated[int, typer.Option(help="Width of the input projection and the temporal layers.")] = _t("hidden"),
    layers: Annotated[int, typer.Option(help="Recurrent or transformer layers.")] = _t("layers"),
    dropout: Annotated[float, typer.Option(help="Dropout after the projection, between layers, before the classifier.")] = _t("dropout"),
    activation: Annotated[str, typer.Option(help="Projection activation: gelu or relu.")] = _t("activation"),
    sampling: Annotated[str, typer.Option(help="Rows of a clip: segments (--clip-len rows spread over the whole video: "
                                               "a random one per segment in training, the centres in evaluation), "
                                               "crop (--clip-len consecutive rows) or whole.")] = _t("sampling"),
    clip_len: Annotated[Optional[int], typer.Option(help="Rows per clip, at most (shorter videos are used whole); "
                                                         "0 = whole sequences.")] = _t("clip_len"),
    clip_stride: Annotated[int, typer.Option(help="Step between the rows a clip is taken from.")] = _t("clip_stride"),
    eval_clips: Annotated[int, typer.Option(help="Evaluation: 0 = one view (segment centres, or the whole sequence); "
                                                 "N = mean over N views.")] = _t("eval_clips"),
    epochs: Annotated[int, typer.Option(help="Most epochs to train.")] = _t("epochs"),
    batch_size: Annotated[int, typer.Option(help="Clips per step.")] = _t("batch_size"),
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = _t("lr"),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = _t("weight_decay"),
    warmup_epochs: Annotated[float, typer.Option(help="Linear learning-rate warm-up, in epochs.")] = _t("warmup_epochs"),
    patience: Annotated[int, typer.Option(help="Early stop after N epochs without a better val top-1; 0 = never.")] = _t("patience"),
    class_weights: Annotated[bool, typer.Option(help="Weight the loss by inverse class frequency.")] = _t("class_weights"),
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = _t("label_smoothing"),
    labels: Annotated[Optional[Path], typer.Option(help="CSV key,label replacing the cache's labels.")] = _t("labels"),
    split: Annotated[str, typer.Option(help="auto (the cache's split column if any, else random), cache or random.")] = _t("split"),
    train_list: Annotated[Optional[Path], typer.Option(help="Official train list (UCF101 trainlist01.txt style).")] = _t("train_list"),
    val_list: Annotated[Optional[Path], typer.Option(help="Official val/test list (UCF101 testlist01.txt style).")] = _t("val_list"),
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out when the split is random.")] = _t("val_fraction"),
    split_seed: Annotated[int, typer.Option(help="Seed of the random split (hash of each video key).")] = _t("split_seed"),
    group_regex: Annotated[Optional[str], typer.Option(help="Keep videos whose keys share this match on one side, "
                                                            "e.g. '_g(\\d+)_' for UCF101 groups.")] = _t("group_regex"),
    seed: Annotated[int, typer.Option(help="Seed of initialisation, crops, shuffling and dropout.")] = _t("seed"),
    memory: Annotated[str, typer.Option(help="auto, ram (read the cache once into memory) or lazy (read per batch).")] = _t("memory"),
    workers: Annotated[int, typer.Option(help="Reader processes in lazy mode.")] = _t("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads \\[default: all cores].")] = _t("threads"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _t("device"),
    plots: Annotated[bool, typer.Option(help="Write curves.png and confusion.png (needs matplotlib).")] = _t("plots"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, errors only.")] = False,
) -> None:
    """Train a temporal head on the cached sequences; writes a run folder with metrics, checkpoints and plots."""
    _setup_logging(quiet)
    with _errors():
        config = TrainConfig(
            out=out, head=head, hidden=hidden, layers=layers, dropout=dropout, activation=activation,
            sampling=sampling, clip_len=clip_len, clip_stride=clip_stride, eval_clips=eval_clips, epochs=epochs,
            batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, patience=patience,
            class_weights=class_weights, label_smoothing=label_smoothing, labels=labels, split=split,
            train_list=train_list, val_list=val_list, val_fraction=val_fraction, split_seed=split_seed,
            group_regex=group_regex, seed=seed, memory=memory, workers=workers, threads=threads, device=device,
            plots=plots, progress=not quiet)

    from pipeline.train_head.train import train_head as run

    with _errors(f"interrupted: {out} keeps best.pt, last.pt and metrics.csv of the finished epochs"):
        result = run(cache, config=config)

    typer.echo(result.summary_line())


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A head checkpoint (best.pt or last.pt).", show_default=False)],
    cache: Annotated[Path, typer.Argument(help="A feature cache of the same features, with labels.", show_default=False)],
    eval_clips: Annotated[Optional[int], typer.Option(help="0 = whole sequences; N = mean over N clips \\[default: as "
                                                           "trained].")] = _v("eval_clips"),
    labels: Annotated[Optional[Path], typer.Option(help="CSV key,label replacing the cache's labels.")] = _v("labels"),
    keys_list: Annotated[Optional[Path], typer.Option("--list", help="Only the videos named in this list file "
                                                                    "(e.g. testlist01.txt).")] = _v("keys_list"),
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for eval.json and confusion.png.")] = _v("out"),
    batch_size: Annotated[int, typer.Option(help="Clips per forward pass.")] = _v("batch_size"),
    memory: Annotated[str, typer.Option(help="auto, ram or lazy.")] = _v("memory"),
    workers: Annotated[int, typer.Option(help="Reader processes in lazy mode.")] = _v("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads \\[default: all cores].")] = _v("threads"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _v("device"),
    json_: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors and the result only.")] = False,
) -> None:
    """Score a head on a labelled cache: top-1, top-5, per-class accuracy, confusion matrix."""
    _setup_logging(quiet)
    with _errors():
        config = EvalConfig(eval_clips=eval_clips, labels=labels, keys_list=keys_list, out=out, batch_size=batch_size,
                            memory=memory, workers=workers, threads=threads, device=device, progress=not quiet)

    from pipeline.train_head.evaluate import evaluate_checkpoint

    with _errors():
        report = evaluate_checkpoint(checkpoint, cache, config=config)

    if json_:
        import json

        typer.echo(json.dumps({"checkpoint": str(checkpoint), "cache": str(cache), "eval": report.eval,
                               **report.metrics, "skipped": len(report.skipped)}, indent=1))
        return
    typer.echo(report.summary_line())
    m = report.metrics
    width = max(len(c) for c in m["classes"])
    support = [sum(row) for row in m["confusion_matrix"]]
    for c, n in zip(m["classes"], support):
        acc = m["per_class_accuracy"][c]
        typer.echo(f"  {c:<{width}}  {'-' if acc is None else f'{acc:6.1%}'}  ({n} videos)")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A head checkpoint (best.pt or last.pt).", show_default=False)],
    inputs: Annotated[list[Path], typer.Argument(help="Videos, frame folders, folders of them, or CSV manifests.",
                                                 show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV of path, top-k labels and probabilities.")] = _p("output"),
    top_k: Annotated[int, typer.Option(help="Classes per video.")] = _p("top_k"),
    json_: Annotated[bool, typer.Option("--json", help="Also write the predictions as JSON, to OUTPUT with the "
                                                      "suffix .json (preds.csv -> preds.json).")] = _p("json"),
    weights: Annotated[Optional[Path], typer.Option(help="The backbone weights file, when the head's features came "
                                                         "from one (checked by sha256).")] = _p("weights"),
    cache: Annotated[Optional[Path], typer.Option(help="Cache of the predicted videos' features \\[default: "
                                                       "predict_features.h5 beside the checkpoint].")] = _p("cache"),
    eval_clips: Annotated[Optional[int], typer.Option(help="0 = whole sequences; N = mean over N clips \\[default: as "
                                                           "trained].")] = _p("eval_clips"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _p("device"),
    batch_size: Annotated[Optional[int], typer.Option(help="Frames per backbone forward pass.")] = _p("batch_size"),
    workers: Annotated[Optional[int], typer.Option(help="Decode worker processes (0 = in-process).")] = _p("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads \\[default: all cores].")] = _p("threads"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors and the summary only.")] = False,
) -> None:
    """Classify new videos: extract them exactly as the head's features were (cached), then write top-k to CSV."""
    _setup_logging(quiet)
    with _errors():
        config = PredictConfig(output=output, top_k=top_k, json=json_, weights=weights, cache=cache,
                               eval_clips=eval_clips, device=device, batch_size=batch_size, workers=workers,
                               threads=threads, progress=not quiet)

    from pipeline.predict import predict as run

    with _errors("interrupted: extracted videos are kept in the prediction cache"):
        report = run(checkpoint, inputs, config=config)

    if not quiet:
        shown = report.predictions[:20]
        for p in shown:
            typer.echo(f"  {p.path}: " + (f"FAILED {p.error}" if p.error else
                                         ", ".join(f"{label} {prob:.1%}" for label, prob in p.top[:3])))
        if len(report.predictions) > len(shown):
            typer.echo(f"  ... {len(report.predictions) - len(shown)} more in {report.output}")
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(EXIT_INPUTS_FAILED)


@app.command()
def finetune(
    inputs: Annotated[list[Path], typer.Argument(help="Labelled videos or frame folders: folders (class "
                                                      "subfolders), files or CSV manifests, as for extract.",
                                                 show_default=False)],
    init: Annotated[Path, typer.Option(help="The head checkpoint to start from (runs/NAME/best.pt).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: config.json, metrics.csv, summary.json, "
                                                         "split.csv, best.pt, last.pt, plots.", show_default=False)],
    unfreeze: Annotated[Optional[str], typer.Option(help="Backbone modules to train: layer4 | layer3,layer4 | all | "
                                                         "none \\[default: the last stage].")] = _f("unfreeze"),
    unfreeze_last: Annotated[Optional[int], typer.Option(help="Train the backbone's last N stages.")] = _f("unfreeze_last"),
    train_bn: Annotated[bool, typer.Option(help="Update BatchNorm running statistics of the trained parts.")] = _f("train_bn"),
    epochs: Annotated[int, typer.Option(help="Most epochs; 0 = evaluate the start only.")] = _f("epochs"),
    batch_size: Annotated[int, typer.Option(help="Clips per forward/backward pass.")] = _f("batch_size"),
    accumulate: Annotated[int, typer.Option(help="Gradient accumulation: one step every N batches.")] = _f("accumulate"),
    clip_len: Annotated[Optional[int], typer.Option(help="Frames per training clip \\[default: the head's].")] = _f("clip_len"),
    clip_stride: Annotated[Optional[int], typer.Option(help="Rows between a clip's frames \\[default: the head's].")] = _f("clip_stride"),
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate of the head.")] = _f("lr"),
    backbone_lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the backbone \\[default: lr/10].")] = _f("backbone_lr"),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = _f("weight_decay"),
    warmup_epochs: Annotated[float, typer.Option(help="Linear learning-rate warm-up, in epochs.")] = _f("warmup_epochs"),
    patience: Annotated[int, typer.Option(help="Early stop after N epochs without a better val top-1; 0 = never.")] = _f("patience"),
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = _f("label_smoothing"),
    augment: Annotated[bool, typer.Option(help="Random resized crop + flip of training clips (one draw per clip).")] = _f("augment"),
    min_scale: Annotated[float, typer.Option(help="Smallest area share a random crop keeps.")] = _f("min_scale"),
    flip: Annotated[bool, typer.Option(help="Horizontal flips (off when left/right matters).")] = _f("flip"),
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute the trained blocks in backward: less memory.")] = _f("grad_checkpointing"),
    amp: Annotated[str, typer.Option(help="Mixed precision on CUDA: auto, bf16, fp16 or off.")] = _f("amp"),
    labels: Annotated[Optional[Path], typer.Option(help="CSV key,label replacing the inputs' labels.")] = _f("labels"),
    split: Annotated[str, typer.Option(help="head (the --init run's split), auto, cache or random.")] = _f("split"),
    train_list: Annotated[Optional[Path], typer.Option(help="Official train list (with --split auto).")] = _f("train_list"),
    val_list: Annotated[Optional[Path], typer.Option(help="Official val/test list (with --split auto).")] = _f("val_list"),
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out by --split random.")] = _f("val_fraction"),
    split_seed: Annotated[int, typer.Option(help="Seed of --split random.")] = _f("split_seed"),
    group_regex: Annotated[Optional[str], typer.Option(help="Keep videos sharing this match on one side.")] = _f("group_regex"),
    cache: Annotated[Optional[Path], typer.Option(help="The head's feature cache (frame indices) \\[default: as "
                                                       "recorded in --init].")] = _f("cache"),
    weights: Annotated[Optional[Path], typer.Option(help="The backbone weights file, when the head's features came "
                                                         "from one (checked by sha256).")] = _f("weights"),
    seed: Annotated[int, typer.Option(help="Seed of clip positions, augmentation, shuffling, dropout.")] = _f("seed"),
    workers: Annotated[Optional[int], typer.Option(help="Decode worker processes (0 = in-process).")] = _f("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads \\[default: all cores].")] = _f("threads"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _f("device"),
    plots: Annotated[bool, typer.Option(help="Write curves.png and confusion.png (needs matplotlib).")] = _f("plots"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, errors only.")] = False,
) -> None:
    """Fine-tune the backbone of a head's features together with the head, on clips decoded from the videos."""
    _setup_logging(quiet)
    with _errors():
        config = FinetuneConfig(
            init=init, out=out, unfreeze=unfreeze, unfreeze_last=unfreeze_last, train_bn=train_bn, epochs=epochs,
            batch_size=batch_size, accumulate=accumulate, clip_len=clip_len, clip_stride=clip_stride, lr=lr,
            backbone_lr=backbone_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, patience=patience,
            label_smoothing=label_smoothing, augment=augment, min_scale=min_scale, flip=flip,
            grad_checkpointing=grad_checkpointing, amp=amp, labels=labels, split=split, train_list=train_list,
            val_list=val_list, val_fraction=val_fraction, split_seed=split_seed, group_regex=group_regex,
            cache=cache, weights=weights, seed=seed, workers=workers, threads=threads, device=device, plots=plots,
            progress=not quiet)

    from pipeline.finetune.train import finetune as run

    with _errors(f"interrupted: {out} keeps best.pt, last.pt and metrics.csv of the finished epochs"):
        result = run(inputs, config=config)

    typer.echo(result.summary_line())


@app.command()
def sweep(
    cache: Annotated[Path, typer.Argument(help="Feature cache (.h5) made by `pipeline extract`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: trials/NNNN run folders, leaderboard.csv/.json, "
                                                         "best.pt, search.png, study.db.", show_default=False)],
    space: Annotated[Optional[Path], typer.Option(help="YAML search space, one line per setting: NAME: \\[choices] | "
                                                       "{low, high, log, step} | value (docs/sweep.md) \\[default: "
                                                       "head, hidden, lr, dropout, clip_len].")] = _w("space"),
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Inline NAME=SPEC, repeatable: "
                                                       "hidden=64,128,256 (choices)  lr=1e-4:1e-2:log (range)  "
                                                       "dropout=0:0.5:0.1 (range, step)  epochs=10 (fixed); "
                                                       "replaces the --space entry of that name.")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Trials of the study, all workers together \\[default: the whole "
                                                       "grid, else 20].")] = _w("trials"),
    strategy: Annotated[str, typer.Option(help="tpe, random or grid.")] = _w("strategy"),
    pruner: Annotated[str, typer.Option(help="median, halving, hyperband or none.")] = _w("pruner"),
    prune_warmup: Annotated[int, typer.Option(help="Epochs every trial runs before it can be pruned.")] = _w("prune_warmup"),
    timeout: Annotated[Optional[float], typer.Option(help="Time budget in seconds: no trial starts after it, the "
                                                          "running one stops at its next epoch end.")] = _w("timeout"),
    reduce_dim: Annotated[Optional[int], typer.Option(help="PCA of the features to this many dimensions (fit on the "
                                                           "train split once; folded into the checkpoints).")] = _w("reduce_dim"),
    refit: Annotated[Optional[int], typer.Option(help="After a --reduce-dim sweep, train the settings of the N best "
                                                     "trials again on the full features (OUT/refit/); the best becomes "
                                                     "best.pt; 0: none \\[default: 3 with --reduce-dim].",
                                                show_default=False)] = _w("refit"),
    stack: Annotated[Optional[int], typer.Option(help="Trials asked at once; mean-pool heads of one shape train as one "
                                                      "model \\[default: 8 for grid and random, 1 for tpe].")] = _w("stack"),
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage shared by workers: sqlite:///PATH, "
                                                        "postgresql://..., journal:PATH \\[default: OUT/study.db].")] = _w("storage"),
    study: Annotated[Optional[str], typer.Option(help="Study name \\[default: the name of --out].")] = _w("study"),
    resume: Annotated[bool, typer.Option(help="Continue or join the study (creates it when missing).")] = _w("resume"),
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = _w("seed"),
    labels: Annotated[Optional[Path], typer.Option(help="CSV key,label replacing the cache's labels.")] = _w("labels"),
    split: Annotated[str, typer.Option(help="auto, cache or random (one split for every trial).")] = _w("split"),
    train_list: Annotated[Optional[Path], typer.Option(help="Official train list.")] = _w("train_list"),
    val_list: Annotated[Optional[Path], typer.Option(help="Official val/test list.")] = _w("val_list"),
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out when the split is random.")] = _w("val_fraction"),
    split_seed: Annotated[int, typer.Option(help="Seed of the random split.")] = _w("split_seed"),
    group_regex: Annotated[Optional[str], typer.Option(help="Keep videos whose keys share this match on one side.")] = _w("group_regex"),
    memory: Annotated[str, typer.Option(help="auto, ram or lazy (how the cache is read, once).")] = _w("memory"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads \\[default: all cores].")] = _w("threads"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = _w("device"),
    plots: Annotated[bool, typer.Option(help="Write search.png (needs matplotlib).")] = _w("plots"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; the leaderboard only.")] = False,
) -> None:
    """Search head settings on one cache (grid, random or TPE, with pruning); several processes can share a study.

    Without --space and --param it searches a default space of head, hidden, lr, dropout and clip_len
    (docs/sweep.md)."""
    _setup_logging(quiet)
    with _errors():
        config = SweepConfig(
            out=out, space=space, params=tuple(param or ()), trials=trials, strategy=strategy, pruner=pruner,
            prune_warmup=prune_warmup, timeout=timeout, reduce_dim=reduce_dim, refit=refit, stack=stack,
            storage=storage, study=study, resume=resume, seed=seed, labels=labels, split=split,
            train_list=train_list, val_list=val_list, val_fraction=val_fraction, split_seed=split_seed,
            group_regex=group_regex, memory=memory, threads=threads, device=device, plots=plots, progress=not quiet)

    from pipeline.sweep.run import SweepError
    from pipeline.sweep.run import sweep as run

    if space is None and not param and not resume:
        from pipeline.sweep.space import default_space

        typer.echo("no --space or --param: searching the default space (docs/sweep.md)\n  "
                   + "\n  ".join(default_space().describe()))

    # a study of other settings is a usage error too
    with _errors(f"interrupted: the study keeps its finished trials; continue with the same command and --resume "
                 f"({out}/leaderboard.csv lists them)", usage=(SweepError,)):
        result = run(cache, config=config)
    typer.echo(result.table())
    typer.echo(result.summary_line())


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the sample videos and the cache.")] = Path("demo_out"),
    backbone: Annotated[str, typer.Option(help="torchvision classification model.")] = "resnet18",
    weights: Annotated[str, typer.Option(help="Weights for the backbone ('none' needs no download).")] = "none",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run the pipeline on a generated sample whose classes differ only in frame order."""
    _setup_logging(quiet)
    from pipeline.demo import run_demo

    with _errors():
        run_demo(out, backbone=backbone, weights=weights, progress=not quiet, echo=typer.echo)



def main() -> None:
    app()
