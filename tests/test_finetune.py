"""Stage three on tiny real videos (ResNet-18, random weights, 56-pixel crops, CPU): what a frame is stays the same
across the stages, only the unfrozen parts train, and the fine-tuned backbone flows into predict and extract."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import FAST, decode_all_rgb, feature_cache, make_frame_folder, make_video, separable_videos
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, app
from pipeline.config import FINETUNE_CLIP_LEN
from pipeline.data.sequences import eval_plans, segment_frames
from pipeline.data.splits import read_split
from pipeline.extract.backbone import FINETUNED_PREFIX, WeightsError, load_backbone, tensors_sha256
from pipeline.extract.decode import VideoSource
from pipeline.finetune.clips import (
    SEEK,
    SEEK_BACKOFF,
    SEQUENTIAL,
    WALK,
    ClipAugment,
    ClipDataset,
    ClipJob,
    VideoRecord,
    clip_batches,
    read_video_frames,
)
from pipeline.finetune.model import FinetuneModel, UnfreezeError, backbone_stages, resolve_unfreeze
from pipeline.finetune.train import ClipSampling
from pipeline.finetune.train import build_config as build_finetune_config
from pipeline.predict import checkpoint_backbone
from pipeline.train_head.checkpoint import load_checkpoint

runner = CliRunner()
HEAD = dict(
    head="lstm",
    hidden=32,
    epochs=8,
    batch_size=4,
    lr=1e-2,
    clip_len=4,
    patience=0,
    val_fraction=0.3,
    split_seed=3,
    progress=False,
    plots=False,
    threads=2,
)
TUNE = dict(epochs=1, batch_size=4, clip_len=4, workers=0, progress=False, plots=False, threads=2)


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """Two classes of 12-frame clips (MJPG .avi, mp4v .mp4 and a PNG folder each), a float32 cache, an LSTM head."""
    root = tmp_path_factory.mktemp("ft")
    videos = root / "videos"
    for c, offset in (("a", 0), ("b", 40)):
        for k in range(4):
            make_video(videos / c / f"clip{k}{'.avi' if k % 2 else '.mp4'}", 12, offset=offset + 3 * k)
        make_frame_folder(videos / c / "frames", 12)
    assert pipeline.extract_videos([videos], root / "cache.h5", dtype="float32", **FAST).ok
    pipeline.train_head(root / "cache.h5", root / "run", **HEAD)
    return root


def start_model(ckpt_path, **options) -> tuple[FinetuneModel, object]:
    ckpt = load_checkpoint(ckpt_path)
    loaded = checkpoint_backbone(ckpt, ckpt_path)
    return FinetuneModel(loaded.model, ckpt.model(), loaded.preprocessing, unfreeze=[], **options), ckpt


def records_of(cache) -> list[VideoRecord]:
    return [
        VideoRecord(k, Path(cache.info(k)["source_path"]), 0, cache.frame_indices(k), cache.timestamps(k))
        for k in cache.keys()
    ]


# ------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_seeking_gives_the_frames_of_sequential_decoding(tmp_path, suffix):
    video = make_video(tmp_path / f"v{suffix}", 60)
    reference = decode_all_rgb(video)
    times = np.array([t for _, t, _ in VideoSource(video).frames(lambda i, t: False)])
    for indices in ([0, 1, 2], [17, 19, 21, 23], [31], [40, 45, 59], [58, 59]):
        indices = np.array(indices)
        frames, mode = read_video_frames(video, indices, times[indices])
        assert mode == SEEK
        for i, frame in zip(indices, frames, strict=True):
            np.testing.assert_array_equal(frame, reference[i])


class MisSeeking:
    """A capture whose CAP_PROP_POS_FRAMES seeks land `error` frames off (as some codecs and containers do)."""

    def __init__(self, cap, error):
        self.cap, self.error = cap, error

    def set(self, prop, value):
        if prop == cv2.CAP_PROP_POS_FRAMES:
            value = max(0, value + self.error(value))
        return self.cap.set(prop, value)

    def __getattr__(self, name):
        return getattr(self.cap, name)


@pytest.mark.parametrize(
    ("error", "shift", "mode"),
    [
        (-3, 0.0, WALK),  # lands early: walk forward to the recorded timestamp
        (2, 0.0, WALK),  # lands late: seek SEEK_BACKOFF earlier, then walk
        (SEEK_BACKOFF + 5, 0.0, SEQUENTIAL),  # lands late even from the earlier point: decode from the start
        (0, 0.5, SEQUENTIAL),  # timestamps that never match (made up by a container without them)
    ],
)
def test_inexact_seeks_are_caught_and_read_right(tmp_path, monkeypatch, error, shift, mode):
    video = make_video(tmp_path / "v.mp4", 120)
    reference = decode_all_rgb(video)
    times = np.array([t for _, t, _ in VideoSource(video).frames(lambda i, t: False)]) + shift
    real = VideoSource.capture
    monkeypatch.setattr(VideoSource, "capture", lambda self: MisSeeking(real(self), lambda k: error))
    indices = np.array([70, 72, 74])
    frames, how = read_video_frames(video, indices, times[indices])
    assert how == mode
    for i, frame in zip(indices, frames, strict=True):
        np.testing.assert_array_equal(frame, reference[i])


def test_augmentation_is_drawn_once_per_clip(tmp_path, head_run):
    cache = pipeline.open_cache(head_run / "cache.h5")
    pre = load_backbone("resnet18", "none", 64, 56).preprocessing
    still = make_frame_folder(tmp_path / "still", 6, name="same_{}")
    image = cv2.imread(str(still / "same_1.png"))
    for f in still.iterdir():  # six copies of one image
        cv2.imwrite(str(f), image)
    records = records_of(cache) + [VideoRecord("still", still, 0, np.arange(6), np.arange(6) / 30.0)]
    data = ClipDataset(records, pre, ClipAugment(pre.crop, min_scale=0.2), frames_fps=30.0)
    outs = [data.clip(len(records) - 1, np.arange(6), seed)[0] for seed in range(12)]
    for out in outs:
        assert out.shape == (6, 3, 56, 56)
        assert all(torch.equal(out[0], frame) for frame in out[1:])  # one crop and flip for every frame
    assert len({out.numpy().tobytes() for out in outs}) == 12  # ... and another one per clip
    flips = [data.augment.params(np.random.default_rng(seed), 72, 96).flip for seed in range(12)]
    assert 0 < sum(flips) < 12  # some clips flipped, some not
    # Frames that differ: each output frame is that frame under the clip's one crop.
    key = next(k for k in cache.keys() if k.endswith(".avi"))
    video = cache.keys().index(key)
    rows = np.array([2, 3, 4, 5])
    out, _ = data.clip(video, rows, seed=7)
    frames = decode_all_rgb(records[video].path)
    params = data.augment.params(np.random.default_rng(7), *frames[0].shape[:2])
    for row, got in zip(rows, out, strict=True):
        alone = data.augment.apply([torch.from_numpy(frames[row]).permute(2, 0, 1)], params)[0]
        assert torch.equal(got, alone)
        unflipped = data.augment.apply([torch.from_numpy(frames[row]).permute(2, 0, 1)], replace(params, flip=False))
        assert torch.equal(got, unflipped[0].flip(-1) if params.flip else unflipped[0])
    # Evaluation: exactly stage one's crop.
    plain, _ = data.clip(video, rows, seed=None)
    for row, got in zip(rows, plain, strict=True):
        assert torch.equal(got, pre.crop_frame(torch.from_numpy(frames[row]).permute(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- the model
def test_zero_steps_give_the_logits_of_the_cached_path(head_run):
    cache = pipeline.open_cache(head_run / "cache.h5")
    model, ckpt = start_model(head_run / "run" / "best.pt")
    keys = cache.keys()
    lengths = np.array([cache.num_frames(k) for k in keys])
    data = ClipDataset(records_of(cache), model.pre, None, 30.0)
    plans = eval_plans(np.arange(len(keys)), lengths, np.zeros(len(keys), np.int64), 4, None, 1, 0)
    model.eval()
    head = ckpt.model()
    for batch in clip_batches(data, [ClipJob(p) for p in plans], workers=1):
        with torch.inference_mode():
            got = model(batch.x, batch.lengths)
            x = torch.nn.utils.rnn.pad_sequence(
                [torch.from_numpy(cache.features(keys[v])) for v in batch.owners.tolist()], batch_first=True
            )
            expected = head(x, batch.lengths)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The real entry point: the start's validation equals the head's own, on the head's split.
    result = pipeline.finetune(
        [head_run / "videos"], head_run / "run" / "best.pt", head_run / "ft0", **{**TUNE, "epochs": 0}
    )
    summary = json.loads((head_run / "run" / "summary.json").read_text())
    assert result.summary["start"]["top1"] == summary["top1"]
    assert result.summary["start"]["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert result.summary["feature_weights"] == FINETUNED_PREFIX + "ft0"
    assert (head_run / "ft0" / "best.pt").exists() and (head_run / "ft0" / "last.pt").exists()


def test_training_clips_take_the_heads_sampling_or_say_why_not(head_run):
    ckpt = load_checkpoint(head_run / "run" / "best.pt")
    assert (ckpt.sampling, ckpt.clip_len) == ("segments", 4)

    def clips(head=ckpt, **options):
        return ClipSampling.of(build_finetune_config(head_run / "run" / "best.pt", head_run / "x", **options), head)

    assert clips() == ClipSampling("segments", 4, 1, None)
    assert clips(clip_len=8) == ClipSampling("segments", 8, 1, "--clip-len 8: validation keeps the head's views")
    assert clips(clip_len=0).sampling == "whole" and "--clip-len 0" in clips(clip_len=0).why
    whole = replace(ckpt, sampling="whole", clip_len=None)
    cropped = clips(whole)
    assert (cropped.sampling, cropped.clip_len) == ("crop", FINETUNE_CLIP_LEN)
    assert "whole sequences" in cropped.why and "--clip-len 0" in cropped.why
    assert clips(whole, clip_len=0) == ClipSampling("whole", None, 1, None)


def test_unfreeze_names_stages_and_errors():
    model = load_backbone("resnet18", "none").model
    assert backbone_stages(model) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert resolve_unfreeze(model, "resnet18", None, 2) == ["layer3", "layer4"]
    assert resolve_unfreeze(model, "resnet18", "layer4.1, layer3", None) == ["layer4.1", "layer3"]
    assert resolve_unfreeze(model, "resnet18", "all", None) == [""]
    assert resolve_unfreeze(model, "resnet18", "none", None) == []
    with pytest.raises(UnfreezeError, match=r"'layer5' is not a module of resnet18; valid names: conv1, .*layer4"):
        resolve_unfreeze(model, "resnet18", "layer4,layer5", None)
    with pytest.raises(UnfreezeError, match="has 6 stages"):
        resolve_unfreeze(model, "resnet18", None, 7)
    mobile = load_backbone("mobilenet_v2", "none").model  # its classifier is gone: the stages are in `features`
    assert backbone_stages(mobile) == [f"features.{i}" for i in range(19)]


def test_gradient_checkpointing_gives_the_same_gradients(head_run):
    frames = torch.randint(0, 256, (6, 3, 56, 56), dtype=torch.uint8)
    lengths, y = torch.tensor([4, 2]), torch.tensor([0, 1])
    grads = []
    for checkpointing in (False, True):
        model, _ = start_model(head_run / "run" / "best.pt")
        model = FinetuneModel(
            model.backbone, model.head, model.pre, unfreeze=["layer3", "layer4"], grad_checkpointing=checkpointing
        )
        model.train()
        model.head.eval()  # no dropout, so both passes compute the same function
        torch.nn.functional.cross_entropy(model(frames, lengths), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(k.startswith(("layer3.", "layer4.")) for k in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_only_the_unfrozen_parts_train_and_batchnorm_statistics_stay(head_run):
    original = load_backbone("resnet18", "none").model.state_dict()
    head_before = load_checkpoint(head_run / "run" / "best.pt").state_dict
    result = runner.invoke(
        app,
        [
            "finetune",
            str(head_run / "videos"),
            "--init",
            str(head_run / "run" / "best.pt"),
            "-o",
            str(head_run / "ft"),
            "--unfreeze",
            "layer4",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--backbone-lr",
            "1e-2",
            "--batch-size",
            "2",
            "--accumulate",
            "2",
            "--clip-len",
            "4",
            "--workers",
            "1",
            "--threads",
            "2",
            "-q",
        ],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "layer4 trained" in result.output
    tuned = load_checkpoint(head_run / "ft" / "last.pt")
    state = tuned.backbone_state
    changed = {k for k in original if not torch.equal(original[k], state[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert not any("running_" in k or "num_batches" in k for k in changed)  # BN statistics frozen by default
    assert all(any(k.startswith(f"layer4.{b}.{c}") for k in changed) for b in (0, 1) for c in ("conv1", "conv2"))
    assert any(not torch.equal(head_before[k], tuned.state_dict[k]) for k in head_before)
    summary = json.loads((head_run / "ft" / "summary.json").read_text())
    assert summary["reads"]["seek"] > 0 and summary["reads"]["sequential"] == 0  # seeking, no decode from the start
    # trained as validated: the head's segments (a random row of each), nothing to explain
    assert summary["train_clips_sampling"].startswith("a random row of 4 segments")
    assert summary["train_clips_differ_because"] is None
    assert summary["reads"]["files"] > 0  # the frame folders
    rows = list(csv.DictReader((head_run / "ft" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["clips_per_s"]) > 0
    # the checkpoint names the tuned backbone: a new spec whose sha256 is that of its tensors
    assert tuned.feature_spec.weights == FINETUNED_PREFIX + "ft"
    assert tuned.feature_spec.weights_sha256 == tensors_sha256(state)
    assert tuned.feature_spec.id != load_checkpoint(head_run / "run" / "best.pt").feature_spec.id

    # --train-bn lets the trained stage's statistics move; the frozen stages stay as they were
    pipeline.finetune(
        [head_run / "videos"],
        head_run / "run" / "best.pt",
        head_run / "ft_bn",
        unfreeze_last=1,
        train_bn=True,
        grad_checkpointing=True,
        lr=1e-2,
        **TUNE,
    )
    state = load_checkpoint(head_run / "ft_bn" / "last.pt").backbone_state
    changed = {k for k in original if not torch.equal(original[k], state[k])}
    assert "layer4.0.bn1.running_mean" in changed and all(k.startswith("layer4.") for k in changed)


def test_the_head_split_is_reused(head_run, tmp_path):
    recorded = read_split(head_run / "run" / "split.csv")
    assert sorted(recorded.values()).count("val") >= 2
    other = pipeline.train_head(head_run / "cache.h5", tmp_path / "other", **{**HEAD, "split_seed": 0, "epochs": 1})
    assert read_split(other.out / "split.csv") != recorded  # so reusing the head's split is not a coincidence
    result = pipeline.finetune(
        [head_run / "videos"], head_run / "run" / "best.pt", tmp_path / "ft", **{**TUNE, "epochs": 0}
    )
    assert read_split(tmp_path / "ft" / "split.csv") == recorded
    assert "the head's split" in result.summary["split"]["method"]
    # without split.csv, the head's recorded settings (seed 3, fraction 0.3) make the same split again
    copy = tmp_path / "copy"
    shutil.copytree(head_run / "run", copy)
    (copy / "split.csv").unlink()
    pipeline.finetune([head_run / "videos"], copy / "best.pt", tmp_path / "ft2", **{**TUNE, "epochs": 0})
    assert read_split(tmp_path / "ft2" / "split.csv") == recorded


def test_validation_can_be_capped_and_the_start_evaluation_skipped(head_run, tmp_path):
    recorded = read_split(head_run / "run" / "split.csv")
    assert list(recorded.values()).count("val") >= 2
    result = pipeline.finetune(
        [head_run / "videos"],
        head_run / "run" / "best.pt",
        tmp_path / "ft",
        **{**TUNE, "val_clips": 1, "start_eval": False},
    )
    assert result.summary["videos"] == 1 and result.summary["start"] is None
    assert result.summary["best_epoch"] == 1  # no epoch 0: the start was not scored
    assert load_checkpoint(tmp_path / "ft" / "best.pt").epoch == 1
    assert "(start" not in result.summary_line()
    with pytest.raises(ValueError, match="--epochs 0 only evaluates the start"):
        pipeline.finetune(
            [head_run / "videos"],
            head_run / "run" / "best.pt",
            tmp_path / "x",
            **{**TUNE, "epochs": 0, "start_eval": False},
        )


# ------------------------------------------------------------------------------------- predict and extract
def test_predict_and_reextract_with_the_finetuned_backbone(head_run, tmp_path):
    ckpt_path = head_run / "ft" / "last.pt"
    if not ckpt_path.exists():
        pipeline.finetune(
            [head_run / "videos"],
            head_run / "run" / "best.pt",
            head_run / "ft",
            unfreeze="layer4",
            lr=1e-2,
            backbone_lr=1e-2,
            **{**TUNE, "epochs": 2},
        )
    ckpt = load_checkpoint(ckpt_path)
    new = tmp_path / "tuned.h5"
    result = runner.invoke(
        app,
        [
            "extract",
            str(head_run / "videos"),
            "-o",
            str(new),
            "--backbone-checkpoint",
            str(ckpt_path),
            "--dtype",
            "float32",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == EXIT_OK, result.output
    old, tuned = pipeline.open_cache(head_run / "cache.h5"), pipeline.open_cache(new)
    assert tuned.spec == ckpt.feature_spec and tuned.spec.id != old.spec.id
    # rows are the fine-tuned backbone's embedding of stage one's frames, and differ from the old ones
    model, _ = start_model(ckpt_path)
    key = next(k for k in old.keys() if k.endswith(".mp4"))
    frames = decode_all_rgb(head_run / "videos" / key)
    with torch.inference_mode():
        direct = (
            model.eval()
            .embed(torch.stack([model.pre.crop_frame(torch.from_numpy(f).permute(2, 0, 1)) for f in frames]))
            .numpy()
        )
    np.testing.assert_allclose(tuned.features(key), direct, atol=1e-4 * np.abs(direct).max())
    assert np.abs(tuned.features(key) - old.features(key)).max() > 1e-2

    # the head trained on the old cache is refused on the new one, naming both specs
    result = runner.invoke(app, ["evaluate", str(head_run / "run" / "best.pt"), str(new)])
    assert result.exit_code == EXIT_ERROR
    assert "none(seed=0)" in result.output and FINETUNED_PREFIX + "ft" in result.output
    assert runner.invoke(app, ["evaluate", str(ckpt_path), str(new)]).exit_code == EXIT_OK
    # options that would change the features are refused
    result = runner.invoke(
        app,
        [
            "extract",
            str(head_run / "videos"),
            "-o",
            str(tmp_path / "x.h5"),
            "--backbone-checkpoint",
            str(ckpt_path),
            "--crop",
            "64",
        ],
    )
    assert result.exit_code == EXIT_USAGE and "crop" in result.output

    # predict runs the fine-tuned backbone: same features, the model's own probabilities
    report = pipeline.predict(
        ckpt_path, [head_run / "videos" / key], tmp_path / "p.csv", cache=tmp_path / "p.h5", workers=0, progress=False
    )
    assert not report.failed
    pred = pipeline.open_cache(tmp_path / "p.h5")
    assert pred.spec == ckpt.feature_spec
    assert ckpt.sampling == "segments"  # scored on the centres of clip_len segments, as train-head scores it
    rows = segment_frames(np.array([len(frames)]), ckpt.clip_len, ckpt.clip_stride)[0]
    rows = rows[rows >= 0]
    with torch.inference_mode():
        crops = torch.stack([model.pre.crop_frame(torch.from_numpy(frames[r]).permute(2, 0, 1)) for r in rows])
        probs = torch.softmax(model(crops, torch.tensor([len(rows)])), 1)[0]
    top_label, top_prob = report.predictions[0].top[0]
    assert top_prob == pytest.approx(float(probs.max()), abs=1e-4)
    assert top_label == ckpt.classes[int(probs.argmax())]


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_checkpoints_of_another_backbone(tmp_path, head_run):
    videos = head_run / "videos"
    synthetic = feature_cache(tmp_path / "syn.h5", separable_videos(classes=2, per_class=4))
    pipeline.train_head(synthetic, tmp_path / "syn", **{**HEAD, "epochs": 1})
    with pytest.raises(WeightsError, match="'synthetic', which is not a torchvision classification model"):
        pipeline.finetune([videos], tmp_path / "syn" / "best.pt", tmp_path / "x", **TUNE)
    # a head on 16-dim features that claim to come from resnet18 (512-dim)
    small = feature_cache(tmp_path / "r18.h5", separable_videos(classes=2, per_class=4), backbone="resnet18")
    pipeline.train_head(small, tmp_path / "r18", **{**HEAD, "epochs": 1})
    with pytest.raises(WeightsError, match="head takes 16-dim features .* resnet18 gives 512"):
        pipeline.finetune([videos], tmp_path / "r18" / "best.pt", tmp_path / "x", **TUNE)
    # a fine-tuned checkpoint whose stored backbone is not the architecture its spec names
    pipeline.finetune([videos], head_run / "run" / "best.pt", tmp_path / "ft0", **{**TUNE, "epochs": 0})
    raw = torch.load(tmp_path / "ft0" / "best.pt", weights_only=True)
    raw["feature_spec"]["backbone"] = "resnet34"
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(WeightsError, match="do not fit resnet34.*another architecture"):
        pipeline.finetune([videos], tmp_path / "edited.pt", tmp_path / "x", **TUNE)
    with pytest.raises(ValueError, match="--amp bf16 needs a CUDA device"):
        pipeline.finetune([videos], head_run / "run" / "best.pt", tmp_path / "x", amp="bf16", device="cpu", **TUNE)
    result = runner.invoke(
        app,
        [
            "finetune",
            str(videos),
            "--init",
            str(head_run / "run" / "best.pt"),
            "-o",
            str(tmp_path / "x"),
            "--unfreeze",
            "layer9",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == EXIT_USAGE and "'layer9' is not a module of resnet18" in result.output
    assert "layer4" in result.output
