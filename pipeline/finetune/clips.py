"""Training clips for fine-tuning: frames at the cached sampling, decoded by seeking, augmented clip by clip.

A clip is a few feature rows of one video; each row names the decoded frame index (and the timestamp sequential
decoding gave it) that stage one embedded. Workers seek to the clip's first frame instead of decoding the video from
its start, and check every frame they keep against the recorded timestamp, so a seek that lands elsewhere is caught
and redone safely (see `read_video_frames`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline.data.sequences import Plan
from pipeline.extract.decode import DecodeError, FolderSource, FrameSelector, VideoSource, open_source, to_rgb
from pipeline.spec import Preprocessing, Sampling

log = logging.getLogger(__name__)

SEEK_TOLERANCE = 0.25  # frame intervals: how far a kept frame's timestamp may be from the recorded one
SEEK_BACKOFF = 64  # frames: where to seek (before the target) when a direct seek lands on another frame
FALLBACK_FPS = 30.0  # frame rate assumed for the tolerance when the container states none

SEEK, WALK, SEQUENTIAL, FILES = "seek", "walk", "sequential", "files"
READ_MODES = (SEEK, WALK, SEQUENTIAL, FILES)


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video and its feature rows. Shapes: frame_indices (T,) int64; timestamps (T,) seconds."""

    key: str
    path: Path
    label: int
    frame_indices: np.ndarray
    timestamps: np.ndarray

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


# ------------------------------------------------------------------------------------------- the sampled rows
def sampled_rows(path: Path, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices, timestamps) that stage one keeps for `path` under `sampling`: FrameSelector on one pass
    through the file that decodes no image (used for videos the head's cache does not hold)."""
    source = open_source(path, sampling.frames_fps)
    total = source.count() if sampling.num_frames is not None else None
    select = FrameSelector(sampling, total)
    indices, times = [], []

    def keep(index: int, t: float) -> bool:
        if select(index, t):
            indices.append(index)
            times.append(t)
        return False  # the images themselves are not needed

    for _ in source.frames(keep):
        pass
    if not indices:
        raise DecodeError("the sampling keeps none of its frames (or none decodes)")
    return np.asarray(indices, np.int64), np.asarray(times, np.float64)


# ---------------------------------------------------------------------------------------------------- reading
def _position(cap: cv2.VideoCapture) -> float:
    return cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0


def _read_by_seeking(
    cap: cv2.VideoCapture, indices: np.ndarray, times: np.ndarray, tolerance: float
) -> tuple[list[np.ndarray], str] | None:
    """Seek to the first wanted frame and grab forward; None as soon as a kept frame's timestamp is not the recorded
    one (the container's seeking cannot be trusted for this clip)."""
    first = int(indices[0])
    mode = SEEK
    if first > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)
    if not cap.grab():
        return None
    if abs(_position(cap) - times[0]) > tolerance:
        # Landed on another frame: seek well before it and walk forward until the recorded timestamp comes up.
        mode = WALK
        cap.set(cv2.CAP_PROP_POS_FRAMES, max(first - SEEK_BACKOFF, 0))
        while True:
            if not cap.grab():
                return None
            t = _position(cap)
            if abs(t - times[0]) <= tolerance:
                break
            if t > times[0] + tolerance:
                return None  # walked past it: the seek point was not before the target
    frames = []
    current = first
    for index, expected in zip(indices.tolist(), times.tolist(), strict=True):
        while current < index:
            if not cap.grab():
                return None
            current += 1
        if abs(_position(cap) - expected) > tolerance:
            return None
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
            return None
        frames.append(bgr)
    return frames, mode


def read_video_frames(path: Path, indices: np.ndarray, times: np.ndarray) -> tuple[list[np.ndarray], str]:
    """RGB frames (H, W, 3) uint8 of `path` at the decoded frame `indices` (ascending), and how they were read.

    Seeks with CAP_PROP_POS_FRAMES and checks each kept frame's timestamp against `times` (those sequential decoding
    recorded, within a quarter of a frame interval). If a seek lands elsewhere it seeks SEEK_BACKOFF frames earlier
    and walks forward to the recorded timestamp ('walk'); if that fails too, or timestamps are unusable, it decodes
    from the start up to the last wanted frame ('sequential'), which is always right.
    """
    source = VideoSource(path)
    cap = source.capture()
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and math.isfinite(fps) and fps > 0 else FALLBACK_FPS
        read = _read_by_seeking(cap, indices, times, SEEK_TOLERANCE / fps)
    finally:
        cap.release()
    if read is not None:
        frames, mode = read
        return [to_rgb(f) for f in frames], mode
    log.debug("%s: seeking is inexact here, decoding from the start to frame %d", path, int(indices[-1]))
    wanted = set(indices.tolist())
    last = int(indices[-1])
    found: dict[int, np.ndarray] = {}
    for index, _, image in source.frames(lambda i, t: i in wanted):
        if image is not None:
            found[index] = image
        if index >= last:
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise DecodeError(f"frames {missing[:5]} of {path} no longer decode (was the file changed since extraction?)")
    return [found[i] for i in indices.tolist()], SEQUENTIAL


def read_frames(record: VideoRecord, rows: np.ndarray, frames_fps: float) -> tuple[list[np.ndarray], str]:
    """RGB frames of `record` at feature `rows` (positions in its sampled rows, ascending)."""
    indices = record.frame_indices[rows]
    if record.is_folder:
        source = FolderSource(record.path, frames_fps)
        return [source.image(int(i)) for i in indices], FILES
    return read_video_frames(record.path, indices, record.timestamps[rows])


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class CropParams:
    """One random resized crop (as fractions of the frame) and flip, shared by every frame of a clip."""

    top: float
    left: float
    height: float
    width: float
    flip: bool

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels of a frame of h x w."""
        top, left = round(self.top * h), round(self.left * w)
        return top, left, max(1, min(round(self.height * h), h - top)), max(1, min(round(self.width * w), w - left))


@dataclass(frozen=True)
class ClipAugment:
    """Train-time augmentation: a random resized crop to crop x crop pixels (area share in [min_scale, 1], aspect
    ratio in [3/4, 4/3]) and a horizontal flip with probability 1/2, drawn once per clip and applied to every frame."""

    crop: int
    min_scale: float = 0.35
    flip: bool = True
    interpolation: str = "bilinear"
    antialias: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def params(self, rng: np.random.Generator, h: int, w: int) -> CropParams:
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.min_scale, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                break
        else:  # no draw fitted: the largest centred crop of an allowed aspect ratio
            aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
            cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
            cw, ch = min(cw, w), min(ch, h)
            top, left = (h - ch) // 2, (w - cw) // 2
        flip = bool(self.flip and rng.random() < 0.5)
        return CropParams(top / h, left / w, ch / h, cw / w, flip)

    def apply(self, frames: list[torch.Tensor], params: CropParams) -> torch.Tensor:
        """Shapes: frames of (3, H, W) uint8 -> (L, 3, crop, crop) uint8; frames of one size go in one call."""
        interpolation = InterpolationMode(self.interpolation)
        sizes = {tuple(f.shape[1:]) for f in frames}
        groups = [torch.stack(frames)] if len(sizes) == 1 else [f[None] for f in frames]
        out = []
        for clip in groups:
            top, left, h, w = params.box(*clip.shape[2:])
            clip = F.resized_crop(
                clip, top, left, h, w, [self.crop, self.crop], interpolation=interpolation, antialias=self.antialias
            )
            out.append(F.hflip(clip) if params.flip else clip)
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------- batches
@dataclass
class ClipBatch:
    """Frames of a batch of clips, padding left out.

    Shapes: x (N, 3, crop, crop) uint8, the real frames of clip 0, then clip 1, ...; lengths (B,) int64 frames per
    clip; y (B,) int64; owners (B,) int64 the sample each clip belongs to. `reads` counts clips by read mode.
    """

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor
    owners: torch.Tensor
    reads: dict[str, int] = field(default_factory=dict)

    def to(self, device: torch.device) -> ClipBatch:
        if device.type == "cpu":
            return self
        return ClipBatch(
            self.x.to(device, non_blocking=True),
            self.lengths,
            self.y.to(device, non_blocking=True),
            self.owners,
            self.reads,
        )

    def pin_memory(self) -> ClipBatch:
        return ClipBatch(self.x.pin_memory(), self.lengths, self.y.pin_memory(), self.owners, self.reads)


@dataclass(frozen=True)
class ClipJob:
    """One batch to decode: a Plan of feature rows (as stage two cuts clips) and, for training, one augmentation
    seed per clip (None: stage one's preprocessing, for evaluation)."""

    plan: Plan
    seeds: np.ndarray | None = None


class ClipDataset(Dataset):
    """Turns ClipJobs into ClipBatches; runs in DataLoader workers (sampler = the jobs, batch_size None).

    Eval frames get exactly stage one's preprocessing (Preprocessing.crop_frame; normalisation happens next to the
    model); train frames get `augment`, one draw per clip."""

    def __init__(self, records: list[VideoRecord], pre: Preprocessing, augment: ClipAugment | None, frames_fps: float):
        self.records, self.pre, self.augment, self.frames_fps = records, pre, augment, frames_fps

    def __len__(self) -> int:
        return len(self.records)

    def clip(self, video: int, rows: np.ndarray, seed: int | None) -> tuple[torch.Tensor, str]:
        """Shapes: -> (len(rows), 3, crop, crop) uint8."""
        record = self.records[video]
        try:
            images, mode = read_frames(record, rows, self.frames_fps)
        except DecodeError as e:
            raise DecodeError(f"{record.path}: {e}") from None
        frames = [torch.from_numpy(image).permute(2, 0, 1) for image in images]  # (3, H, W) each
        if seed is None or self.augment is None:
            return torch.stack([self.pre.crop_frame(f) for f in frames]), mode
        h, w = frames[0].shape[1:]
        params = self.augment.params(np.random.default_rng(seed), h, w)
        return self.augment.apply(frames, params), mode

    def __getitem__(self, job: ClipJob) -> ClipBatch:
        plan = job.plan
        clips, reads = [], dict.fromkeys(READ_MODES, 0)
        for k, (video, rows) in enumerate(zip(plan.videos.tolist(), plan.rows, strict=True)):
            seed = None if job.seeds is None else int(job.seeds[k])
            frames, mode = self.clip(video, rows[rows >= 0], seed)
            clips.append(frames)
            reads[mode] += 1
        return ClipBatch(
            torch.cat(clips),
            torch.from_numpy(plan.lengths.astype(np.int64)),
            torch.from_numpy(plan.y.astype(np.int64)),
            torch.from_numpy(plan.owners.astype(np.int64)),
            reads,
        )


def clip_batches(dataset: ClipDataset, jobs: list[ClipJob], workers: int, pin_memory: bool = False):
    """ClipBatches of `jobs` in order, decoded by `workers` processes (0: in this process)."""
    if workers == 0:
        for job in jobs:
            yield dataset[job]
        return
    from pipeline.runtime import start_workers, worker_init

    loader = DataLoader(
        dataset,
        sampler=jobs,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=worker_init,
        prefetch_factor=2,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    yield from start_workers(loader)
