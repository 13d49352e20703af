"""The built-in demo: generate the order-only sample, extract it, show what the cache holds.

    pipeline demo --out demo_out
"""

from __future__ import annotations

from pathlib import Path

from pipeline.sample import CLASSES, make_order_sample


def run_demo(out: str | Path, backbone: str = "resnet18", weights: str = "none", progress: bool = True,
             echo=print) -> dict:
    from pipeline.data.cache import open_cache
    from pipeline.extract.run import extract_videos

    out = Path(out)
    videos = out / "videos"
    if not videos.exists():
        paths = make_order_sample(videos)
        echo(f"[1/2] generated {len(paths)} sample clips in {videos} ({len(CLASSES)} classes that differ only in "
             f"frame order)")
    else:
        echo(f"[1/2] reusing sample clips in {videos}")
    report = extract_videos([videos], out / "cache.h5", backbone=backbone, weights=weights, progress=progress)
    with open_cache(out / "cache.h5") as cache:
        echo(f"[2/2] {report.summary()}")
        echo(f"      features: {cache.spec.describe()}")
        if cache.spec.weights.startswith("none"):
            echo("      weights: random initialisation (seeded); no pretrained weights are needed for this sample")
        key = cache.keys()[0]
        echo(f"      {key}: features {cache.features(key).shape}, frames {cache.frame_indices(key).tolist()}")
    return {"report": report}
