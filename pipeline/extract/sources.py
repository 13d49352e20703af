"""Frame sources: where decoded frames come from, as one stream of events for the run loop.

`PoolSource` drives the decode worker processes (scheduling, slots handed back once the GPU has copied them,
crashed and stalled workers), `NvdecSource` the GPU decoder threads, `InProcessSource` decodes in this process
(`--workers 0`). Each turns its messages into `Rows`, `Ended`, `Failed` and `Retry` events; frames of `Rows` are
native (N, H, W, 3) RGB when `native`, else crops (N, 3, C, C), on the host or the device, valid until `release`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.extract.workers import JOBS_AHEAD, DecodeJob, DecodePool, crash_reason, decode_video

log = logging.getLogger(__name__)


def _no_release(event) -> None:
    pass


@dataclass
class Rows:
    video: int
    frames: torch.Tensor
    frame_indices: np.ndarray
    timestamps: np.ndarray
    native: bool
    release: Callable = _no_release  # release(event or None): the frames' memory may be reused once event passed


@dataclass
class Ended:
    video: int
    info: dict  # what the decoder learnt: native_fps, width, height, decoded_frames, ...


@dataclass
class Failed:
    video: int
    reason: str


@dataclass
class Retry:
    """NVDEC gave the video up: it starts again on the CPU decoder."""

    video: int
    reason: str


def _event(message: tuple, frames=None, native: bool = False, release: Callable = _no_release):
    kind, i = message[0], message[1]
    if kind == "rows":
        return Rows(i, frames, np.asarray(message[3]), np.asarray(message[4]), native, release)
    if kind == "end":
        return Ended(i, message[2])
    if kind == "fallback":
        return Retry(i, message[2])
    return Failed(i, message[2])


class PoolSource:
    """Videos decoded by a DecodePool, JOBS_AHEAD queued at each worker, in input order."""

    def __init__(self, pool: DecodePool, jobs: list[DecodeJob], native: bool, decode_timeout: float):
        self.pool, self.jobs, self.native, self.decode_timeout = pool, jobs, native, decode_timeout
        self.waiting: deque[int] = deque()
        self.releases: deque = deque()  # (event, worker, generation, slot): slots the GPU is still copying from

    def add(self, video: int) -> None:
        self.waiting.append(video)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.pool.jobs(w) for w in range(len(self.pool)))

    @property
    def in_flight_copies(self) -> bool:
        return bool(self.releases)

    def poll(self, timeout: float) -> list:
        pool = self.pool
        for w in range(len(pool)):
            while self.waiting and len(pool.jobs(w)) < JOBS_AHEAD:
                pool.assign(w, replace(self.jobs[self.waiting.popleft()]))
        pool.kill_stalled(self.decode_timeout)
        messages, crashes = pool.poll(timeout)
        events = []
        for w, message in messages:
            if message[0] == "rows":
                frames, release = self._frames(w, message[2])
                events.append(_event(message, frames, self.native, release))
            else:
                events.append(_event(message))
                pool.done(w, message[1])
        for crash in crashes:
            self.settle(crash.worker)  # the GPU has finished reading its slots before they are reused
            if crash.job is not None:
                pool.done(crash.worker, crash.job.index)
                events.append(Failed(crash.job.index, crash.reason))
            else:
                exitcode = pool.workers[crash.worker].process.exitcode
                log.warning(
                    "decode worker %d died while idle (%s); restarting it", crash.worker, crash_reason(exitcode)
                )
            pool.restart(crash.worker)
        self.settle()
        return events

    def _frames(self, w: int, payload: tuple):
        frames = self.pool.frames(w, payload)
        if payload[0] != "slot":
            return frames, _no_release
        generation, slot = self.pool.generation(w), payload[1]

        def release(event) -> None:
            if event is None:
                self.pool.release(w, generation, slot)
            else:
                self.releases.append((event, w, generation, slot))

        return frames, release

    def settle(self, worker: int | None = None) -> None:
        """Hand back the slots whose copy to the GPU is done (all of `worker`'s, waiting for them)."""
        while self.releases and (worker is not None or self.releases[0][0].query()):
            event, w, generation, slot = self.releases.popleft()
            event.synchronize()
            self.pool.release(w, generation, slot)

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def close(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # no copy may still read a slot when the memory goes
        self.pool.close()


class InProcessSource:
    """Videos decoded in this process, one chunk per poll (`--workers 0`)."""

    def __init__(self, jobs: list[DecodeJob], native: bool):
        self.jobs, self.native = jobs, native
        self.waiting: deque[int] = deque()
        self._current = None

    def add(self, video: int) -> None:
        self.waiting.append(video)

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self.waiting)

    in_flight_copies = False
    restarts = 0

    def poll(self, timeout: float) -> list:
        while True:
            if self._current is None:
                if not self.waiting:
                    return []
                self._current = decode_video(self.jobs[self.waiting.popleft()])
            message = next(self._current, None)
            if message is None:
                self._current = None
                continue
            frames = torch.from_numpy(np.stack(message[2])) if message[0] == "rows" else None
            return [_event(message, frames, self.native)]

    def close(self, device: torch.device) -> None:
        self._current = None


class NvdecSource:
    """Videos decoded by the GPU's decoder threads (pipeline/extract/nvdec.py): native frames on the device."""

    def __init__(self, decoders):
        self.decoders = decoders

    def add(self, job: DecodeJob) -> None:
        self.decoders.submit(replace(job, pre=None))

    @property
    def busy(self) -> bool:
        return self.decoders.pending > 0

    in_flight_copies = False
    restarts = 0

    def poll(self, timeout: float) -> list:
        events = []
        while (message := self.decoders.get()) is not None:
            events.append(_event(message, message[2] if message[0] == "rows" else None, native=True))
        return events

    def close(self, device: torch.device) -> None:
        self.decoders.close()
