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


class WorkQueue:
    """Videos not yet given to a source, in input order: `cpu` only for the CPU decoder (frame folders, NVDEC's
    give-ups), `videos` for NVDEC, which the CPU decoder also takes when `shared` (--decoder auto: both decode at
    once, each as fast as it can)."""

    def __init__(self, shared: bool = True):
        self.cpu: deque[int] = deque()
        self.videos: deque[int] = deque()
        self.shared = shared

    def for_cpu(self) -> int | None:
        if self.cpu:
            return self.cpu.popleft()
        return self.videos.popleft() if self.shared and self.videos else None

    def retry_on_cpu(self, video: int) -> None:
        """NVDEC gave `video` up: the CPU decoder takes it next."""
        self.cpu.appendleft(video)

    def for_nvdec(self) -> int | None:
        return self.videos.popleft() if self.videos else None

    @property
    def cpu_pending(self) -> bool:
        return bool(self.cpu) or (self.shared and bool(self.videos))


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

    def __init__(self, pool: DecodePool, jobs: list[DecodeJob], work: WorkQueue, native: bool, decode_timeout: float):
        self.pool, self.jobs, self.work, self.native, self.decode_timeout = pool, jobs, work, native, decode_timeout
        self.releases: deque = deque()  # (event, worker, generation, slot): slots the GPU is still copying from
        self.before_restart: Callable[[], None] | None = None  # quiets this process's threads before a fork

    @property
    def busy(self) -> bool:
        return self.work.cpu_pending or any(self.pool.jobs(w) for w in range(len(self.pool)))

    @property
    def in_flight_copies(self) -> bool:
        return bool(self.releases)

    def poll(self, timeout: float) -> list:
        pool = self.pool
        for w in range(len(pool)):
            while len(pool.jobs(w)) < JOBS_AHEAD and (video := self.work.for_cpu()) is not None:
                pool.assign(w, replace(self.jobs[video]))
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
            if self.before_restart is not None:
                self.before_restart()
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

    def __init__(self, jobs: list[DecodeJob], work: WorkQueue, native: bool):
        self.jobs, self.work, self.native = jobs, work, native
        self._current = None

    @property
    def busy(self) -> bool:
        return self._current is not None or self.work.cpu_pending

    in_flight_copies = False
    restarts = 0

    def poll(self, timeout: float) -> list:
        while True:
            if self._current is None:
                video = self.work.for_cpu()
                if video is None:
                    return []
                self._current = decode_video(self.jobs[video])
            message = next(self._current, None)
            if message is None:
                self._current = None
                continue
            frames = torch.from_numpy(np.stack(message[2])) if message[0] == "rows" else None
            return [_event(message, frames, self.native)]

    def close(self, device: torch.device) -> None:
        self._current = None


class NvdecSource:
    """Videos decoded by the GPU's decoder threads (pipeline/extract/nvdec.py): native frames on the device. Takes
    from the work queue only what its threads can start soon, so that the CPU decoder shares the rest."""

    def __init__(self, decoders, jobs: list[DecodeJob], work: WorkQueue):
        self.decoders, self.jobs, self.work = decoders, jobs, work

    @property
    def busy(self) -> bool:
        return self.decoders.pending > 0 or bool(self.work.videos)

    in_flight_copies = False
    restarts = 0

    def poll(self, timeout: float) -> list:
        while self.decoders.pending < self.decoders.threads + 2 and (video := self.work.for_nvdec()) is not None:
            self.decoders.submit(replace(self.jobs[video], pre=None))
        events = []
        while (message := self.decoders.get()) is not None:
            events.append(_event(message, message[2] if message[0] == "rows" else None, native=True))
        return events

    def close(self, device: torch.device) -> None:
        self.decoders.close()
