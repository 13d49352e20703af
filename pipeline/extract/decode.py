"""Frames and their timestamps, decoded from video files (OpenCV/FFmpeg) or folders of images, in RGB order.

Frame counts and timestamps always come from decoding: container headers (CAP_PROP_FRAME_COUNT, FPS) are recorded for
reference only, because on real files they are often wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# FFmpeg and OpenCV print their own complaints about damaged files to stderr; the run reports each failure itself.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

import cv2  # noqa: E402  (after the log settings above)

if hasattr(cv2, "setLogLevel"):  # also when cv2 was imported before the variables above were set
    cv2.setLogLevel(2)  # 2 = LOG_LEVEL_ERROR
import numpy as np

from pipeline.spec import Sampling

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".avi",
        ".mkv",
        ".mov",
        ".webm",
        ".m4v",
        ".mpg",
        ".mpeg",
        ".gif",
        ".wmv",
        ".flv",
        ".3gp",
        ".ts",
        ".mts",
        ".m2ts",
        ".ogv",
        ".vob",
        ".y4m",
    }
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class DecodeError(RuntimeError):
    """An input that cannot be turned into frames; the message says why."""


DEFAULT_MAX_PIXELS = 8192 * 8192


def check_pixels(width: int, height: int, max_pixels: int | None, what: str = "frame", header: bool = True) -> None:
    """Refuse a frame larger than `max_pixels` (a frame bomb: a small file that decodes into gigabytes)."""
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(
            f"{what} is {width}x{height} ({width * height / 1e6:.3g} megapixels), over the "
            f"--max-pixels limit of {max_pixels} ({max_pixels / 1e6:.3g} megapixels)"
            + ("; refused before decoding" if header else "")
        )


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF, BMP, WebP or PPM/PGM file from its header, without decoding it;
    None for other formats or an unreadable header. A few bytes are read (JPEG: the markers up to its frame
    header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            if head[:6] in (b"GIF87a", b"GIF89a"):
                return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
            if head[:2] == b"BM" and len(head) >= 26:
                return (
                    abs(int.from_bytes(head[18:22], "little", signed=True)),
                    abs(int.from_bytes(head[22:26], "little", signed=True)),
                )
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp_size(head)
            if head[:2] in (b"P5", b"P6"):
                fields = re.sub(rb"#[^\n]*", b"", head[2:] + f.read(224)).split()
                return int(fields[0]), int(fields[1])
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(f)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg_size(f) -> tuple[int, int] | None:
    """Walk the JPEG markers from offset 2 to the first start-of-frame (SOF0..SOF15 but DHT, JPG and DAC)."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            continue
        length = int.from_bytes(f.read(2), "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)  # precision, height, width
            return int.from_bytes(data[3:5], "big"), int.from_bytes(data[1:3], "big")
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)
        if f.read(1) != b"\xff":
            return None


def natural_key(name: str) -> list:
    """Sort key that puts img_2 before img_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def opencv_safe(path: Path) -> bool:
    """Whether OpenCV can be given this path as a string: its Python bindings need valid UTF-8 (a file name of
    other bytes, held as surrogate escapes, crashes the process inside cv2 instead of raising)."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, naturally sorted."""
    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted(images, key=lambda p: natural_key(p.name))


@dataclass
class SourceInfo:
    """What the container says about itself (for the record; decoding decides the truth)."""

    native_fps: float
    width: int
    height: int
    header_frame_count: int


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any OpenCV image (gray, BGR, BGRA; 8 or 16 bit) -> (H, W, 3) uint8 RGB."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DecodeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _capture_by_descriptor(path: Path) -> cv2.VideoCapture:
    """Open a file whose name OpenCV cannot take through /proc/self/fd/N, a UTF-8 name for the same file
    (Linux). FFmpeg opens that name itself, so the descriptor is closed as soon as the capture is open."""
    if not os.path.isdir("/proc/self/fd"):
        raise DecodeError("its file name is not valid UTF-8, which OpenCV cannot open on this system; rename it")
    fd = os.open(path, os.O_RDONLY)
    try:
        return cv2.VideoCapture(f"/proc/self/fd/{fd}", cv2.CAP_FFMPEG)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ sources
class Source:
    """A sequence of frames: `probe()` then `frames(keep)` yields (index, timestamp_s, rgb or None)."""

    def __init__(self, path: Path, max_pixels: int | None = None):
        self.path = path
        self.max_pixels = max_pixels

    def probe(self) -> SourceInfo:
        raise NotImplementedError

    def count(self) -> int:
        """Number of frames, by decoding (needed only for uniform --num-frames sampling)."""
        return sum(1 for _ in self.frames(lambda i, t: False))

    def frames(self, keep) -> Iterator[tuple[int, float, np.ndarray | None]]:
        """Every decoded frame in order; the RGB image is produced only when keep(index, timestamp) is true."""
        raise NotImplementedError


class VideoSource(Source):
    def _open(self) -> cv2.VideoCapture:
        if not self.path.exists():
            raise DecodeError("file does not exist (a broken link?)")
        if not self.path.is_file():
            raise DecodeError("not a regular file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb"):
                pass
        except OSError as e:
            raise DecodeError(f"cannot read the file ({e.strerror})") from e
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        if opencv_safe(self.path):
            cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        else:
            cap = _capture_by_descriptor(self.path)
        if not cap.isOpened():
            cap.release()
            raise DecodeError("OpenCV/FFmpeg cannot open it as a video (not a video, or a corrupt/truncated one)")
        cap.set(cv2.CAP_PROP_CONVERT_RGB, 1)
        # The container's frame size, known before any frame is decoded (0 when it does not say).
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        try:
            check_pixels(width, height, self.max_pixels, "the video's frame size")
        except DecodeError:
            cap.release()
            raise
        return cap

    def capture(self) -> cv2.VideoCapture:
        """An opened capture of the file (with the checks and messages of `frames`), for readers that seek."""
        return self._open()

    def probe(self) -> SourceInfo:
        cap = self._open()
        try:
            fps = cap.get(cv2.CAP_PROP_FPS)
            return SourceInfo(
                native_fps=float(fps) if fps and math.isfinite(fps) and fps > 0 else 0.0,
                width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                header_frame_count=max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), -1),
            )
        finally:
            cap.release()

    def frames(self, keep):
        cap = self._open()
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and math.isfinite(fps) and fps > 0 else 0.0
        last_t = -1.0
        index = 0
        try:
            while cap.grab():
                t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                # Some containers report no or non-increasing positions: fall back to the nominal frame rate.
                if not math.isfinite(t) or t <= last_t:
                    t = index / fps if fps else last_t + 1.0 / 30.0
                    t = max(t, last_t + 1e-6)
                last_t = t
                image = None
                if keep(index, t):
                    ok, bgr = cap.retrieve()
                    if not ok or bgr is None:
                        break  # a frame that demuxes but does not decode ends a damaged stream
                    check_pixels(bgr.shape[1], bgr.shape[0], self.max_pixels, f"frame {index}", header=False)
                    image = to_rgb(bgr)
                yield index, t, image
                index += 1
        finally:
            cap.release()


class FolderSource(Source):
    """A folder of images, one frame each, naturally sorted; timestamps at a nominal frame rate."""

    def __init__(self, path: Path, fps: float, max_pixels: int | None = None):
        super().__init__(path, max_pixels)
        self.fps = fps
        self.images = list_images(path)

    def _read(self, image_path: Path) -> np.ndarray:
        if self.max_pixels is not None:
            size = image_size(image_path)  # from the header: a frame bomb is refused before it is decoded
            if size is not None:
                check_pixels(*size, self.max_pixels, f"image {image_path.name!r}")
        if opencv_safe(image_path):
            image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        else:  # see opencv_safe: decode the bytes instead of handing cv2 the name
            try:
                data = np.fromfile(image_path, np.uint8)
            except OSError as e:
                raise DecodeError(f"cannot read image {image_path.name!r} ({e.strerror})") from e
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if image is None:
            raise DecodeError(f"cannot decode image {image_path.name!r} (corrupt or not an image)")
        return to_rgb(image)

    def probe(self) -> SourceInfo:
        if not self.images:
            raise DecodeError("folder holds no images")
        size = image_size(self.images[0])
        if size is None:
            first = self._read(self.images[0])
            size = first.shape[1], first.shape[0]
        return SourceInfo(native_fps=self.fps, width=size[0], height=size[1], header_frame_count=len(self.images))

    def count(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        """Frame `index` as (H, W, 3) uint8 RGB, read directly (no other image is touched)."""
        return self._read(self.images[index])

    def frames(self, keep):
        for index, image_path in enumerate(self.images):
            t = index / self.fps
            yield index, t, (self._read(image_path) if keep(index, t) else None)


def open_source(path: Path, frames_fps: float, max_pixels: int | None = None) -> Source:
    """The frames of a video file or a folder of images; frames over `max_pixels` are refused
    (DecodeError)."""
    return FolderSource(path, frames_fps, max_pixels) if path.is_dir() else VideoSource(path, max_pixels)


# ----------------------------------------------------------------------------------------------------- sampling
class FrameSelector:
    """Streaming decision 'is this decoded frame a feature row?' for one video and one Sampling."""

    def __init__(self, sampling: Sampling, total: int | None = None):
        self.s = sampling
        self.kept = 0
        self.next_t = 0.0
        self.uniform: set[int] | None = None
        if sampling.num_frames is not None:
            if total is None:
                raise ValueError("uniform sampling needs the frame count")
            n = min(sampling.num_frames, total)
            self.uniform = set(np.round(np.linspace(0, total - 1, n)).astype(int).tolist()) if n else set()

    def __call__(self, index: int, t: float) -> bool:
        s = self.s
        if self.uniform is not None:
            return index in self.uniform
        if s.max_frames is not None and self.kept >= s.max_frames:
            return False
        if s.fps is not None:
            # one frame per interval [k/fps, (k+1)/fps): the first frame whose timestamp enters it
            if t + 1e-9 < self.next_t:
                return False
            self.next_t = (math.floor(t * s.fps + 1e-9) + 1) / s.fps
        elif index % s.stride:
            return False
        self.kept += 1
        return True
