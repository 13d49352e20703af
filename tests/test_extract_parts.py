"""The run loop's parts alone: the batcher cuts chunks into fixed-shape batches and gives every row back to its
owner; the sink commits a video once it ended and all its rows are back, and fails it on non-finite features."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.data.cache import CacheWriter
from pipeline.data.synthetic import synthetic_spec
from pipeline.extract.batcher import Batcher, Owner
from pipeline.extract.inputs import VideoItem
from pipeline.extract.sink import PartSink


def _chunk(video: int, start: int, n: int) -> tuple[Owner, torch.Tensor]:
    idx = np.arange(start, start + n)
    crops = torch.stack([torch.full((3, 2, 2), 10 * video + f % 10, dtype=torch.uint8) for f in idx.tolist()])
    return Owner(video, 0, idx, idx / 25.0), crops


def test_batches_have_one_shape_and_every_row_returns_to_its_owner():
    batcher = Batcher(4)
    sizes = [(0, 0, 3), (1, 0, 5), (0, 3, 2), (2, 0, 1)]
    for video, start, n in sizes:
        batcher.add(*_chunk(video, start, n))
    got: dict[int, list[int]] = {}
    real = 0
    while batcher.queued:
        batch, rows, owners = batcher.take()
        assert batch.shape == (4, 3, 2, 2) and rows == sum(len(o) for o in owners)
        assert (batch[rows:] == 0).all()  # padding
        row = 0
        for owner in owners:
            for k, f in enumerate(owner.frame_indices.tolist()):
                assert batch[row + k, 0, 0, 0] == 10 * owner.video + f % 10
                got.setdefault(owner.video, []).append(f)
            row += len(owner)
        real += rows
    assert real == 11 and got == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4], 2: [0]}


def test_dropping_a_video_forgets_only_its_rows():
    batcher = Batcher(8)
    batcher.add(*_chunk(0, 0, 3))
    batcher.add(*_chunk(1, 0, 4))
    batcher.add(*_chunk(0, 3, 2))
    batcher.drop(0)
    assert batcher.queued == 4
    _, rows, owners = batcher.take()
    assert rows == 4 and [o.video for o in owners] == [1]


def _sink(tmp_path: Path, n: int) -> tuple[PartSink, CacheWriter, list[VideoItem]]:
    writer = CacheWriter(tmp_path / "c.h5", synthetic_spec(4), "float16")
    items = [VideoItem(f"v{k}.avi", tmp_path / f"v{k}.avi", "a", "") for k in range(n)]

    def attrs(i: int) -> dict:
        return {"key": items[i].key, "source_path": str(items[i].path), "label": "a", "spec_id": writer.spec.id}

    return PartSink(writer, items, attrs), writer, items


def test_the_sink_commits_a_video_once_ended_and_complete(tmp_path):
    sink, writer, items = _sink(tmp_path, 2)
    owner = Owner(0, 0, np.arange(3), np.arange(3) / 25.0)
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    sink.expect(0, 3)
    sink.features(feats[:2], [Owner(0, 0, owner.frame_indices[:2], owner.timestamps[:2])], alive=lambda o: True)
    sink.ended_video(0, {"decoded_frames": 3})  # ended with a row still at the model: not committed yet
    time.sleep(0.2)
    assert sink.drain() == [] and not writer.part_path("v0.avi").exists()
    sink.features(feats[2:], [Owner(0, 0, owner.frame_indices[2:], owner.timestamps[2:])], alive=lambda o: True)
    outcomes = sink.close()
    assert [(o.video, o.error) for o in outcomes] == [(0, None)]
    writer.write_index()
    writer.close()
    cache = pipeline.open_cache(tmp_path / "c.h5")
    np.testing.assert_array_equal(cache.features("v0.avi"), feats.astype(np.float16))
    np.testing.assert_array_equal(cache.frame_indices("v0.avi"), [0, 1, 2])
    assert cache.info("v0.avi")["decoded_frames"] == 3


def test_the_sink_fails_a_video_with_non_finite_features_and_records_why(tmp_path):
    sink, writer, items = _sink(tmp_path, 2)
    bad = np.full((2, 4), np.inf, dtype=np.float32)
    sink.expect(1, 2)
    sink.features(bad, [Owner(1, 0, np.arange(2), np.arange(2) / 25.0)], alive=lambda o: True)
    sink.ended_video(1, {"decoded_frames": 2})
    outcomes = sink.close()
    assert len(outcomes) == 1 and outcomes[0].video == 1 and "non-finite" in outcomes[0].error
    writer.write_index()
    writer.close()
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert len(cache) == 0 and "non-finite" in cache.failures()[0]["reason"]


def test_the_report_separates_start_up_from_the_steady_state(tmp_path):
    from helpers import FAST, make_video

    for k in range(3):
        make_video(tmp_path / "v" / f"v{k}.avi", 12, offset=k)
    report = pipeline.extract_videos([tmp_path / "v"], tmp_path / "c.h5", **{**FAST, "batch_size": 4})
    start = report.startup
    assert set(start) == {"process", "setup", "first_batch", "first_frames"} and start["first_frames"] == 4
    assert 0 < start["setup"] + start["first_batch"] < report.seconds and start["process"] > 0
    assert report.steady_fps > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_the_graphed_forward_gives_the_eager_features_bit_for_bit():
    from pipeline.extract.backbone import FrameEmbedder, load_backbone

    loaded = load_backbone("resnet18", "none", resize=64, crop=56, progress=False)
    device = torch.device("cuda")
    eager, graphed = FrameEmbedder(loaded, device), FrameEmbedder(loaded, device, graph=True)
    for seed in range(3):  # replays of one captured graph, with new inputs each time
        frames = torch.randint(0, 256, (8, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(eager(frames), graphed(frames))
    assert graphed._graphs[(8, 3, 56, 56)] is not None
