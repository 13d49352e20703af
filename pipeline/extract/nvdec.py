"""Hardware video decoding on the GPU (NVDEC) through torchcodec, with the CPU decoder as the fallback for
everything.

torchcodec (`pip install torchcodec`, a build with CUDA support) is imported only when `--decoder nvdec` asks
for it. A few threads of the main process decode one video each; frames arrive on the GPU as (N, H, W, 3)
uint8 RGB and go to the device preprocessing without a host round trip. Frame indices and timestamps come from
the decoded frames (their pts); the frame count is that of torchcodec's exact scan of the file.

Whatever goes wrong (torchcodec missing, a codec NVDEC does not take, a file it cannot open, an error halfway
through) the video is handed to the CPU decode workers with a note; it never fails a run.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from pipeline.extract.decode import DecodeError, FrameSelector, check_pixels
from pipeline.extract.workers import CHUNK_FRAMES, DecodeJob

log = logging.getLogger(__name__)

NVDEC_CODECS = frozenset({"h264", "hevc", "h265", "av1"})
NVDEC_THREADS = 4  # videos decoded at once: the GPU has several decoder engines
QUEUE_CHUNKS = 8  # decoded chunks waiting for the model: bounds the GPU memory they take


def unavailable_reason(device: torch.device) -> str | None:
    """Why NVDEC cannot be used for this run, or None when it can (torchcodec importable, a CUDA device)."""
    if device.type != "cuda":
        return f"NVDEC decodes on an NVIDIA GPU, and this run's device is {device}"
    try:
        import torchcodec.decoders  # noqa: F401  (probe only)
    except Exception as e:  # noqa: BLE001  (ImportError, or libraries that do not load)
        return f"torchcodec cannot be imported ({type(e).__name__}: {e}); install a CUDA build of torchcodec"
    return None


class Fallback(Exception):
    """This video goes to the CPU decoder; the message says why."""


def decode_nvdec(job: DecodeJob, device: torch.device):
    """Messages for one video decoded by NVDEC: ('rows', i, frames (n, H, W, 3) uint8 on the device, frame
    indices, timestamps) chunks, then ('end', i, info); ('fallback', i, reason) at any point hands it to the
    CPU decoder, and ('error', i, reason) is a refusal that the CPU decoder would make too (--max-pixels)."""
    i = job.index
    try:
        from torchcodec.decoders import VideoDecoder

        try:
            decoder = VideoDecoder(str(job.path), device=str(device), dimension_order="NHWC", seek_mode="exact")
        except Exception as e:  # torchcodec raises RuntimeError/ValueError of its own
            raise Fallback(f"NVDEC could not open it ({type(e).__name__}: {e})") from e
        meta = decoder.metadata
        codec = (meta.codec or "?").lower()
        if codec not in NVDEC_CODECS:
            raise Fallback(f"codec {codec} is not decoded by NVDEC here")
        width, height = int(meta.width or 0), int(meta.height or 0)
        check_pixels(width, height, job.max_pixels, "the video's frame size")
        total = int(meta.num_frames or 0)
        keep = FrameSelector(job.sampling, total if job.sampling.num_frames is not None else None)
        rows = 0
        for start in range(0, total, CHUNK_FRAMES):
            batch = decoder.get_frames_in_range(start=start, stop=min(start + CHUNK_FRAMES, total))
            pts = batch.pts_seconds.tolist()  # on the CPU whatever the device
            picked = [k for k, t in enumerate(pts) if keep(start + k, t)]
            if picked:
                # (n, H, W, 3) on device
                frames = batch.data if len(picked) == len(pts) else batch.data[picked]
                yield "rows", i, frames, [start + k for k in picked], [pts[k] for k in picked]
                rows += len(picked)
        if total == 0:
            raise Fallback("NVDEC found no frame in it")
        if rows == 0:
            raise DecodeError(f"the sampling kept none of its {total} frames")
        fps = float(meta.average_fps or 0.0)
        header = getattr(meta, "num_frames_from_header", None)
        yield (
            "end",
            i,
            {
                "native_fps": fps,
                "width": width,
                "height": height,
                "header_frame_count": int(header) if header is not None else -1,
                "decoded_frames": total,
                "mixed_frame_sizes": False,
                "decoder": "nvdec",
            },
        )
    except DecodeError as e:
        yield "error", i, str(e)
    except Fallback as e:
        yield "fallback", i, str(e)
    except Exception as e:  # noqa: BLE001  (anything from the library: the CPU decoder has the last word)
        yield "fallback", i, f"NVDEC failed ({type(e).__name__}: {e})"


class NvdecDecoders:
    """NVDEC_THREADS threads of this process, each decoding one video at a time from a shared job queue; their
    messages arrive, in each video's order, on `messages` (bounded: decoding waits while the model is
    behind)."""

    def __init__(self, device: torch.device, threads: int = NVDEC_THREADS):
        self.device = device
        self.jobs: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.pending = 0  # jobs given and not yet ended, failed or handed back
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"pipeline-nvdec-{k}", daemon=True) for k in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: DecodeJob) -> None:
        self.pending += 1
        self.jobs.put(job)

    def _loop(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's current device: cuda:N under torchrun
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            for message in decode_nvdec(job, self.device):
                while not self._stop.is_set():
                    try:
                        self.messages.put(message, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set() or message[0] == "fallback":
                    break

    def get(self) -> tuple | None:
        try:
            message = self.messages.get_nowait()
        except queue.Empty:
            return None
        if message[0] in ("end", "error", "fallback"):
            self.pending -= 1
        return message

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
