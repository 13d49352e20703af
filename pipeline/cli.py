"""The `pipeline` command: parse options, build a config, call one library function, map the result to an exit code.

Exit codes: 0 success; 1 an error stopped the command (message on stderr, finished work kept); 2 bad command-line
usage; 3 the run finished but some inputs failed (listed, recorded in the cache, retried by the next run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import ExtractConfig, Sampling, default_of

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


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


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
    batch_size: Annotated[Optional[int], typer.Option(help="Frames per forward pass [default: 8 on CPU, 64 on GPU].")] = _e("batch_size"),
    workers: Annotated[Optional[int], typer.Option(help="Decode worker processes (0 = in-process).")] = _e("workers"),
    threads: Annotated[Optional[int], typer.Option(help="Torch threads of the model process.")] = _e("threads"),
    overwrite: Annotated[bool, typer.Option(help="Discard a cache of another feature spec instead of refusing.")] = _e("overwrite"),
    shard: Annotated[Optional[str], typer.Option(help="i/n: extract share i of n of the inputs (Slurm arrays, plain "
                                                      "processes); then `pipeline merge`. Not needed under torchrun.")] = _e("shard"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, errors only.")] = False,
) -> None:
    """Extract per-frame features of videos into an HDF5 cache (resumable; failed inputs are reported and skipped)."""
    _setup_logging(quiet)
    try:
        sampling = Sampling(fps=fps, stride=stride, max_frames=max_frames, num_frames=num_frames, frames_fps=frames_fps)
        config = ExtractConfig(output=output, backbone=backbone, weights=weights, resize=resize, crop=crop, mean=mean,
                               std=std, sampling=sampling, dtype=dtype, device=device, batch_size=batch_size,
                               workers=workers, threads=threads, overwrite=overwrite, shard=shard,
                               progress=not quiet)
    except ValueError as e:
        raise _fail(str(e), EXIT_USAGE) from None

    from pipeline.data.cache import CacheError
    from pipeline.extract.backbone import WeightsError
    from pipeline.extract.inputs import InputError
    from pipeline.extract.run import extract_videos

    try:
        report = extract_videos(inputs, output, config=config)
    except (InputError, ValueError) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except (CacheError, WeightsError, RuntimeError) as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished videos are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
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

    from pipeline.data.cache import CacheError, describe_sampling, open_cache

    try:
        c = open_cache(cache)
    except (FileNotFoundError, CacheError) as e:
        raise _fail(str(e)) from None
    spec = c.spec
    frames = sum(c.num_frames(k) for k in c.keys())
    labels = Counter(c.label(k) or "(none)" for k in c.keys())
    typer.echo(f"cache      {c.path}  (schema {c.schema_version}, features {c.dtype})")
    typer.echo(f"videos     {len(c)}   frames {frames}   dim {spec.dim}")
    typer.echo(f"backbone   {spec.backbone}   weights {spec.weights}"
               + (f"   sha256 {spec.weights_sha256[:16]}..." if spec.weights_sha256 else ""))
    pre = spec.preprocessing
    typer.echo(f"preprocess resize {pre['resize']} crop {pre['crop']} {pre['interpolation']} {pre['color']} "
               f"mean {pre['mean']} std {pre['std']}")
    typer.echo(f"sampling   {describe_sampling(spec.sampling)}   spec id {spec.id}")
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
    from pipeline.data.cache import CacheError
    from pipeline.data.cache import merge as merge_parts

    try:
        n = merge_parts(cache)
    except CacheError as e:
        raise _fail(str(e)) from None
    typer.echo(f"{cache}: {n} videos")


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

    try:
        run_demo(out, backbone=backbone, weights=weights, progress=not quiet, echo=typer.echo)
    except RuntimeError as e:
        raise _fail(str(e)) from None


def main() -> None:
    app()
