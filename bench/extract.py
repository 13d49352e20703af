"""Extraction speed: end-to-end rows/s of `pipeline.extract_videos` against the same model's forward-only rows/s.

The ratio says how much of the model's speed the decode → crop → batch → cache pipeline keeps (target on CPU: >= 0.9).
A row is a frame for image models (torchvision classifiers, timm:NAME) and a window of frames for video models
(r3d_18, ...: windows of the weights' clip length, side by side).

    python bench/extract.py                                      # resnet50 + resnet18, 320x240 + 1280x720, CPU
    python bench/extract.py --models resnet18 --resolutions 320x240 --clips 2 --frames 32
    python bench/extract.py --models timm:vit_base_patch16_clip_224.openai,r3d_18 --resolutions 320x240
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from common import load_average, machine  # bench/common.py, beside this script

from pipeline.extract import run
from pipeline.extract.backbone import FrameEmbedder, load_backbone
from pipeline.extract.decode import open_source
from pipeline.extract.workers import DecodeJob, decode_video
from pipeline.runtime import cpu_count, default_workers, pick_device
from pipeline.sample import write_video
from pipeline.spec import Sampling

CODECS = (".mp4", ".avi")  # mp4v and MJPG, alternating clip by clip (see pipeline.sample.write_video)
WARMUP_BATCHES = 3  # forward passes before timing: oneDNN builds its kernels for a new shape on the first calls


@dataclass
class Row:
    model: str
    resolution: str
    frames: int
    """Rows: frames, or windows of frames for a video model."""
    e2e_seconds: float
    setup_seconds: float
    forward_fps: float
    window: int = 1
    """Frames per row."""

    @property
    def e2e_fps(self) -> float:
        return self.frames / self.e2e_seconds

    @property
    def ratio(self) -> float:
        return self.e2e_fps / self.forward_fps


def parse_resolution(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def clip(rng: np.random.Generator, frames: int, width: int, height: int) -> list[np.ndarray]:
    """RGB frames (H, W, 3) uint8: a square crossing a fixed noisy background (codecs must code both)."""
    background = np.clip(rng.integers(40, 200, 3) + rng.integers(-24, 25, (height, width, 3)), 0, 255)
    background = background.astype(np.uint8)
    side = height // 4
    out = []
    for j in range(frames):
        frame = background.copy()
        x = (width - side) * j // max(frames - 1, 1)
        frame[height // 3 : height // 3 + side, x : x + side] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(frame)
    return out


def _write_clip(job: tuple) -> Path:
    path, seed, frames, width, height = job
    write_video(path, clip(np.random.default_rng(seed), frames, width, height), fps=25.0)
    return path


def make_videos(folder: Path, width: int, height: int, clips: int, frames: int, seed: int = 0) -> list[Path]:
    """`clips` clips of `frames` frames each, alternately mp4v .mp4 and MJPG .avi (pipeline.sample.write_video),
    written by every core at once (clip k's content depends on `seed` and k only)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (folder / f"clip_{k:03d}{CODECS[k % len(CODECS)]}", seed * 100_003 + k, frames, width, height)
        for k in range(clips)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    if clips < 4:
        return [_write_clip(job) for job in jobs]
    with ProcessPoolExecutor(max(1, min(cpu_count(), clips))) as pool:
        return list(pool.map(_write_clip, jobs))


def forward_seconds(embedder: FrameEmbedder, batch_size: int, batches: int, window: int = 1) -> float:
    """Seconds for `batches` forward passes of the bare model on preprocessed (normalised, channels_last) inputs,
    with FrameEmbedder's dtype (autocast on CUDA) and device; inputs are made once, outside the timing. A video
    model gets `batch_size` clips of `window` frames."""
    pre, device = embedder.pre, embedder.device
    if embedder.video:
        clips = torch.randint(0, 256, (batch_size, window, 3, pre.crop, pre.crop), dtype=torch.uint8)
        x = pre.normalize(clips.to(device)).permute(0, 2, 1, 3, 4)  # (N, 3, T, C, C)
    else:
        x = pre.normalize(torch.randint(0, 256, (batch_size, 3, pre.crop, pre.crop), dtype=torch.uint8).to(device))
    x = x.contiguous(memory_format=embedder.memory_format)
    autocast = (
        torch.autocast(device_type=device.type, dtype=embedder.autocast_dtype)
        if embedder.autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def step() -> None:
        with torch.inference_mode(), autocast:
            embedder.model(x)

    for _ in range(WARMUP_BATCHES):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def setup_timer():
    """Time spent inside run.load_backbone and FrameEmbedder() (building and placing the model, once per call)."""
    spent = [0.0]
    originals = run.load_backbone, run.FrameEmbedder

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    run.load_backbone, run.FrameEmbedder = timed(run.load_backbone), timed(run.FrameEmbedder)
    try:
        yield spent
    finally:
        run.load_backbone, run.FrameEmbedder = originals


def extract_seconds(videos: list[Path], cache: Path, model: str, **options) -> tuple[int, float, float]:
    """One real `pipeline.extract_videos` run into a new cache: (frames, seconds without model setup, setup seconds)."""
    with setup_timer() as setup:
        report = run.extract_videos(videos, cache, backbone=model, weights="none", progress=False, **options)
    if not report.ok or not report.frames:
        raise RuntimeError(f"extraction into {cache} failed or extracted nothing: {report.failed or report.skipped}")
    return report.frames, report.seconds - setup[0], setup[0]


def measure(
    model: str,
    resolution: str,
    videos: list[Path],
    cache: Path,
    device: torch.device,
    batch_size: int,
    repeats: int = 1,
    **options,
) -> Row:
    """Forward-only and end-to-end speed of one model on one set of videos, each the best of `repeats` runs.

    Every run extracts into a new cache beside `cache`; `options` go to extract_videos (workers, threads, dtype...).
    A video model's batches hold as many windows as `batch_size` frames (at least one), as extract's default."""
    loaded = load_backbone(model, "none", progress=False)
    window = loaded.clip_len or 1
    batch_size = max(1, batch_size // window)
    options.update(device=str(device), batch_size=batch_size)
    # A warm run on the start of one clip keeps the process's first-use costs (oneDNN kernels, CUDA context and
    # kernels, lazy imports) out of the measured runs.
    run.extract_videos(
        videos[:1],
        cache.with_name(f"warm_{cache.name}"),
        backbone=model,
        weights="none",
        progress=False,
        max_frames=2 * batch_size * window,
        **options,
    )
    embedder = FrameEmbedder(loaded, device)
    half = max(1, round(sum(probe_frames(v) // window for v in videos) / batch_size / 2))
    best = None
    for k in range(repeats):
        # Forward-only runs as many frames as the extraction, half before and half after it, so that a drift in
        # the machine's load hits both figures alike.
        t_forward = forward_seconds(embedder, batch_size, half, window)
        target = cache if k == 0 else cache.with_name(f"{cache.stem}_{k}{cache.suffix}")
        frames, e2e, setup = extract_seconds(videos, target, model, **options)
        t_forward += forward_seconds(embedder, batch_size, half, window)
        row = Row(model, resolution, frames, e2e, setup, 2 * half * batch_size / t_forward, window)
        if best is None:
            best = row
        else:  # the least disturbed run of each kind
            best.e2e_seconds = min(best.e2e_seconds, row.e2e_seconds)
            best.forward_fps = max(best.forward_fps, row.forward_fps)
    return best


def probe_frames(path: Path) -> int:
    """The frame count in the header: good enough to size the forward-only run (written by make_videos)."""
    cap = cv2.VideoCapture(str(path))
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def worker_ms(videos: list[Path], model: str) -> tuple[float, float]:
    """CPU milliseconds per frame of a decode worker's work, run here on one thread as in a worker:
    (decode + RGB conversion, the whole worker: decode + RGB + resize/crop + chunking)."""
    pre = load_backbone(model, "none", progress=False).preprocessing
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        start, frames = time.process_time(), 0
        for v in videos:
            frames += sum(1 for _ in open_source(v, 30.0).frames(lambda i, t: True))
        decode = time.process_time() - start
        start = time.process_time()
        for k, v in enumerate(videos):
            # the worker's own code, here
            for message in decode_video(DecodeJob(k, v, Sampling(), pre, None)):
                if message[0] == "error":
                    raise RuntimeError(f"{v}: {message[2]}")
        whole = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    return 1000 * decode / frames, 1000 * whole / frames


def table(rows: list[Row]) -> str:
    width = max([10] + [len(r.model) for r in rows])
    lines = [
        f"{'model':<{width}} {'resolution':>10} {'frames/row':>10} {'rows':>6} {'e2e rows/s':>11} "
        f"{'forward rows/s':>15} {'ratio':>6} {'e2e frames/s':>13}"
    ]
    for r in rows:
        lines.append(
            f"{r.model:<{width}} {r.resolution:>10} {r.window:>10} {r.frames:>6} {r.e2e_fps:>11.1f} "
            f"{r.forward_fps:>15.1f} {r.ratio:>6.2f} {r.e2e_fps * r.window:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--models",
        default="resnet50,resnet18",
        help="comma-separated backbones: torchvision classifiers, torchvision video models (r3d_18), timm:NAME",
    )
    p.add_argument("--resolutions", default="320x240,1280x720", help="comma-separated WxH of the generated videos")
    p.add_argument("--clips", type=int, default=4, help="clips per resolution (alternately mp4v .mp4 and MJPG .avi)")
    p.add_argument("--frames", type=int, default=64, help="frames per clip")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's own (8 on CPU, 256 otherwise)")
    p.add_argument("--preprocess", default="auto", help="where frames are resized and cropped: workers, device, auto")
    p.add_argument("--workers", type=int, default=None, help="decode workers; default: extract's own")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the model; default: all cores")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each figure this many times and keep the best (on a machine shared with others)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time a decode worker's work per frame (decode, resize/crop) on one thread",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the generated videos here for later runs (default: a temporary folder)",
    )
    args = p.parse_args(argv)
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # weights 'none' is the point here: no warning

    device = pick_device(args.device)
    batch_size = args.batch_size or run.default_batch_size(device)
    threads = args.threads or cpu_count()
    workers = args.workers if args.workers is not None else default_workers(device)
    torch.set_num_threads(threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    print(f"machine: {machine(device)}; load average {load_average()}")
    print(
        f"device {device}, batch size {batch_size}, model threads {threads}, decode workers {workers}, "
        f"preprocessing in {args.preprocess}, "
        f"{args.clips} clips x {args.frames} frames per resolution, best of {args.repeats}, weights none, "
        f"features stored as float16"
    )

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_extract_")))
        work.mkdir(parents=True, exist_ok=True)
        caches = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=work, prefix="caches_")))
        rows = []
        for resolution in resolutions:
            w, h = parse_resolution(resolution)
            folder = work / f"videos_{w}x{h}_{args.clips}x{args.frames}"
            videos = sorted(folder.glob("clip_*")) if folder.is_dir() else []
            if len(videos) != args.clips:
                start = time.perf_counter()
                videos = make_videos(folder, w, h, args.clips, args.frames)
                print(f"generated {len(videos)} clips at {resolution} in {time.perf_counter() - start:.1f}s")
            for model in models:
                cache = caches / f"{model}_{w}x{h}.h5"
                row = measure(
                    model,
                    resolution,
                    videos,
                    cache,
                    device,
                    batch_size,
                    args.repeats,
                    workers=args.workers,
                    threads=threads,
                    preprocess=args.preprocess,
                )
                rows.append(row)
                print(
                    f"  {model} {resolution}: {row.frames} rows of {row.window} frames, best e2e "
                    f"{row.e2e_seconds:.1f}s (+{row.setup_seconds:.1f}s model setup, excluded), {row.e2e_fps:.1f} vs "
                    f"forward {row.forward_fps:.1f} rows/s",
                    flush=True,
                )
                if args.profile:
                    decode, whole = worker_ms(videos, model)
                    print(
                        f"    per frame: forward {1000 / row.forward_fps / row.window:.1f} ms with {threads} threads; "
                        f"worker CPU {whole:.1f} ms on 1 thread = decode + RGB {decode:.1f} ms, "
                        f"resize/crop {whole - decode:.1f} ms",
                        flush=True,
                    )
    print()
    print(table(rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
