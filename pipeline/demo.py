"""The built-in demo: the whole mission on the order-only sample, offline, in about 80 s on 2 CPU cores.

Generate the sample, extract it, train an LSTM head and the order-blind meanpool baseline, evaluate both on freshly
generated clips, and predict a few more. The classes differ only in frame order, so meanpool stays near chance.

    pipeline demo --out demo_out
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.sample import CLASSES, make_order_sample

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
        run = train_head(out / "cache.h5", out / "runs" / head, head=head, progress=progress, **DEMO_TRAIN)
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
