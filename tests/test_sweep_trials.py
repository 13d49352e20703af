"""The trial loop of `pipeline sweep` (sweep/trials.py): each setting trained once, pruning, the time budget, trials
asked ahead, and the trials' training budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SWEEP_QUICK, SWEEP_TRIAL, feature_cache, order_videos, separable_videos, study_trials

import pipeline
from pipeline.config import HEAD_MIN_PATIENCE, SWEEP_PATIENCE_SHARE, SweepConfig, head_budget, head_patience
from pipeline.train_head.checkpoint import load_checkpoint

TRIAL, QUICK = SWEEP_TRIAL, SWEEP_QUICK


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return feature_cache(tmp_path_factory.mktemp("trials") / "c.h5", separable_videos(per_class=6))


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_a_sweep_never_trains_the_same_settings_twice(cache, tmp_path, strategy):
    out = tmp_path / strategy
    result = pipeline.sweep(
        cache,
        out,
        params=["head=meanpool", "hidden=8,16", "lr=0.01,0.02", *TRIAL],
        strategy=strategy,
        trials=12,
        pruner="none",
        **QUICK,
    )
    trained = [r["params"] for r in result.rows]
    assert len(trained) == 4 and len({(p["hidden"], p["lr"]) for p in trained}) == 4
    assert len(list((out / "trials").iterdir())) == 4
    duplicates = [t for t in study_trials(out) if "duplicate_of" in t.user_attrs]
    assert duplicates, "the sampler never drew trained settings again: the test space is too large"
    for t in duplicates:  # told without training: the earlier trial's value, or pruned
        earlier = next(e for e in study_trials(out) if e.number == t.user_attrs["duplicate_of"])
        assert t.params == earlier.params and "run" not in t.user_attrs
        assert t.value == earlier.value or t.state.name == "PRUNED"


def test_pruning_stops_weak_trials_after_the_warmup(cache, tmp_path):
    out = tmp_path / "pruned"
    # lr 1e-5 barely moves a head in 8 epochs; lr 0.03 separates the classes in one or two
    result = pipeline.sweep(
        cache,
        out,
        params=["lr=0.00001,0.03", "seed=0,1,2", "epochs=8", "batch_size=8", "clip_len=5", "hidden=16"],
        strategy="grid",
        pruner="median",
        prune_warmup=2,
        **QUICK,
    )
    pruned = [r for r in result.rows if r["state"] == "pruned"]
    assert pruned, result.table()
    for r in pruned:
        assert 2 <= r["epochs_run"] < 8 and r["stopped"] == f"pruned at epoch {r['epochs_run']}"
        assert len((Path(r["run"]) / "metrics.csv").read_text().split()) - 1 == r["epochs_run"]
        assert not (Path(r["run"]) / "summary.json").exists()  # stopped like an interrupted train-head run
    assert result.best["state"] == "complete" and result.best["params"]["lr"] == 0.03
    assert sum(r["epochs_run"] for r in result.rows) < 6 * 8


def test_timeout_stops_the_running_trial_at_an_epoch_end(cache, tmp_path):
    result = pipeline.sweep(
        cache,
        tmp_path / "t",
        params=["hidden=8,16", "epochs=100000", "batch_size=8", "clip_len=5"],
        timeout=4.0,  # room for the first trial to start on a busy machine
        pruner="none",
        **QUICK,
    )
    (row,) = result.rows
    assert row["state"] == "pruned" and row["stopped"] == "timeout" and row["epochs_run"] >= 1
    # stopped at the end of an epoch: every epoch it ran is in metrics.csv, and last.pt is the last of them
    run = tmp_path / "t" / "trials" / f"{row['trial']:04d}"
    assert len((run / "metrics.csv").read_text().splitlines()) - 1 == row["epochs_run"]
    assert load_checkpoint(run / "last.pt").epoch == row["epochs_run"]


def test_trials_asked_ahead_but_not_started_wait_for_the_next_run(cache, tmp_path):
    out = tmp_path / "ahead"
    params = ["head=gru,lstm", "hidden=8,16", "epochs=100000", "batch_size=8", "clip_len=5"]
    first = pipeline.sweep(cache, out, params=params, strategy="grid", stack=4, timeout=1.5, **QUICK)
    # the one trial that started ran into the time budget; the three others never started and wait for a next run
    (row,) = [r for r in first.rows if r["state"] != "waiting"]
    assert row["stopped"] == "timeout" and first.trials_here == 1 and first.counts() == {"pruned": 1, "waiting": 3}
    trials = study_trials(out)
    waiting = [t for t in trials if t.state.name == "WAITING"]
    unstarted = [t for t in trials if t.user_attrs.get("surplus")]
    assert len(waiting) == len(unstarted) == 3
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert sorted(map(str, queued)) == sorted(map(str, (t.params for t in unstarted)))
    assert row["params"] not in queued
    assert sorted(map(str, (r["params"] for r in first.rows if r["state"] == "waiting"))) == sorted(map(str, queued))
    second = pipeline.sweep(cache, out, params=params, strategy="grid", stack=1, timeout=1.5, resume=True, **QUICK)
    started = [r for r in second.rows if r["trial"] != row["trial"] and r["state"] != "waiting"]
    assert len(started) == 1 and started[0]["params"] in queued
    assert second.counts() == {"pruned": 2, "waiting": 2}


def test_a_trial_trains_for_the_heads_budget_with_a_shorter_patience(tmp_path):
    sweep = SweepConfig(out=tmp_path / "s")
    # UCF101-sized, the order tasks, a tiny split: train-head's epochs, a tenth of them as patience (at least 10)
    for train, budget in ((7_600, (30, 10)), (647, (110, 11)), (13, (400, 40))):
        cfg = sweep.train_config(tmp_path / "t", train)
        assert (cfg.epochs, cfg.patience) == budget and cfg.epochs == head_budget(train, 64)[0]
    assert SWEEP_PATIENCE_SHARE == 1 / 10 and head_budget(13, 64) == (400, 133)
    assert sweep.train_config(tmp_path / "t", 13, patience=5).patience == 5  # a space that sets it keeps it
    assert sweep.train_config(tmp_path / "t", 13, epochs=50).patience == HEAD_MIN_PATIENCE
    assert head_patience(400) == 133  # train-head's own, unchanged

    # A real trial records what it trained with: 400 epochs for 13 train videos, and stops 40 epochs after its best
    # (an order-blind mean-pool head on an order-only task learns nothing that holds on val for long).
    order = feature_cache(tmp_path / "order.h5", order_videos(base_clips=4))
    params = ["head=meanpool", "hidden=8", "lr=0.03,0.01"]
    result = pipeline.sweep(order, tmp_path / "s", params=params, trials=1, pruner="none", **QUICK)
    (row,) = result.rows
    train = json.loads((Path(row["run"]) / "config.json").read_text())["train"]
    assert (train["epochs"], train["patience"]) == (400, 40)
    summary = json.loads((Path(row["run"]) / "summary.json").read_text())
    assert summary["epochs_run"] - summary["best_epoch"] == 40 and row["epochs_run"] == summary["epochs_run"] < 400
