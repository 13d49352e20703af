"""Caches and head checkpoints written by pipeline 0.1 (tests/data/v0.1, made by that release) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.data.cache import merge
from pipeline.train_head.checkpoint import load_checkpoint

OLD = Path(__file__).parent / "data" / "v0.1"


@pytest.fixture
def old(tmp_path) -> Path:
    shutil.copytree(OLD, tmp_path / "v0.1")  # readers may write beside the cache (a lock file)
    return tmp_path / "v0.1"


def test_an_old_cache_reads_with_the_spec_it_recorded(old):
    cache = pipeline.open_cache(old / "cache.h5")
    recorded = json.loads((old / "cache.h5.parts" / "spec.json").read_text())
    assert cache.spec.id == recorded["spec_id"]  # the id 0.1 computed, from the typed spec of today
    assert cache.spec.to_dict() == recorded["spec"]
    assert len(cache) == 8 and {cache.label(k) for k in cache.keys()} == {"class0", "class1"}
    first = cache.features("class0/v0.mp4")
    assert first.shape == (6, 8) and first.dtype == np.float16
    np.testing.assert_array_equal(first[0, :4], np.array([0.00123, 0.2988, -0.2742, -0.8906], np.float16))
    np.testing.assert_array_equal(cache.frame_indices("class0/v0.mp4"), np.arange(6))


def test_an_old_checkpoint_evaluates_and_an_old_cache_trains(old, tmp_path):
    ckpt = load_checkpoint(old / "head.pt")
    assert ckpt.feature_spec == pipeline.open_cache(old / "cache.h5").spec
    report = pipeline.evaluate(old / "head.pt", old / "cache.h5", progress=False)
    assert report.metrics["videos"] == 8
    run = pipeline.train_head(
        old / "cache.h5",
        tmp_path / "run",
        head="meanpool",
        hidden=8,
        epochs=1,
        batch_size=4,
        clip_len=4,
        progress=False,
        plots=False,
        val_fraction=0.5,
    )
    assert (
        run.summary["epochs_run"] == 1
        and load_checkpoint(tmp_path / "run" / "best.pt").feature_spec == ckpt.feature_spec
    )


def test_an_old_flat_cache_is_moved_into_subfolders_by_the_next_writer(old):
    before = pipeline.open_cache(old / "cache.h5")
    features = {k: before.features(k) for k in before.keys()}
    parts = old / "cache.h5.parts"
    assert len(list(parts.glob("*.h5"))) == 8  # 0.1 kept every part at the top of the folder
    assert merge(old / "cache.h5") == 8  # a writer opens it: moves the parts, rewrites the index
    assert not list(parts.glob("*.h5")) and len(list(parts.glob("??/*.h5"))) == 8
    after = pipeline.open_cache(old / "cache.h5")
    assert after.nested and after.unindexed_parts() == 0 and after.missing_parts() == []
    for key, feats in features.items():
        np.testing.assert_array_equal(after.features(key), feats)
    assert before.features("class0/v0.mp4").shape == (6, 8)  # an index opened before the move still finds them
