"""Decode workers: processes that turn one video at a time into chunks of frames, handed over through shared
memory.

Each worker owns a few fixed-size slots of shared memory (an anonymous mapping made before the fork). It
writes a chunk of frames of one size into a free slot and sends only the slot number, the frame indices and
the timestamps through its own pipe; the main process reads the frames in place (on CUDA the mapping is
page-locked, so they go straight to the GPU) and hands the slot back. Memory is bounded by the slots, whatever
the videos' length.

A worker that dies (a codec's segfault, the OOM killer) takes only the video it was decoding: the pool reports
that video with the signal, starts a new worker in its place and gives it the jobs the dead one had queued. A
worker that stalls (a decoder spinning on a corrupt stream) is killed after --decode-timeout seconds without a
frame, and reported the same way. Workers never outlive the main process, however it ends (runtime.parent_only).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch

from pipeline.extract.decode import DecodeError, FrameSelector, open_source
from pipeline.runtime import forget, opencv_single_thread, parent_only, worker_init
from pipeline.spec import Preprocessing, Sampling

log = logging.getLogger(__name__)

CHUNK_FRAMES = 32  # at most this many native frames per chunk (one slot): the device crops a chunk at once
CROP_CHUNK_FRAMES = 8  # crops per chunk: the model starts as soon as the first few are ready (CPU path)
SLOT_BYTES = 16 << 20  # one slot: 72 frames of 320x240 RGB, 5 of 1280x720, 111 crops of 224x224
SLOTS_PER_WORKER = 4
JOBS_AHEAD = 2  # videos queued at a worker: it starts the next one without waiting for the main process
# tests: a worker kills itself (SIGKILL) on opening a file of this name
CRASH_ON_ENV = "PIPELINE_TEST_CRASH_ON"
# tests: a worker stalls (sleeps without a frame, as a spinning decoder would) on opening a file of this name
HANG_ON_ENV = "PIPELINE_TEST_HANG_ON"


@dataclass(frozen=True)
class DecodeJob:
    """One video for a decode worker. `pre` None: hand over native RGB frames (the device crops them)."""

    index: int
    path: Path
    sampling: Sampling
    pre: Preprocessing | None
    max_pixels: int | None


def decode_video(job: DecodeJob, max_chunk_bytes: int | None = None) -> Iterator[tuple]:
    """Messages for one video: ('rows', i, frames, frame_indices, timestamps) chunks, where frames is a list
    of arrays of one shape ((H, W, 3) native RGB, or (3, C, C) crops when job.pre is set), then ('end', i,
    info), or ('error', i, reason) at any point. A chunk holds at most CHUNK_FRAMES native frames
    (CROP_CHUNK_FRAMES crops) and, when it holds more than one, at most max_chunk_bytes."""
    i = job.index
    chunk = CHUNK_FRAMES if job.pre is None else CROP_CHUNK_FRAMES
    try:
        source = open_source(job.path, job.sampling.frames_fps, job.max_pixels)
        meta = source.probe()
        total = source.count() if job.sampling.num_frames is not None else None
        keep = FrameSelector(job.sampling, total)
        frames, idx, ts = [], [], []
        decoded = rows = 0
        sizes = set()
        for index, t, image in source.frames(keep):
            decoded += 1
            if image is None:
                continue
            sizes.add(image.shape[:2])
            if job.pre is not None:
                image = job.pre.crop_frame(torch.from_numpy(image).permute(2, 0, 1)).numpy()  # (3, C, C)
            if frames and (
                image.shape != frames[0].shape
                or len(frames) == chunk
                or (max_chunk_bytes is not None and (len(frames) + 1) * image.nbytes > max_chunk_bytes)
            ):
                yield "rows", i, frames, np.array(idx), np.array(ts)
                rows += len(frames)
                frames, idx, ts = [], [], []
            frames.append(image)
            idx.append(index)
            ts.append(t)
        if frames:
            yield "rows", i, frames, np.array(idx), np.array(ts)
            rows += len(frames)
        if decoded == 0:
            raise DecodeError("no frame could be decoded (corrupt, truncated or not a video)")
        if rows == 0:
            raise DecodeError(f"the sampling kept none of its {decoded} frames")
        yield (
            "end",
            i,
            {
                "native_fps": meta.native_fps,
                "width": meta.width,
                "height": meta.height,
                "header_frame_count": meta.header_frame_count,
                "decoded_frames": decoded,
                "mixed_frame_sizes": len(sizes) > 1,
            },
        )
    except Exception as e:  # noqa: BLE001  (a bad input must never stop the run: report it and go on)
        reason = str(e) if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
        log.debug("decode failure %s\n%s", job.path, traceback.format_exc())
        yield "error", i, reason


# -------------------------------------------------------------------------------------------- the worker side
def _worker_main(control, results, shm: mmap.mmap, slots: int, slot_bytes: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    worker_init()
    crash_on, hang_on = os.environ.get(CRASH_ON_ENV), os.environ.get(HANG_ON_ENV)
    free = list(range(slots))
    jobs: deque[DecodeJob] = deque()

    def pump(block: bool) -> None:
        """Read the main process's messages: jobs, freed slots; None (or a closed pipe) ends the worker."""
        while block or control.poll():
            block = False
            message = control.recv()
            if message is None:
                raise SystemExit(0)
            kind, payload = message
            (jobs if kind == "job" else free).append(payload)

    try:
        while True:
            if not jobs:
                pump(block=True)
                continue
            job = jobs.popleft()
            if crash_on and job.path.name == crash_on:
                os.kill(os.getpid(), signal.SIGKILL)
            if hang_on and job.path.name == hang_on:
                while True:
                    time.sleep(3600)
            for message in decode_video(job, slot_bytes):
                if message[0] == "rows":
                    _, i, frames, idx, ts = message
                    shape = (len(frames), *frames[0].shape)
                    nbytes = len(frames) * frames[0].nbytes
                    if nbytes <= slot_bytes:
                        while not free:
                            pump(block=True)
                        slot = free.pop()
                        view = np.frombuffer(shm, np.uint8, nbytes, slot * slot_bytes).reshape(shape)
                        for k, frame in enumerate(frames):
                            view[k] = frame
                        message = ("rows", i, ("slot", slot, shape), idx, ts)
                    else:  # one frame larger than a slot: through the pipe (rare: 4K and up)
                        message = ("rows", i, ("array", np.stack(frames)), idx, ts)
                results.send(message)
                pump(block=False)
    except (SystemExit, EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        os._exit(0)  # no atexit handlers or finalizers inherited from the main process


# ---------------------------------------------------------------------------------------------- the main side
@dataclass
class _Worker:
    process: mp.process.BaseProcess
    control: object  # Connection, main -> worker: ("job", DecodeJob), ("free", slot), None
    results: object  # Connection, worker -> main
    generation: int
    tokens: tuple  # runtime.parent_only registrations of control and results
    # assigned, not yet ended, in order: the first is being decoded
    jobs: deque = field(default_factory=deque)
    held: set = field(default_factory=set)  # slots whose frames the main process holds (received, not released)
    active: float = field(default_factory=time.monotonic)  # last sign of progress: a message, a slot given back
    stall_reason: str | None = None  # set when the pool killed it for stalling


@dataclass
class Crash:
    """A worker died; `job` is the video it was decoding (None when it was idle)."""

    worker: int
    job: DecodeJob | None
    reason: str


def crash_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return f"the decoder was killed (signal {sig}, {name}; out of memory?) while reading this file"
        return f"the decoder crashed (signal {sig}, {name}) while reading this file"
    return f"the decoder exited unexpectedly (exit code {exitcode}) while reading this file"


class DecodePool:
    """`n` decode worker processes, each with its own pipes and shared-memory slots; restartable one by
    one."""

    def __init__(self, n: int, slots: int = SLOTS_PER_WORKER, slot_bytes: int = SLOT_BYTES):
        self.ctx = mp.get_context("fork")  # workers start in milliseconds and share the slots' mapping
        self.slots, self.slot_bytes = slots, slot_bytes
        self.shm = [mmap.mmap(-1, slots * slot_bytes) for _ in range(n)]
        # (slots * slot_bytes,) each
        self.buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self.shm]
        self.workers: list[_Worker | None] = [None] * n
        self._pinned: list[int] = []
        self._generation = 0
        self.restarts = 0
        for w in range(n):
            self._start(w)

    def __len__(self) -> int:
        return len(self.workers)

    def pin(self) -> bool:
        """Page-lock the slots for CUDA, so that frames go to the GPU straight from them and asynchronously.
        False (and a note) when the system refuses; copies then go through the driver's staging buffers."""
        cudart = torch.cuda.cudart()
        for buffer in self.buffers:
            try:
                torch.cuda.check_error(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
            except Exception as e:  # noqa: BLE001  (a locked-memory limit, an old driver)
                log.info("could not page-lock the decode workers' shared memory (%s); copying through staging", e)
                return False
            self._pinned.append(buffer.data_ptr())
        return True

    def _start(self, w: int) -> None:
        if self._pinned and hasattr(mmap, "MADV_DOFORK"):
            # Page-locking may mark the range "do not fork" (drivers do, against copy-on-write under DMA); the
            # slots are a shared mapping, so a new worker can and must inherit them.
            self.shm[w].madvise(mmap.MADV_DOFORK)
        control, control_child = self.ctx.Pipe(duplex=True)
        results, results_child = self.ctx.Pipe(duplex=False)
        # Every child closes these (its own parent ends included): the main process's death then reaches each
        # worker as end-of-file on its control pipe, and no worker keeps another one's pipes open.
        tokens = (parent_only(control), parent_only(results))
        args = (control_child, results_child, self.shm[w], self.slots, self.slot_bytes)
        process = self.ctx.Process(target=_worker_main, name=f"pipeline-decode-{w}", daemon=True, args=args)
        with opencv_single_thread():
            process.start()
        control_child.close()  # only the worker holds these ends: its death closes them, and reads see EOF
        results_child.close()
        self._generation += 1
        self.workers[w] = _Worker(process, control, results, self._generation, tokens)

    def jobs(self, w: int) -> deque:
        return self.workers[w].jobs

    def generation(self, w: int) -> int:
        return self.workers[w].generation

    def assign(self, w: int, job: DecodeJob) -> None:
        worker = self.workers[w]
        if not worker.jobs:
            worker.active = time.monotonic()  # an idle worker's clock starts with its job
        worker.jobs.append(job)
        # a dead worker: its sentinel reports it, the job goes to its successor
        with contextlib.suppress(OSError):
            worker.control.send(("job", job))

    def release(self, w: int, generation: int, slot: int) -> None:
        """Hand slot `slot` back to worker `w` (ignored when that worker has been replaced since)."""
        worker = self.workers[w]
        if worker.generation == generation:
            worker.held.discard(slot)
            worker.active = time.monotonic()
            with contextlib.suppress(OSError):
                worker.control.send(("free", slot))

    def frames(self, w: int, payload: tuple) -> torch.Tensor:
        """The frames of a 'rows' message: a view of the worker's slot (valid until released), or the
        array."""
        if payload[0] == "array":
            return torch.from_numpy(payload[1])
        _, slot, shape = payload
        self.workers[w].held.add(slot)
        start = slot * self.slot_bytes
        return self.buffers[w][start : start + int(np.prod(shape))].view(shape)

    def done(self, w: int, i: int) -> None:
        """Video i ended (or failed) at worker w: it leaves the worker's queue."""
        jobs = self.workers[w].jobs
        if jobs and jobs[0].index == i:
            jobs.popleft()

    def poll(self, timeout: float | None) -> tuple[list[tuple[int, tuple]], list[Crash]]:
        """Messages that arrived ((worker, message), in each worker's order) and workers that died, waiting up
        to `timeout` seconds for the first. A dead worker's last messages come first; it is not restarted
        here."""
        by_conn = {}
        for w, worker in enumerate(self.workers):
            by_conn[worker.results] = w
            by_conn[worker.process.sentinel] = w
        ready = wait(list(by_conn), timeout)
        messages, crashes = [], []
        dead = sorted({by_conn[r] for r in ready if not hasattr(r, "recv")})
        for w in sorted({by_conn[r] for r in ready}):
            worker = self.workers[w]
            try:
                while worker.results.poll():
                    messages.append((w, worker.results.recv()))
                    worker.active = time.monotonic()
                    if w not in dead:
                        break  # one message per live worker and call: the others get their turn
            except (EOFError, OSError):
                if w not in dead:
                    dead.append(w)
        for w in dead:
            worker = self.workers[w]
            worker.process.join(timeout=5)
            # Messages it sent before dying that this call has not consumed are read before its jobs are
            # judged.
            pending = [m for v, m in messages if v == w]
            ended = {m[1] for m in pending if m[0] in ("end", "error")}
            job = next((j for j in worker.jobs if j.index not in ended), None)
            reason = worker.stall_reason or crash_reason(worker.process.exitcode)
            crashes.append(Crash(w, job, reason))
        return messages, crashes

    def kill_stalled(self, timeout: float) -> list[int]:
        """Kill the workers that have had a video and a free slot for `timeout` seconds without sending
        anything (a decoder that spins or blocks); the next poll reports each as a Crash with that reason.
        A worker waiting for the main process to hand a slot back is not stalled."""
        now, killed = time.monotonic(), []
        for w, worker in enumerate(self.workers):
            waiting_for_us = len(worker.held) >= self.slots
            if worker.jobs and not waiting_for_us and worker.stall_reason is None and now - worker.active > timeout:
                worker.stall_reason = (
                    f"the decoder stalled: no frame for {timeout:g} s (--decode-timeout); it was stopped"
                )
                log.warning("decode worker %d: %s (%s)", w, worker.stall_reason, worker.jobs[0].path)
                with contextlib.suppress(OSError):
                    worker.process.kill()
                killed.append(w)
        return killed

    def restart(self, w: int) -> None:
        """Replace dead worker w by a new one, with the jobs queued behind the one it died on."""
        old = self.workers[w]
        self._close_connections(old)
        waiting = list(old.jobs)
        self.restarts += 1
        self._start(w)
        for job in waiting:
            self.assign(w, job)

    @staticmethod
    def _close_connections(worker: _Worker) -> None:
        for token in worker.tokens:
            forget(token)
        for conn in (worker.control, worker.results):
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Stop every worker (politely, then by force) and free the shared memory."""
        for worker in self.workers:
            if worker is not None:
                with contextlib.suppress(OSError):
                    worker.control.send(None)
        for worker in self.workers:
            if worker is None:
                continue
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2)
            self._close_connections(worker)
        if self._pinned:
            cudart = torch.cuda.cudart()
            for pointer in self._pinned:
                cudart.cudaHostUnregister(pointer)
            self._pinned = []
        self.buffers = []
        for m in self.shm:
            with contextlib.suppress(BufferError):  # a tensor still viewing it keeps it alive until collected
                m.close()
