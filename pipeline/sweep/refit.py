"""After a sweep on PCA-reduced features: the settings of the best trials trained again on the full features,
each as `pipeline train-head` would, into OUT/refit/NNNN/; the best of them becomes OUT/best.pt.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import replace

from tqdm import tqdm

from pipeline.config import SweepConfig
from pipeline.data.labelled import LabelledData, load_labelled
from pipeline.sweep.results import write_atomic
from pipeline.sweep.space import SearchSpace
from pipeline.sweep.stack import stack_groups, train_stack
from pipeline.train_head.metrics import to_json
from pipeline.train_head.train import TrainResult, train_head

log = logging.getLogger(__name__)


def refit(
    cfg: SweepConfig, space: SearchSpace, rows: list[dict], full: LabelledData | None, cache, device
) -> dict | None:
    """Train the settings of the --refit best of `rows` (the leaderboard) again on the full features, each as
    `pipeline train-head` would (same seed, split and epochs, no pruning; those of one stack_key as one stack),
    into OUT/refit/NNNN/; the best of them (val top-1, then val loss) becomes best.pt. `full`: the full features
    when still in memory (else they are read again). Returns its entry of best.json's `refits`."""
    chosen = [r for r in rows if r[cfg.metric] is not None][: cfg.refits]
    if not chosen:
        return None
    configs = [
        cfg.train_config(cfg.out / "refit" / f"{r['trial']:04d}", **{**space.fixed, **r["params"]}) for r in chosen
    ]
    configs = [replace(c, runtime=replace(c.runtime, progress=cfg.runtime.progress)) for c in configs]
    what = f"refit on the full features: trials {', '.join(str(r['trial']) for r in chosen)}"
    if cfg.runtime.progress:
        tqdm.write(what, file=sys.stderr)
    else:
        log.info(what)
    started = time.perf_counter()
    if full is None:  # the cache was read lazily: read it again
        full = load_labelled(cache, configs[0])
    results: dict[int, TrainResult] = {}
    for members in stack_groups(configs, device):
        if len(members) == 1:
            results[members[0]] = train_head(full.cache, config=configs[members[0]], data=full)
            continue
        stacked = train_stack(full, [configs[i] for i in members], device, progress=cfg.runtime.progress)
        for i, outcome in zip(members, stacked, strict=True):
            if not isinstance(outcome, TrainResult):
                raise outcome
            results[i] = outcome
    refits = []
    for i, r in enumerate(chosen):
        s = results[i].summary
        refits.append(
            {
                "trial": r["trial"],
                "params": r["params"],
                "run": str(configs[i].out.resolve()),
                "top1": s["top1"],
                "top5": s["top5"],
                "val_loss": s["val_loss"],
                "epochs_run": s["epochs_run"],
                "best_epoch": s["best_epoch"],
                "reduced_top1": r["top1"],
            }
        )
    best_i = min(range(len(refits)), key=lambda i: (-refits[i]["top1"], refits[i]["val_loss"], i))
    best = {**refits[best_i], "seconds": time.perf_counter() - started, "of": len(refits)}
    tmp = cfg.out / f".best.pt.{os.getpid()}.tmp"
    shutil.copyfile(configs[best_i].out / "best.pt", tmp)
    os.replace(tmp, cfg.out / "best.pt")
    row = next(r for r in rows if r["trial"] == best["trial"])
    write_atomic(cfg.out / "best.json", to_json({**row, "refit": best, "refits": refits}))
    log.info(
        "refit: trial %d's settings score %.1f%% on the full features (%.1f%% reduced)",
        best["trial"],
        100 * best["top1"],
        100 * best["reduced_top1"],
    )
    return best
