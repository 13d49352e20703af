"""Hardware video decoding on the GPU (NVDEC) through PyNvVideoCodec, with the CPU decoder as the fallback for
everything.

PyNvVideoCodec (`pip install 'framecache[nvdec]'`: a wheel with its own demuxer, no system packages) is imported
only when NVDEC is asked for (`--decoder nvdec`, or `auto` on a CUDA device). NVDEC_THREADS threads of the main
process each keep one decoder session and reuse it from video to video (`reconfigure_decoder`), so several of the
GPU's decoder engines work at once. Frames stay in device memory: NV12 from the decoder, converted to RGB here by the
stream's own matrix (BT.601, BT.709, BT.2020) and range (limited or full), then cropped by the device preprocessing.
Frame indices and timestamps come from the decoded frames themselves (their pts), never from the header.

Whatever goes wrong (the library missing, a codec NVDEC does not take, a file it cannot open, an error halfway
through, `--num-frames` sampling, which needs an exact count first) the video goes to the CPU decoder with a note;
it never fails a run.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from pipeline.extract.decode import DecodeError, FrameSelector, check_pixels
from pipeline.extract.workers import CHUNK_FRAMES, DecodeJob

log = logging.getLogger(__name__)

NVDEC_CODECS = frozenset({"h264", "hevc", "h265", "av1", "vp9"})
NVDEC_THREADS = 8  # decoder sessions at once: an H200 has 7 NVDEC engines; 8 threads measured 4,300 frames/s at 720p
QUEUE_CHUNKS = 16  # decoded chunks waiting for the model: bounds the GPU memory they take
LIBRARY = "PyNvVideoCodec"
# (Kr, Kb) of the YUV -> RGB matrices; FFmpeg's names (and their aliases in stream metadata)
MATRICES = {
    "bt601": (0.299, 0.114),
    "smpte170m": (0.299, 0.114),
    "bt470bg": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
    "bt2020": (0.2627, 0.0593),
    "bt2020nc": (0.2627, 0.0593),
}


def unavailable_reason(device: torch.device) -> str | None:
    """Why NVDEC cannot be used for this run, or None when it can (PyNvVideoCodec importable, a CUDA device)."""
    if device.type != "cuda":
        return f"NVDEC decodes on an NVIDIA GPU, and this run's device is {device}"
    try:
        __import__(LIBRARY)
    except Exception as e:  # noqa: BLE001  (ImportError, or libraries that do not load)
        return f"{LIBRARY} cannot be imported ({type(e).__name__}: {e}); pip install 'framecache[nvdec]'"
    return None


class Fallback(Exception):
    """This video goes to the CPU decoder; the message says why."""


def nv12_to_rgb(nv12: torch.Tensor, matrix: str = "bt601", full_range: bool = False) -> torch.Tensor:
    """Shapes: (N, 3H/2, W) uint8 NV12 (the Y plane, then interleaved U, V at half resolution) -> (N, H, W, 3) uint8
    RGB, on the same device. Chroma is upsampled by repetition; `matrix` and `full_range` are the stream's."""
    kr, kb = MATRICES.get(matrix, MATRICES["bt601"])
    n, rows, w = nv12.shape
    h = rows * 2 // 3
    y = nv12[:, :h].float()  # (N, H, W)
    uv = nv12[:, h:].reshape(n, h // 2, w // 2, 2).float()
    uv = uv.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (N, H, W, 2)
    u, v = uv[..., 0] - 128.0, uv[..., 1] - 128.0
    if not full_range:  # limited ("TV") range: Y in 16..235, chroma in 16..240
        y = (y - 16.0) * (255.0 / 219.0)
        u, v = u * (255.0 / 224.0), v * (255.0 / 224.0)
    r = y + 2.0 * (1.0 - kr) * v
    b = y + 2.0 * (1.0 - kb) * u
    g = (y - kr * r - kb * b) / (1.0 - kr - kb)
    return torch.stack([r, g, b], dim=-1).round_().clamp_(0, 255).to(torch.uint8)


def stream_colour(meta, height: int) -> tuple[str, bool]:
    """The stream's YUV matrix and range from its metadata; unspecified: BT.709 for HD, else BT.601, limited (as
    FFmpeg assumes)."""
    space = str(getattr(meta, "color_space", "") or getattr(meta, "colorspace", "") or "").lower().replace("-", "")
    matrix = next((name for name in MATRICES if name in space), "bt709" if height >= 720 else "bt601")
    colour_range = str(getattr(meta, "color_range", "") or "").lower()
    return matrix, colour_range in ("full", "jpeg", "pc", "2")


class Session:
    """One decoder session of one thread, reused from video to video (PyNvVideoCodec keeps a cache of decoders)."""

    def __init__(self, device: torch.device):
        self.device, self.decoder = device, None

    def open(self, path: str):
        nvc = __import__(LIBRARY)
        if self.decoder is None:
            self.decoder = nvc.SimpleDecoder(
                path,
                gpu_id=self.device.index or 0,
                use_device_memory=True,
                output_color_type=nvc.OutputColorType.NATIVE,
            )
        else:
            self.decoder.reconfigure_decoder(path)
        return self.decoder


def decode_nvdec(job: DecodeJob, device: torch.device, session: Session | None = None):
    """Messages for one video decoded by NVDEC: ('rows', i, frames (n, H, W, 3) uint8 on the device, frame
    indices, timestamps) chunks, then ('end', i, info); ('fallback', i, reason) at any point hands it to the
    CPU decoder, and ('error', i, reason) is a refusal that the CPU decoder would make too (--max-pixels)."""
    i = job.index
    session = session or Session(device)
    try:
        if job.sampling.num_frames is not None:
            raise Fallback("--num-frames needs the exact frame count, which the CPU decoder counts")
        try:
            decoder = session.open(str(job.path))
            meta = decoder.get_stream_metadata()
        except Exception as e:  # the library raises its own kinds
            session.decoder = None  # a session that failed to open is not reused
            raise Fallback(f"NVDEC could not open it ({type(e).__name__}: {e})") from e
        codec = str(getattr(meta, "codec_name", "") or getattr(meta, "codec", "") or "?").lower()
        if not any(name in codec for name in NVDEC_CODECS):
            raise Fallback(f"codec {codec} is not decoded by NVDEC here")
        width, height = int(meta.width), int(meta.height)
        check_pixels(width, height, job.max_pixels, "the video's frame size")
        fps = float(getattr(meta, "average_fps", 0.0) or 0.0)
        num, den = getattr(meta, "timebase_num", 0) or 0, getattr(meta, "timebase_den", 0) or 0
        matrix, full_range = stream_colour(meta, height)
        keep = FrameSelector(job.sampling, None)
        decoded = rows = 0
        while frames := decoder.get_batch_frames(CHUNK_FRAMES):
            kept, idx, ts = [], [], []
            for frame in frames:
                t = frame.getPTS() * num / den if den else (decoded / fps if fps > 0 else 0.0)
                if keep(decoded, t):
                    kept.append(torch.from_dlpack(frame))  # (3H/2, W) NV12 on the device
                    idx.append(decoded)
                    ts.append(t)
                decoded += 1
            if kept:
                yield "rows", i, nv12_to_rgb(torch.stack(kept), matrix, full_range), idx, ts
                rows += len(kept)
        if decoded == 0:
            raise Fallback("NVDEC found no frame in it")
        if rows == 0:
            raise DecodeError(f"the sampling kept none of its {decoded} frames")
        yield (
            "end",
            i,
            {
                "native_fps": fps,
                "width": width,
                "height": height,
                "header_frame_count": int(getattr(meta, "num_frames", -1) or -1),
                "decoded_frames": decoded,
                "mixed_frame_sizes": False,
                "decoder": "nvdec",
                "colour": f"{matrix}, {'full' if full_range else 'limited'} range",
            },
        )
    except DecodeError as e:
        yield "error", i, str(e)
    except Fallback as e:
        yield "fallback", i, str(e)
    except Exception as e:  # noqa: BLE001  (anything from the library: the CPU decoder has the last word)
        session.decoder = None
        yield "fallback", i, f"NVDEC failed ({type(e).__name__}: {e})"


class NvdecDecoders:
    """`threads` threads of this process, each with its own decoder session, decoding one video at a time from a
    shared job queue; their messages arrive, in each video's order, on `messages` (bounded: decoding waits while
    the model is behind)."""

    def __init__(self, device: torch.device, threads: int = NVDEC_THREADS):
        self.device, self.threads = device, threads
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
        session = Session(self.device)
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            for message in decode_nvdec(job, self.device, session):
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
