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
import queue as queue_module
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import EXTRACT_BATCH_CPU, EXTRACT_BATCH_GPU, ExtractConfig, config_with
from pipeline.data.cache import CacheWriter, merge, pack, printable
from pipeline.extract.backbone import FrameEmbedder, LoadedBackbone, load_backbone
from pipeline.extract.distributed import Distributed, balance
from pipeline.extract.inputs import VideoItem, discover
from pipeline.extract.preprocess import crop_batch, resolve_mode
from pipeline.extract.workers import (
    JOBS_AHEAD,
    DecodeJob,
    DecodePool,
    crash_reason,
    decode_video,
)
from pipeline.runtime import cpu_count, default_workers, pick_device
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

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{len(self.extracted)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed; "
            f"{self.frames} frames in {self.seconds:.1f}s ({fps:.1f} frames/s) -> "
            f"{printable(str(self.cache))}"
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
    batch_size = cfg.batch_size or default_batch_size(device)

    loaded = backbone_model or load_backbone(
        cfg.backbone, cfg.weights, cfg.resize, cfg.crop, cfg.mean, cfg.std, progress=cfg.runtime.progress
    )
    spec = FeatureSpec(
        backbone=cfg.backbone,
        weights=loaded.weights,
        weights_sha256=loaded.weights_sha256,
        preprocessing=loaded.preprocessing,
        sampling=cfg.sampling,
        dim=loaded.dim,
    )
    if dist.shard and cfg.overwrite:
        raise ValueError(
            "--overwrite cannot be used by several ranks at once; delete the cache and its .parts folder first"
        )
    writer = CacheWriter(cfg.output, spec, cfg.dtype, overwrite=cfg.overwrite, shard=dist.shard)
    report = ExtractReport(cache=cfg.output, spec=spec, shard=dist.shard)
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
            embedder = FrameEmbedder(loaded, device, compile=cfg.compile)
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
    return report


def default_batch_size(device: torch.device) -> int:
    """Frames per forward pass: EXTRACT_BATCH_CPU on a CPU (latency, memory), EXTRACT_BATCH_GPU on an
    accelerator (it needs wide batches)."""
    return EXTRACT_BATCH_CPU if device.type == "cpu" else EXTRACT_BATCH_GPU


class _Progress:
    """One bar in frames for the whole run. Its total is estimated from the bytes of the videos still to do at the
    rate (frames per byte) of those done, and corrected as each video ends, so the ETA counts frames, not videos
    (a long video no longer hides behind a short one); the postfix names the videos done and the one being read."""

    def __init__(self, sizes: list[int], enabled: bool):
        self.sizes, self.left, self.done, self.current = sizes, sum(sizes), 0, ""
        self.done_bytes = 0
        self.bar = tqdm(unit="frame", desc="extract", disable=not enabled, smoothing=0.1, dynamic_ncols=True)

    def frames(self, n: int) -> None:
        self.bar.update(n)

    def reading(self, name: str) -> None:
        if name != self.current:
            self.current = name
            self._postfix()

    def video_done(self, i: int) -> None:
        self.done += 1
        self.done_bytes += self.sizes[i]
        self.left -= self.sizes[i]
        if self.bar.n and self.done_bytes:
            self.bar.total = self.bar.n + round(self.left * self.bar.n / self.done_bytes)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.done}/{len(self.sizes)} videos, {printable(self.current)}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Committer:
    """Commits finished part files on a thread of their own: the fsyncs and renames wait on the disk, not the
    model.

    Commits happen in order; the first error is raised again in the main thread (check, close)."""

    def __init__(self):
        self._queue: queue_module.Queue = queue_module.Queue(maxsize=256)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pipeline-commit", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            part, attrs = job
            if self._error is not None:
                part.abort()
                continue
            try:
                part.commit(attrs)
            except BaseException as e:  # noqa: BLE001  (raised again in the main thread)
                self._error = e
                part.abort()

    def submit(self, part, attrs: dict) -> None:
        self.check()
        self._queue.put((part, attrs))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.check()


class _AsyncPart:
    """A PartWriter whose commit runs on the committer's thread (appends and aborts stay here)."""

    def __init__(self, part, committer: _Committer):
        self.part, self.committer = part, committer

    def append(self, features: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray) -> None:
        self.part.append(features, frame_indices, timestamps)

    def commit(self, attrs: dict) -> None:
        self.committer.submit(self.part, attrs)

    def abort(self) -> None:
        self.part.abort()


def _nvdec_usable(decoder: str, device: torch.device) -> bool:
    """Whether --decoder asks for NVDEC and it can run here (the reason is logged when it cannot).
    auto is cpu until NVDEC has been measured faster on the target (docs/performance.md)."""
    if decoder != "nvdec":
        return False
    from pipeline.extract import nvdec

    reason = nvdec.unavailable_reason(device)
    if reason is not None:
        log.warning("--decoder nvdec is unavailable: %s; decoding on the CPU", reason)
    return reason is None


def _nvdec_decoders(decoder: str, device: torch.device):
    """The NVDEC threads, started (after the decode workers have forked) when `_nvdec_usable` said yes."""
    from pipeline.extract import nvdec

    return nvdec.NvdecDecoders(device)


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
    pre = embed.pre
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
        DecodeJob(i, item.path, cfg.sampling, None if native else pre, cfg.max_pixels) for i, item in enumerate(todo)
    ]
    waiting: deque[int] = deque()  # videos for the CPU decoder, in input order
    nvdec = None
    use_nvdec = _nvdec_usable(cfg.decoder, device)

    queue: deque = deque()  # (i, crops (n,3,C,C) uint8 on the host or the device, frame_indices, timestamps)
    queued = 0
    outstanding: dict[int, int] = {}  # rows of video i not yet through the model
    ended: dict[int, dict] = {}
    parts = {}
    dead: set[int] = set()  # videos that failed mid-stream: their remaining messages are ignored
    attempt: dict[int, int] = {}  # bumped when NVDEC hands a video back to the CPU decoder halfway
    inflight: deque = deque()  # (PendingFeatures, owners): forward passes whose features are on their way
    releases: deque = deque()  # (event, worker, generation, slot): slots the GPU is still copying from
    last_index = time.monotonic()
    progress = _Progress([max(signatures[item.key][0], 1) for item in todo], cfg.runtime.progress)
    pool = committer = None

    def finish(i: int) -> None:
        item = todo[i]
        size, mtime = signatures[item.key]
        parts.pop(i).commit(
            {
                "key": item.key,
                "source_path": str(item.path.resolve()),
                "label": item.label,
                "split": item.split,
                "kind": item.kind,
                "source_size": size,
                "source_mtime_ns": mtime,
                "spec_id": writer.spec.id,
                "device": str(device),
                "shard": f"{writer.shard[0]}/{writer.shard[1]}" if writer.shard else "",
                "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **ended.pop(i),
            }
        )
        outstanding.pop(i, None)
        writer.clear_failure(item.key)
        report.extracted.append(item.key)
        progress.video_done(i)

    def fail(i: int, reason: str) -> None:
        item = todo[i]
        if i in parts:
            parts.pop(i).abort()
        outstanding.pop(i, None)
        ended.pop(i, None)
        dead.add(i)
        report.failed[item.key] = (str(item.path), reason)
        writer.record_failure(item.key, str(item.path), reason)
        tqdm.write(f"FAILED {printable(str(item.path))}: {printable(reason)}")
        progress.video_done(i)

    def drop(i: int) -> None:
        """Forget video i's rows still waiting for the model."""
        nonlocal queued
        for entry in [e for e in queue if e[0] == i]:
            queue.remove(entry)
            queued -= len(entry[1])

    def forward(n: int) -> None:
        nonlocal queued
        pieces, owners = [], []
        rows = n
        while n > 0:
            i, frames, idx, ts = queue.popleft()
            if len(frames) > n:  # split the chunk: the rest stays at the front for the next batch
                queue.appendleft((i, frames[n:], idx[n:], ts[n:]))
                frames, idx, ts = frames[:n], idx[:n], ts[:n]
            pieces.append(frames)
            owners.append((i, attempt.get(i, 0), idx, ts))
            n -= len(frames)
            queued -= len(frames)
        batch = torch.cat(pieces)  # (rows, 3, C, C)
        if rows < batch_size:
            # Every forward pass has the same shape, so a frame's features are the same bytes whatever shared
            # its batch: a resumed run equals an uninterrupted one (the padding rows are computed and
            # dropped).
            batch = torch.cat([batch, batch.new_zeros((batch_size - rows, *batch.shape[1:]))])
        inflight.append((embed.start(batch, rows), owners))
        collect(embed.depth)

    def collect(keep: int) -> None:
        """Write the features of finished forward passes; wait for the oldest while more than `keep` are
        out."""
        while inflight and (len(inflight) > keep or inflight[0][0].ready()):
            pending, owners = inflight.popleft()
            feats = pending.result().numpy()  # (rows, D)
            progress.frames(len(feats))  # before the videos they finish, whose end corrects the bar's total
            row = 0
            for i, gen, idx, ts in owners:
                k = len(idx)
                if i in parts and attempt.get(i, 0) == gen:  # the video may have failed while its rows waited
                    try:
                        parts[i].append(feats[row : row + k], idx, ts)
                    except ValueError as e:
                        fail(i, str(e))
                    else:
                        outstanding[i] -= k
                        if outstanding[i] == 0 and i in ended:
                            finish(i)
                row += k
            report.frames += len(feats)

    def settle(worker: int | None = None) -> None:
        """Hand back the slots whose copy to the GPU is done (all of `worker`'s, waiting for them)."""
        while releases and (worker is not None or releases[0][0].query()):
            event, w, generation, slot = releases.popleft()
            event.synchronize()
            pool.release(w, generation, slot)

    def rows(i: int, frames: torch.Tensor, idx, ts, release, whole: bool) -> None:
        """A chunk of decoded frames of video i: native (n, H, W, 3) when `whole`, else crops (n, 3, C, C), on
        the host or the device. `release(event)` hands their memory back (once `event` has passed)."""
        nonlocal queued
        progress.reading(todo[i].path.name)
        if whole:
            if frames.device.type == "cpu":
                frames, copied = embed.upload(frames)
            else:
                copied = None  # decoded on the GPU
            crops = crop_batch(pre, frames)  # (n, 3, C, C) uint8, on the model's device
            release(copied)
        else:
            crops = frames.clone()  # out of the shared slot
            release(None)
        if i not in parts:
            parts[i] = _AsyncPart(writer.begin(todo[i].key, writer.spec.dim), committer)
            outstanding[i] = 0
        queue.append((i, crops, np.asarray(idx), np.asarray(ts)))
        queued += len(crops)
        outstanding[i] += len(crops)
        while queued >= batch_size:
            forward(batch_size)

    def handle(message: tuple, frames_of, whole: bool = native) -> None:
        kind, i = message[0], message[1]
        if i in dead:
            if kind == "rows":
                frames_of(message[2])[1](None)
            return
        if kind == "rows":
            frames, release = frames_of(message[2])
            rows(i, frames, message[3], message[4], release, whole)
        elif kind == "end":
            ended[i] = message[2]
            if outstanding.get(i, 0) == 0 and i in parts:
                finish(i)
        elif kind == "fallback":  # NVDEC gave it up: start it again on the CPU decoder
            log.warning("%s: %s; decoding it on the CPU", todo[i].path, message[2])
            drop(i)
            if i in parts:
                parts.pop(i).abort()
            outstanding.pop(i, None)
            ended.pop(i, None)
            attempt[i] = attempt.get(i, 0) + 1
            waiting.append(i)
        else:
            drop(i)  # the failed video's rows still waiting for the model
            fail(i, message[2])

    def from_pool(w: int):
        def frames_of(payload):
            frames = pool.frames(w, payload)
            if payload[0] != "slot":
                return frames, lambda event: None
            generation, slot = pool.generation(w), payload[1]

            def release(event) -> None:
                if event is None:
                    pool.release(w, generation, slot)
                else:
                    releases.append((event, w, generation, slot))

            return frames, release

        return frames_of

    def in_process(payload):
        if isinstance(payload, list):  # frames of decode_video in this process
            return torch.from_numpy(np.stack(payload)), lambda event: None
        return payload, lambda event: None  # a tensor decoded on the GPU

    def schedule() -> None:
        for w in range(len(pool)):
            while waiting and len(pool.jobs(w)) < JOBS_AHEAD:
                pool.assign(w, replace(jobs[waiting.popleft()]))

    try:
        if workers > 0:
            pool = DecodePool(min(workers, len(todo)))  # forked before this process starts threads of its own
            if device.type == "cuda" and native:
                pool.pin()
        nvdec = _nvdec_decoders(cfg.decoder, device) if use_nvdec else None
        for i, item in enumerate(todo):
            if nvdec is not None and item.kind == "video":
                nvdec.submit(replace(jobs[i], pre=None))
            else:
                waiting.append(i)
        committer = _Committer()
        while True:
            if nvdec is not None:
                while (message := nvdec.get()) is not None:
                    handle(message, in_process, whole=True)  # NVDEC hands over native frames
            if pool is None:
                if waiting:
                    for message in decode_video(jobs[waiting.popleft()]):
                        handle(message, in_process)
                elif nvdec is not None and nvdec.pending:
                    time.sleep(0.001)
                else:
                    break
            else:
                schedule()
                busy = waiting or any(pool.jobs(w) for w in range(len(pool)))
                if not busy and not (nvdec is not None and nvdec.pending):
                    break
                quick = releases or (nvdec is not None and nvdec.pending)
                messages, crashes = pool.poll(0.002 if quick else 0.5)
                for w, message in messages:
                    handle(message, from_pool(w))
                    if message[0] in ("end", "error"):
                        pool.done(w, message[1])
                for crash in crashes:
                    settle(crash.worker)  # the GPU has finished reading its slots before they are reused
                    if crash.job is not None:
                        i = crash.job.index
                        pool.done(crash.worker, i)
                        if i not in dead:
                            drop(i)
                            fail(i, crash.reason)
                    else:
                        log.warning(
                            "decode worker %d died while idle (%s); restarting it",
                            crash.worker,
                            crash_reason(pool.workers[crash.worker].process.exitcode),
                        )
                    pool.restart(crash.worker)
                report.worker_restarts = pool.restarts
                settle()
            committer.check()
            if not writer.shard and time.monotonic() - last_index > INDEX_EVERY_S:
                writer.write_index()
                last_index = time.monotonic()
        while queued:
            forward(min(queued, batch_size))
        collect(0)
    finally:
        for part in parts.values():
            part.abort()
        if nvdec is not None:
            nvdec.close()
        if pool is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # no copy may still read a slot when the memory goes
            pool.close()
        if committer is not None:
            committer.close()
        report.device_busy_seconds = embed.busy_seconds
        progress.close()
