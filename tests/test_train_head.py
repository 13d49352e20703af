"""Stage two on caches written straight from arrays: heads, padding, splits, checkpoints, metrics, order-only sample."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from helpers import TINY_HEAD, feature_cache, order_videos, separable_videos

import pipeline
from pipeline.config import HEAD_EPOCHS, HEAD_MAX_EPOCHS, HEAD_MIN_STEPS, HEADS, SplitConfig, head_budget
from pipeline.data.labelled import load_labelled
from pipeline.data.sequences import (
    RamStore,
    clip_frames,
    eval_plans,
    load_sequences,
    segment_frames,
    train_plans,
)
from pipeline.data.splits import list_split, make_split, random_split
from pipeline.train_head.checkpoint import FORMAT_NAME, CheckpointError, FeatureMismatchError, load_checkpoint
from pipeline.train_head.metrics import classification_report
from pipeline.train_head.model import HeadDims, build_head
from pipeline.train_head.train import HeadRun, build_config


# ---------------------------------------------------------------------------------------------------- training
def test_overfits_a_tiny_separable_cache_and_writes_the_run_folder(tiny_run):
    _, run = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["top1"] == 1.0
    assert summary["split"]["train"] + summary["split"]["val"] == 24
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert len(rows) == summary["epochs_run"] == TINY_HEAD["epochs"]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.2 * losses[0]
    assert float(rows[-1]["train_acc"]) == 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["head"] == "lstm" and config["classes"] == ["class0", "class1", "class2"]
    for name in ("best.pt", "last.pt", "curves.png", "confusion.png"):
        assert (run / name).stat().st_size > 0, name
    cm = np.array(summary["confusion_matrix"])
    assert cm.sum() == summary["videos"] == summary["split"]["val"] and np.trace(cm) == cm.sum()


def test_default_budget_gives_small_splits_more_epochs_and_big_ones_the_same(tmp_path):
    """--epochs and --patience not given: enough epochs for HEAD_MIN_STEPS optimiser steps (at least HEAD_EPOCHS,
    at most HEAD_MAX_EPOCHS), a patience of a third of them (at least 10); recorded in config.json."""
    assert head_budget(7_600, 64) == (30, 10)  # a UCF101-sized split: 119 steps an epoch, as before
    assert head_budget(647, 64) == (110, 37)  # the order tasks of bench/heads_suite.py: 11 steps an epoch
    assert head_budget(10, 64) == (HEAD_MAX_EPOCHS, round(HEAD_MAX_EPOCHS / 3))
    assert head_budget(2_000, 8)[0] == HEAD_EPOCHS and 2_000 / 8 * HEAD_EPOCHS >= HEAD_MIN_STEPS
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=8))
    data = load_labelled(cache, build_config(tmp_path / "load", progress=False))
    train = len(data.split.train)
    for options, expected in (
        ({}, head_budget(train, 64)),
        ({"batch_size": 4}, head_budget(train, 4)),
        ({"epochs": 60}, (60, 20)),
        ({"epochs": 5}, (5, 10)),
        ({"patience": 0}, (head_budget(train, 64)[0], 0)),
    ):
        run = HeadRun(
            build_config(tmp_path / "run", progress=False, overwrite=True, **options), data, torch.device("cpu")
        )
        run.close()
        recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
        assert (run.cfg.epochs, run.cfg.patience) == (recorded["epochs"], recorded["patience"]) == expected, options


def test_same_seed_same_result_other_seed_other_result(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=5))
    opts = {**TINY_HEAD, "epochs": 3}
    runs = [
        pipeline.train_head(cache, tmp_path / name, head="gru", seed=seed, **opts)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    a, b, c = (load_checkpoint(r.out / "last.pt").state_dict for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (runs[0].out / "metrics.csv").read_text().split("\n")[1].split(",")[1] == (
        runs[1].out / "metrics.csv"
    ).read_text().split("\n")[1].split(",")[1]


@pytest.mark.parametrize("head", [h for h in HEADS if h != "lstm"])
def test_every_head_learns_the_separable_cache(tmp_path, head):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=6))
    result = pipeline.train_head(cache, tmp_path / head, head=head, **{**TINY_HEAD, "epochs": 8})
    assert result.top1 >= 0.8, result.summary_line()


def test_lazy_store_trains_exactly_like_the_ram_store(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=4))
    opts = {**TINY_HEAD, "epochs": 2}
    ram = pipeline.train_head(cache, tmp_path / "ram", memory="ram", **opts)
    lazy = pipeline.train_head(cache, tmp_path / "lazy", memory="lazy", workers=0, **opts)
    assert json.loads((tmp_path / "lazy" / "config.json").read_text())["in_memory"] is False
    a = load_checkpoint(ram.out / "last.pt").state_dict
    b = load_checkpoint(lazy.out / "last.pt").state_dict
    # Same batches; the two stores sum the input statistics in other chunks (float32 rounding, ~1e-6), which two
    # epochs of segment sampling carry into the weights at a few 1e-6.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_lazy_worker_batches_equal_ram_batches(tmp_path):
    from pipeline.data.sequences import batches

    c = pipeline.open_cache(feature_cache(tmp_path / "c.h5", separable_videos(per_class=3)))
    keys = c.keys()
    ram = load_sequences(c, keys, "ram", progress=False)
    lazy = load_sequences(c, keys, "lazy", progress=False)
    assert isinstance(ram, RamStore) and not lazy.in_memory
    plans = train_plans(ram.lengths, np.zeros(len(keys), np.int64), 4, 6, 2, np.random.default_rng(0))
    for got, want in zip(batches(lazy, plans, workers=1), batches(ram, plans), strict=True):
        torch.testing.assert_close(got.x, want.x)
        assert torch.equal(got.lengths, want.lengths)
    plan = eval_plans(np.array([0]), ram.lengths, np.zeros(len(keys), np.int64), 1, None, 1, 0)[0]
    assert ram.gather(plan).x[0].numpy().tolist() == c.features(keys[0]).astype(np.float32).tolist()


# ------------------------------------------------------------------------------------------------- padding, clips
@pytest.mark.parametrize("head", HEADS)
def test_a_sequence_gives_the_same_logits_alone_and_padded_in_a_batch(head):
    torch.manual_seed(0)
    model = build_head(
        HeadDims(head=head, in_dim=12, num_classes=5, hidden=32, layers=2, dropout=0.3, activation="gelu")
    ).eval()
    short = torch.randn(1, 4, 12)
    batch = torch.randn(3, 9, 12) * 5  # padded steps hold garbage: only masking/packing can make them harmless
    batch[1, :4] = short[0]
    lengths = torch.tensor([9, 4, 7])
    with torch.inference_mode():
        alone = model(short, torch.tensor([4]))
        padded = model(batch, lengths)
        longer_alone = model(batch[2:3, :7], torch.tensor([7]))
    torch.testing.assert_close(padded[1:2], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[2:3], longer_alone, rtol=1e-4, atol=1e-5)
    if head != "meanpool":  # order matters to every temporal head
        with torch.inference_mode():
            assert not torch.allclose(model(short.flip(1), torch.tensor([4])), alone, atol=1e-4)


def test_clip_plans():
    lengths = np.array([20, 3, 8])
    frames = clip_frames(lengths, 4, 2, np.array([5, 9, 1]))
    assert frames.tolist() == [[5, 7, 9, 11], [0, 2, -1, -1], [1, 3, 5, 7]]
    whole = clip_frames(lengths, None, 3)
    assert whole.tolist() == [[0, 3, 6, 9, 12, 15, 18], [0, -1, -1, -1, -1, -1, -1], [0, 3, 6, -1, -1, -1, -1]]
    plans = train_plans(lengths, np.array([0, 1, 2]), 2, 4, 2, np.random.default_rng(0))
    assert sorted(v for p in plans for v in p.videos) == [0, 1, 2]
    for p in plans:
        for v, f in zip(p.videos, p.rows, strict=True):
            real = f[f >= 0]
            assert (np.diff(real) == 2).all() and real.max() < lengths[v]
    # three evenly spaced clips: the first starts at row 0, the last ends at the last row
    (plan,) = eval_plans(np.array([0]), lengths, np.zeros(3, np.int64), 8, 4, 2, 3)
    assert sorted(plan.rows[:, 0].tolist()) == [0, 6, 13]
    assert plan.rows.max() == 19 and (plan.owners == 0).all()


def test_segment_plans_spread_over_the_whole_video():
    lengths = np.array([40, 3, 9])
    centres = segment_frames(lengths, 4, 1)
    assert centres.tolist() == [[5, 15, 25, 35], [0, 1, 2, -1], [1, 3, 5, 7]]
    assert segment_frames(lengths, 4, 2).tolist() == [[4, 14, 24, 34], [0, 2, -1, -1], [0, 2, 4, 8]]
    # training: one random row of each segment, so every row of a video can be drawn and the order is kept
    seen = set()
    for epoch in range(100):
        for plan in train_plans(lengths, np.zeros(3, np.int64), 3, 4, 1, np.random.default_rng(epoch), "segments"):
            for v, f in zip(plan.videos, plan.rows, strict=True):
                real = f[f >= 0]
                assert (np.diff(real) > 0).all() and real.max() < lengths[v]
                if v == 0:
                    assert [r // 10 for r in real] == [0, 1, 2, 3]
                    seen.update(real.tolist())
    assert seen == set(range(40))
    # evaluation: the centres, or N views at evenly spaced offsets of every segment; a short video has one view
    (plan,) = eval_plans(np.array([0, 1]), lengths, np.zeros(3, np.int64), 8, 4, 1, 0, "segments")
    assert plan.rows.tolist() == [[5, 15, 25, 35], [0, 1, 2, -1]]
    (plan,) = eval_plans(np.array([0, 1]), lengths, np.zeros(3, np.int64), 8, 4, 1, 2, "segments")
    assert sorted(plan.rows.tolist()) == [[0, 1, 2, -1], [2, 12, 22, 32], [7, 17, 27, 37]]
    assert sorted(plan.owners.tolist()) == [0, 0, 1]


def _far_apart_events(per_class: int = 32, length: int = 80, dim: int = 8, seed: int = 0) -> list[tuple]:
    """Noise videos with two 6-row events 30+ rows apart, away from the ends: P then Q (class 'pq') or Q then P
    ('qp'). Each event alone says nothing, wherever it sits in a window; only their order does, and no 16-row window
    holds both."""
    rng = np.random.default_rng(seed)
    p, q = np.eye(dim)[0] * 4, np.eye(dim)[1] * 4
    videos = []
    for label, (first, second) in (("pq", (p, q)), ("qp", (q, p))):
        for k in range(per_class):
            x = rng.normal(0, 0.5, (length, dim))
            a, b = int(rng.integers(8, 24)), int(rng.integers(length - 28, length - 12))
            x[a : a + 6] += first
            x[b : b + 6] += second
            videos.append((f"{label}/v{k:03d}.mp4", x, label, None))
    return videos


def test_default_sampling_sees_the_whole_video_where_a_crop_cannot(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", _far_apart_events())
    opts = {**TINY_HEAD, "head": "gru", "epochs": 15}
    del opts["clip_len"]
    default = pipeline.train_head(cache, tmp_path / "default", **opts)
    crop = pipeline.train_head(cache, tmp_path / "crop", sampling="crop", **opts)
    assert default.summary["eval"] == "centres of 16 segments (shorter videos whole)"
    assert default.top1 >= 0.9, default.summary_line()
    assert crop.top1 <= 0.7, crop.summary_line()


def test_clip_len_is_a_maximum_for_short_videos(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=4))  # 5 to 12 rows
    for sampling in ("segments", "crop"):
        run = pipeline.train_head(
            cache, tmp_path / sampling, sampling=sampling, **{**TINY_HEAD, "clip_len": 16, "epochs": 2}
        )
        assert run.summary["epochs_run"] == 2
    assert pipeline.TrainConfig(out=tmp_path, clip_len=0).sampling == "whole"
    with pytest.raises(ValueError, match="--sampling"):
        pipeline.TrainConfig(out=tmp_path, sampling="random")


def test_checkpoints_record_their_sampling_and_old_ones_load_as_crop(tiny_run, tmp_path):
    cache, run = tiny_run
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.sampling == "segments" and ckpt.clip_len == 5
    report = pipeline.evaluate(run / "best.pt", cache, progress=False)
    assert report.eval == "centres of 5 segments (shorter videos whole)"
    # a checkpoint written before the field existed: trained on crops, scored on whole sequences as it was then
    raw = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    del raw["sampling"]
    torch.save(raw, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.sampling == "crop"
    report = pipeline.evaluate(tmp_path / "old.pt", cache, progress=False)
    assert report.eval == "whole sequences"
    assert (
        pipeline.evaluate(tmp_path / "old.pt", cache, eval_clips=2, progress=False).eval == "mean of 2 clips of 5 rows"
    )


# ------------------------------------------------------------------------------------------------------ splits
def _ucf_like_labels(groups: int = 10, clips: int = 4, classes: int = 5) -> dict[str, str]:
    return {
        f"C{c}/v_C{c}_g{g:02d}_c{k:02d}.avi": f"C{c}"
        for c in range(classes)
        for g in range(1, groups + 1)
        for k in range(1, clips + 1)
    }


def test_random_split_is_stratified_and_stable_when_videos_are_added():
    labels = _ucf_like_labels(groups=20)
    first = random_split(labels, 0.25, seed=3)
    val_share = {
        c: sum(labels[k] == c for k in first.val) / sum(v == c for v in labels.values()) for c in set(labels.values())
    }
    assert all(0.1 <= s <= 0.45 for s in val_share.values()), val_share
    more = {
        **labels,
        **{f"C{c}/v_C{c}_g{g:02d}_c{k:02d}.avi": f"C{c}" for c in range(7) for g in range(21, 31) for k in range(1, 5)},
    }
    second = random_split(more, 0.25, seed=3)
    assert set(first.val) <= set(second.val) and set(first.train) <= set(second.train)
    assert set(random_split(labels, 0.25, seed=4).val) != set(first.val)


def test_a_tiny_dataset_keeps_every_class_in_train():
    from pipeline.data.splits import stable_unit

    # one video per class for 12 classes (some hash into val), and two larger classes so that val is not empty
    labels = {f"solo{c}/only.mp4": f"solo{c}" for c in range(12)}
    labels.update({f"{c}/v{k}.mp4": c for c in ("big1", "big2") for k in range(6)})
    assert any(stable_unit(k, 0) < 0.2 for k in labels if k.startswith("solo")), "no lone video hashes into val"
    split = make_split(labels, SplitConfig(val_fraction=0.2, split_seed=0))
    assert {labels[k] for k in split.train} == set(labels.values())
    assert all(k in split.train for k in labels if k.startswith("solo")) and split.val


def test_group_regex_keeps_each_group_on_one_side():
    labels = _ucf_like_labels()

    def straddling(split):
        def group(k):
            return k.split("_g")[1][:2]

        return {group(k) for k in split.train} & {group(k) for k in split.val}

    assert straddling(random_split(labels, 0.3, seed=0))  # without groups, clips of one group land on both sides
    grouped = random_split(labels, 0.3, seed=0, group_regex=r"_g(\d+)_")
    assert not straddling(grouped) and grouped.val and grouped.train
    assert set(grouped.train) | set(grouped.val) == set(labels)


def test_official_lists_and_split_column(tmp_path):
    labels = _ucf_like_labels(groups=3, clips=2, classes=2)
    keys = ["UCF-101/" + k for k in labels]  # the cache was made from the dataset's parent folder
    labels = {"UCF-101/" + k: v for k, v in labels.items()}
    train_list = tmp_path / "trainlist01.txt"
    test_list = tmp_path / "testlist01.txt"
    train_list.write_text(
        "".join(f"C{c}/v_C{c}_g{g:02d}_c{k:02d}.avi {c + 1}\n" for c in range(2) for g in (2, 3) for k in (1, 2))
    )
    test_list.write_text("".join(f"C{c}/v_C{c}_g01_c{k:02d}.avi\n" for c in range(2) for k in (1, 2)))
    split = list_split(keys, labels, train_list, test_list)
    assert len(split.train) == 8 and len(split.val) == 4
    assert all("_g01_" in k for k in split.val)
    only_test = list_split(keys, labels, None, test_list)  # the train side is everything else
    assert sorted(only_test.train) == sorted(split.train)
    column = make_split(labels, cache_splits={k: ("test" if "_g01_" in k else "train") for k in keys})
    assert sorted(column.val) == sorted(split.val) and column.method == "split column of the cache"


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tiny_run, tmp_path):
    cache, run = tiny_run
    raw = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["classes"] == ["class0", "class1", "class2"]
    assert raw["feature_spec"]["backbone"] == "synthetic" and raw["dims"]["head"] == "lstm"
    ckpt = load_checkpoint(run / "best.pt")
    c = pipeline.open_cache(cache)
    key = c.keys()[0]
    x = torch.from_numpy(c.features(key).astype(np.float32))[None]
    model = ckpt.model()
    with torch.inference_mode():
        logits = model(x, torch.tensor([x.shape[1]]))
    assert ckpt.classes[int(logits.argmax())] == c.label(key)
    # evaluate on the training cache scores the val videos (the summary's val accuracy), the training ones apart
    report = pipeline.evaluate(run / "best.pt", cache, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert report.metrics["videos"] == summary["videos"] and report.metrics["top1"] == summary["top1"] == 1.0
    assert report.seen["videos"] + report.metrics["videos"] == 24 and not report.only_seen
    assert ckpt.metrics["top1"] == summary["top1"] and ckpt.epoch == summary["best_epoch"]


@pytest.mark.parametrize(
    "change", [dict(backbone="resnet50"), dict(weights="ResNet18_Weights.IMAGENET1K_V1"), dict(crop=112)]
)
def test_a_cache_of_other_features_is_refused_naming_both(tiny_run, tmp_path, change):
    _, run = tiny_run
    other = feature_cache(tmp_path / "other.h5", separable_videos(), **change)
    with pytest.raises(FeatureMismatchError) as e:
        pipeline.evaluate(run / "best.pt", other, progress=False)
    text = str(e.value)
    assert str(run / "best.pt") in text and str(other) in text
    field = next(iter(change)) if "crop" not in change else "preprocessing"
    assert f"{field}:" in text


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would create the marker file
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 1, "payload": _Payload(marker)}, evil)
    with open(evil.with_suffix(".pkl"), "wb") as f:  # a plain pickle too, not a torch zip file
        pickle.dump({"format": FORMAT_NAME, "payload": _Payload(marker)}, f)
    for path in (evil, evil.with_suffix(".pkl")):
        with pytest.raises(CheckpointError, match=r"refusing|cannot read"):
            load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a pipeline head checkpoint"):
        torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
        load_checkpoint(tmp_path / "plain.pt")


# ---------------------------------------------------------------------------------------------------- metrics
def test_without_matplotlib_plots_are_skipped_with_one_warning_saying_how_to_get_them(tmp_path, monkeypatch, caplog):
    import sys

    from pipeline.train_head import metrics

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(metrics, "_said_no_plots", False)
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=4))
    with caplog.at_level("WARNING"):
        for name in ("a", "b"):
            pipeline.train_head(cache, tmp_path / name, **{**TINY_HEAD, "epochs": 1, "plots": True})
    said = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert said == [
        (
            "matplotlib is not installed: plots are skipped (get them with pip install 'framecache[plots]', "
            "or pass --no-plots)"
        )
    ]
    assert (tmp_path / "a" / "summary.json").is_file() and not (tmp_path / "a" / "curves.png").exists()


def test_classification_report_against_a_hand_computed_confusion_matrix():
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]]
    )
    y = np.array([0, 0, 1, 2, 2, 2])
    r = classification_report(probs, y, ["a", "b", "c"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert r["top1"] == pytest.approx(4 / 6)
    assert r["per_class_accuracy"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 2 / 3})
    assert r["top5"] == 1.0  # 3 classes: top-5 is top-3
    assert r["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.8, 0.7, 0.4, 0.6])))


def test_evaluate_matches_a_confusion_matrix_computed_by_hand(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=6))
    # a deliberately undertrained head, so that the confusion matrix has off-diagonal entries
    pipeline.train_head(cache, tmp_path / "run", head="meanpool", **{**TINY_HEAD, "epochs": 1, "lr": 1e-4})
    test = feature_cache(tmp_path / "test.h5", separable_videos(seed=7, per_class=5))
    report = pipeline.evaluate(tmp_path / "run" / "best.pt", test, progress=False, batch_size=4)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    model = ckpt.model()
    c = pipeline.open_cache(test)
    cm = [[0] * 3 for _ in range(3)]
    for key in c:  # one video at a time, no padding, no batching
        x = torch.from_numpy(c.features(key).astype(np.float32))[None]
        with torch.inference_mode():
            pred = int(model(x, torch.tensor([x.shape[1]])).argmax())
        cm[ckpt.classes.index(c.label(key))][pred] += 1
    assert report.metrics["confusion_matrix"] == cm
    assert report.metrics["top1"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 15)
    assert sum(cm[i][i] for i in range(3)) < 15, "the head should not be perfect for this check to mean much"


# --------------------------------------------------------------------------------------------- order-only sample
def test_meanpool_is_at_chance_and_lstm_high_on_the_order_only_sample(tmp_path):
    cache = feature_cache(tmp_path / "train.h5", order_videos(seed=0))
    test = feature_cache(tmp_path / "test.h5", order_videos(seed=1, base_clips=12))
    opts = {**TINY_HEAD, "epochs": 20, "batch_size": 8, "lr": 5e-3, "clip_len": 16, "group_regex": r"clip_(\d+)"}
    top1 = {}
    for head in ("lstm", "meanpool"):
        pipeline.train_head(cache, tmp_path / head, head=head, **opts)
        top1[head] = pipeline.evaluate(tmp_path / head / "best.pt", test, progress=False).metrics["top1"]
    assert top1["lstm"] >= 0.85, top1
    assert top1["meanpool"] <= 0.3, top1
