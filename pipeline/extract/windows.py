"""Clip-level rows of video backbones: one video's stream of sampled frames cut into windows of `size` frames, a
window starting every `stride` sampled frames.

Frames arrive in chunks, as the decoder hands them over; a window is cut as soon as its last frame is in, and only
the frames a later window still needs are kept, so memory stays bounded whatever the video's length. A video with
fewer sampled frames than one window still gets one row: its frames, the last one repeated to fill the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.extract.backbone import LoadedBackbone, preset_crop
from pipeline.spec import Window


@dataclass
class Clips:
    """Windows cut from one video, ready for the model and the cache.

    Shapes: clips (K, size, 3, C, C) uint8, on the frames' device; frame_indices, timestamps (K,); spans (K, 2)."""

    clips: torch.Tensor
    frame_indices: np.ndarray
    """int64: the decoded frame at the window's centre, floor((first + last) / 2): the row's frame for per-frame
    labels."""
    timestamps: np.ndarray
    """float64 seconds: the centre of the window, (time of its first frame + time of its last frame) / 2."""
    spans: np.ndarray
    """int64 (first, last): the decoded frame numbers of the window's first and last (real) frame, inclusive."""

    def __len__(self) -> int:
        return len(self.clips)


def centres(first_idx, last_idx, first_ts, last_ts) -> tuple[np.ndarray, np.ndarray]:
    """The centre frame index and timestamp of windows that span [first, last] (arrays of one length)."""
    first_idx, last_idx = np.asarray(first_idx, np.int64), np.asarray(last_idx, np.int64)
    ts = (np.asarray(first_ts, np.float64) + np.asarray(last_ts, np.float64)) / 2.0
    return (first_idx + last_idx) // 2, ts


class Windower:
    """Cuts one video's sampled frames into Clips as they arrive (push), and a short video's one window at its end
    (finish)."""

    def __init__(self, window: Window):
        self.size, self.stride = window.size, window.stride
        self._frames: list[torch.Tensor] = []  # (3, C, C) each: sampled frames base, base + 1, ...
        self._idx: list[int] = []
        self._ts: list[float] = []
        self._base = 0  # position (among the video's sampled frames) of self._frames[0]
        self._next = 0  # position of the next window's first frame
        self.windows = 0  # windows cut so far

    def push(self, frames: torch.Tensor, frame_indices, timestamps) -> Clips | None:
        """Shapes: frames (n, 3, C, C) uint8, the next sampled frames of the video; frame_indices, timestamps (n,).
        Returns the windows they complete (None: none yet)."""
        self._frames.extend(frames.unbind(0))
        self._idx.extend(int(i) for i in np.asarray(frame_indices).reshape(-1))
        self._ts.extend(float(t) for t in np.asarray(timestamps).reshape(-1))
        starts = []
        while self._next + self.size <= self._base + len(self._frames):
            starts.append(self._next - self._base)
            self._next += self.stride
        out = self._cut(starts) if starts else None
        # frames before the next window's start are needed by no later window
        drop = min(self._next - self._base, len(self._frames))
        if drop > 0:
            del self._frames[:drop], self._idx[:drop], self._ts[:drop]
            self._base += drop
        return out

    def finish(self) -> Clips | None:
        """At the video's end: one window of the frames there are, the last repeated, when the video was too short
        for any (and has frames); else None. Frames after the last whole window make no row."""
        if self.windows or not self._frames:
            return None
        real = len(self._frames)
        self._frames += [self._frames[-1]] * (self.size - real)
        clip = torch.stack(self._frames)[None]  # (1, size, 3, C, C)
        idx, ts = centres([self._idx[0]], [self._idx[real - 1]], [self._ts[0]], [self._ts[real - 1]])
        spans = np.array([[self._idx[0], self._idx[real - 1]]], np.int64)
        self._frames, self._idx, self._ts = [], [], []
        self.windows = 1
        return Clips(clip, idx, ts, spans)

    def _cut(self, starts: list[int]) -> Clips:
        clips = torch.stack([torch.stack(self._frames[s : s + self.size]) for s in starts])  # (K, size, 3, C, C)
        first = [self._idx[s] for s in starts]
        last = [self._idx[s + self.size - 1] for s in starts]
        idx, ts = centres(first, last, [self._ts[s] for s in starts], [self._ts[s + self.size - 1] for s in starts])
        self.windows += len(starts)
        return Clips(clips, idx, ts, np.stack([first, last], axis=1).astype(np.int64))


def window_count(sampled: int, window: Window) -> int:
    """Rows a video of `sampled` frames gets: its whole windows, or one (padded) when it has frames but too few."""
    if sampled <= 0:
        return 0
    if sampled < window.size:
        return 1
    return (sampled - window.size) // window.stride + 1


def resolve_window(loaded: LoadedBackbone, backbone: str, size: int | None, stride: int | None) -> Window | None:
    """The Window of a run: --window (default: the weights' clip length) every --window-stride (default: --window)
    frames for a video backbone; None for an image backbone, which refuses the two flags. Checks with one forward
    pass that a window other than the weights' own fits the model (MViT takes exactly 16 frames)."""
    if not loaded.video:
        if size is not None or stride is not None:
            raise ValueError(
                f"--window and --window-stride apply to video backbones (r3d_18, s3d, mvit_v2_s, swin3d_t, ...); "
                f"{backbone} makes one row per frame"
            )
        return None
    window = Window(size or loaded.clip_len, stride or size or loaded.clip_len)
    if window.size != loaded.clip_len or loaded.preprocessing.crop != preset_crop(backbone):
        crop = loaded.preprocessing.crop
        try:
            with torch.inference_mode():
                loaded.model.eval()(torch.zeros(1, 3, window.size, crop, crop))
        except Exception as e:  # the model's own complaint, in one line
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(
                f"--window {window.size} with {crop}x{crop} crops does not fit {backbone} (its weights take clips of "
                f"{loaded.clip_len} frames at {preset_crop(backbone)}x{preset_crop(backbone)}): {detail}"
            ) from None
    return window
