"""Sequences of feature rows for training and evaluating heads: clip plans, padding, and two stores.

The RAM store reads the chosen videos of a cache once into one (rows, D) array in the cache's own dtype (float16 stays
float16) and gathers whole batches with one indexing operation, casting to float32 per batch. The lazy store, for caches
larger than memory, reads each batch's videos in DataLoader worker processes that open the cache themselves.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.cache import CacheError, FeatureCache
from pipeline.runtime import progress_bar, worker_init

log = logging.getLogger(__name__)

RAM_SHARE = 0.6  # memory="auto" holds the features in RAM when they need at most this share of the available memory
STATS_ROWS = 200_000  # rows sampled for the per-dimension mean/std that heads standardise their inputs with
STATS_CHUNK = 8192  # rows converted to float32 at a time while computing them (64 MiB for D=2048)


@dataclass
class Plan:
    """Which rows one batch is made of.

    Shapes: videos (B,) store indices; rows (B, L) row positions within each video (not decoded frame
    numbers: those are the cache's frame_indices), -1 for padding;
    owners (B,) the sample each clip belongs to (several clips of one video share an owner); y (B,) class indices,
    or (B, L) the class of each row for a head that labels frames (-1 where padded or unlabelled).
    """

    videos: np.ndarray
    rows: np.ndarray
    owners: np.ndarray
    y: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return (self.rows >= 0).sum(1)


@dataclass
class Batch:
    """Shapes: x (B, L, D) float32, zero where padded; lengths (B,) int64; y (B,) or (B, L) int64 (as Plan.y);
    owners (B,) int64."""

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor
    owners: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            self.x.to(device, non_blocking=True), self.lengths, self.y.to(device, non_blocking=True), self.owners
        )


# ----------------------------------------------------------------------------------------------------- stores
class SequenceStore:
    """The feature rows of a list of videos. `gather` builds padded float32 batches from a Plan."""

    keys: list[str]
    lengths: np.ndarray
    dim: int
    in_memory: bool

    def gather(self, plan: Plan) -> Batch:
        raise NotImplementedError


def _batch(plan: Plan, x: torch.Tensor) -> Batch:
    return Batch(
        x,
        torch.from_numpy(plan.lengths.astype(np.int64)),
        torch.from_numpy(plan.y.astype(np.int64)),
        torch.from_numpy(plan.owners.astype(np.int64)),
    )


class RamStore(SequenceStore):
    """All rows in one (rows, D) tensor in the cache's dtype; `offsets[i]` is video i's first row."""

    in_memory = True

    def __init__(self, keys: list[str], data: np.ndarray, lengths: np.ndarray):
        self.keys, self.lengths = keys, lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.data = torch.from_numpy(data)  # shares memory with the array
        self.dim = data.shape[1]

    def gather(self, plan: Plan) -> Batch:
        b, length = plan.rows.shape
        valid = plan.rows >= 0
        x = torch.empty(b, length, self.dim)
        counts = valid.sum(1)
        first = plan.rows[:, 0]
        if (plan.rows[np.arange(b), counts - 1] - first == counts - 1).all():
            # Each sequence a run of consecutive rows (stride 1, padding at the end): one slice copy per sequence,
            # converting to float32 as it copies (about 1.6x faster than index_select and a second copy).
            starts = self.offsets[plan.videos] + first
            for i, (start, n) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
                x[i, :n].copy_(self.data[start : start + n])
                if n < length:
                    x[i, n:] = 0.0
            return _batch(plan, x)
        rows = self.offsets[plan.videos][:, None] + np.where(valid, plan.rows, 0)
        x.view(-1, self.dim).copy_(self.data.index_select(0, torch.from_numpy(rows.reshape(-1))))
        if not valid.all():
            x[torch.from_numpy(~valid)] = 0.0
        return _batch(plan, x)


@dataclass
class ReadFailure:
    """A CacheError met by a reader process, on its way to the main process."""

    message: str


class LazyStore(SequenceStore, Dataset):
    """Reads each video from the cache when a batch needs it. The HDF5 file is opened by FeatureCache on first use in
    each process, never here, so that DataLoader workers each get their own handle."""

    in_memory = False

    def __init__(self, cache: FeatureCache, keys: list[str], lengths: np.ndarray):
        self.cache, self.keys, self.lengths = cache, keys, lengths
        self.dim = cache.spec.dim

    def gather(self, plan: Plan) -> Batch:
        b, length = plan.rows.shape
        x = torch.zeros(b, length, self.dim)
        for i, (v, frames) in enumerate(zip(plan.videos, plan.rows, strict=True)):
            frames = frames[frames >= 0]
            x[i, : len(frames)] = torch.from_numpy(self.cache.features(self.keys[v])[frames].astype(np.float32))
        return _batch(plan, x)

    # Dataset protocol: the DataLoader's sampler yields whole Plans, each worker turns one into a Batch.
    def __getitem__(self, plan: Plan) -> Batch | ReadFailure:
        try:
            return self.gather(plan)
        except CacheError as e:
            # In a reader process: handed over as a value and raised again by `batches` with its own one-line
            # message (an exception raised here would reach the user wrapped in the DataLoader's traceback text).
            return ReadFailure(str(e))

    def __len__(self) -> int:
        return len(self.keys)


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: MemAvailable, capped by a cgroup limit if any."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def choose_memory(nbytes: int, memory: str) -> bool:
    """True to hold `nbytes` of features in RAM: always for 'ram', never for 'lazy', when they fit for 'auto'."""
    if memory != "auto":
        return memory == "ram"
    avail = available_memory()
    fits = avail is None or nbytes <= RAM_SHARE * avail
    if not fits:
        log.warning(
            "features need %.1f GiB, more than %d%% of the %.1f GiB available: reading them lazily per batch "
            "(pass --memory ram to force)",
            nbytes / 2**30,
            RAM_SHARE * 100,
            avail / 2**30,
        )
    return fits


def load_sequences(cache: FeatureCache, keys: list[str], memory: str = "auto", progress: bool = True) -> SequenceStore:
    """A store of the videos `keys` of `cache`, in RAM or lazy (see `choose_memory`)."""
    lengths = np.array([cache.num_frames(k) for k in keys], dtype=np.int64)
    itemsize = np.dtype(cache.dtype).itemsize
    nbytes = int(lengths.sum()) * cache.spec.dim * itemsize
    if not choose_memory(nbytes, memory):
        return LazyStore(cache, keys, lengths)
    data = np.empty((int(lengths.sum()), cache.spec.dim), dtype=cache.dtype)
    row = 0
    for key, n in zip(
        progress_bar(keys, desc="loading", unit="video", disable=not progress, leave=False), lengths, strict=True
    ):
        features = cache.features(key)
        if features.shape != (n, cache.spec.dim):
            raise ValueError(
                f"{cache.path}: {key!r} holds {features.shape} features, the index says ({n}, {cache.spec.dim})"
            )
        data[row : row + n] = features
        row += n
    cache.close()
    log.info("loaded %d videos, %d rows, %.1f MiB (%s) into memory", len(keys), row, nbytes / 2**20, cache.dtype)
    return RamStore(keys, data, lengths)


def sample_rows(store: SequenceStore, videos: np.ndarray, max_rows: int) -> Iterator[torch.Tensor]:
    """float32 chunks (n, D) of about `max_rows` rows spread evenly over `videos` (store indices): every k-th row of
    a RAM store, STATS_CHUNK rows at a time; whole videos spread evenly over the list from a lazy one (one read
    each)."""
    total = int(store.lengths[videos].sum())
    step = max(1, total // max_rows)
    if isinstance(store, RamStore):
        rows = np.concatenate([store.offsets[v] + np.arange(store.lengths[v]) for v in videos])[::step]
        rows = torch.from_numpy(rows)
        for i in range(0, len(rows), STATS_CHUNK):
            yield store.data.index_select(0, rows[i : i + STATS_CHUNK]).float()
    else:
        count = min(len(videos), max(1, round(len(videos) / step)))
        picked = np.unique(np.linspace(0, len(videos) - 1, count).round().astype(np.int64))
        for v in videos[picked]:
            yield torch.from_numpy(store.cache.features(store.keys[v]).astype(np.float32))


def feature_stats(
    store: SequenceStore, videos: np.ndarray, max_rows: int = STATS_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of the rows of `videos`, from at most about `max_rows` rows spread evenly.

    The std is floored at 1% of the median std, so that a dimension constant in these rows cannot blow up elsewhere.
    """
    # Sums of (x - shift) and its square (shift: the first chunk's mean, so that large offsets cannot cancel the
    # variance out), as float32 matmuls per chunk (a column sum as ones @ x is ~5x faster than x.sum(0) on a CPU)
    # added up in float64.
    n, s, ss = 0, torch.zeros(store.dim, dtype=torch.float64), torch.zeros(store.dim, dtype=torch.float64)
    shift = None
    for x in sample_rows(store, videos, max_rows):  # float32 (rows, D)
        if shift is None:
            shift = x.mean(0)
        x = x - shift
        ones = torch.ones(1, len(x))
        n += len(x)
        s += (ones @ x)[0].double()
        ss += (ones @ x.square_())[0].double()
    mean = s / max(n, 1)
    std = (ss / max(n, 1) - mean * mean).clamp(min=0).sqrt()
    if shift is not None:
        mean += shift.double()
    std = std.clamp(min=max(float(std.median()) * 0.01, 1e-6))
    return mean.float(), std.float()


# ------------------------------------------------------------------------------------------------------ plans
def clip_frames(lengths: np.ndarray, clip_len: int | None, stride: int, starts: np.ndarray | None = None) -> np.ndarray:
    """Row positions (B, L) of one contiguous clip per video, -1 where a video is too short (padding).

    A clip is clip_len rows `stride` apart from `starts` (0 when None); a video shorter than the clip's span gives
    every stride-th row from 0. clip_len None means the whole sequence (every stride-th row).
    """
    if clip_len is None:
        length = int(-(-lengths.max() // stride))
        frames = np.arange(length)[None, :] * stride + np.zeros((len(lengths), 1), np.int64)
    else:
        span = (clip_len - 1) * stride + 1
        starts = np.zeros(len(lengths), np.int64) if starts is None else np.where(lengths >= span, starts, 0)
        frames = starts[:, None] + np.arange(clip_len)[None, :] * stride
    return np.where(frames < lengths[:, None], frames, -1).astype(np.int64)


def segment_frames(lengths: np.ndarray, segments: int, stride: int, offsets: np.ndarray | None = None) -> np.ndarray:
    """Row positions (B, segments) spread over each whole video, -1 for padding.

    A video's every stride-th row is cut into `segments` consecutive parts of (nearly) equal size and one row is
    taken from each, at `offsets` (B, segments), fractions in [0, 1) of each part (None: 0.5, the centres). A video
    with at most `segments` such rows gives all of them (the head masks the padding).
    """
    n = -(-lengths.astype(np.int64) // stride)  # rows on the stride grid
    if offsets is None:
        offsets = np.full((len(lengths), segments), 0.5)
    bounds = n[:, None] * np.arange(segments + 1)[None, :] // segments  # integer part boundaries, (B, segments + 1)
    width = np.diff(bounds, axis=1)
    pos = bounds[:, :-1] + np.minimum(np.floor(offsets * width).astype(np.int64), np.maximum(width - 1, 0))
    column = np.arange(segments)[None, :]
    pos = np.where((n <= segments)[:, None], np.where(column < n[:, None], column, -1), pos)
    return np.where(pos >= 0, pos * stride, -1).astype(np.int64)


def train_plans(
    lengths: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    clip_len: int | None,
    stride: int,
    rng: np.random.Generator,
    sampling: str = "crop",
) -> list[Plan]:
    """One epoch: the videos in a random order, each as one clip. `lengths` and `y` are indexed by store index;
    the plans' owners are store indices too.

    sampling "segments": clip_len rows spread over the whole video, a random one of each segment; "crop": clip_len
    consecutive rows at a random start; clip_len None (or "whole"): the whole sequence.
    """
    order = rng.permutation(len(lengths))
    plans = []
    for first in range(0, len(order), batch_size):
        videos = order[first : first + batch_size]
        if clip_len is not None and sampling == "segments":
            frames = segment_frames(lengths[videos], clip_len, stride, rng.random((len(videos), clip_len)))
        else:
            starts = None
            if clip_len is not None and sampling != "whole":
                span = (clip_len - 1) * stride + 1
                room = np.maximum(lengths[videos] - span + 1, 1)
                starts = np.floor(rng.random(len(videos)) * room).astype(np.int64)
            frames = clip_frames(lengths[videos], None if sampling == "whole" else clip_len, stride, starts)
        plans.append(Plan(videos, _trim(frames), videos, y[videos]))
    return plans


def eval_plans(
    videos: np.ndarray,
    lengths: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    clip_len: int | None,
    stride: int,
    eval_clips: int,
    sampling: str = "crop",
) -> list[Plan]:
    """Every video of `videos` (store indices) as the clips it is scored on. Owners index into `videos`. Videos are
    batched by length (less padding).

    sampling "segments": the segment centres (eval_clips 0), or eval_clips views at offsets (k + 0.5) / eval_clips
    of every segment; "crop": the whole sequence (eval_clips 0) or eval_clips clips spread evenly from its first to
    its last row; clip_len None (or "whole"): the whole sequence.
    """
    clip = None if sampling == "whole" else clip_len
    if clip is not None and sampling == "segments":
        views = max(eval_clips, 1)
        n = -(-lengths[videos] // stride)
        per_video = [np.arange(views if n[i] > clip else 1) for i in range(len(videos))]
        owners = np.concatenate([np.full(len(s), i) for i, s in enumerate(per_video)])
        fractions = (np.concatenate(per_video) + 0.5) / views
        order = np.argsort(-lengths[videos[owners]], kind="stable")
        plans = []
        for first in range(0, len(order), batch_size):
            sel = order[first : first + batch_size]
            vids = videos[owners[sel]]
            offsets = np.repeat(fractions[sel][:, None], clip, axis=1)
            plans.append(Plan(vids, _trim(segment_frames(lengths[vids], clip, stride, offsets)), owners[sel], y[vids]))
        return plans
    if eval_clips == 0 or clip is None:
        owners = np.arange(len(videos))
        starts = None
        clip = None
    else:
        span = (clip - 1) * stride + 1
        per_video = [
            np.unique(np.round(np.linspace(0, max(int(lengths[v]) - span, 0), eval_clips)).astype(np.int64))
            for v in videos
        ]
        owners = np.concatenate([np.full(len(s), i) for i, s in enumerate(per_video)])
        starts = np.concatenate(per_video)
    order = np.argsort(-lengths[videos[owners]], kind="stable")
    plans = []
    for first in range(0, len(order), batch_size):
        sel = order[first : first + batch_size]
        vids = videos[owners[sel]]
        frames = clip_frames(lengths[vids], clip, stride, None if starts is None else starts[sel])
        plans.append(Plan(vids, _trim(frames), owners[sel], y[vids]))
    return plans


def with_row_targets(plans: list[Plan], row_y: np.ndarray, offsets: np.ndarray) -> list[Plan]:
    """`plans` whose y is the class of every row they hold (B, L), -1 where padded: the targets of a head that
    labels frames. `row_y` holds every store row's class, video after video; video v's rows start at offsets[v]."""
    out = []
    for plan in plans:
        real = plan.rows >= 0
        rows = offsets[plan.videos][:, None] + np.where(real, plan.rows, 0)
        out.append(Plan(plan.videos, plan.rows, plan.owners, np.where(real, row_y[rows], -1)))
    return out


def _trim(frames: np.ndarray) -> np.ndarray:
    """Drop trailing columns that are padding in every row."""
    used = int((frames >= 0).sum(1).max()) if len(frames) else 0
    return frames[:, : max(used, 1)]


def batches(store: SequenceStore, plans: list[Plan], workers: int = 0) -> Iterator[Batch]:
    """Batches of `plans`, gathered in this process (RAM store) or by `workers` reader processes (lazy store)."""
    if store.in_memory or workers == 0:
        for plan in plans:
            yield store.gather(plan)
        return
    loader = DataLoader(
        store,
        sampler=plans,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=functools.partial(worker_init, opencv=False),
        prefetch_factor=4,
        persistent_workers=False,
    )
    for batch in loader:
        if isinstance(batch, ReadFailure):
            raise CacheError(batch.message)
        yield batch
