"""GPU check: ResNet-50 extraction on CUDA against the bf16 forward pass alone (320x240 and 1280x720 clips,
the CPU decoder and NVDEC) and against the lowest ceiling each run depends on, measured in the same run (the
embedder alone: eager, as a CUDA graph, compiled; each decoder feeding a model that does nothing), a fresh
`pipeline extract` process timed from launch to exit with its start-up apart, the device path's features against
the CPU path's, bit-identical batching, then a
short ResNet-50 fine-tune in bf16 (clips/s, peak GPU memory, the loss going down); then the other kinds of
backbone (a timm ViT, one row per frame; a torchvision video model, one row per window of frames): end-to-end
rows/s against their pure forward and their device rows against CPU rows. One table; exit status 0 when every
check passed.

Nothing is downloaded: weights are the seeded random initialisation ('none'), so the CPU and CUDA models are
identical. Real H.264 clips (for NVDEC) are used when .cache/h264/ holds them (bench/fetch_h264.py, on a
machine with network). Run it through bench/gpu_check.sh, which checks the environment first.

    python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cpu --resolutions 320x240 --clips 2 --frames 16 --cpu-frames 8 \
        --h264-copies 1 --h264-frames 8 --finetune-per-class 0   # a dry run without a GPU (about 2 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import load_average, machine  # bench/common.py, beside this script
from extract import forward_seconds, make_videos, parse_resolution, setup_timer  # bench/extract.py

import pipeline
from pipeline.data.cache import open_cache
from pipeline.extract import run
from pipeline.extract.backbone import FrameEmbedder, LoadedBackbone, load_backbone
from pipeline.extract.workers import CRASH_ON_ENV
from pipeline.runtime import default_workers, pick_device
from pipeline.sample import CLASSES, class_order, clip_frames, write_video

MODEL = "resnet50"
OTHER_MODELS = "timm:vit_base_patch16_clip_224.openai,r3d_18"  # a CLIP ViT-B/16 (timm), R3D-18 (16-frame windows)
FINETUNE_UNFREEZE = "layer4"
H264_DIR = Path(__file__).resolve().parents[1] / ".cache" / "h264"
H264_CLIPS = {"1280x720": "bigbuckbunny.mp4", "640x272": "bikes.mp4"}  # real H.264 (bench/fetch_h264.py)
TARGET_FPS_320 = 13_000  # steady end-to-end frames/s on 320x240, ResNet-50 bf16, one H200 ...
TARGET_RATIO_320 = 0.85  # ... and as a share of the pure bf16 forward (eager)
TARGET_FPS_320_COMPILED = 16_000  # the same with --compile
TARGET_USER_FPS_320 = 9_000  # `pipeline extract` in a fresh process, launch to exit
TARGET_FPS_720_NVDEC = 5_000  # 1280x720 H.264 through NVDEC, end to end
TARGET_STARTUP_S = 5.0  # a fresh `pipeline extract`: process, setup and first batch


@dataclass
class Line:
    what: str
    decoder: str
    frames: int
    fps: float
    ratio: float
    busy: float | None
    ceiling: tuple[str, float] | None = None
    """The lowest ceiling this row depends on (its name, frames/s), if measured."""
    is_ceiling: bool = False

    def text(self) -> str:
        busy = f"{self.busy:.0%}" if self.busy is not None else "-"
        of = f"{self.fps / self.ceiling[1]:.2f} of {self.ceiling[0]}" if self.ceiling else "-"
        of = "ceiling" if self.is_ceiling else of
        return (
            f"{self.what:<28} {self.decoder:>7} {self.frames:>7} {self.fps:>11.1f} {self.ratio:>6.2f} {busy:>6}  {of}"
        )


def noop_backbone(like: LoadedBackbone) -> LoadedBackbone:
    """A model that does nothing (a mean per channel) with `like`'s preprocessing: a run through it costs the
    decoding, the copy to the device, the crop and normalisation, the batching and the writing, but no forward."""
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return LoadedBackbone(model, "none", None, like.preprocessing, 3)


def embedder_fps(embedder: FrameEmbedder, batch_size: int, batches: int) -> float:
    """Frames/s of the embedder as the run calls it on uint8 crops already on the device: normalisation, forward
    (eager, graphed or compiled) and the copy of the features to the host."""
    pre, device = embedder.pre, embedder.device
    frames = torch.randint(0, 256, (batch_size, 3, pre.crop, pre.crop), dtype=torch.uint8).to(device)
    for _ in range(3):  # warm-up: the graph capture, the compilation
        embedder(frames)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(batches):
            embedder(frames)
        best = max(best, batches * batch_size / (time.perf_counter() - start))
    return best


def min_cosine(reference: Path, other: Path) -> tuple[float, int]:
    """Smallest cosine similarity between rows of the same (video, frame index) in two caches, and rows compared.

    Every row of `reference` must be in `other`."""
    worst, rows = 1.0, 0
    with open_cache(reference) as ref, open_cache(other) as oth:
        for key in ref:
            a, b = ref.features(key).astype(np.float64), oth.features(key).astype(np.float64)  # (T, D)
            where = {int(f): row for row, f in enumerate(oth.frame_indices(key))}
            b = b[[where[int(f)] for f in ref.frame_indices(key)]]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            worst, rows = min(worst, float(cos.min())), rows + len(cos)
    return worst, rows


def same_bytes(a: Path, b: Path) -> bool:
    with open_cache(a) as x, open_cache(b) as y:
        return sorted(x.keys()) == sorted(y.keys()) and all(
            x.features(k).tobytes() == y.features(k).tobytes() for k in x
        )


def fresh_process(folder: Path, cache: Path, device: str) -> dict | None:
    """`pipeline extract FOLDER` as a user runs it, in a new process, timed from launch to exit; its start-up and
    steady speed as it reports them."""
    import re
    import subprocess

    command = [
        sys.executable,
        "-m",
        "pipeline",
        "extract",
        str(folder),
        "-o",
        str(cache),
        "--backbone",
        MODEL,
        "--weights",
        "none",
        "--device",
        device,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    wall = time.perf_counter() - started
    found = re.search(
        r"(\d+) frames in .*start-up ([\d.]+)s \((process [\d.]+, setup [\d.]+, first batch [\d.]+)\), then "
        r"([\d.]+) frames/s",
        result.stdout,
    )
    if result.returncode != 0 or found is None:
        print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
        return None
    return {
        "frames": int(found[1]),
        "wall": wall,
        "startup": float(found[2]),
        "parts": found[3],
        "steady": float(found[4]),
    }


def extract(videos: list[Path], cache: Path, **options) -> tuple[run.ExtractReport, float]:
    """One real extraction into a new cache: the report and its seconds without model setup."""
    with setup_timer() as setup:
        report = run.extract_videos(videos, cache, backbone=MODEL, weights="none", progress=False, **options)
    return report, report.seconds - setup[0]


@contextlib.contextmanager
def float32_on_cuda():
    """The device path in float32 (no autocast, no TF32): what the CPU path computes, for the cosine check."""
    original = run.FrameEmbedder

    class Float32(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.autocast_dtype = None

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    run.FrameEmbedder = Float32
    try:
        yield
    finally:
        run.FrameEmbedder = original
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


TINTS = ((112, 0, 0), (0, 112, 0), (0, 0, 112), (112, 112, 0))  # RGB added to every frame of a class


def tinted_videos(folder: Path, per_class: int, frames: int, width: int, height: int) -> None:
    """The demo's sample (a growing square, classes in four frame orders) with a colour tint per class, so that a
    randomly initialised backbone separates the classes within a few epochs; alternately mp4v .mp4 and MJPG .avi,
    in folder/<class>/clip_<k>.<ext>."""
    rng = np.random.default_rng(0)
    for k in range(per_class):
        base = clip_frames(rng, frames, width, height)
        for label, tint in zip(CLASSES, TINTS, strict=True):
            suffix = (".mp4", ".avi")[k % 2]
            shown = [
                np.clip(base[j].astype(np.int16) + tint, 0, 255).astype(np.uint8) for j in class_order(label, frames)
            ]
            write_video(folder / label / f"clip_{k:03d}{suffix}", shown, fps=25.0)


def finetune_check(args, device, work: Path) -> tuple[list[str], list[str]]:
    """Extract a generated sample, train an LSTM head for one epoch, fine-tune layer4 (BatchNorm statistics
    too) + head (bf16 on CUDA); table lines and failures. The head is left under-trained on purpose, so that
    fine-tuning has a loss to bring down."""
    w, h = parse_resolution(args.finetune_resolution)
    start = time.perf_counter()
    videos = work / "finetune_videos"
    tinted_videos(videos, args.finetune_per_class, args.finetune_frames, w, h)
    n = args.finetune_per_class * len(CLASSES)
    crop = args.finetune_crop
    sizes = {"resize": crop * 8 // 7, "crop": crop} if crop else {}
    report = pipeline.extract_videos(
        [videos],
        work / "finetune.h5",
        backbone=MODEL,
        weights="none",
        device=str(device),
        workers=args.workers,
        progress=False,
        **sizes,
    )
    print(
        f"fine-tune data: {n} clips x {args.finetune_frames} frames at {args.finetune_resolution} generated and "
        f"extracted in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    if not report.ok:
        return [], [f"fine-tune: extraction failed: {report.failed}"]
    clip_len = min(args.finetune_clip_len, args.finetune_frames)
    head = pipeline.train_head(
        work / "finetune.h5",
        work / "head",
        head="lstm",
        hidden=128,
        clip_len=clip_len,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        group_regex=r"clip_(\d+)",
        val_fraction=0.25,
        patience=0,
        plots=False,
        progress=False,
        device=str(device),
    )
    amp = "bf16" if device.type == "cuda" else "off"
    start = time.perf_counter()
    # Random weights have no BatchNorm statistics worth keeping (running mean 0, variance 1: no normalisation at
    # all), and with them frozen the random ResNet-50 barely learns; so this check trains them (--train-bn).
    result = pipeline.finetune(
        [videos],
        head.out / "best.pt",
        work / "head-ft",
        unfreeze=FINETUNE_UNFREEZE,
        amp=amp,
        train_bn=True,
        epochs=args.finetune_epochs,
        batch_size=args.finetune_batch_size,
        clip_len=clip_len,
        lr=3e-3,
        backbone_lr=3e-4,
        flip=False,
        patience=0,
        workers=args.workers,
        device=str(device),
        plots=False,
        progress=False,
    )
    s = result.summary
    with open(result.out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows]
    print(
        f"  fine-tune {MODEL} {FINETUNE_UNFREEZE} + lstm, amp {amp}, {s['train_clips']} training clips of "
        f"{clip_len} frames in {time.perf_counter() - start:.1f}s (incl. validation); reads {s['reads']}"
    )
    for r in rows:
        print(
            f"    epoch {r['epoch']}: train loss {float(r['train_loss']):.4f}, val top-1 "
            f"{float(r['val_top1']):.1%}, {float(r['clips_per_s']):.1f} clips/s"
        )
    failures = []
    if len(losses) < 2 or not losses[-1] < losses[0]:
        failures.append(f"fine-tune: the train loss did not go down over {len(losses)} epochs: {losses}")
    head_loss = head.summary["val_loss"]
    if abs(s["start"]["loss"] - head_loss) > 0.1 * head_loss + 1e-3:
        failures.append(
            f"fine-tune: the start's val loss {s['start']['loss']:.4f} is not the head's {head_loss:.4f} "
            f"(backbone + head before any step should compute the cached path)"
        )
    peak = s["peak_gpu_memory_mib"]
    line = (
        f"{MODEL:<9} {FINETUNE_UNFREEZE:>8} {amp:>5} {args.finetune_batch_size:>5}x{clip_len:<3} "
        f"{s['train_clips_per_s']:>8.1f} {s['train_clips_per_s'] * clip_len:>9.1f} "
        f"{(f'{peak:.0f}' if peak is not None else '-'):>9} {losses[0]:>8.4f} {losses[-1]:>8.4f} "
        f"{s['start']['top1']:>8.1%} {s['top1']:>8.1%}"
    )
    return [line], failures


def other_backbones(args, device, work: Path, videos: list[Path], batch_size: int) -> tuple[list[Line], list]:
    """Each of --other-models on the first resolution's clips: end-to-end rows/s against its pure forward, and its
    device rows (bf16) against CPU float32 rows of the first frames of two clips. Table lines and checks."""
    lines, checks = [], []
    for model in [m.strip() for m in args.other_models.split(",") if m.strip()]:
        try:
            loaded = load_backbone(model, "none", progress=False)
        except ValueError as e:  # timm not installed here
            print(f"  {model} skipped: {e}", flush=True)
            continue
        window = loaded.clip_len or 1
        batch = max(1, batch_size // window)  # extract's own default: as many windows as hold a batch of frames
        embedder = FrameEmbedder(loaded, device)
        batches = 20 if device.type == "cuda" else 1
        forward = batches * batch / forward_seconds(embedder, batch, batches, window)
        del embedder
        options = {"device": str(device), "batch_size": batch, "workers": args.workers, "dtype": "float32"}
        cache = work / f"other_{model.replace(':', '_')}.h5"
        warm = cache.with_name(f"warm_{cache.name}")
        run.extract_videos(
            videos[:1], warm, backbone=model, weights="none", progress=False, max_frames=batch * window, **options
        )
        with setup_timer() as setup:
            report = run.extract_videos(videos, cache, backbone=model, weights="none", progress=False, **options)
        seconds = report.seconds - setup[0]
        rows = report.frames
        busy = report.device_busy_seconds / seconds if device.type == "cuda" else None
        what = f"{model.split('.')[0][:18]} x{window}fr"
        line = Line(what, "cpu", rows, rows / seconds, rows / seconds / forward, busy)
        lines.append(line)
        print(f"  {line.text()}  (pure forward {forward:.1f} rows/s, rows of {window} frames)", flush=True)
        frames = max(args.cpu_frames, window)
        sample = videos[: args.cpu_clips]
        reference, on_device = work / f"other_cpu_{cache.name}", work / f"other_dev_{cache.name}"
        common = dict(backbone=model, weights="none", dtype="float32", max_frames=frames, progress=False)
        run.extract_videos(sample, reference, device="cpu", **common)
        run.extract_videos(sample, on_device, device=str(device), batch_size=batch, **common)
        cos, compared = min_cosine(reference, on_device)
        checks.append(
            (
                f"{model}: device rows vs CPU float32 rows, min cosine over {compared} rows",
                cos >= args.min_cosine,
                f"{cos:.6f} (>= {args.min_cosine})",
            )
        )
    return lines, checks


def h264_inputs(folder: Path, clip: str, copies: int) -> list[Path]:
    """`copies` links to one real H.264 clip under distinct names (each is a video of its own to the run)."""
    source = H264_DIR / clip
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(copies):
        path = folder / f"{Path(clip).stem}_{k:03d}.mp4"
        try:
            os.link(source, path)
        except OSError:
            path.write_bytes(source.read_bytes())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="the device under test (cpu makes a dry run of this script)")
    p.add_argument("--resolutions", default="320x240,1280x720", help="comma-separated WxH of the generated videos")
    p.add_argument(
        "--clips",
        default="400,40",
        help="clips per resolution, one number or one per resolution (alternately mp4v .mp4 and MJPG .avi)",
    )
    p.add_argument(
        "--frames",
        default="256",
        help="frames per clip, one number or one per resolution (default: 102,400 frames at 320x240, 10,240 at 720p)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's own (256 on a GPU)")
    p.add_argument("--workers", type=int, default=None, help="decode workers; default: extract's own")
    p.add_argument("--h264-copies", type=int, default=24, help="copies of each real H.264 clip extracted as one set")
    p.add_argument("--h264-frames", type=int, default=None, help="frames kept per H.264 clip (default: all)")
    p.add_argument("--cpu-clips", type=int, default=2, help="clips per resolution also extracted on the CPU")
    p.add_argument("--cpu-frames", type=int, default=16, help="frames per clip extracted on the CPU (the first ones)")
    p.add_argument(
        "--min-cosine",
        type=float,
        default=0.999,
        help="smallest cosine allowed between CPU float32 and device bf16 rows",
    )
    p.add_argument(
        "--min-cosine-fp32",
        type=float,
        default=0.9999,
        help="smallest cosine allowed between the CPU path and the device path, both float32",
    )
    p.add_argument("--no-targets", action="store_true", help="report the speed targets without failing on them")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also extract the first resolution with a compiled backbone (a minute or more)",
    )
    p.add_argument(
        "--finetune-per-class",
        type=int,
        default=24,
        help="fine-tune check: clips per class of the 4 generated classes (0 skips the check)",
    )
    p.add_argument("--finetune-frames", type=int, default=32, help="fine-tune check: frames per clip")
    p.add_argument("--finetune-resolution", default="320x240", help="fine-tune check: WxH of the generated clips")
    p.add_argument(
        "--finetune-crop", type=int, default=None, help="fine-tune check: crop size; default: the weights' own (224)"
    )
    p.add_argument("--finetune-epochs", type=int, default=6, help="fine-tune check: epochs")
    p.add_argument("--finetune-batch-size", type=int, default=8, help="fine-tune check: clips per step")
    p.add_argument("--finetune-clip-len", type=int, default=16, help="fine-tune check: frames per training clip")
    p.add_argument(
        "--other-models",
        default=OTHER_MODELS,
        help="other backbones measured on the first resolution's clips (timm:NAME, torchvision video models); "
        "empty: none",
    )
    args = p.parse_args(argv)
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # weights 'none' is the point here: no warning

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or run.default_batch_size(device)
    workers = args.workers if args.workers is not None else default_workers(device)
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    clips = [int(x) for x in str(args.clips).split(",")]
    frames = [int(x) for x in str(args.frames).split(",")]
    clips, frames = (v * len(resolutions) if len(v) == 1 else v for v in (clips, frames))
    from pipeline.extract import nvdec

    nvdec_missing = nvdec.unavailable_reason(device)
    print(f"machine: {machine(device)}; load average {load_average()}")
    print(
        f"{MODEL} (weights none, seed fixed) on {device}, batch size {batch_size}, decode workers "
        f"{workers}, features stored as float32; NVDEC: {nvdec_missing or 'available (PyNvVideoCodec)'}",
        flush=True,
    )
    failures, targets, lines, checks = [], [], [], []
    options = {"device": str(device), "batch_size": batch_size, "workers": args.workers, "dtype": "float32"}

    embedder = FrameEmbedder(load_backbone(MODEL, "none", progress=False), device)
    batches = 40 if cuda else 2
    forward_fps = batches * batch_size / forward_seconds(embedder, batch_size, batches)
    forward_fps = max(forward_fps, batches * batch_size / forward_seconds(embedder, batch_size, batches))
    lines.append(
        Line(f"pure forward, batch {batch_size}", "-", batches * batch_size, forward_fps, 1.0, None, is_ceiling=True)
    )
    precision = "bf16" if embedder.autocast_dtype is not None else "fp32"
    print(f"pure forward ({precision}): {forward_fps:.0f} frames/s", flush=True)
    del embedder
    # Ceilings: the embedder as a run calls it (normalise + forward + copy back), eager, as one CUDA graph (the
    # default on CUDA) and compiled; the decoders with a model that does nothing (per resolution, below).
    ceilings = {}
    kinds = {"eager": {}, "graphed": {"graph": True}} if cuda else {"eager": {}}
    if cuda or args.compile:
        kinds["compiled"] = {"compile": True}
    for kind, flags in kinds.items():
        start = time.perf_counter()
        embedder = FrameEmbedder(load_backbone(MODEL, "none", progress=False), device, **flags)
        ceilings[kind] = embedder_fps(embedder, batch_size, batches)
        fps = ceilings[kind]
        lines.append(Line(f"embedder {kind}", "-", batches * batch_size, fps, fps / forward_fps, None, is_ceiling=True))
        print(f"embedder {kind}: {fps:.0f} frames/s ({time.perf_counter() - start:.0f}s with set-up)")
        del embedder
    default_model = "graphed" if cuda else "eager"  # what a run uses unless --compile
    like = load_backbone(MODEL, "none", progress=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)

        def ceiling_of(label: str, videos: list[Path], decoder: str, **extra) -> tuple[str, float]:
            """The decoder's ceiling (a run through a model that does nothing, on a quarter of `videos`: a rate),
            and the lowest of it and the model's (compiled when `extra` says so)."""
            model = "compiled" if extra.pop("compile", False) and "compiled" in ceilings else default_model
            cache = work / f"noop_{label.replace(' ', '_')}_{decoder}.h5"
            report = run.extract_videos(
                videos[: max(1, len(videos) // 4)],
                cache,
                backbone_model=noop_backbone(like),
                progress=False,
                decoder=decoder,
                **options,
                **extra,
            )
            seconds = report.seconds - report.startup.get("setup", 0.0)
            fps = report.frames / seconds
            ceiling = Line(f"{label} no model", decoder, report.frames, fps, fps / forward_fps, None, is_ceiling=True)
            lines.append(ceiling)
            print(f"  {lines[-1].text()}", flush=True)
            name = f"{decoder} decode"
            return min((name, fps), (f"{model} embedder", ceilings[model]), key=lambda c: c[1])

        def timed(label: str, videos: list[Path], decoder: str, **extra) -> Line | None:
            cache = work / f"{label.replace(' ', '_')}_{decoder}.h5"
            warm = {**extra, "max_frames": min(batch_size, extra.get("max_frames") or batch_size)}
            run.extract_videos(
                videos[:1],
                cache.with_name(f"warm_{cache.name}"),
                backbone=MODEL,
                weights="none",
                progress=False,
                decoder=decoder,
                **options,
                **warm,
            )
            report, seconds = extract(videos, cache, decoder=decoder, **options, **extra)
            if not report.ok:
                failures.append(f"{label} ({decoder}): extraction failed: {report.failed}")
                return None
            busy = report.device_busy_seconds / seconds if cuda else None
            fps = report.frames / seconds
            ceiling = ceiling_of(label, videos, decoder, **extra)
            line = Line(label, decoder, report.frames, fps, fps / forward_fps, busy, ceiling)
            lines.append(line)
            print(f"  {line.text()}", flush=True)
            return line

        for resolution, n_clips, n_frames in zip(resolutions, clips, frames, strict=True):
            w, h = parse_resolution(resolution)
            start = time.perf_counter()
            videos = make_videos(work / f"videos_{w}x{h}", w, h, n_clips, n_frames)
            print(
                f"generated {len(videos)} clips x {n_frames} frames at {resolution} (mp4v, MJPG) in "
                f"{time.perf_counter() - start:.1f}s",
                flush=True,
            )
            line = timed(f"{resolution} mp4v+MJPG", videos, "cpu")
            if resolution == resolutions[0]:
                user = fresh_process(videos[0].parent, work / f"user_{w}x{h}.h5", str(device))
                if user is None:
                    failures.append(f"{resolution}: `pipeline extract` in a fresh process failed")
                else:
                    fps, startup, steady = user["frames"] / user["wall"], user["startup"], user["steady"]
                    ceiling = line.ceiling if line is not None else None
                    for what, rate in (("pipeline extract", fps), ("... its steady part", steady)):
                        lines.append(
                            Line(f"{resolution} {what}", "cpu", user["frames"], rate, rate / forward_fps, None, ceiling)
                        )
                    print(
                        f"  `pipeline extract` from launch to exit: {user['frames']} frames in {user['wall']:.1f}s "
                        f"({fps:.0f} frames/s); start-up {startup:.1f}s ({user['parts']}), then {steady:.0f} "
                        f"frames/s (x{steady / forward_fps:.2f} of the pure forward)",
                        flush=True,
                    )
                    if cuda:
                        targets.append(
                            (
                                f"{resolution} start-up < {TARGET_STARTUP_S} s",
                                startup < TARGET_STARTUP_S,
                                f"{startup:.1f}",
                            )
                        )
                        targets.append(
                            (
                                f"{resolution} `pipeline extract`, launch to exit >= {TARGET_USER_FPS_320} frames/s",
                                fps >= TARGET_USER_FPS_320,
                                f"{fps:.0f}",
                            )
                        )
            if args.compile and resolution == resolutions[0]:
                compiled = timed(f"{resolution} compiled", videos, "cpu", compile=True)
                if compiled is not None and cuda:
                    targets.append(
                        (
                            f"{resolution} compiled end-to-end >= {TARGET_FPS_320_COMPILED} frames/s",
                            compiled.fps >= TARGET_FPS_320_COMPILED,
                            f"{compiled.fps:.0f}",
                        )
                    )
            if line is not None and line.frames != n_clips * n_frames:
                failures.append(f"{resolution}: {line.frames} frames extracted, {n_clips * n_frames} expected")
            if line is not None and resolution == "320x240" and cuda:
                targets.append(
                    (f"320x240 end-to-end >= {TARGET_FPS_320} frames/s", line.fps >= TARGET_FPS_320, f"{line.fps:.0f}")
                )
                targets.append(
                    (
                        f"320x240 end-to-end >= {TARGET_RATIO_320} x pure forward",
                        line.ratio >= TARGET_RATIO_320,
                        f"{line.ratio:.2f}",
                    )
                )
            # The device path against the CPU path on the first frames of a few clips.
            start = time.perf_counter()
            sample = videos[: args.cpu_clips]
            reference = work / f"cpu_{w}x{h}.h5"
            report = run.extract_videos(
                sample,
                reference,
                backbone=MODEL,
                weights="none",
                device="cpu",
                dtype="float32",
                max_frames=args.cpu_frames,
                progress=False,
            )
            if not report.ok:
                failures.append(f"{resolution}: CPU extraction failed: {report.failed}")
                continue
            device_fp32 = work / f"device_fp32_{w}x{h}.h5"
            with float32_on_cuda():
                run.extract_videos(
                    sample,
                    device_fp32,
                    backbone=MODEL,
                    weights="none",
                    device=str(device),
                    dtype="float32",
                    max_frames=args.cpu_frames,
                    preprocess="device",
                    progress=False,
                )
            cos32, rows = min_cosine(reference, device_fp32)
            bf16 = work / f"{resolution}_mp4v+MJPG_cpu.h5"
            cos16 = min_cosine(reference, bf16)[0] if line is not None else 0.0
            checks.append(
                (
                    f"{resolution}: device path fp32 vs CPU path, min cosine over {rows} rows",
                    cos32 >= args.min_cosine_fp32,
                    f"{cos32:.6f} (>= {args.min_cosine_fp32})",
                )
            )
            checks.append(
                (
                    f"{resolution}: device bf16 vs CPU fp32, min cosine over {rows} rows",
                    cos16 >= args.min_cosine,
                    f"{cos16:.6f} (>= {args.min_cosine})",
                )
            )
            print(
                f"  CPU reference {report.frames} frames in {time.perf_counter() - start:.1f}s; min cosine "
                f"fp32 {cos32:.6f}, bf16 {cos16:.6f}",
                flush=True,
            )

        # Real H.264 clips: the CPU decoder against NVDEC.
        for resolution, clip in H264_CLIPS.items():
            if not (H264_DIR / clip).is_file():
                print(
                    f"no real H.264 clip {H264_DIR / clip} (python bench/fetch_h264.py, then copy "
                    f".cache/h264/ here): the H.264 rows are skipped"
                )
                break
            videos = h264_inputs(work / f"h264_{resolution}", clip, args.h264_copies)
            keep = {"max_frames": args.h264_frames} if args.h264_frames else {}
            line_cpu = timed(f"{resolution} H.264 x{len(videos)}", videos, "cpu", **keep)
            if nvdec_missing:
                print(f"  NVDEC on {resolution} H.264 skipped: {nvdec_missing}")
                continue
            line = timed(f"{resolution} H.264 x{len(videos)}", videos, "nvdec", **keep)
            if line is None or line_cpu is None:
                continue
            if line.frames != line_cpu.frames:
                failures.append(
                    f"{resolution} H.264: NVDEC extracted {line.frames} frames, the CPU decoder {line_cpu.frames}"
                )
                continue
            cos, rows = min_cosine(
                work / f"{resolution}_H.264_x{len(videos)}_cpu.h5", work / f"{resolution}_H.264_x{len(videos)}_nvdec.h5"
            )
            checks.append(
                (
                    f"{resolution} H.264: NVDEC vs CPU decoder, min cosine over {rows} rows",
                    cos >= args.min_cosine,
                    f"{cos:.6f} (>= {args.min_cosine})",
                )
            )
            if resolution == "1280x720":
                targets.append(
                    (
                        f"1280x720 H.264 NVDEC end-to-end >= {TARGET_FPS_720_NVDEC} frames/s",
                        line.fps >= TARGET_FPS_720_NVDEC,
                        f"{line.fps:.0f} (x{line.ratio:.2f} of the pure forward)",
                    )
                )

        # Resumed = uninterrupted: one run over three clips against one run per clip, in another order.
        first = "x".join(map(str, parse_resolution(resolutions[0])))
        some = sorted((work / f"videos_{first}").glob("clip_*"))[:3]
        whole, pieces = work / "bits_whole.h5", work / "bits_pieces.h5"
        run.extract_videos(some, whole, backbone=MODEL, weights="none", progress=False, max_frames=40, **options)
        for v in reversed(some):
            run.extract_videos(
                [v], pieces, backbone=MODEL, weights="none", progress=False, max_frames=40, **{**options, "workers": 1}
            )
        checks.append(("one run = one run per video, bit for bit", same_bytes(whole, pieces), ""))

        # A decode worker killed mid-run (as the OOM killer would): its video fails, a new worker (forked
        # after the slots were page-locked) decodes the next ones.
        names: dict[str, Path] = {}
        for v in sorted(work.glob("videos_*/clip_*")) + sorted(work.glob("h264_*/*.mp4")):
            names.setdefault(v.name, v)  # file names are the keys: one of each
        crashed = list(names.values())[:4]
        os.environ[CRASH_ON_ENV] = crashed[1].name
        try:
            report = run.extract_videos(
                crashed,
                work / "crash.h5",
                backbone=MODEL,
                weights="none",
                progress=False,
                max_frames=40,
                **{**options, "workers": 1},
            )
        finally:
            del os.environ[CRASH_ON_ENV]
        reason = report.failed.get(crashed[1].name, ("", ""))[1]
        checks.append(
            (
                "a killed decode worker fails only its video; its successor decodes the rest",
                list(report.failed) == [crashed[1].name]
                and "signal 9" in reason
                and len(report.extracted) == len(crashed) - 1,
                f"{len(report.extracted)} extracted, failed: {report.failed}",
            )
        )

        first_videos = sorted((work / f"videos_{first}").glob("clip_*"))
        other_lines, other_checks = other_backbones(args, device, work, first_videos, batch_size)
        lines += other_lines
        checks += other_checks

        peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        rss = (
            max(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            )
            / 2**10
        )
        finetune_lines = []
        if args.finetune_per_class:
            finetune_lines, problems = finetune_check(args, device, work)
            failures += problems

    print()
    print(
        f"{'extraction (' + MODEL + ')':<28} {'decoder':>7} {'rows':>7} {'rows/s':>11} {'ratio':>6} {'busy':>6}"
        "  of the lowest ceiling it depends on"
    )
    for line in lines:
        print(line.text())
    gpu = f"{peak_gpu:.0f} MiB" if peak_gpu is not None else "-"
    print(
        f"peak GPU memory {gpu}; peak host RSS {rss:.0f} MiB (this process or one decode worker); "
        f"ratio = end-to-end / pure forward (eager); busy = the forward passes' device time / wall time; "
        f"ceilings: the embedder alone (eager, graphed, compiled) and each decoder with a model that does nothing"
    )
    for name, ok, value in checks:
        print(f"{'ok    ' if ok else 'FAILED'} {name}: {value}")
        if not ok:
            failures.append(f"{name}: {value}")
    for name, ok, value in targets:
        print(f"{'met   ' if ok else 'MISSED'} target {name}: {value}")
        if not ok and not args.no_targets:
            failures.append(f"target {name}: {value}")
    if finetune_lines:
        print(
            f"\n{'model':<9} {'unfrozen':>8} {'amp':>5} {'batch':>9} {'clips/s':>8} {'frames/s':>9} "
            f"{'peak MiB':>9} {'loss 1st':>8} {'loss end':>8} {'val start':>8} {'val best':>8}"
        )
        print("\n".join(finetune_lines))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(
        f"\nOK: every video extracted on {device}; every check passed"
        + ("; the fine-tune's loss went down" if finetune_lines else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
