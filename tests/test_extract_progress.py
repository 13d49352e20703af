"""The extraction bar's total: estimated from frame counts (containers, frame folders) under the sampling, right
from the start on a folder mixing frame folders, MJPG and mp4v videos, and corrected as videos end."""

from __future__ import annotations

import cv2
import pytest
from helpers import make_frame_folder, make_video, pattern_frame

from pipeline.extract.decode import FrameSelector, open_source
from pipeline.extract.inputs import discover
from pipeline.extract.progress import Progress, expected_rows, sampled_rows
from pipeline.spec import Sampling

SAMPLINGS = [Sampling(), Sampling(stride=3), Sampling(fps=5), Sampling(max_frames=12), Sampling(num_frames=7)]


def write_mp4v(path, n: int, fps: float = 25.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (96, 72))
    for i in range(n):
        writer.write(cv2.cvtColor(pattern_frame(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for n in (5, 12, 30):
        make_frame_folder(root / f"folder_{n}", n)
    for n, fps in ((10, 25.0), (25, 10.0), (40, 30.0)):
        make_video(root / f"mjpg_{n}.avi", n, fps=fps)
    for n in (8, 20, 33):
        write_mp4v(root / f"mp4v_{n}.mp4", n)
    return discover([root])


def decoded_rows(item, sampling: Sampling) -> int:
    """The rows extraction keeps, by decoding every frame (the truth the estimate is checked against)."""
    source = open_source(item.path, sampling.frames_fps)
    keep = FrameSelector(sampling, source.count() if sampling.num_frames else None)
    return sum(1 for index, t, _ in source.frames(lambda i, t: False) if keep(index, t))


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: s.describe())
def test_total_is_within_10_percent_from_the_first_second(mixed, sampling):
    kinds = {item.path.suffix or "folder" for item in mixed}
    assert kinds == {".avi", ".mp4", "folder"} and len(mixed) == 9
    truth = [decoded_rows(item, sampling) for item in mixed]
    progress = Progress(mixed, sampling, enabled=False)
    try:
        assert progress.probed.wait(1.0), "the estimate took more than a second"
        assert abs(progress.total - sum(truth)) <= 0.10 * sum(truth), (progress.total, sum(truth))
        # as the videos end with their real row counts, the total follows; at the end it is exact
        for i, rows in enumerate(truth):
            progress.frames(rows)
            progress.video_done(i, rows)
            assert progress.total >= progress.n
        assert progress.total == progress.n == sum(truth)
    finally:
        progress.close()


def test_estimates_are_exact_for_frame_folders_and_these_containers(mixed):
    for item in mixed:
        assert expected_rows(item, Sampling()) == decoded_rows(item, Sampling()), item.key


def test_finished_videos_correct_the_estimates_of_their_kind(mixed):
    """A container that overstates its frames: once some videos of that kind ended with fewer rows, the others'
    estimates are scaled by the same share (frame folders keep theirs)."""
    progress = Progress(mixed, Sampling(), enabled=False)
    assert progress.probed.wait(1.0)
    videos = [i for i, item in enumerate(mixed) if item.path.is_file()]
    folders = [i for i, item in enumerate(mixed) if item.path.is_dir()]
    first = videos[0]
    half = progress.estimates[first] // 2
    progress.frames(half)
    progress.video_done(first, half)
    expected = half + sum(progress.estimates[i] for i in folders)
    expected += sum(progress.estimates[i] for i in videos[1:]) * half / progress.estimates[first]
    assert progress.total == round(expected)
    progress.close()


def test_sampled_rows_follow_the_sampling():
    assert sampled_rows(100, 25.0, Sampling()) == 100
    assert sampled_rows(100, 25.0, Sampling(stride=3)) == 34
    assert sampled_rows(100, 25.0, Sampling(fps=5)) == 20  # 4 s at 5 per second
    assert sampled_rows(100, 25.0, Sampling(max_frames=30)) == 30
    assert sampled_rows(100, 25.0, Sampling(num_frames=8)) == 8
    assert sampled_rows(5, 25.0, Sampling(num_frames=8)) == 5
    assert sampled_rows(0, 25.0, Sampling()) == 0


def test_in_a_log_the_bar_is_drawn_a_few_times_not_once_a_video(mixed, capsys):
    """stderr not a terminal (pytest captures it): finishing videos does not redraw the bar each time."""
    truth = [decoded_rows(item, Sampling()) for item in mixed] * 20  # 180 videos
    progress = Progress(mixed * 20, Sampling(), enabled=True)
    try:
        assert progress.probed.wait(5.0)
        for i, rows in enumerate(truth):
            progress.frames(rows)
            progress.video_done(i, rows)
    finally:
        progress.close()
    err = capsys.readouterr().err
    assert f"{sum(truth)}/{sum(truth)}" in err  # its last state, written when it closes
    assert err.count("videos,") <= 3, err
