"""The extraction's progress bar, in feature rows, whose total is right from the start.

Each input's rows are estimated from what is cheap and usually exact (a video container's frame count, the number of
images of a frame folder) under the run's sampling, on a background thread, and replaced by the rows actually
written as each video ends; inputs that give no count are estimated from the others.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

from pipeline.data.cache import printable
from pipeline.extract.decode import list_images, opencv_safe
from pipeline.extract.inputs import VideoItem
from pipeline.runtime import progress_bar
from pipeline.spec import Sampling

PROBE_THREADS = 4  # OpenCV releases the GIL while it opens a file: a few threads probe several at once
FALLBACK_FPS = 30.0  # frame rate assumed for a video whose container gives none (only --fps uses it)


def sampled_rows(frames: int, native_fps: float, sampling: Sampling) -> int:
    """Feature rows that `sampling` keeps of a source of `frames` decoded frames at `native_fps` (an estimate under
    --fps: the frames of each 1/fps interval are assumed evenly spaced)."""
    if frames <= 0:
        return 0
    if sampling.num_frames is not None:
        return min(sampling.num_frames, frames)
    if sampling.fps is not None:
        fps = native_fps if native_fps > 0 else FALLBACK_FPS
        rows = min(frames, math.ceil(frames / fps * sampling.fps - 1e-9))
    else:
        rows = math.ceil(frames / sampling.stride)
    return min(rows, sampling.max_frames) if sampling.max_frames is not None else rows


def source_frames(path: Path, frames_fps: float) -> tuple[int, float] | None:
    """(frames, frame rate) a source says it has without decoding: a frame folder's images at `frames_fps`, or a video
    container's frame count and rate; None when it does not say (or cannot be opened)."""
    try:
        if path.is_dir():
            return len(list_images(path)), frames_fps
        if not path.is_file() or not opencv_safe(path):
            return None
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        try:
            if not cap.isOpened():
                return None
            count, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))
        finally:
            cap.release()
    except (OSError, cv2.error):
        return None
    if count <= 0:
        return None
    return count, (fps if math.isfinite(fps) and fps > 0 else 0.0)


def expected_rows(item: VideoItem, sampling: Sampling) -> int | None:
    """The feature rows extracting `item` should give, from its frame count; None when the source gives none."""
    found = source_frames(item.path, sampling.frames_fps)
    return None if found is None else sampled_rows(found[0], found[1], sampling)


class Progress:
    """One bar in feature rows for the whole run, with the videos done and the one being read as its postfix.

    The total is the sum of every video's expected rows (probed on a background thread as the run starts; until a
    video is probed it counts as the mean of those probed), each replaced by the video's real row count when it ends
    (`video_done(i, rows)`). Videos not yet done are scaled by how far the finished ones of their kind (frame folders,
    videos) came from their estimates, so a container that overstates its frames does not mislead the ETA for long.
    """

    def __init__(self, items: Sequence[VideoItem], sampling: Sampling, enabled: bool, *, probe: bool = True):
        self.items, self.sampling = list(items), sampling
        self.estimates: list[int | None] = [None] * len(self.items)
        self.rows: dict[int, int] = {}  # finished videos: rows written (their estimate when not told)
        self.done, self.current, self.n = 0, "", 0
        self.probed = threading.Event()
        self._lock = threading.Lock()
        self._closed = self._stop = False
        self.bar = progress_bar(unit="frame", desc="extract", disable=not enabled, smoothing=0.1, dynamic_ncols=True)
        self.total: int | None = None
        if not self.items or not probe:
            self.probed.set()
            return
        self._thread = threading.Thread(target=self._probe, name="pipeline-progress", daemon=True)
        self._thread.start()

    # -- the estimate
    def _probe(self) -> None:
        with ThreadPoolExecutor(PROBE_THREADS) as pool:
            found = pool.map(lambda item: None if self._stop else expected_rows(item, self.sampling), self.items)
            for i, rows in enumerate(found):
                if self._closed or self._stop:
                    break
                with self._lock:
                    self.estimates[i] = rows
                    if i % 16 == 15 or i == len(self.items) - 1:
                        self._update_total()
        self.probed.set()

    def stop_probing(self) -> None:
        """Stop probing and wait for the probes in flight (before a decode worker is forked anew: a thread inside
        OpenCV at the fork would leave its locks held in the child). Videos not probed count as the mean."""
        self._stop = True
        self.probed.wait()

    def _kind(self, i: int) -> str:
        return "frames" if self.items[i].path.is_dir() else "video"

    def _update_total(self) -> None:
        """Rows of the finished videos + the estimates of the others (corrected by their kind's finished ones)."""
        known = [e for e in self.estimates if e is not None]
        if not known and not self.rows:
            return
        mean = sum(known) / len(known) if known else sum(self.rows.values()) / len(self.rows)
        ratio = {}
        for kind in ("frames", "video"):
            pairs = [
                (r, self.estimates[i]) for i, r in self.rows.items() if self.estimates[i] and self._kind(i) == kind
            ]
            estimated = sum(e for _, e in pairs)
            ratio[kind] = sum(r for r, _ in pairs) / estimated if estimated else 1.0
        total = float(sum(self.rows.values()))
        for i, estimate in enumerate(self.estimates):
            if i not in self.rows:
                total += (estimate if estimate is not None else mean) * ratio[self._kind(i)]
        self.total = max(round(total), self.n)
        self.bar.total = self.total
        # redrawn at the bar's own pace (tqdm's clock and interval), so a log gets no line per video
        if not self.bar.disable and time.time() - self.bar.last_print_t >= self.bar.mininterval:
            self.bar.refresh()

    # -- what the run reports
    def frames(self, n: int) -> None:
        """`n` more feature rows were written."""
        self.n += n
        self.bar.update(n)

    def reading(self, name: str) -> None:
        if name != self.current:
            self.current = name
            self._postfix()

    def video_done(self, i: int, rows: int | None = None) -> None:
        """Video i (an index into the items) ended, with `rows` feature rows (None: as estimated; 0 for a failure)."""
        with self._lock:
            self.done += 1
            self.rows[i] = rows if rows is not None else (self.estimates[i] or 0)
            if self.done == len(self.items):
                self.total = self.bar.total = self.n
            else:
                self._update_total()
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.done}/{len(self.items)} videos, {printable(self.current)}", refresh=False)

    def close(self) -> None:
        self._closed = True
        self.bar.close()
