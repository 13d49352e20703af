"""The built-in demos, offline, on generated samples (pipeline.sample), each well under two minutes on 2 CPU cores.

`run_demo`: the whole mission on the order-only sample. Generate the sample, extract it, train an LSTM head and the
order-blind meanpool baseline, evaluate both on freshly generated clips, and predict a few more. The classes differ
only in frame order, so meanpool stays near chance.

`run_frames_demo`: the same with a label per frame (temporal action segmentation) on the segment sample: a tcn head
against meanpool, which labels each row alone and so cannot tell approach from leave; scored by frame accuracy, edit
score and F1@{10,25,50}, and segments predicted for new videos.

    pipeline demo --out demo_out
    pipeline demo --frames --out demo_frames
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from pipeline.config import FRAME_METRICS
from pipeline.sample import CLASSES, SEGMENT_CLASSES, make_order_sample, make_segment_sample

TRAIN_CLIPS_PER_CLASS = 24  # 96 clips: 4 orderings of 24 base clips
TEST_CLIPS_PER_CLASS = 12  # 48 unseen clips to evaluate both heads on
PREDICT_CLIPS_PER_CLASS = 2  # 8 more to run `predict` on
# Small data: small batches and a higher learning rate than the defaults (made for UCF101-sized caches). The group
# regex keeps the four orderings of one base clip on the same side of the split.
DEMO_TRAIN = dict(epochs=30, batch_size=16, lr=3e-3, patience=0, group_regex=r"clip_(\d+)")
HEADS = ("lstm", "meanpool")


def _sample(folder: Path, per_class: int, seed: int, echo) -> None:
    if folder.exists():
        echo(f"      reusing {folder}")
    else:
        paths = make_order_sample(folder, per_class=per_class, seed=seed)
        echo(f"      generated {len(paths)} clips in {folder} (seed {seed})")


def run_demo(
    out: str | Path, backbone: str = "resnet18", weights: str = "none", progress: bool = True, echo=print
) -> dict:
    """Run every stage; returns {"test_top1": {head: accuracy}, "predictions": PredictReport, ...}."""
    from pipeline.data.cache import open_cache
    from pipeline.extract.run import extract_videos
    from pipeline.predict import predict
    from pipeline.train_head.evaluate import evaluate_checkpoint
    from pipeline.train_head.train import train_head

    started = time.perf_counter()
    out = Path(out)
    echo(f"[1/5] sample: {len(CLASSES)} classes ({', '.join(CLASSES)}) that show the same frames in different orders")
    _sample(out / "videos", TRAIN_CLIPS_PER_CLASS, 0, echo)

    echo(f"[2/5] extract with {backbone}, weights {weights}")
    report = extract_videos([out / "videos"], out / "cache.h5", backbone=backbone, weights=weights, progress=progress)
    echo(f"      {report.summary()}")
    with open_cache(out / "cache.h5") as cache:
        echo(f"      features: {cache.spec.describe()}")
        if cache.spec.weights.startswith("none"):
            echo("      weights: RANDOM initialisation (seeded), no download; this sample needs no pretrained weights")
        else:
            echo(f"      weights: {cache.spec.weights} (sha256 {(cache.spec.weights_sha256 or '?')[:16]}...)")

    results = {}
    for head in HEADS:
        echo(f"[3/5] train-head --head {head}" + (" (order-blind baseline)" if head == "meanpool" else ""))
        run = train_head(
            out / "cache.h5", out / "runs" / head, head=head, overwrite=True, progress=progress, **DEMO_TRAIN
        )
        echo(f"      {run.summary_line()}")
        results[head] = run

    echo(f"[4/5] evaluate both heads on {TEST_CLIPS_PER_CLASS * len(CLASSES)} freshly generated clips")
    _sample(out / "test_videos", TEST_CLIPS_PER_CLASS, 1, echo)
    report = extract_videos(
        [out / "test_videos"], out / "test.h5", backbone=backbone, weights=weights, progress=progress
    )
    echo(f"      {report.summary()}")
    test_top1 = {}
    for head in HEADS:
        ev = evaluate_checkpoint(out / "runs" / head / "best.pt", out / "test.h5", progress=progress)
        test_top1[head] = ev.metrics["top1"]
        echo(f"      {head:<9} {ev.summary_line()}")

    echo(f"[5/5] predict {PREDICT_CLIPS_PER_CLASS * len(CLASSES)} more new clips with the LSTM head")
    _sample(out / "new_videos", PREDICT_CLIPS_PER_CLASS, 2, echo)
    preds = predict(
        out / "runs" / "lstm" / "best.pt", [out / "new_videos"], out / "predictions.csv", json=True, progress=progress
    )
    right = 0
    for p in preds.predictions:
        truth = Path(p.path).parent.name
        guess, prob = p.top[0] if p.top else ("FAILED", 0.0)
        right += guess == truth
        echo(f"      {Path(p.path).parent.name}/{Path(p.path).name}: {guess} ({prob:.0%})")
    echo(f"      {preds.summary()}")

    chance = 1 / len(CLASSES)
    echo("")
    echo(f"Test top-1 on {TEST_CLIPS_PER_CLASS * len(CLASSES)} unseen clips (chance {chance:.0%}):")
    echo(f"  LSTM head            {test_top1['lstm']:6.1%}")
    echo(f"  meanpool baseline    {test_top1['meanpool']:6.1%}   (order-blind: the classes share their frames)")
    echo(f"  predictions          {right}/{len(preds.predictions)} right -> {preds.output}")
    seconds = time.perf_counter() - started
    echo(f"The whole demo took {seconds:.0f}s (sample, extraction, training, evaluation, prediction).")
    return {"test_top1": test_top1, "runs": results, "predictions": preds, "predict_right": right, "seconds": seconds}


# ------------------------------------------------------------------------------------------- per-frame labels
FRAMES_TRAIN_VIDEOS = 24  # 40-80 frames each: about 1,400 frames of training data
FRAMES_TEST_VIDEOS = 12  # unseen videos to evaluate both heads on
FRAMES_PREDICT_VIDEOS = 2  # more to run `predict` on
FRAMES_SIZE = 96  # the sample's frames (96x72) are resized to this and centre-cropped: about 5x less work than 224 px
# Small data: small batches of whole videos, a higher learning rate, a narrow and shallow tcn (receptive field of
# about 500 rows, far more than a video of this sample).
DEMO_FRAMES_TRAIN = dict(epochs=30, batch_size=4, lr=3e-3, patience=0, hidden=64)
FRAME_HEADS = {"tcn": dict(layers=8, stages=2), "meanpool": {}}


def _segment_sample(folder: Path, videos: int, seed: int, echo) -> None:
    if (folder / "segments.csv").exists():
        echo(f"      reusing {folder}")
    else:
        paths = make_segment_sample(folder, videos=videos, seed=seed)
        echo(f"      generated {len(paths)} videos in {folder}/videos, their labels in groundTruth/ (seed {seed})")


def _true_segments(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    """video file name -> its (label, start, end) segments, from the sample's segments.csv."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    with open(folder / "segments.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["key"], []).append((row["label"], int(row["start"]), int(row["end"])))
    return out


def run_frames_demo(
    out: str | Path,
    backbone: str = "resnet18",
    weights: str = "none",
    progress: bool = True,
    echo=print,
    *,
    train_videos: int = FRAMES_TRAIN_VIDEOS,
    test_videos: int = FRAMES_TEST_VIDEOS,
    predict_videos: int = FRAMES_PREDICT_VIDEOS,
    size: int | None = FRAMES_SIZE,
    train: dict | None = None,
    seed: int = 0,
) -> dict:
    """Per-frame labels on the segment sample: generate, extract, train a tcn head and the meanpool baseline with
    --frame-labels, evaluate both on new videos, predict the segments of a few more.

    `size`: the frames' resize and crop (None: the weights' own); `train`: TrainConfig options that replace those
    of DEMO_FRAMES_TRAIN (e.g. epochs); `seed`: the samples' seeds are 3 * seed (train), + 1 (test), + 2 (predict),
    and the heads' training seed is `seed`. Returns {"test": {head: segmentation metrics}, "runs": {head: TrainResult},
    "predictions": PredictReport, "predict_acc": share of predicted frames right, "seconds": the whole demo}."""
    from pipeline.data.cache import open_cache
    from pipeline.extract.run import extract_videos
    from pipeline.predict import predict
    from pipeline.train_head.evaluate import evaluate_checkpoint
    from pipeline.train_head.train import train_head

    started = time.perf_counter()
    out = Path(out)
    sizes = {} if size is None else {"resize": size, "crop": size}
    settings = {**DEMO_FRAMES_TRAIN, "seed": seed, **(train or {})}

    def extract(folder: Path, cache: Path) -> None:
        report = extract_videos(
            [folder / "videos"], cache, backbone=backbone, weights=weights, progress=progress, **sizes
        )
        echo(f"      {report.summary()}")

    echo(
        f"[1/5] sample: a label per frame, {', '.join(SEGMENT_CLASSES)}; approach (a square grows) and leave (it "
        f"shrinks) show the same frames in opposite orders"
    )
    _segment_sample(out / "train", train_videos, 3 * seed, echo)

    echo(f"[2/5] extract with {backbone}, weights {weights}" + (f", frames at {size} px" if size else ""))
    extract(out / "train", out / "train.h5")
    with open_cache(out / "train.h5") as cache:
        echo(f"      features: {cache.spec.describe()}")
        if cache.spec.weights.startswith("none"):
            echo("      weights: RANDOM initialisation (seeded), no download; this sample needs no pretrained weights")

    runs = {}
    for head, extra in FRAME_HEADS.items():
        shape = ", ".join(f"{k} {v}" for k, v in extra.items())
        echo(
            f"[3/5] train-head --frame-labels {out / 'train' / 'groundTruth'} --head {head}"
            + (f" ({shape})" if shape else "")
            + (" (each row alone: the order-blind baseline)" if head == "meanpool" else "")
        )
        run = train_head(
            out / "train.h5",
            out / "runs" / head,
            head=head,
            frame_labels=out / "train" / "groundTruth",
            overwrite=True,
            progress=progress,
            **{**settings, **extra},
        )
        echo(f"      {run.summary_line()}")
        runs[head] = run

    echo(f"[4/5] evaluate both heads on {test_videos} freshly generated videos")
    _segment_sample(out / "test", test_videos, 3 * seed + 1, echo)
    extract(out / "test", out / "test.h5")
    test = {}
    for head in FRAME_HEADS:
        ev = evaluate_checkpoint(
            out / "runs" / head / "best.pt",
            out / "test.h5",
            frame_labels=out / "test" / "groundTruth",
            progress=progress,
        )
        test[head] = ev.metrics
        echo(f"      {head:<9} {ev.summary_line()}")

    echo(f"[5/5] predict the segments of {predict_videos} more new videos with the tcn head")
    _segment_sample(out / "new", predict_videos, 3 * seed + 2, echo)
    preds = predict(out / "runs" / "tcn" / "best.pt", [out / "new" / "videos"], out / "segments.csv", progress=progress)
    truth = _true_segments(out / "new")
    right = total = 0
    for p in preds.predictions:
        name = Path(p.path).name
        if p.error:
            echo(f"      {name}: FAILED {p.error}")
            continue
        true_rows = (out / "new" / "groundTruth" / f"{Path(name).stem}.txt").read_text(encoding="utf-8").split()
        right += sum(r["label"] == true_rows[r["frame"]] for r in p.rows)
        total += len(p.rows)
        echo(f"      {name}: {len(p.segments)} segments predicted, {len(truth.get(name, []))} true")
        for seg in p.segments:
            echo(
                f"        {seg['label']:<9} frames {seg['start_frame']:>3}-{seg['end_frame']:<3} "
                f"{seg['start_s']:5.1f}-{seg['end_s']:.1f} s"
            )
        echo("        true: " + ", ".join(f"{label} {s}-{e}" for label, s, e in truth.get(name, [])))
    echo(f"      {preds.summary()}")

    frames = test["tcn"]["frames"]
    echo("")
    echo(f"Test on {test_videos} unseen videos ({frames} frames), a label per frame:")
    echo(f"  {'':<19} {'frame acc':>9} {'edit':>7} {'F1@10':>7} {'F1@25':>7} {'F1@50':>7}")
    names = {"tcn": "tcn head", "meanpool": "meanpool baseline"}
    for head in FRAME_HEADS:
        m = test[head]
        echo(f"  {names[head]:<19} " + " ".join(f"{m[k]:>{w}.1%}" for k, w in zip(FRAME_METRICS, (9, 7, 7, 7, 7))))
    echo("  (meanpool labels each row alone: approach and leave show the same frames, so it cannot tell them apart)")
    if total:
        echo(f"  predictions          {right / total:.0%} of {total} frames right -> {preds.output}")
    seconds = time.perf_counter() - started
    echo(f"The whole demo took {seconds:.0f}s (sample, extraction, training, evaluation, prediction).")
    return {
        "test": test,
        "runs": runs,
        "predictions": preds,
        "predict_acc": right / total if total else None,
        "seconds": seconds,
    }
