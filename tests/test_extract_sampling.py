"""Sampling options, decoded timestamps and frame counts that never trust container headers."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from helpers import FAST, decode_all_rgb, make_video

import pipeline
from pipeline.spec import Sampling


@pytest.fixture(scope="module")
def video25(tmp_path_factory):
    """50 frames at 25 fps: frame i is at i/25 s."""
    return make_video(tmp_path_factory.mktemp("v") / "clip.mp4", 50, fps=25.0)


def run(video, tmp_path, **sampling):
    out = tmp_path / "c.h5"
    pipeline.extract_videos([video], out, **FAST, **sampling)
    cache = pipeline.open_cache(out)
    key = cache.keys()[0]
    return cache, key


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, list(range(50))),
        ({"stride": 4}, list(range(0, 50, 4))),
        ({"fps": 5.0}, list(range(0, 50, 5))),
        ({"fps": 10.0}, [math.ceil(k * 2.5) for k in range(20)]),  # the first frame at or after k/10 s
        ({"fps": 100.0}, list(range(50))),  # never duplicates frames above the native rate
        ({"max_frames": 7}, list(range(7))),
        ({"stride": 3, "max_frames": 4}, [0, 3, 6, 9]),
        ({"num_frames": 5}, [0, 12, 24, 37, 49]),  # round(linspace(0, 49, 5))
        ({"num_frames": 80}, list(range(50))),  # fewer frames than asked: all of them, once
    ],
)
def test_sampling_picks_frames_by_index_and_time(video25, tmp_path, options, expected):
    cache, key = run(video25, tmp_path, **options)
    idx = cache.frame_indices(key)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(cache.timestamps(key), idx / 25.0, atol=1e-6)
    info = cache.info(key)
    assert info["decoded_frames"] == 50 and info["native_fps"] == pytest.approx(25.0)
    assert cache.features(key).shape == (len(expected), 512)


def test_fps_sampling_with_fractional_rate(tmp_path):
    video = make_video(tmp_path / "v.avi", 40, fps=12.5)  # frames every 80 ms
    cache, key = run(video, tmp_path, fps=4.0)  # targets every 250 ms: 0, 0.25 -> 0.32, 0.5 -> 0.56, 0.75 -> 0.8 ...
    ts = cache.timestamps(key)
    np.testing.assert_allclose(ts[:5], [0.0, 0.32, 0.56, 0.8, 1.04], atol=1e-6)
    assert np.all(np.diff(np.floor(ts * 4.0 + 1e-9)) >= 1)  # at most one frame per 1/4 s interval


def test_sampling_errors_name_the_flags():
    with pytest.raises(ValueError, match="--num-frames"):
        Sampling(num_frames=4, stride=2)
    with pytest.raises(ValueError, match="--fps or --stride"):
        Sampling(fps=2, stride=2)
    with pytest.raises(ValueError, match="--stride"):
        Sampling(stride=0)


def _truncated_avi(tmp_path, frames=60, keep=0.5):
    full = make_video(tmp_path / "full.avi", frames, fps=20.0)
    data = full.read_bytes()
    path = tmp_path / "cut.avi"
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_frame_count_comes_from_decoding_not_the_header(tmp_path):
    """A truncated AVI: its header still claims 60 frames; the cache holds exactly what decodes."""
    video = _truncated_avi(tmp_path)
    cap = cv2.VideoCapture(str(video))
    header = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    decodable = len(decode_all_rgb(video))
    assert 0 < decodable < header == 60  # the file really lies
    cache, key = run(video, tmp_path)
    info = cache.info(key)
    assert info["decoded_frames"] == decodable and info["header_frame_count"] == header
    assert cache.features(key).shape[0] == decodable
    np.testing.assert_array_equal(cache.frame_indices(key), np.arange(decodable))


def test_uniform_sampling_spans_the_decoded_length_not_the_header(tmp_path):
    video = _truncated_avi(tmp_path)
    decodable = len(decode_all_rgb(video))
    cache, key = run(video, tmp_path, num_frames=3)
    np.testing.assert_array_equal(cache.frame_indices(key), np.round(np.linspace(0, decodable - 1, 3)))


def test_one_frame_video(tmp_path):
    cache, key = run(make_video(tmp_path / "one.mp4", 1), tmp_path, fps=2.0)
    assert cache.features(key).shape == (1, 512)
    np.testing.assert_array_equal(cache.frame_indices(key), [0])
