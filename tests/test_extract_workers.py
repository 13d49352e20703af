"""Decode workers and the device path: batched preprocessing equals the per-frame crop, features do not depend
on batching, a crashing decoder fails only its video, frame bombs are refused, NVDEC falls back to the CPU
decoder."""

from __future__ import annotations

import logging
import sys
import types

import cv2
import numpy as np
import pytest
import torch
import torchvision
from helpers import FAST, FAST_ARGS, decode_all_rgb, make_frame_folder, make_video, pattern_frame
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_INPUTS_FAILED, EXIT_OK, app
from pipeline.extract.backbone import default_preprocessing
from pipeline.extract.decode import image_size
from pipeline.extract.preprocess import crop_frames
from pipeline.extract.workers import CRASH_ON_ENV

# (width, height): QCIF, QVGA, 720p, portrait, odd
SIZES = [(176, 144), (320, 240), (1280, 720), (240, 320), (97, 61)]


@pytest.fixture(scope="module")
def decoded_frames(tmp_path_factory) -> list[np.ndarray]:
    """Two real decoded frames (MJPG and mp4v) of every size in SIZES, as OpenCV hands them over in RGB."""
    folder = tmp_path_factory.mktemp("sizes")
    frames = []
    for k, (w, h) in enumerate(SIZES):
        frames += decode_all_rgb(make_video(folder / f"s{k}{('.avi', '.mp4')[k % 2]}", 2, width=w, height=h))
    return frames


def test_batched_preprocessing_equals_per_frame_crop_and_torchvision(decoded_frames):
    """The device path's batched resize + crop, run on CPU tensors, gives the per-frame path's crops exactly,
    and normalised they are torchvision's own transforms of the weights."""
    pre = default_preprocessing(torchvision.models.ResNet50_Weights.DEFAULT)
    frames = [torch.from_numpy(f) for f in decoded_frames]  # (H, W, 3) uint8, sizes mixed
    batched = crop_frames(pre, frames)
    assert batched.shape == (len(frames), 3, 224, 224) and batched.dtype == torch.uint8
    for k, f in enumerate(frames):
        expected = pre.crop_frame(f.permute(2, 0, 1))  # (3, C, C), this frame alone
        assert torch.equal(batched[k], expected), f"frame {k} of shape {tuple(f.shape)}"
    reference = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    expected = torch.stack([reference(f.permute(2, 0, 1)) for f in frames])
    torch.testing.assert_close(pre.normalize(batched), expected, rtol=0, atol=1e-6)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_device_preprocessing_gives_the_worker_path_features(tmp_path):
    """Extraction with the device path forced on the CPU (native frames through the shared slots, cropped in
    whole chunks) against the per-frame path of the workers, on videos of several sizes and a folder of mixed
    sizes."""
    videos = tmp_path / "v"
    for k, (w, h) in enumerate([(176, 144), (240, 320), (97, 61)]):
        make_video(videos / f"c{k}.avi", 5, width=w, height=h, offset=k)
    mixed = make_frame_folder(videos / "mixed", 3)
    cv2.imwrite(str(mixed / "img_4.png"), cv2.cvtColor(pattern_frame(9, 64, 80), cv2.COLOR_RGB2BGR))
    opts = dict(FAST, dtype="float32", workers=1, batch_size=4)
    a = pipeline.extract_videos([videos], tmp_path / "a.h5", preprocess="workers", **opts)
    b = pipeline.extract_videos([videos], tmp_path / "b.h5", preprocess="device", **opts)
    assert a.ok and b.ok and len(a.extracted) == len(b.extracted) == 4
    ca, cb = pipeline.open_cache(tmp_path / "a.h5"), pipeline.open_cache(tmp_path / "b.h5")
    for key in ca:
        np.testing.assert_array_equal(ca.frame_indices(key), cb.frame_indices(key))
        assert _cosine(ca.features(key), cb.features(key)).min() >= 0.9999, key
        np.testing.assert_allclose(ca.features(key), cb.features(key), rtol=1e-5, atol=1e-5)
    assert cb.info("mixed")["mixed_frame_sizes"]


def test_features_do_not_depend_on_batching_bit_for_bit(tmp_path):
    """One run over all videos against one run per video, in reverse order, with other workers: the same bytes
    (every forward pass has the batch size's shape, padded at the end)."""
    videos = tmp_path / "v"
    for k, n in enumerate((7, 3, 12)):
        make_video(videos / f"c{k}.avi", n, offset=5 * k)
    for dtype in ("float16", "float32"):
        opts = dict(FAST, dtype=dtype, batch_size=8)
        whole = tmp_path / f"whole_{dtype}.h5"
        pipeline.extract_videos([videos], whole, **{**opts, "workers": 2})
        pieces = tmp_path / f"pieces_{dtype}.h5"
        for k in (2, 0, 1):  # as a run killed after each video and resumed would
            pipeline.extract_videos([videos / f"c{k}.avi"], pieces, **opts)
        a, b = pipeline.open_cache(whole), pipeline.open_cache(pieces)
        assert sorted(a.keys()) == sorted(b.keys()) == ["c0.avi", "c1.avi", "c2.avi"]
        for key in a:
            np.testing.assert_array_equal(a.frame_indices(key), b.frame_indices(key))
            assert a.features(key).tobytes() == b.features(key).tobytes(), (dtype, key)


def test_a_decoder_crash_fails_only_its_video_and_a_rerun_retries_it(tmp_path, monkeypatch):
    """A decode worker killed by SIGKILL (as the OOM killer would) while reading one file: that file is failed
    with the reason, the worker is replaced, the other videos are extracted, exit code 3; the next run retries
    it."""
    videos = tmp_path / "v"
    for k in range(4):
        make_video(videos / f"c{k}.avi", 4, offset=k)
    out = tmp_path / "c.h5"
    args = [
        "extract",
        str(videos),
        "-o",
        str(out),
        *FAST_ARGS,
        "--workers",
        "1",
        "--batch-size",
        "4",
        "-q",
    ]
    monkeypatch.setenv(CRASH_ON_ENV, "c1.avi")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_INPUTS_FAILED, result.output
    assert "c1.avi" in result.output and "the decoder was killed (signal 9, SIGKILL" in result.output
    assert "1 decode worker(s) replaced after dying" in result.output
    cache = pipeline.open_cache(out)
    assert sorted(cache.keys()) == ["c0.avi", "c2.avi", "c3.avi"]
    assert [(f["key"], "signal 9" in f["reason"]) for f in cache.failures()] == [("c1.avi", True)]
    monkeypatch.delenv(CRASH_ON_ENV)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_OK, result.output
    cache = pipeline.open_cache(out)
    assert sorted(cache.keys()) == ["c0.avi", "c1.avi", "c2.avi", "c3.avi"] and cache.failures() == []


def test_a_frame_bomb_is_refused_from_its_header(tmp_path):
    """A PNG far larger than --max-pixels is refused from its header (its frames are never decoded); the other
    inputs are extracted. The limit is not part of the feature spec."""
    videos = tmp_path / "v"
    make_video(videos / "ok.avi", 3)
    bomb = make_frame_folder(videos / "bomb", 2)
    cv2.imwrite(str(bomb / "img_3.png"), np.zeros((2000, 1500), np.uint8))  # 3 MP of zeros: a few kB on disk
    report = pipeline.extract_videos([videos], tmp_path / "c.h5", max_pixels=1_000_000, **FAST)
    assert report.extracted == ["ok.avi"] and list(report.failed) == ["bomb"]
    reason = report.failed["bomb"][1]
    assert "'img_3.png' is 1500x2000" in reason and "--max-pixels limit of 1000000" in reason, reason
    assert "before decoding" in reason
    again = pipeline.extract_videos([videos], tmp_path / "c.h5", **FAST)  # the default limit lets it through
    assert again.extracted == ["bomb"] and again.ok
    # A video is judged by its container's frame size, before its first frame is decoded.
    small = pipeline.extract_videos([videos / "ok.avi"], tmp_path / "v.h5", max_pixels=96 * 72 - 1, **FAST)
    assert "the video's frame size is 96x72" in small.failed["ok.avi"][1]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".ppm", ".pgm", ".tif"])
def test_image_size_reads_headers(tmp_path, ext):
    image = pattern_frame(3, 123, 45)
    if ext == ".pgm":
        image = image[:, :, 0]
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), image)
    assert image_size(path) == ((123, 45) if ext != ".tif" else None)  # TIFF: not parsed (decoded instead)


def test_nvdec_without_a_gpu_says_why_and_decodes_on_the_cpu(tmp_path, caplog):
    make_video(tmp_path / "v" / "a.avi", 3)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        report = pipeline.extract_videos([tmp_path / "v"], tmp_path / "n.h5", decoder="nvdec", dtype="float32", **FAST)
    assert report.ok and report.extracted == ["a.avi"]
    said = "--decoder nvdec is unavailable: NVDEC decodes on an NVIDIA GPU, and this run's device is cpu"
    assert said in caplog.text
    pipeline.extract_videos([tmp_path / "v"], tmp_path / "c.h5", decoder="cpu", dtype="float32", **FAST)
    a, b = pipeline.open_cache(tmp_path / "n.h5"), pipeline.open_cache(tmp_path / "c.h5")
    assert a.features("a.avi").tobytes() == b.features("a.avi").tobytes()


@pytest.fixture
def fake_torchcodec(monkeypatch):
    """A stand-in for torchcodec's VideoDecoder, decoding with OpenCV on the CPU (NHWC uint8, pts at 25 fps):
    lets the NVDEC path run here. Files named 'broken*' fail halfway through, 'closed*' cannot be opened."""

    class Batch:
        def __init__(self, data, pts):
            self.data, self.pts_seconds = data, torch.tensor(pts, dtype=torch.float64)

    class VideoDecoder:
        def __init__(self, path, device="cpu", dimension_order="NCHW", seek_mode="exact"):
            if "closed" in path:
                raise RuntimeError("could not open input file")
            self.path, self.frames = path, decode_all_rgb(path)
            h, w = self.frames[0].shape[:2]
            n = len(self.frames)
            self.metadata = types.SimpleNamespace(
                codec="h264", width=w, height=h, num_frames=n, average_fps=25.0, num_frames_from_header=n
            )

        def get_frames_in_range(self, start, stop):
            if "broken" in self.path and start > 0:
                raise RuntimeError("NVDEC error halfway")
            frames = torch.from_numpy(np.stack(self.frames[start:stop]))  # (n, H, W, 3)
            return Batch(frames, [k / 25 for k in range(start, stop)])

    module = types.ModuleType("torchcodec")
    module.decoders = types.ModuleType("torchcodec.decoders")
    module.decoders.VideoDecoder = VideoDecoder
    monkeypatch.setitem(sys.modules, "torchcodec", module)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", module.decoders)
    from pipeline.extract import nvdec, run

    monkeypatch.setattr(nvdec, "CHUNK_FRAMES", 4)
    # As on a GPU, where torchcodec would be importable:
    monkeypatch.setattr(run, "_nvdec_usable", lambda decoder, device: decoder == "nvdec")
    monkeypatch.setattr(run, "_nvdec_decoders", lambda device: nvdec.NvdecDecoders(device, threads=2))


@pytest.mark.parametrize("workers", [0, 1])
def test_nvdec_path_and_its_fallbacks_give_the_cpu_features(tmp_path, fake_torchcodec, workers):
    """Through the NVDEC path (a stand-in decoder here): a file it decodes, one it fails halfway through (its
    rows so far are discarded and the CPU decoder starts it again), one it cannot open, a frame folder (never
    NVDEC's): every feature equals the CPU decoder's."""
    videos = tmp_path / "v"
    for k, name in enumerate(("good.avi", "broken.avi", "closed.avi")):
        make_video(videos / name, 10, offset=3 * k)
    make_frame_folder(videos / "seq", 3)
    opts = dict(FAST, dtype="float32", batch_size=4, workers=workers, preprocess="device")
    report = pipeline.extract_videos([videos], tmp_path / "n.h5", decoder="nvdec", **opts)
    assert report.ok and len(report.extracted) == 4
    pipeline.extract_videos([videos], tmp_path / "c.h5", **{**opts, "preprocess": "workers"})
    # NVDEC's frames are always cropped by the device path, whatever --preprocess says for the CPU decoder's.
    workers_path = pipeline.extract_videos(
        [videos], tmp_path / "w.h5", decoder="nvdec", **{**opts, "preprocess": "workers"}
    )
    assert workers_path.ok and len(workers_path.extracted) == 4
    a, b = pipeline.open_cache(tmp_path / "n.h5"), pipeline.open_cache(tmp_path / "c.h5")
    assert a.info("good.avi")["decoder"] == "nvdec" and "decoder" not in b.info("good.avi")
    assert "decoder" not in a.info("broken.avi")  # decoded again by the CPU decoder
    for key in b:
        np.testing.assert_array_equal(a.frame_indices(key), b.frame_indices(key))
        np.testing.assert_allclose(a.features(key), b.features(key), rtol=1e-5, atol=1e-5)


def test_stage_one_imports_no_stage_two_dependencies():
    """Extraction runs where only its own dependencies are installed (the GPU machines): no optuna, no
    yaml."""
    import subprocess

    probe = (
        "import sys, pipeline.extract.run, pipeline.extract.nvdec; "
        "extra = [m for m in ('optuna', 'yaml', 'torchcodec') if m in sys.modules]; "
        "assert not extra, extra"
    )
    assert subprocess.run([sys.executable, "-c", probe], check=False, timeout=120).returncode == 0
