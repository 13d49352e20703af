"""Stage one: every sampled frame of every input through a frozen backbone, once, into the feature cache.

Decode worker processes (pipeline/extract/workers.py) turn videos into frames while the model runs here; on
CUDA the frames come through page-locked shared memory and are resized and cropped on the GPU in whole chunks,
elsewhere the workers crop them. Batches span video boundaries and always have the same shape; each finished
video is committed as its own part file (on a thread of its own), so a crash loses at most the videos in
flight, and a decoder that crashes loses only the video it was reading.

    pipeline extract videos/ -o cache.h5 --backbone resnet50 --fps 5
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import EXTRACT_BATCH_CPU, EXTRACT_BATCH_GPU, ExtractConfig, config_with
from pipeline.data.cache import CacheWriter, merge, pack, printable
from pipeline.extract.backbone import FrameEmbedder, LoadedBackbone, load_backbone
from pipeline.extract.batcher import Batcher, Owner
from pipeline.extract.distributed import Distributed, balance
from pipeline.extract.inputs import VideoItem, discover
from pipeline.extract.preprocess import crop_batch, resolve_mode
from pipeline.extract.progress import Progress
from pipeline.extract.sink import PartSink
from pipeline.extract.sources import Ended, InProcessSource, NvdecSource, PoolSource, Retry, Rows, WorkQueue
from pipeline.extract.windows import Windower, resolve_window
from pipeline.extract.workers import DecodeJob, DecodePool
from pipeline.runtime import cpu_count, default_workers, pick_device, process_age
from pipeline.spec import FeatureSpec

log = logging.getLogger(__name__)

INDEX_EVERY_S = 30.0  # rewrite CACHE.h5 this often during a run, so an interrupted run leaves a recent index


@dataclass
class ExtractReport:
    """What one run did. `failed` maps video key -> (source path, reason)."""

    cache: Path
    spec: FeatureSpec
    shard: tuple[int, int] | None = None
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    """Keys removed by --prune (their source no longer exists)."""
    packed: bool = False
    frames: int = 0
    seconds: float = 0.0
    device_busy_seconds: float = 0.0  # CUDA: device time of the forward passes (normalise, model, copy back)
    worker_restarts: int = 0  # decode workers replaced after they died
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds before the first features: `process` (interpreter start and imports, before extract_videos was
    called), `setup` (inputs, backbone, device, cache, resume check), `first_batch` (workers, first decode and
    forward pass); the rest of `seconds` is the steady state."""

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def steady_fps(self) -> float:
        """Frames per second after the first features came back (start-up excluded)."""
        after = self.seconds - self.startup.get("setup", 0.0) - self.startup.get("first_batch", 0.0)
        return (self.frames - self.startup.get("first_frames", 0)) / after if after > 0 else 0.0

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        rows = "windows" if self.spec.window else "frames"
        text = (
            f"{len(self.extracted)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed; "
            f"{self.frames} {rows} in {self.seconds:.1f}s ({fps:.1f} {rows}/s) -> "
            f"{printable(str(self.cache))}"
        )
        start = self.startup
        if "first_batch" in start:
            before = start["process"] + start["setup"] + start["first_batch"]
            text += (
                f"; start-up {before:.1f}s (process {start['process']:.1f}, setup {start['setup']:.1f}, first "
                f"batch {start['first_batch']:.1f}), then {self.steady_fps:.1f} {rows}/s"
            )
        if self.pruned:
            text += f"; {len(self.pruned)} pruned (source gone)"
        if self.packed:
            text += " (packed: one file)"
        if self.worker_restarts:
            text += f"; {self.worker_restarts} decode worker(s) replaced after dying"
        return text


# ---------------------------------------------------------------------------------------------------- the run
def build_config(output, config: ExtractConfig | None = None, **options) -> ExtractConfig:
    """An ExtractConfig from keyword options; sampling and runtime options (fps, stride, device, ...) may be flat."""
    return config_with(
        ExtractConfig, config, {"output": Path(output) if output is not None else None}, options, "extract_videos"
    )


def extract_videos(
    inputs: list,
    output,
    *,
    config: ExtractConfig | None = None,
    backbone_model: LoadedBackbone | None = None,
    **options,
) -> ExtractReport:
    """Extract per-frame features of `inputs` (folders, files, CSV manifests) into the cache `output`.

    Options are ExtractConfig fields (backbone="resnet18", weights="none", dtype="float32", ...) or Sampling fields
    (fps=5, stride=2, max_frames=..., num_frames=...). Rerunning resumes; see docs/cache-format.md.
    `backbone_model`: a backbone built by the caller (the fine-tuned one of a checkpoint), used instead of loading
    config.weights; the feature spec takes its weights name, sha256 and preprocessing.
    """
    cfg = build_config(output, config, **options)
    started = time.perf_counter()
    report_startup = {"process": process_age()}
    dist = Distributed.from_env(cfg.shard)
    unreadable: dict[str, str] = {}
    items = discover(inputs, unreadable)
    if dist.shard:
        # Every rank computes the same balanced split of ALL inputs (finished or not), so no video is ever
        # owned by two ranks or by none, whatever the others have done.
        items = [items[i] for i in balance([it.signature()[0] for it in items], dist.world)[dist.rank]]
    device = pick_device(dist.device(cfg.runtime.device))
    workers = cfg.workers if cfg.workers is not None else default_workers(device, dist.local_world)
    # Decode workers run one thread each and mostly wait; the model gets every core (measured: 2 threads on 2 cores
    # beat 1 thread + a worker by 30% on ResNet-18). Ranks on one machine share its cores.
    threads = dist.threads(cfg.runtime.threads, cpu_count())
    torch.set_num_threads(threads)
    loaded = backbone_model or load_backbone(
        cfg.backbone, cfg.weights, cfg.resize, cfg.crop, cfg.mean, cfg.std, progress=cfg.runtime.progress
    )
    window = resolve_window(loaded, cfg.backbone, cfg.window, cfg.window_stride)
    # video backbones: windows per pass, as many as hold the default number of frames
    batch_size = cfg.batch_size or max(1, default_batch_size(device) // (window.size if window else 1))
    spec = FeatureSpec(
        backbone=loaded.backbone or cfg.backbone,
        weights=loaded.weights,
        weights_sha256=loaded.weights_sha256,
        preprocessing=loaded.preprocessing,
        sampling=cfg.sampling,
        dim=loaded.dim,
        window=window,
    )
    if dist.shard and cfg.overwrite:
        raise ValueError(
            "--overwrite cannot be used by several ranks at once; delete the cache and its .parts folder first"
        )
    writer = CacheWriter(cfg.output, spec, cfg.dtype, overwrite=cfg.overwrite, shard=dist.shard)
    report = ExtractReport(cache=cfg.output, spec=spec, shard=dist.shard, startup=report_startup)
    report.failed.update({folder: (folder, reason) for folder, reason in unreadable.items()})
    try:
        todo, signatures = [], {}
        for item in items:
            sig = item.signature()
            if writer.is_done(item.key, *sig):
                report.skipped.append(item.key)
            else:
                todo.append(item)
                signatures[item.key] = sig
        log.info("%d videos: %d to extract, %d already in %s", len(items), len(todo), len(report.skipped), cfg.output)
        if todo:
            embedder = FrameEmbedder(loaded, device, compile=cfg.compile, graph=cfg.cuda_graph)
            report.startup["setup"] = time.perf_counter() - started
            _run(todo, signatures, cfg, embedder, writer, report, workers, batch_size, device)
        if cfg.prune and not dist.shard:
            report.pruned = writer.prune_missing_sources()
    finally:
        if not dist.shard:
            writer.write_index()
        writer.close()
    if dist.torchrun:
        dist.barrier()  # every rank's parts are committed; one process builds the index
        if dist.merges:
            merge(cfg.output, prune=cfg.prune)
            if cfg.pack:
                report.packed = bool(pack(cfg.output))
        dist.barrier()
    elif dist.shard:
        log.warning(
            "shard %d/%d done; when every shard is, build the index with `pipeline merge %s`",
            dist.rank,
            dist.world,
            cfg.output,
        )
    elif cfg.pack:
        report.packed = bool(pack(cfg.output))
    report.seconds = time.perf_counter() - started
    if report.startup.get("first_batch") is not None:
        log.info(
            "start-up: %.2fs process and imports, %.2fs setup, %.2fs to the first features; then %.0f frames/s",
            report.startup["process"],
            report.startup["setup"],
            report.startup["first_batch"],
            report.steady_fps,
        )
    return report


def default_batch_size(device: torch.device) -> int:
    """Frames per forward pass: EXTRACT_BATCH_CPU on a CPU (latency, memory), EXTRACT_BATCH_GPU on an
    accelerator (it needs wide batches)."""
    return EXTRACT_BATCH_CPU if device.type == "cpu" else EXTRACT_BATCH_GPU


def _nvdec_usable(decoder: str, device: torch.device) -> bool:
    """Whether NVDEC decodes in this run: --decoder nvdec when it can run here (else a warning says why), auto when
    it is a CUDA run and PyNvVideoCodec is installed."""
    if decoder == "cpu":
        return False
    from pipeline.extract import nvdec

    reason = nvdec.unavailable_reason(device)
    if reason is not None and decoder == "nvdec":
        log.warning("--decoder nvdec is unavailable: %s; decoding on the CPU", reason)
    elif reason is not None and device.type == "cuda":
        log.info("NVDEC is not used: %s", reason)
    return reason is None


def _nvdec_decoders(device: torch.device):
    """The NVDEC threads, started after the decode workers have forked."""
    from pipeline.extract import nvdec

    return nvdec.NvdecDecoders(device)


def _frame_sources(todo: list[VideoItem], jobs: list[DecodeJob], cfg: ExtractConfig, workers: int, device, native):
    """The run's frame sources over one work queue: NVDEC, when it runs, takes videos (and the CPU decoder takes
    videos too with --decoder auto); the decode workers (or this process) take frame folders and NVDEC's
    give-ups."""
    use_nvdec = _nvdec_usable(cfg.decoder, device)
    work = WorkQueue(shared=not (use_nvdec and cfg.decoder == "nvdec"))
    for i, item in enumerate(todo):
        (work.videos if use_nvdec and item.kind == "video" else work.cpu).append(i)
    cpu: PoolSource | InProcessSource
    if workers > 0:
        pool = DecodePool(min(workers, len(todo)))  # forked before this process starts threads of its own
        if device.type == "cuda" and native:
            pool.pin()
        cpu = PoolSource(pool, jobs, work, native, cfg.decode_timeout)
    else:
        cpu = InProcessSource(jobs, work, native)
    try:
        nvdec = NvdecSource(_nvdec_decoders(device), jobs, work) if use_nvdec else None
    except BaseException:
        cpu.close(device)
        raise
    return cpu, nvdec


class _Loop:
    """One extraction run: frame sources -> device crops -> the batcher -> the embedder -> the sink.

    The loop itself only routes events; each part does one job (sources.py, batcher.py, backbone.FrameEmbedder,
    sink.py)."""

    def __init__(
        self,
        todo,
        signatures,
        cfg: ExtractConfig,
        embed: FrameEmbedder,
        writer: CacheWriter,
        report,
        batch_size: int,
        device: torch.device,
    ):
        self.todo, self.cfg, self.embed, self.writer, self.report = todo, cfg, embed, writer, report
        self.device = device
        self.batcher = Batcher(batch_size)
        self.progress = Progress(todo, cfg.sampling, cfg.runtime.progress)
        self.sink = PartSink(writer, todo, lambda i: self._attrs(i, signatures))
        self.dead: set[int] = set()  # videos that failed mid-stream: their remaining events are ignored
        self.attempt: dict[int, int] = {}  # bumped when NVDEC hands a video back to the CPU decoder halfway
        self.inflight: deque = deque()  # (PendingFeatures, owners): forward passes whose features are on their way
        self.windowers: dict[int, Windower] = {}  # video backbones: each video's frames not yet in a window
        self.cpu = None
        self.started = time.perf_counter()

    def _attrs(self, i: int, signatures: dict) -> dict:
        item = self.todo[i]
        size, mtime = signatures[item.key]
        shard = self.writer.shard
        return {
            "key": item.key,
            "source_path": str(item.path.resolve()),
            "label": item.label,
            "split": item.split,
            "kind": item.kind,
            "source_size": size,
            "source_mtime_ns": mtime,
            "spec_id": self.writer.spec.id,
            "device": str(self.device),
            "shard": f"{shard[0]}/{shard[1]}" if shard else "",
        }

    # -- events
    def handle(self, event) -> None:
        i = event.video
        if i in self.dead:
            if isinstance(event, Rows):
                event.release(None)
            return
        if isinstance(event, Rows):
            self.rows(event)
        elif isinstance(event, Ended):
            last = self.windowers.pop(i).finish() if i in self.windowers else None
            if last is not None:  # a video shorter than one window: its one padded window
                self.enqueue(
                    i, last.clips, Owner(i, self.attempt.get(i, 0), last.frame_indices, last.timestamps, last.spans)
                )
            self.sink.ended_video(i, event.info)
        elif isinstance(event, Retry):
            log.warning("%s: %s; decoding it on the CPU", self.todo[i].path, event.reason)
            self.windowers.pop(i, None)
            self.batcher.drop(i)
            self.sink.discard(i)
            self.attempt[i] = self.attempt.get(i, 0) + 1
            self.cpu.work.retry_on_cpu(i)
        else:
            self.fail(i, event.reason)

    def rows(self, event: Rows) -> None:
        self.progress.reading(self.todo[event.video].path.name)
        if event.native:
            frames, copied = self.embed.upload(event.frames)  # no copy for frames already on the device
            crops = crop_batch(self.embed.pre, frames)  # (n, 3, C, C) uint8, on the model's device
            event.release(copied)
        else:
            crops = event.frames.clone()  # out of the shared slot
            event.release(None)
        i, attempt = event.video, self.attempt.get(event.video, 0)
        window = self.writer.spec.window
        if window is None:
            self.enqueue(i, crops, Owner(i, attempt, np.asarray(event.frame_indices), np.asarray(event.timestamps)))
            return
        clips = self.windowers.setdefault(i, Windower(window)).push(crops, event.frame_indices, event.timestamps)
        if clips is not None:
            self.enqueue(i, clips.clips, Owner(i, attempt, clips.frame_indices, clips.timestamps, clips.spans))

    def enqueue(self, i: int, rows: torch.Tensor, owner: Owner) -> None:
        """Rows of video i for the model: frames (n, 3, C, C), or window clips (n, T, 3, C, C)."""
        self.batcher.add(owner, rows)
        self.sink.expect(i, len(rows))
        while self.batcher.full():
            self.forward()

    def fail(self, i: int, reason: str) -> None:
        item = self.todo[i]
        self.batcher.drop(i)
        self.windowers.pop(i, None)
        self.dead.add(i)
        self.sink.fail(i, reason)
        self.report.failed[item.key] = (str(item.path), reason)
        tqdm.write(f"FAILED {printable(str(item.path))}: {printable(reason)}")
        self.progress.video_done(i, 0)

    # -- the model
    def forward(self) -> None:
        batch, rows, owners = self.batcher.take()
        self.inflight.append((self.embed.start(batch, rows), owners))
        self.collect(self.embed.depth)

    def collect(self, keep: int) -> None:
        """Hand the features of finished forward passes to the sink; wait for the oldest while more than `keep`
        are out."""
        while self.inflight and (len(self.inflight) > keep or self.inflight[0][0].ready()):
            pending, owners = self.inflight.popleft()
            feats = pending.result().numpy()  # (rows, D)
            if "first_batch" not in self.report.startup:
                self.report.startup["first_batch"] = time.perf_counter() - self.started
                self.report.startup["first_frames"] = len(feats)
            self.progress.frames(len(feats))  # before the videos they finish, whose end corrects the bar's total
            self.sink.features(feats, owners, self.alive)
            self.report.frames += len(feats)
        self.settle()

    def alive(self, owner: Owner) -> bool:
        return owner.video not in self.dead and self.attempt.get(owner.video, 0) == owner.attempt

    def settle(self, final: bool = False) -> None:
        """Count what the sink committed or failed (`final`: wait for the sink to finish everything first)."""
        for outcome in self.sink.close() if final else self.sink.drain():
            item = self.todo[outcome.video]
            if outcome.error is None:
                self.report.extracted.append(item.key)
                self.progress.video_done(outcome.video, outcome.rows)
            elif outcome.video not in self.dead:  # failed on the sink's thread (non-finite features)
                self.batcher.drop(outcome.video)
                self.windowers.pop(outcome.video, None)
                self.dead.add(outcome.video)
                self.report.failed[item.key] = (str(item.path), outcome.error)
                tqdm.write(f"FAILED {printable(str(item.path))}: {printable(outcome.error)}")
                self.progress.video_done(outcome.video, 0)

    # -- the run
    def run(self, cpu, nvdec=None) -> None:
        """Run until both sources are drained. `cpu` takes NVDEC's give-ups; both are closed at the end."""
        self.cpu = cpu
        if isinstance(cpu, PoolSource):
            cpu.before_restart = self.progress.stop_probing
        last_index = time.monotonic()
        try:
            sources = [s for s in (nvdec, cpu) if s is not None]
            while any(s.busy for s in sources):
                # Wait long for the decode workers only when nothing else needs attention soon.
                quick = (nvdec is not None and nvdec.busy) or self.cpu.in_flight_copies
                for source in sources:
                    for event in source.poll(0.002 if quick or source is nvdec else 0.5):
                        self.handle(event)
                self.report.worker_restarts = self.cpu.restarts
                self.settle()
                if not self.writer.shard and time.monotonic() - last_index > INDEX_EVERY_S:
                    self.writer.write_index()
                    last_index = time.monotonic()
            while self.batcher.queued:
                self.forward()
            self.collect(0)
            self.settle(final=True)
        finally:
            if nvdec is not None:
                nvdec.close(self.device)
            if self.cpu is not None:
                self.cpu.close(self.device)
            for outcome in self.sink.close():
                if outcome.error is None:
                    self.report.extracted.append(self.todo[outcome.video].key)
            self.report.device_busy_seconds = self.embed.busy_seconds
            self.progress.close()


def _run(
    todo: list[VideoItem],
    signatures: dict,
    cfg: ExtractConfig,
    embed: FrameEmbedder,
    writer: CacheWriter,
    report: ExtractReport,
    workers: int,
    batch_size: int,
    device: torch.device,
) -> None:
    # workers hand over native frames, the device crops
    native = resolve_mode(cfg.preprocess, device) == "device"
    log.info(
        "%s: %d decode workers, resize and crop %s, decoder %s, batches of %d",
        device,
        workers,
        "on the device" if native else "in the workers",
        cfg.decoder,
        batch_size,
    )
    jobs = [
        DecodeJob(i, item.path, cfg.sampling, None if native else embed.pre, cfg.max_pixels)
        for i, item in enumerate(todo)
    ]
    # The decode workers fork first: a thread of this process (the sink's, the progress bar's probes) holding a lock
    # at the fork (OpenCV's, FFmpeg's) would leave it held for ever in every worker.
    cpu, nvdec = _frame_sources(todo, jobs, cfg, workers, device, native)
    try:
        loop = _Loop(todo, signatures, cfg, embed, writer, report, batch_size, device)
    except BaseException:
        for source in (nvdec, cpu):
            if source is not None:
                source.close(device)
        raise
    loop.run(cpu, nvdec)
