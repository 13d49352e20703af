"""The `pipeline` command: parse options, build a config, call one library function, map the result to an exit code.

Each command's options are made from its config dataclass (pipeline/config.py): the field's name is the flag, its
default the default and its docstring the help text, so a setting is declared once. Exit codes: 0 success; 1 an
error stopped the command (message on stderr, finished work kept); 2 bad command-line usage; 3 the run finished but
some inputs failed (listed, recorded in the cache, retried by the next run).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import logging
import re
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline import config as settings_module
from pipeline.config import (
    EvalConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    SweepConfig,
    TrainConfig,
    config_with,
    default_cache_path,
    default_run_folder,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUTS_FAILED = 0, 1, 2, 3

app = typer.Typer(
    help="Embed every video frame once with a frozen torchvision CNN into an HDF5 cache, then train temporal heads "
    "on the cached sequences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""),
    ] = False,
) -> None:
    """Embed every video frame once with a frozen torchvision CNN into an HDF5 cache, then train temporal heads on
    the cached sequences."""


# ------------------------------------------------------------------------------------- options from configs
@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal under the field in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = after.value.value
    return docs


def _help(text: str, computed_default: bool) -> str:
    """A docstring as option help: one paragraph, named constants as their values, Rich markup shown as typed.
    Where the default is computed (the field's default is None), the docstring's closing "default: ..." clause is
    shown as the default."""
    text = " ".join(text.split())

    def value(m: re.Match) -> str:
        found = getattr(settings_module, m.group(0), None)
        return str(found) if isinstance(found, (int, float, str)) else m.group(0)

    text = re.sub(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", value, text)
    text = text.replace("[", "\\[")
    clause = re.search(r"(?:^|[;.] )[Dd]efault(?:, [^:]+)?: ([^;]+?)\.?$", text) if computed_default else None
    if clause:
        text = f"{text[: clause.start()].rstrip(';. ')}. \\[default: {clause.group(1)}]"
    return text


def _option_type(annotation) -> Any:
    """A field's type as typer takes it: `X | None` -> Optional[X]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return Optional[args[0]]  # noqa: UP045 (typer reads typing.Optional)
    return annotation


def _config_options(
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    flags: dict[str, tuple[str, ...]] | None = None,
    kinds: dict[str, Any] | None = None,
    metavars: dict[str, str] | None = None,
    computed: dict[str, str] | None = None,
) -> list[inspect.Parameter]:
    """One option per setting of `cls` (required where the field has no default), the settings of its groups
    (sampling, splitting, runtime) included; `skip` leaves some out, `flags` renames, `kinds` replaces a field's
    type, `metavars` names values, `computed` gives required settings a default that the command computes (the
    value says which)."""
    flags, kinds, metavars, computed = flags or {}, kinds or {}, metavars or {}, computed or {}
    params: list[inspect.Parameter] = []

    def walk(c: type, defaults) -> None:
        hints = typing.get_type_hints(c, vars(sys.modules[c.__module__]))
        docs = _field_docs(c)
        for f in fields(c):
            if f.name in skip or f.name == "progress":  # progress: the command's --quiet
                continue
            if defaults is not None:
                default = getattr(defaults, f.name)
            elif f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = inspect.Parameter.empty  # a required option
            if is_dataclass(hints[f.name]):
                walk(hints[f.name], default)
                continue
            kind = kinds.get(f.name, _option_type(hints[f.name]))
            doc = docs.get(f.name, "")
            if f.name in computed:  # the command fills it in: None here
                default, kind, doc = None, Optional[kind], f"{doc} Default: {computed[f.name]}."  # noqa: UP045
            extra = {"metavar": metavars[f.name]} if f.name in metavars else {"metavar": ""} if kind is bool else {}
            shown = default not in (None, (), inspect.Parameter.empty)
            option = typer.Option(*flags.get(f.name, ()), help=_help(doc, default is None), show_default=shown, **extra)
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None if default == () else default,
                    annotation=Annotated[kind, option],
                )
            )

    walk(cls, None)
    return params


def _command(cls: type, name: str | None = None, **option_args):
    """Register `body` as a command whose options are its own parameters plus those of the settings of `cls`; the
    settings reach `body` as keyword arguments (**settings)."""

    def register(body):
        own = [
            p
            for p in inspect.signature(body, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        taken = {p.name for p in own}
        generated = [p for p in _config_options(cls, **option_args) if p.name not in taken]

        @functools.wraps(body)
        def command(**kwargs):
            return body(**kwargs)

        command.__signature__ = inspect.Signature(own + generated)
        command.__annotations__ = {}
        del command.__wrapped__  # typer must read the signature above, not body's
        app.command(name)(command)
        return body

    return register


def _settings(cls: type, values: dict, quiet: bool):
    """The config of a command: its options (None from a repeatable option that was not given: empty)."""
    values = {
        k: (() if v is None and k == "params" else tuple(v) if isinstance(v, list) else v) for k, v in values.items()
    }
    return config_with(cls, None, {}, {**values, "progress": not quiet}, "the command")


# --------------------------------------------------------------------------------------------- error mapping
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


def _train(cls: type, settings: dict, quiet: bool, run) -> None:
    """A command that trains into a run folder (train-head, finetune): `run(config)`, then its summary line."""
    _setup_logging(quiet)
    with _errors():
        config = _settings(cls, settings, quiet)
    with _errors(f"interrupted: {config.out} keeps best.pt, last.pt and metrics.csv of the finished epochs"):
        result = run(config)
    typer.echo(result.summary_line())


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, errors and the result only.", metavar="")]


# ------------------------------------------------------------------------------------------------ stage one
@_command(
    ExtractConfig,
    flags={"output": ("-o", "--output")},
    computed={"output": "the first input's name with .h5, here (videos/ -> videos.h5)"},
)
def extract(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Folders (searched recursively for videos and image folders), "
            "video files, image folders, or CSV manifests (path,label[,split]).",
            show_default=False,
        ),
    ],
    backbone_checkpoint: Annotated[
        Optional[Path],
        typer.Option(  # noqa: UP045
            help="Extract exactly the features of this checkpoint: the fine-tuned backbone of a `pipeline finetune` "
            "run (or a head's backbone and weights). Backbone, preprocessing and sampling come from it."
        ),
    ] = None,
    quiet: Quiet = False,
    **settings,
) -> None:
    """Extract per-frame features of videos into an HDF5 cache (resumable; failed inputs are reported and skipped)."""
    _setup_logging(quiet)
    with _errors():
        if settings["output"] is None:
            settings["output"] = default_cache_path(inputs)
        config = _settings(ExtractConfig, settings, quiet)
    output = config.output

    from pipeline.data.cache import printable
    from pipeline.extract.run import extract_videos
    from pipeline.predict import extract_with_checkpoint

    with _errors("interrupted: finished videos are kept; rerun the same command to resume"):
        if backbone_checkpoint is not None:
            weights = settings["weights"]
            weights_file = None if weights == ExtractConfig.__dataclass_fields__["weights"].default else Path(weights)
            report = extract_with_checkpoint(backbone_checkpoint, inputs, output, config=config, weights=weights_file)
        else:
            report = extract_videos(inputs, output, config=config)

    if not quiet or report.failed:
        typer.echo(report.summary())
    for key in report.pruned:
        typer.echo(f"  pruned {printable(key)}")
    if report.failed:
        typer.echo(f"{len(report.failed)} inputs failed (they are retried by the next run):", err=True)
        for _key, (path, reason) in sorted(report.failed.items()):
            typer.echo(f"  {printable(path)}: {printable(reason)}", err=True)
        raise typer.Exit(EXIT_INPUTS_FAILED)


@app.command()
def info(
    cache: Annotated[Path, typer.Argument(help="A feature cache (.h5).")],
    failures: Annotated[bool, typer.Option(help="List every failed input with its reason.", metavar="")] = True,
    check: Annotated[
        bool,
        typer.Option(
            help="Open every video's data and check it against the index; exit 1 naming the damaged ones.", metavar=""
        ),
    ] = False,
) -> None:
    """Summarise a feature cache: videos, frames, dim, backbone and weights, labels, failures, missing
    files."""
    from collections import Counter

    from pipeline.data.cache import open_cache, printable, writer_active

    with _errors():
        c = open_cache(cache)

    spec = c.spec
    frames = sum(c.num_frames(k) for k in c.keys())
    labels = Counter(c.label(k) or "(none)" for k in c.keys())
    typer.echo(
        f"cache      {printable(str(c.path))}  (schema {c.schema_version}, features {c.dtype}, "
        + ("one packed file)" if c.packed else f"parts in {printable(c.parts.name)}/)")
    )
    typer.echo(f"videos     {len(c)}   frames {frames}   dim {spec.dim}")
    typer.echo(
        f"backbone   {spec.backbone}   weights {spec.weights}"
        + (f"   sha256 {spec.weights_sha256[:16]}..." if spec.weights_sha256 else "")
    )
    pre = spec.preprocessing
    typer.echo(f"preprocess {pre.describe()} {pre.interpolation} {pre.color} mean {list(pre.mean)} std {list(pre.std)}")
    typer.echo(f"sampling   {spec.sampling.describe()}   spec id {spec.id}")
    w = spec.window
    typer.echo(
        f"rows       one per window of {w.size} sampled frames, one window every {w.stride}"
        if w
        else "rows       one per sampled frame"
    )
    typer.echo(f"labels     {len([k for k in labels if k != '(none)'])}")
    for label, n in sorted(labels.items()):
        typer.echo(f"  {printable(label):<28} {n}")
    bad = c.failures()
    typer.echo(f"failures   {len(bad)}")
    if failures:
        for f in bad:
            typer.echo(f"  {printable(f['source_path'])}: {printable(f['reason'])}")
    shards = c.shards()
    if shards:
        typer.echo(f"shards     {len(shards)}   " + "   ".join(f"{s}: {n} videos" for s, n in shards.items()))
    pending = c.unindexed_parts()
    if pending:
        typer.echo(f"note       {pending} finished videos are not indexed yet: rerun the extract command to resume")
    gone = c.missing_sources()
    if gone:
        typer.echo(
            f"missing sources  {len(gone)}  (their files are gone or not mounted; "
            f"`pipeline extract ... --prune` removes them)"
        )
        for key in gone[:20]:
            typer.echo(f"  {printable(key)}: {printable(c.sources()[key][0])}")
        if len(gone) > 20:
            typer.echo(f"  ... {len(gone) - 20} more")
    if writer_active(c.path):
        # the run rebuilds the index every 30 s: until then a redone or dropped video's part may look missing
        typer.echo("note       a `pipeline extract` run is writing to this cache now; rerun info when it ends")
        return
    damaged = {key: "part file missing" for key in c.missing_parts()}
    if check:
        damaged.update(c.check())
    if damaged:
        typer.echo(
            f"damaged    {len(damaged)} videos cannot be read; rerun the extract command that made "
            f"the cache to redo them",
            err=True,
        )
        for key, problem in sorted(damaged.items()):
            typer.echo(f"  {printable(key)}: {printable(problem)}", err=True)
        raise typer.Exit(EXIT_ERROR)
    if check:
        typer.echo(f"check      all {len(c)} videos read and match the index")


@app.command()
def pack(
    cache: Annotated[Path, typer.Argument(help="A feature cache (.h5) and its parts folder.", show_default=False)],
    output: Annotated[
        Optional[Path],
        typer.Option(  # noqa: UP045
            "-o",
            "--output",
            help="Where to write the one-file cache \\[default: replace CACHE in place and remove its parts folder].",
        ),
    ] = None,
) -> None:
    """Make one self-contained HDF5 file of a cache (index and parts), readable by h5py alone and by every
    command."""
    from pipeline.data.cache import pack as pack_cache
    from pipeline.data.cache import printable

    _setup_logging(False)
    with _errors():
        result = pack_cache(cache, output)

    typer.echo(
        f"{printable(str(result.output))}: {result.videos} videos in one file, "
        f"{result.bytes / 2**20:.1f} MiB, {result.seconds:.1f}s"
    )


@app.command()
def merge(cache: Annotated[Path, typer.Argument(help="The cache that sharded runs wrote parts for.")]) -> None:
    """Build the cache index from every finished part (after `extract --shard i/n` runs; torchrun does it itself)."""
    from pipeline.data.cache import merge as merge_parts

    with _errors():
        n = merge_parts(cache)

    typer.echo(f"{cache}: {n} videos")


# ------------------------------------------------------------------------------------------------ stage two
Cache = Annotated[Path, typer.Argument(help="Feature cache (.h5) made by `pipeline extract`.", show_default=False)]
Checkpoint = Annotated[Path, typer.Argument(help="A head checkpoint (best.pt or last.pt).", show_default=False)]


@_command(
    TrainConfig,
    name="train-head",
    flags={"out": ("--out", "-o")},
    computed={"out": "runs/CACHE-HEAD (runs/CACHE-HEAD-2, ... when taken)"},
)
def train_head(cache: Cache, quiet: Quiet = False, **settings) -> None:
    """Train a temporal head on the cached sequences; writes a run folder with metrics, checkpoints and plots."""
    from pipeline.train_head.train import train_head as run

    if settings["out"] is None:
        settings["out"] = default_run_folder(f"{cache.stem}-{settings['head']}")
    _train(TrainConfig, settings, quiet, lambda config: run(cache, config=config))


@_command(EvalConfig, flags={"keys_list": ("--list",), "out": ("--out", "-o")})
def evaluate(
    checkpoint: Checkpoint,
    cache: Annotated[
        Path, typer.Argument(help="A feature cache of the same features, with labels.", show_default=False)
    ],
    json_: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.", metavar="")] = False,
    quiet: Quiet = False,
    **settings,
) -> None:
    """Score a head on a labelled cache: top-1, top-5, per-class accuracy, confusion matrix; a head that labels
    frames (with --frame-labels): frame accuracy, edit score, F1@{10,25,50}."""
    _setup_logging(quiet)
    with _errors():
        config = _settings(EvalConfig, settings, quiet)

    from pipeline.train_head.evaluate import evaluate_checkpoint

    with _errors():
        report = evaluate_checkpoint(checkpoint, cache, config=config)

    if json_:
        import json

        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    typer.echo(report.summary_line())
    if report.seen is not None:
        typer.secho(
            f"  + {report.seen['videos']} videos the head was trained on: {report.scores(report.seen)} "
            f"(not in the score above)",
            fg=typer.colors.YELLOW,
        )
    elif report.only_seen:
        typer.secho(
            "  every scored video was in the head's training split: this is not a held-out score",
            fg=typer.colors.YELLOW,
        )
    m = report.metrics
    width = max(len(c) for c in m["classes"])
    support = [sum(row) for row in m["confusion_matrix"]]
    unit = "frames" if report.target == "frames" else "videos"
    for c, n in zip(m["classes"], support):
        acc = m["per_class_accuracy"][c]
        typer.echo(f"  {c:<{width}}  {'-' if acc is None else f'{acc:6.1%}'}  ({n} {unit})")


@_command(PredictConfig, flags={"output": ("--output", "-o")})
def predict(
    checkpoint: Checkpoint,
    inputs: Annotated[
        list[Path], typer.Argument(help="Videos, frame folders, folders of them, or CSV manifests.", show_default=False)
    ],
    quiet: Quiet = False,
    **settings,
) -> None:
    """Classify new videos: extract them exactly as the head's features were (cached), then write top-k to CSV (a
    head that labels frames: segments to CSV, and every row's label to OUTPUT.frames.csv)."""
    _setup_logging(quiet)
    with _errors():
        config = _settings(PredictConfig, settings, quiet)

    from pipeline.predict import predict as run

    with _errors("interrupted: extracted videos are kept in the prediction cache"):
        report = run(checkpoint, inputs, config=config)

    if not quiet:
        shown = report.predictions[:20]
        for p in shown:
            top = ", ".join(f"{label} {prob:.1%}" for label, prob in p.top[:3])
            if p.segments is not None:
                top = f"{len(p.segments)} segments; rows labelled {top}"
            typer.echo(f"  {p.path}: " + (f"FAILED {p.error}" if p.error else top))
        if len(report.predictions) > len(shown):
            typer.echo(f"  ... {len(report.predictions) - len(shown)} more in {report.output}")
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(EXIT_INPUTS_FAILED)


@_command(
    SweepConfig,
    flags={"params": ("--param", "-p"), "out": ("--out", "-o")},
    metavars={"params": "NAME=SPEC", "space": "FILE.yaml"},
    kinds={"params": Optional[list[str]], "space": Optional[Path]},  # noqa: UP045
    computed={"out": "runs/CACHE-sweep (runs/CACHE-sweep-2, ... when taken)"},
)
def sweep(
    cache: Cache,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar; the leaderboard only.", metavar="")
    ] = False,
    **settings,
) -> None:
    """Search head settings on one cache (grid, random or TPE, with pruning); several processes can share a study.

    Without --space and --param it searches a default space of head, hidden, lr, dropout and clip_len
    (docs/sweep.md)."""
    _setup_logging(quiet)
    with _errors():
        if settings["out"] is None:
            settings["out"] = default_run_folder(f"{cache.stem}-sweep")
        config = _settings(SweepConfig, settings, quiet)
    out = config.out

    from pipeline.sweep.run import SweepError
    from pipeline.sweep.run import sweep as run

    if config.space is None and not config.params and not config.resume:
        from pipeline.sweep.space import default_space

        typer.echo(
            "no --space or --param: searching the default space (docs/sweep.md)\n  "
            + "\n  ".join(default_space(config.target).describe())
        )

    # a study of other settings is a usage error too
    with _errors(
        f"interrupted: the study keeps its finished trials; continue with the same command and --resume "
        f"({out}/leaderboard.csv lists them)",
        usage=(SweepError,),
    ):
        result = run(cache, config=config)
    typer.echo(result.table())
    typer.echo(result.summary_line())


# ---------------------------------------------------------------------------------------------- stage three
@_command(
    FinetuneConfig, flags={"out": ("--out", "-o")}, computed={"out": "runs/RUN-ft, RUN being the --init run's folder"}
)
def finetune(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Labelled videos or frame folders: folders (class "
            "subfolders), files or CSV manifests, as for extract.",
            show_default=False,
        ),
    ],
    quiet: Quiet = False,
    **settings,
) -> None:
    """Fine-tune the backbone of a head's features together with the head, on clips decoded from the videos."""
    from pipeline.finetune.train import finetune as run

    if settings["out"] is None:
        settings["out"] = default_run_folder(f"{Path(settings['init']).resolve().parent.name}-ft")
    _train(FinetuneConfig, settings, quiet, lambda config: run(inputs, config=config))


@app.command()
def demo(
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Working folder for the sample videos and the caches \\[default: demo_out, or demo_frames with "
            "--frames].",
            show_default=False,
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help="torchvision classification model.")] = "resnet18",
    weights: Annotated[str, typer.Option(help="Weights for the backbone ('none' needs no download).")] = "none",
    frames: Annotated[
        bool,
        typer.Option(
            "--frames",
            help="Label every frame instead (temporal action segmentation): a tcn head against the per-row meanpool "
            "baseline, scored by frame accuracy, edit score and F1@{10,25,50}, and segments predicted for new videos.",
            metavar="",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run the pipeline on a generated sample whose classes differ only in frame order (--frames: a label per
    frame)."""
    _setup_logging(quiet)
    from pipeline.demo import run_demo, run_frames_demo

    run = run_frames_demo if frames else run_demo
    with _errors():
        run(
            out or Path("demo_frames" if frames else "demo_out"),
            backbone=backbone,
            weights=weights,
            progress=not quiet,
            echo=typer.echo,
        )


def main() -> None:
    app()
