"""The sink: features of finished forward passes into each video's part file, on a thread of its own.

The thread that feeds the model only slices each batch's features by video and queues them; the dtype conversion,
the HDF5 appends, the fsyncs and renames of committed parts and the failure records happen on the sink's thread,
in the order they were queued. A video is committed once its decoder has ended it and every one of its rows has
come back from the model. What the thread did (committed, failed) comes back through `drain`, on the main thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline.data.cache import CacheWriter, PartWriter
from pipeline.extract.batcher import Owner

QUEUE_OPS = 1024  # operations waiting for the thread: bounds the features held in memory


@dataclass
class Outcome:
    video: int
    error: str | None  # None: committed
    rows: int = 0  # rows written (committed videos)


class PartSink:
    """Owns the part files of the videos in flight. Main-thread API: `expect`, `features`, `ended`, `fail`,
    `discard`, `drain`, `close`; every file operation runs on the sink's thread."""

    def __init__(self, writer: CacheWriter, items: list, attrs_of):
        self.writer, self.items = writer, items  # items: the VideoItems of the run, indexed by video
        self.attrs_of = attrs_of  # video -> the part's attributes (key, source, spec id, ...), without decode info
        self.outstanding: dict[int, int] = {}  # rows of a video queued for the model and not yet back
        self.ended: dict[int, dict] = {}
        self._ops: queue.Queue = queue.Queue(maxsize=QUEUE_OPS)
        self._outcomes: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pipeline-sink", daemon=True)
        self._thread.start()

    # -- the main thread
    def expect(self, video: int, rows: int) -> None:
        self.outstanding[video] = self.outstanding.get(video, 0) + rows

    def features(self, feats: np.ndarray, owners: list[Owner], alive) -> None:
        """Shapes: feats (rows, D) float32, rows in the order of `owners`. `alive(owner)`: whether its rows still
        count (its video did not fail or restart meanwhile)."""
        row = 0
        for owner in owners:
            k = len(owner)
            if alive(owner):
                rows = (feats[row : row + k], owner.frame_indices, owner.timestamps, owner.spans)
                self._put(("append", owner.video, *rows))
                self.outstanding[owner.video] -= k
                self._maybe_commit(owner.video)
            row += k

    def ended_video(self, video: int, info: dict) -> None:
        self.ended[video] = info
        self.outstanding.setdefault(video, 0)
        self._maybe_commit(video)

    def fail(self, video: int, reason: str) -> None:
        """Abort the video's part and record why it failed."""
        self._forget(video)
        self._put(("fail", video, reason))

    def discard(self, video: int) -> None:
        """Abort the video's part (it starts again on another decoder)."""
        self._forget(video)
        self._put(("abort", video))

    def drain(self) -> list[Outcome]:
        """What the thread finished since the last call; raises an error that stops the run (a full disk)."""
        if self._error is not None:
            raise self._error
        out = []
        while True:
            try:
                out.append(self._outcomes.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> list[Outcome]:
        """Wait for every queued operation; abort the parts of videos never ended; the last outcomes. Closing
        again returns nothing more."""
        if self._thread.is_alive():
            self._ops.put(None)
            self._thread.join()
        return self.drain()

    def _forget(self, video: int) -> None:
        self.outstanding.pop(video, None)
        self.ended.pop(video, None)

    def _maybe_commit(self, video: int) -> None:
        if video in self.ended and self.outstanding.get(video) == 0:
            info = self.ended.pop(video)
            self.outstanding.pop(video)
            self._put(("commit", video, {**self.attrs_of(video), **info}))

    def _put(self, op: tuple) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._ops.put(op, timeout=0.5)
                return
            except queue.Full:
                continue

    # -- the sink's thread
    def _loop(self) -> None:
        parts: dict[int, PartWriter] = {}
        failed: set[int] = set()  # failed here (non-finite features): later operations of the video are moot
        try:
            while (op := self._ops.get()) is not None:
                kind, video = op[0], op[1]
                if kind == "append":
                    if video in failed:
                        continue
                    if video not in parts:
                        parts[video] = self.writer.begin(self.items[video].key, self.writer.spec.dim)
                    try:
                        parts[video].append(*op[2:])
                    except ValueError as e:  # non-finite features: this video fails, the run goes on
                        parts.pop(video).abort()
                        failed.add(video)
                        self._record_failure(video, str(e))
                        self._outcomes.put(Outcome(video, str(e)))
                elif kind == "commit":
                    if video in failed:
                        continue
                    key = self.items[video].key
                    part = parts.pop(video, None) or self.writer.begin(key, self.writer.spec.dim)
                    part.commit({**op[2], "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    self.writer.clear_failure(key)
                    self._outcomes.put(Outcome(video, None, part.rows))
                else:  # abort, fail
                    failed.discard(video)
                    if video in parts:
                        parts.pop(video).abort()
                    if kind == "fail":
                        self._record_failure(video, op[2])
        except BaseException as e:  # noqa: BLE001  (raised again on the main thread by drain)
            self._error = e
        finally:
            for part in parts.values():
                part.abort()
            if self._error is not None:  # unblock a main thread waiting on a full queue
                while True:
                    try:
                        self._ops.get_nowait()
                    except queue.Empty:
                        break

    def _record_failure(self, video: int, reason: str) -> None:
        item = self.items[video]
        self.writer.record_failure(item.key, str(item.path), reason)
