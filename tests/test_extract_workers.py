"""Decode workers and the device path: batched preprocessing equals the per-frame crop, features do not depend
on batching, a crashing decoder fails only its video, frame bombs are refused, NVDEC falls back to the CPU
decoder."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from helpers import FAST, FAST_ARGS, decode_all_rgb, make_frame_folder, make_video, pattern_frame
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_INPUTS_FAILED, EXIT_OK, app
from pipeline.extract import nvdec
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


def _nv12(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB -> (3H/2, W) NV12, BT.601 limited range (OpenCV's conversion), as an H.264 stream holds it."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)  # (3H/2, W): Y, then U and V planes
    u = i420[h : h + h // 4].reshape(h // 2, w // 2)
    v = i420[h + h // 4 :].reshape(h // 2, w // 2)
    return torch.from_numpy(np.concatenate([i420[:h], np.stack([u, v], axis=-1).reshape(h // 2, w)]))


@pytest.fixture
def fake_nvdec(monkeypatch):
    """A stand-in for PyNvVideoCodec's SimpleDecoder, decoding with OpenCV on the CPU and handing over NV12 frames
    through DLPack with their pts (time base 1/90000, 25 fps): lets the NVDEC path run here. Files named 'broken*'
    fail halfway through, 'closed*' cannot be opened, '*.avi' report codec mjpeg unless named 'h264*'."""
    opened = []

    class Frame:
        def __init__(self, nv12: torch.Tensor, pts: int):
            self.nv12, self.pts = nv12, pts

        def __dlpack__(self, **kwargs):
            return self.nv12.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.nv12.__dlpack_device__()

        def getPTS(self) -> int:  # noqa: N802  (the library's name)
            return self.pts

    class SimpleDecoder:
        def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type=None):
            assert output_color_type == "native"
            self.reconfigure_decoder(path)

        def reconfigure_decoder(self, path):
            opened.append(path)
            if "closed" in path:
                raise RuntimeError("could not open input file")
            self.path, self.frames, self.pos = path, decode_all_rgb(Path(path)), 0
            h, w = self.frames[0].shape[:2]
            codec = "h264" if "h264" in path or "broken" in path else "mjpeg"
            self.meta = types.SimpleNamespace(
                codec_name=codec,
                width=w,
                height=h,
                num_frames=len(self.frames) + 7,
                average_fps=25.0,
                timebase_num=1,
                timebase_den=90000,
                color_space="bt601",
                color_range="tv",
            )

        def get_stream_metadata(self):
            return self.meta

        def get_batch_frames(self, n):
            if "broken" in self.path and self.pos > 0:
                raise RuntimeError("NVDEC error halfway")
            batch = [Frame(_nv12(f), 3600 * (self.pos + k)) for k, f in enumerate(self.frames[self.pos : self.pos + n])]
            self.pos += len(batch)
            return batch

    module = types.ModuleType("PyNvVideoCodec")
    module.SimpleDecoder = SimpleDecoder
    module.OutputColorType = types.SimpleNamespace(NATIVE="native", RGB="rgb")
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", module)
    from pipeline.extract import nvdec, run

    monkeypatch.setattr(nvdec, "CHUNK_FRAMES", 4)
    # As on a GPU, where PyNvVideoCodec would be importable:
    monkeypatch.setattr(nvdec, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(run, "_nvdec_decoders", lambda device: nvdec.NvdecDecoders(device, threads=2))
    return opened


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_nv12_conversion_follows_matrix_and_range():
    """BT.601 limited NV12 made by OpenCV converts back within chroma subsampling's error; a full-range, BT.709
    grey ramp converts exactly."""
    rgb = np.stack([pattern_frame(k) for k in range(2)])  # (2, 72, 96, 3)
    back = nvdec.nv12_to_rgb(torch.stack([_nv12(f) for f in rgb]), "bt601", full_range=False).numpy()
    assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 4  # chroma at half resolution blurs colour edges only
    grey = np.repeat(np.linspace(0, 255, 16).astype(np.uint8)[None, :], 4, 0)  # (4, 16) Y, full range
    nv12 = torch.from_numpy(np.concatenate([grey, np.full((2, 16), 128, np.uint8)]))[None]
    out = nvdec.nv12_to_rgb(nv12, "bt709", full_range=True)[0].numpy()
    assert (out == grey[..., None]).all()
    # limited range: Y 16 is black and 235 white; a chroma offset moves R by 2(1 - Kr) of it, per matrix
    grey = torch.tensor([[16, 235], [16, 235], [128, 128]], dtype=torch.uint8)[None]  # (1, 3, 2): H 2, W 2
    red = torch.tensor([[16, 16], [16, 16], [128, 128 + 56]], dtype=torch.uint8)[None]  # black, V 184
    for matrix, kr in (("bt601", 0.299), ("bt709", 0.2126)):
        out = nvdec.nv12_to_rgb(grey, matrix).numpy()[0]
        assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
        out = nvdec.nv12_to_rgb(red, matrix).numpy()[0]
        assert out[1, 1].tolist() == [round(2 * (1 - kr) * 56 * 255 / 224), 0, 0]


@pytest.mark.parametrize("workers", [0, 1])
def test_nvdec_path_and_its_fallbacks_give_the_cpu_features(tmp_path, fake_nvdec, workers):
    """Through the NVDEC path (a stand-in decoder here): a file it decodes, one it fails halfway through (its
    rows so far are discarded and the CPU decoder starts it again), one it cannot open, one of a codec it does not
    take, a frame folder (never NVDEC's): frame indices equal the CPU decoder's, timestamps come from the pts, and
    features agree with the CPU path's (cosine; NVDEC's frames went through NV12 and back)."""
    videos = tmp_path / "v"
    for k, name in enumerate(("h264_good.avi", "broken.avi", "closed.avi", "mjpeg.avi")):
        make_video(videos / name, 10, offset=3 * k)
    make_frame_folder(videos / "seq", 3)
    opts = dict(FAST, dtype="float32", batch_size=4, workers=workers, preprocess="device")
    report = pipeline.extract_videos([videos], tmp_path / "n.h5", decoder="nvdec", **opts)
    assert report.ok and len(report.extracted) == 5
    assert len(fake_nvdec) == 4  # every video went to NVDEC first, never the frame folder
    pipeline.extract_videos([videos], tmp_path / "c.h5", **{**opts, "preprocess": "workers", "decoder": "cpu"})
    a, b = pipeline.open_cache(tmp_path / "n.h5"), pipeline.open_cache(tmp_path / "c.h5")
    assert a.info("h264_good.avi")["decoder"] == "nvdec" and "decoder" not in b.info("h264_good.avi")
    assert a.info("h264_good.avi")["colour"] == "bt601, limited range"
    assert a.info("h264_good.avi")["decoded_frames"] == 10  # counted by decoding, not the header's 17
    for key in ("broken.avi", "closed.avi", "mjpeg.avi"):
        assert "decoder" not in a.info(key)  # decoded again by the CPU decoder
    np.testing.assert_allclose(a.timestamps("h264_good.avi"), np.arange(10) * 0.04)
    for key in b:
        np.testing.assert_array_equal(a.frame_indices(key), b.frame_indices(key))
        assert _min_cosine(a.features(key), b.features(key)) > 0.995, key


def test_auto_shares_videos_between_nvdec_and_the_cpu_decoder(tmp_path, fake_nvdec):
    videos = tmp_path / "v"
    for k in range(6):
        make_video(videos / f"h264_{k}.avi", 6, offset=k)
    opts = dict(FAST, dtype="float32", batch_size=4, workers=1, preprocess="device")
    report = pipeline.extract_videos([videos], tmp_path / "a.h5", decoder="auto", **opts)
    assert report.ok and len(report.extracted) == 6
    cache = pipeline.open_cache(tmp_path / "a.h5")
    by = [cache.info(k).get("decoder", "cpu") for k in cache.keys()]
    assert "nvdec" in by and len(fake_nvdec) + by.count("cpu") >= 6


def test_stage_one_imports_no_stage_two_dependencies():
    """Extraction runs where only its own dependencies are installed (the GPU machines): no optuna, no
    yaml."""
    import subprocess

    probe = (
        "import sys, pipeline.extract.run, pipeline.extract.nvdec; "
        "extra = [m for m in ('optuna', 'yaml', 'PyNvVideoCodec') if m in sys.modules]; "
        "assert not extra, extra"
    )
    assert subprocess.run([sys.executable, "-c", probe], check=False, timeout=120).returncode == 0
