"""The refit of `pipeline sweep --reduce-dim` (sweep/refit.py): the best settings trained again on the full
features, exactly as train-head trains them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SWEEP_QUICK, SWEEP_TRIAL, feature_cache, metric_rows, separable_videos

import pipeline
from pipeline.train_head.checkpoint import load_checkpoint

TRIAL, QUICK = SWEEP_TRIAL, SWEEP_QUICK


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return feature_cache(tmp_path_factory.mktemp("refit") / "c.h5", separable_videos(per_class=6))


def test_a_reduced_sweep_refits_the_best_settings_on_the_full_features(cache, tmp_path):
    params = ["head=meanpool", "lr=0.001,0.03", "hidden=16", *TRIAL]
    shared = {
        "head": "meanpool",
        "hidden": 16,
        "epochs": 3,
        "batch_size": 8,
        "clip_len": 5,
        "plots": False,
        "progress": False,
        "threads": 2,
    }
    dim = pipeline.open_cache(cache).spec.dim
    # --refit 1: the best trial's settings, trained on the full features exactly as train-head trains them
    out = tmp_path / "one"
    result = pipeline.sweep(cache, out, params=params, strategy="grid", pruner="none", reduce_dim=4, refit=1, **QUICK)
    refit = result.refit
    assert refit["trial"] == result.best["trial"] and refit["of"] == 1
    assert Path(refit["run"]) == out / "refit" / f"{refit['trial']:04d}"
    assert f"refit of the 1 best on the full features: {refit['top1']:.1%}" in result.summary_line()
    best = load_checkpoint(out / "best.pt")
    assert best.dims.in_dim == dim and "reduction" not in best.config  # trained on the full features
    assert result.best["params"] == {"lr": refit["params"]["lr"]}  # a one-value parameter is fixed, not searched
    direct = pipeline.train_head(cache, tmp_path / "direct", lr=refit["params"]["lr"], **shared)
    assert direct.summary["top1"] == refit["top1"] and direct.summary["val_loss"] == pytest.approx(refit["val_loss"])
    timeless = [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in metric_rows(direct.out)]
    assert timeless == [
        {k: v for k, v in r.items() if not k.endswith("_seconds")} for r in metric_rows(Path(refit["run"]))
    ]

    # the default refits the 3 best (here both trials, one stack) and keeps the better one as best.pt
    out = tmp_path / "default"
    result = pipeline.sweep(cache, out, params=params, strategy="grid", pruner="none", reduce_dim=4, **QUICK)
    recorded = json.loads((out / "best.json").read_text())
    refits = recorded["refits"]
    assert sorted(r["trial"] for r in refits) == [0, 1] and result.refit["of"] == 2
    winner = max(refits, key=lambda r: (r["top1"], -r["val_loss"]))
    assert result.refit["trial"] == winner["trial"] == recorded["trial"]
    assert load_checkpoint(out / "best.pt").metrics["top1"] == winner["top1"]
    for r in refits:  # trained as one stack: each as train-head would train it, up to rounding
        alone = (
            json.loads((tmp_path / "direct" / "summary.json").read_text())
            if r["params"]["lr"] == refit["params"]["lr"]
            else pipeline.train_head(cache, tmp_path / "other", lr=r["params"]["lr"], **shared).summary
        )
        assert r["top1"] == alone["top1"] and r["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="--refit trains the best settings again"):
        pipeline.sweep(cache, tmp_path / "x", params=params, refit=2, **QUICK)
