"""Stage one: every sampled frame of every input through a frozen backbone, once, into the feature cache.

Decoding and cropping run in worker processes (a DataLoader over videos) while the model runs here; batches span video
boundaries; each finished video is committed as its own part file, so a crash loses at most the videos in flight.

    pipeline extract videos/ -o cache.h5 --backbone resnet50 --fps 5
"""

from __future__ import annotations

import inspect
import logging
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import EXTRACT_BATCH_CPU, EXTRACT_BATCH_GPU, ExtractConfig, config_with, parse_shard
from pipeline.data.cache import CacheWriter, merge, pack, printable
from pipeline.extract.backbone import FrameEmbedder, LoadedBackbone, load_backbone
from pipeline.extract.decode import DecodeError, FrameSelector, open_source
from pipeline.extract.inputs import VideoItem, discover
from pipeline.runtime import cpu_count, pick_device
from pipeline.spec import FeatureSpec, Preprocessing, Sampling

log = logging.getLogger(__name__)

CHUNK_FRAMES = 8  # frames per message from a decode worker
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

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        text = (f"{len(self.extracted)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed; "
                f"{self.frames} frames in {self.seconds:.1f}s ({fps:.1f} frames/s) -> "
                f"{printable(str(self.cache))}")
        if self.pruned:
            text += f"; {len(self.pruned)} pruned (source gone)"
        if self.packed:
            text += " (packed: one file)"
        return text


# ------------------------------------------------------------------------------------------------ decode workers
def balance(weights: list[int], n: int) -> list[list[int]]:
    """Split item indices into n lists of similar total weight (largest first, each to the lightest list).
    Each list keeps the items' original order."""
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += max(weights[i], 1)
    return [sorted(b) for b in bins]


class FrameStream(IterableDataset):
    """Yields ('rows', i, frames uint8 (n, 3, C, C), frame_indices, timestamps), then ('end', i, info) per video,
    or ('error', i, reason). Each worker decodes its own share of the videos, in order."""

    def __init__(self, items: list[VideoItem], shares: list[list[int]], sampling: Sampling, pre: Preprocessing):
        self.items, self.shares, self.sampling, self.pre = items, shares, sampling, pre

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        share = self.shares[info.id if info is not None else 0]
        for i in share:
            yield from self._video(i)

    def _video(self, i: int) -> Iterator[tuple]:
        item = self.items[i]
        rows = 0
        try:
            source = open_source(item.path, self.sampling.frames_fps)
            meta = source.probe()
            total = source.count() if self.sampling.num_frames is not None else None
            keep = FrameSelector(self.sampling, total)
            frames, idx, ts = [], [], []
            decoded = 0
            sizes = set()
            for index, t, image in source.frames(keep):
                decoded += 1
                if image is None:
                    continue
                sizes.add(image.shape[:2])
                frames.append(self.pre.crop_frame(torch.from_numpy(image).permute(2, 0, 1)))
                idx.append(index)
                ts.append(t)
                if len(frames) == CHUNK_FRAMES:
                    yield "rows", i, torch.stack(frames), np.array(idx), np.array(ts)
                    rows += len(frames)
                    frames, idx, ts = [], [], []
            if frames:
                yield "rows", i, torch.stack(frames), np.array(idx), np.array(ts)
                rows += len(frames)
            if decoded == 0:
                raise DecodeError("no frame could be decoded (corrupt, truncated or not a video)")
            if rows == 0:
                raise DecodeError(f"the sampling kept none of its {decoded} frames")
            yield "end", i, {
                "native_fps": meta.native_fps, "width": meta.width, "height": meta.height,
                "header_frame_count": meta.header_frame_count, "decoded_frames": decoded,
                "mixed_frame_sizes": len(sizes) > 1,
            }
        except Exception as e:  # a bad input must never stop the run: report it and go on
            reason = str(e) if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
            log.debug("decode failure %s\n%s", item.path, traceback.format_exc())
            yield "error", i, reason


def worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def start_workers(source) -> Iterator:
    """iter(source), with OpenCV's thread pool at one thread while the decode workers fork.

    A forked worker inherits OpenCV's pool but not its threads: resizing the pool there (worker_init) joins threads
    that do not exist and hangs for ever once this process has used the pool (any cv2 call on a large image)."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(source)
    finally:
        cv2.setNumThreads(before)


# ---------------------------------------------------------------------------------------------------- the run
def build_config(output, config: ExtractConfig | None = None, **options) -> ExtractConfig:
    """An ExtractConfig from keyword options; sampling and runtime options (fps, stride, device, ...) may be flat."""
    return config_with(ExtractConfig, config, {"output": Path(output) if output is not None else None}, options,
                       "extract_videos")


def extract_videos(inputs: list, output, *, config: ExtractConfig | None = None,
                   backbone_model: LoadedBackbone | None = None, **options) -> ExtractReport:
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
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    # Decode workers run one thread each and mostly wait; the model gets every core (measured: 2 threads on 2 cores
    # beat 1 thread + a worker by 30% on ResNet-18). Ranks on one machine share its cores.
    threads = cfg.runtime.threads or max(1, cpu_count() // dist.local_world)
    torch.set_num_threads(threads)
    batch_size = cfg.batch_size or (EXTRACT_BATCH_CPU if device.type == "cpu" else EXTRACT_BATCH_GPU)

    loaded = backbone_model or load_backbone(cfg.backbone, cfg.weights, cfg.resize, cfg.crop, cfg.mean, cfg.std,
                                             progress=cfg.runtime.progress)
    spec = FeatureSpec(backbone=cfg.backbone, weights=loaded.weights, weights_sha256=loaded.weights_sha256,
                       preprocessing=loaded.preprocessing, sampling=cfg.sampling, dim=loaded.dim)
    if dist.shard and cfg.overwrite:
        raise ValueError("--overwrite cannot be used by several ranks at once; delete the cache and its .parts "
                         "folder first")
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
            embedder = FrameEmbedder(loaded, device)
            _run(todo, signatures, cfg, embedder, writer, report, workers, batch_size, device)
        if cfg.prune and not dist.shard:
            report.pruned = writer.prune_missing_sources()
    finally:
        if not dist.shard:
            writer.write_index()
        writer.close()
    if dist.torchrun:
        dist.barrier()  # every rank's parts are committed; one process builds the index
        if dist.rank == 0:
            merge(cfg.output, prune=cfg.prune)
            if cfg.pack:
                report.packed = bool(pack(cfg.output))
        dist.barrier()
    elif dist.shard:
        log.warning("shard %d/%d done; when every shard is, build the index with `pipeline merge %s`",
                    dist.rank, dist.world, cfg.output)
    elif cfg.pack:
        report.packed = bool(pack(cfg.output))
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class Distributed:
    """Which share of the inputs this process extracts: all of them, --shard i/n, or a torchrun rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    torchrun: bool = False

    @classmethod
    def from_env(cls, shard: str | None) -> Distributed:
        import os

        if shard is not None:
            i, n = parse_shard(shard)
            return cls(rank=i, world=n)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import datetime

        import torch.distributed as torch_dist

        if not torch_dist.is_initialized():
            # gloo for the two barriers only (CPU or GPU): ranks never wait on each other while extracting.
            torch_dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torchrun=True)

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.world > 1 else None

    def device(self, requested: str) -> str:
        """Each rank on its own GPU: cuda -> cuda:LOCAL_RANK."""
        if self.torchrun and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        import torch.distributed as torch_dist

        torch_dist.barrier()


def default_workers(device: torch.device) -> int:
    if device.type == "cpu":
        return 1 if cpu_count() <= 4 else min(4, cpu_count() // 4)
    return max(1, min(8, cpu_count() - 1))


def _run(todo: list[VideoItem], signatures: dict, cfg: ExtractConfig, embed: FrameEmbedder, writer: CacheWriter,
         report: ExtractReport, workers: int, batch_size: int, device: torch.device) -> None:
    pre = embed.pre
    n_shares = max(workers, 1)
    shares = balance([max(signatures[it.key][0], 0) for it in todo], n_shares)
    stream = FrameStream(todo, shares, cfg.sampling, pre)
    if workers > 0:
        # in_order=False (torch >= 2.6) lets a fast worker's videos pass a slow one's; each worker stays in order
        kwargs = {"in_order": False} if "in_order" in inspect.signature(DataLoader).parameters else {}
        source = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=worker_init,
                            prefetch_factor=4, pin_memory=device.type == "cuda", persistent_workers=False, **kwargs)
    else:
        source = stream

    queue: deque = deque()  # (i, frames (n,3,C,C) uint8, frame_indices, timestamps), in arrival order
    queued = 0
    outstanding: dict[int, int] = {}  # rows of video i not yet through the model
    ended: dict[int, dict] = {}
    parts = {}
    dead: set[int] = set()  # videos that failed mid-stream: their remaining messages are ignored
    last_index = time.monotonic()
    bar_videos = tqdm(total=len(todo), unit="video", desc="videos", disable=not cfg.runtime.progress, position=0)
    bar_frames = tqdm(unit="frame", desc="frames", disable=not cfg.runtime.progress, position=1, smoothing=0.1)

    def finish(i: int) -> None:
        item = todo[i]
        size, mtime = signatures[item.key]
        parts.pop(i).commit({
            "key": item.key, "source_path": str(item.path.resolve()), "label": item.label, "split": item.split,
            "kind": item.kind, "source_size": size, "source_mtime_ns": mtime, "spec_id": writer.spec.id,
            "device": str(device), "shard": f"{writer.shard[0]}/{writer.shard[1]}" if writer.shard else "",
            "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **ended.pop(i)})
        outstanding.pop(i, None)
        writer.clear_failure(item.key)
        report.extracted.append(item.key)
        bar_videos.update(1)

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
        bar_videos.update(1)

    def forward(n: int) -> None:
        nonlocal queued
        pieces, owners = [], []
        while n > 0:
            i, frames, idx, ts = queue.popleft()
            if len(frames) > n:  # split the chunk: the rest stays at the front for the next batch
                queue.appendleft((i, frames[n:], idx[n:], ts[n:]))
                frames, idx, ts = frames[:n], idx[:n], ts[:n]
            pieces.append(frames)
            owners.append((i, idx, ts))
            n -= len(frames)
            queued -= len(frames)
        feats = embed(torch.cat(pieces)).numpy()
        row = 0
        for i, idx, ts in owners:
            k = len(idx)
            if i in parts:  # the video may have failed while its rows waited
                try:
                    parts[i].append(feats[row:row + k], idx, ts)
                except ValueError as e:
                    fail(i, str(e))
                else:
                    outstanding[i] -= k
                    if outstanding[i] == 0 and i in ended:
                        finish(i)
            row += k
        bar_frames.update(len(feats))
        report.frames += len(feats)

    try:
        for message in start_workers(source):
            kind, i = message[0], message[1]
            if i in dead:
                continue
            if kind == "rows":
                _, _, frames, idx, ts = message
                if i not in parts:
                    parts[i] = writer.begin(todo[i].key, writer.spec.dim)
                    outstanding[i] = 0
                queue.append((i, frames, idx, ts))
                queued += len(frames)
                outstanding[i] += len(frames)
                while queued >= batch_size:
                    forward(batch_size)
            elif kind == "end":
                ended[i] = message[2]
                if outstanding.get(i, 0) == 0 and i in parts:
                    finish(i)
            else:
                # drop the failed video's rows still waiting for the model
                for entry in [e for e in queue if e[0] == i]:
                    queue.remove(entry)
                    queued -= len(entry[1])
                fail(i, message[2])
            if not writer.shard and time.monotonic() - last_index > INDEX_EVERY_S:
                writer.write_index()
                last_index = time.monotonic()
        while queued:
            forward(min(queued, batch_size))
    finally:
        for part in parts.values():
            part.abort()
        bar_frames.close()
        bar_videos.close()
