"""Head configurations per minute: `pipeline sweep` (cache read once, PCA, pruning, stacked mean-pool trials, the
best few refit on the full features) against the same configurations run as sequential `pipeline train-head`
commands to completion (a process each, each reading the cache), on a UCF101-shaped synthetic cache; and the best
validation top-1 each finds.

    python bench/sweep.py                  # 101 classes x 8 videos of 120-240 rows x 2048; 36 configurations
    python bench/sweep.py --dropout 0.3    # 12 configurations
    python bench/sweep.py --per-class 4 --heads gru,meanpool --hidden 64 --lr 3e-3 --epochs 4   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ensure_cache, load_average, machine, write_resnet50_sized  # bench/common.py, beside this script

from pipeline.config import TrainConfig, default_of
from pipeline.runtime import cpu_count

UCF101_CLASSES, MIN_ROWS, MAX_ROWS = 101, 120, 240  # UCF101 clips: ~7 s, 120-240 rows at 25 fps
LATENT = 128  # the features vary in a 128-dimensional subspace of the 2048 (plus a little isotropic noise) ...
CLASS_SCALE, VIDEO_SCALE, NOISE = 0.2, 0.5, 0.1  # ... around class means, per-video offsets and per-frame noise


def generate(path: Path, classes: int, per_class: int, dim: int, seed: int = 0) -> None:
    """Video v of class c: rows (mean_c + offset_v + noise_t) @ mix + small isotropic noise, float16.

    CNN embeddings concentrate their variance in a few hundred directions; so do these (a 128-dimensional latent
    mixed into `dim`), which is what makes a PCA to 256 dimensions lossless here. On real features, check what
    --reduce-dim costs with a sweep of its own (docs/sweep.md).
    """
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
    means = (rng.standard_normal((classes, LATENT)) * CLASS_SCALE).astype(np.float32)

    def videos():
        for i in range(classes * per_class):
            c = i % classes
            t = int(rng.integers(MIN_ROWS, MAX_ROWS + 1))
            z = (
                means[c]
                + VIDEO_SCALE * rng.standard_normal(LATENT, dtype=np.float32)
                + rng.standard_normal((t, LATENT), dtype=np.float32)
            )
            x = z @ mix + NOISE * rng.standard_normal((t, dim), dtype=np.float32)
            yield f"class{c:03d}/video_{i:05d}", x, f"class{c:03d}", None

    write_resnet50_sized(path, videos(), dim, classes * per_class)


def run(args: list[str]) -> float:
    """Wall seconds of one `pipeline` command (a new process, as a user would run it)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--classes", type=int, default=UCF101_CLASSES)
    p.add_argument("--per-class", type=int, default=8, help="videos per class (UCF101 has ~130)")
    p.add_argument("--dim", type=int, default=2048, help="feature size (ResNet-50: 2048)")
    p.add_argument("--heads", default="gru,meanpool", help="the configurations: every head x hidden x lr x dropout")
    p.add_argument("--hidden", default="128,256")
    p.add_argument("--lr", default="1e-3,3e-3,1e-2")
    p.add_argument("--dropout", default="0.1,0.3,0.5")
    p.add_argument(
        "--epochs",
        type=int,
        default=20,
        help=f"epochs of every configuration (train-head's default: {default_of(TrainConfig, 'epochs')})",
    )
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--reduce-dim", type=int, default=256, help="the sweep's PCA (0: none)")
    p.add_argument("--pruner", default="halving")
    p.add_argument("--prune-warmup", type=int, default=2)
    p.add_argument("--stack", type=int, default=None, help="the sweep's --stack (default: its own)")
    p.add_argument("--refit", type=int, default=None, help="the sweep's --refit (default: its own; 0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: all cores")
    p.add_argument("--skip-baseline", action="store_true", help="time the sweep only")
    p.add_argument("--cache", type=Path, default=None, help="reuse (or create) the synthetic cache here")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    threads = str(args.threads or cpu_count())
    heads, hiddens, lrs, drops = (
        args.heads.split(","),
        args.hidden.split(","),
        args.lr.split(","),
        args.dropout.split(","),
    )
    configs = [(h, int(n), float(lr), float(d)) for h in heads for n in hiddens for lr in lrs for d in drops]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = args.cache or workdir / "ucf101_like.h5"
    try:
        ensure_cache(
            cache,
            f"{args.classes} x {args.per_class} videos",
            lambda path: generate(path, args.classes, args.per_class, args.dim),
        )
        common = ["--val-fraction", str(args.val_fraction), "--epochs", str(args.epochs), "--threads", threads]
        loads = [load_average()]

        # 1. the configurations one by one, each a `pipeline train-head` process run to completion
        base = []
        if not args.skip_baseline:
            for i, (head, hidden, lr, dropout) in enumerate(configs):
                out = workdir / "train-head" / f"{i:02d}"
                seconds = run(
                    [
                        "train-head",
                        str(cache),
                        "--out",
                        str(out),
                        "--head",
                        head,
                        "--hidden",
                        str(hidden),
                        "--lr",
                        str(lr),
                        "--dropout",
                        str(dropout),
                        "--no-plots",
                        "-q",
                        *common,
                    ]
                )
                summary = json.loads((out / "summary.json").read_text())
                base.append(
                    {
                        "config": (head, hidden, lr, dropout),
                        "seconds": seconds,
                        "top1": summary["top1"],
                        "epochs": summary["epochs_run"],
                    }
                )
                print(
                    f"  train-head {head} {hidden} {lr:g} {dropout:g}: {seconds:.1f} s, {summary['epochs_run']} "
                    f"epochs, val top-1 {summary['top1']:.1%}",
                    file=sys.stderr,
                    flush=True,
                )
            loads.append(load_average())

        # 2. the same configurations as one grid sweep
        out = workdir / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        sweep_args = [
            "sweep",
            str(cache),
            "--out",
            str(out),
            "--strategy",
            "grid",
            "--param",
            f"head={args.heads}",
            "--param",
            f"hidden={args.hidden}",
            "--param",
            f"lr={args.lr}",
            "--param",
            f"dropout={args.dropout}",
            "--param",
            f"epochs={args.epochs}",
            "--pruner",
            args.pruner,
            "--prune-warmup",
            str(args.prune_warmup),
            "--val-fraction",
            str(args.val_fraction),
            "--threads",
            threads,
            "--no-plots",
            "-q",
        ]
        if args.reduce_dim:
            sweep_args += ["--reduce-dim", str(args.reduce_dim)]
            if args.refit is not None:
                sweep_args += ["--refit", str(args.refit)]
        if args.stack is not None:
            sweep_args += ["--stack", str(args.stack)]
        sweep_s = run(sweep_args)
        loads.append(load_average())
        rows = json.loads((out / "leaderboard.json").read_text())["rows"]
        train_s = sum(
            float(line.split(",")[7]) + float(line.split(",")[8])
            for r in rows
            for line in (Path(r["run"]) / "metrics.csv").read_text().splitlines()[1:]
        )
        trial_s = sum(r["seconds"] for r in rows)
        states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned")}
        refit = json.loads((out / "best.json").read_text()).get("refit")
        stacked = sum(1 for r in rows if r.get("stack"))

        n = len(configs)
        size = sum(f.stat().st_size for f in Path(f"{cache}.parts").rglob("*") if f.is_file())
        print()
        print(
            f"{args.classes} classes x {args.per_class} videos of {MIN_ROWS}-{MAX_ROWS} rows x {args.dim} float16 "
            f"({size / 2**20:.0f} MiB); {n} configurations: head {args.heads} x hidden "
            f"{args.hidden} x lr {args.lr} x dropout {args.dropout}, {args.epochs} epochs, other settings "
            f"train-head's defaults; {threads} threads; {machine()}; load average {' -> '.join(loads)}"
        )
        print()
        print("| | sequential `pipeline train-head` | `pipeline sweep` |")
        print("|---|---:|---:|")
        sweep_desc = (
            f"grid, {args.pruner} pruning after {args.prune_warmup} epochs"
            + (f", --reduce-dim {args.reduce_dim}" if args.reduce_dim else "")
            + (f", --stack {args.stack}" if args.stack is not None else "")
            + (f", then the {refit['of']} best refit on the full features" if refit else "")
        )
        print(f"| how | {n} processes, each reads the cache | one process: {sweep_desc} |")
        best_sweep = rows[0]
        if base:
            base_s = sum(b["seconds"] for b in base)
            best_base = max(base, key=lambda b: b["top1"])
            print(
                f"| configurations | {n} trained to completion | {n}: {states['complete']} complete, "
                f"{states['pruned']} pruned |"
            )
            print(f"| epochs trained | {sum(b['epochs'] for b in base)} | {sum(r['epochs_run'] or 0 for r in rows)} |")
            print(f"| wall time | {base_s:.0f} s | {sweep_s:.0f} s |")
            print(
                f"| configurations per minute | {60 * n / base_s:.2f} | {60 * n / sweep_s:.2f} "
                f"(**{base_s / sweep_s:.1f}x**) |"
            )
            trained = json.loads((Path(refit["run"] if refit else best_sweep["run"]) / "config.json").read_text())
            found = " ".join(str(trained["train"][k]) for k in ("head", "hidden", "lr", "dropout"))
            score = (
                f"{refit['top1']:.1%} (refit of the {refit['of']} best: {found}; {refit['reduced_top1']:.1%} on "
                f"the reduced features)"
                if refit
                else f"{best_sweep['top1']:.1%} ({found}, {best_sweep['state']})"
            )
            print(f"| best val top-1 | {best_base['top1']:.1%} ({' '.join(map(str, best_base['config']))}) | {score} |")
        else:
            print(f"| wall time | - | {sweep_s:.0f} s ({states['complete']} complete, {states['pruned']} pruned) |")
            print(
                f"| best val top-1 | - | {best_sweep['top1']:.1%}"
                + (f", refit {refit['top1']:.1%}" if refit else "")
                + " |"
            )
        print()
        refit_s = refit["seconds"] if refit else 0.0
        print(
            f"sweep: {trial_s:.0f} s in trials ({stacked} of them stacked), of which {train_s:.0f} s in training "
            f"and validation epochs; {refit_s:.0f} s refit; {sweep_s - trial_s - refit_s:.0f} s start-up, reading "
            f"the cache, PCA and the study"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
