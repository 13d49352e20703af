"""`pipeline sweep`: many head configurations on one cache, searched by Optuna (grid, random, TPE), weak trials pruned
from their per-epoch validation, in one process or in many cooperating on one study (SQLite, journal file or RDB).

The cache is read (and optionally PCA-reduced) once per process; every trial is a `train_head` run on that shared
data, with its own run folder under OUT/trials/NNNN, or one head of a stack (`pipeline.sweep.stack`) that trains
as that run would. Trials are asked from the study up to --stack at a time (ask and tell, with this process's own
heartbeats); after a reduced sweep the --refit best settings are trained again on the full features (OUT/refit/).

    pipeline sweep cache.h5 --space space.yaml --trials 50 --out runs/sweep-heads
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import FRAME_METRICS, SWEEP_TRIALS, VIDEO_METRICS, SweepConfig, config_with
from pipeline.data.labelled import LabelledData, load_labelled
from pipeline.runtime import cpu_count, pick_device
from pipeline.sweep.reduce import Reduction, fit_pca, reduce_store
from pipeline.sweep.refit import refit
from pipeline.sweep.results import SHOWN, Leaderboard, importances, leaderboard_table, plot_search
from pipeline.sweep.space import SearchSpace, default_space, parse_mapping, parse_space
from pipeline.sweep.storage import counted, open_storage, quiet_optuna
from pipeline.sweep.trials import TrialLoop, make_pruner, make_sampler

log = logging.getLogger(__name__)

LEGACY_DATA = {"target": "videos", "metric": "top1"}  # what studies recorded before these settings existed


class SweepError(RuntimeError):
    """A study that cannot be used as asked (it exists and --resume was not given; another space or other data)."""


@dataclass
class SweepResult:
    """The study after this process's trials: `rows` is the leaderboard, best first."""

    out: Path
    study: str
    storage: str
    rows: list[dict]
    best_checkpoint: Path | None
    plot: Path | None
    trials_here: int
    """Trials this process ran (other workers may have run more)."""
    seconds: float
    refit: dict | None = None
    """The best settings trained again on the full features (after --reduce-dim): its scores and run folder."""
    metric: str = "top1"
    """The val metric the trials are ranked by (each row holds it under this name)."""

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0][self.metric] is not None else None

    def counts(self) -> Counter:
        return Counter(r["state"] for r in self.rows)

    def table(self, n: int = SHOWN) -> str:
        return leaderboard_table(self.rows, n, self.metric)

    def summary_line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().most_common())
        best = self.best
        name = "top-1" if self.metric == "top1" else self.metric
        head = f"best val {name} {best[self.metric]:.1%} (trial {best['trial']})" if best else "no trial finished"
        refit = self.refit
        if refit:
            head += (
                f"; refit of the {refit['of']} best on the full features: {refit['top1']:.1%} (trial "
                f"{refit['trial']}) in {refit['seconds']:.0f}s"
            )
        where = f" -> {self.best_checkpoint}" if self.best_checkpoint else ""
        return (
            f"sweep {self.study}: {head}; {len(self.rows)} trials ({counts}), {self.trials_here} run here in "
            f"{self.seconds:.0f}s{where}"
        )


# ---------------------------------------------------------------------------------------------------- the sweep
def build_config(out, config: SweepConfig | None = None, **options) -> SweepConfig:
    return config_with(SweepConfig, config, {"out": out}, options, "sweep")


def sweep(
    cache: str | Path, out: str | Path | None = None, *, config: SweepConfig | None = None, **options
) -> SweepResult:
    """Search train-head settings on `cache`; write the sweep folder `out` (see docs/sweep.md).

    Options are SweepConfig fields: space (a YAML file, or a dict of the same form: {"hidden": [64, 128],
    "lr": {"low": 1e-4, "high": 1e-2, "log": True}}), params=["dropout=0:0.5:0.1"], trials=30, strategy="grid",
    pruner="halving", reduce_dim=256, storage=..., study=..., resume=True, ... Raises SpaceError for a bad space,
    SweepError for a study that cannot be used, and what `train_head` raises for unusable data.
    """
    return _Sweep(cache, build_config(out, config, **options)).run()


class _Sweep:
    def __init__(self, cache, cfg: SweepConfig):
        self.cache, self.cfg = Path(cache), cfg
        self.scores = FRAME_METRICS if cfg.target == "frames" else VIDEO_METRICS
        self.started = time.perf_counter()

    # ---------------------------------------------------------------------------------------------- setup
    def _space(self, recorded: dict | None) -> SearchSpace:
        """The space of --space/--param; else the study's own (when it has one); else the default SWEEP_SPACE."""
        cfg = self.cfg
        if cfg.space is not None or cfg.params:
            return parse_space(cfg.space, cfg.params)
        if recorded is None:
            space = default_space(cfg.target)
            log.info("no --space or --param: searching the default space %s", "; ".join(space.describe()))
            return space
        return SearchSpace(parse_mapping(recorded, "the study's space"))

    def run(self) -> SweepResult:
        import optuna

        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.runtime.threads or cpu_count())
        with quiet_optuna():
            self.storage_url, storage = open_storage(cfg.storage, cfg.out, cfg.heartbeat, cfg.grace)
            self.storage = storage
            name = cfg.study or cfg.out.resolve().name
            self.name = name
            try:
                existing = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                existing = None
            recorded = existing.user_attrs.get("sweep") if existing is not None else None
            space = self._space(recorded["space"] if recorded else None)
            if space.varying and cfg.strategy == "grid":
                space.grid()  # a space without a grid fails here, before the data is read
            if existing is not None and not cfg.resume and any(counted(t) for t in existing.get_trials(deepcopy=False)):
                raise SweepError(
                    f"study {name!r} in {self.storage_url} already has trials: pass --resume to continue "
                    f"it, or choose another --study or --out"
                )
            self.space = space
            self.trials = self._budget(space)

            data, reduction, full = self._load()
            self.device = pick_device(cfg.runtime.device)
            identity = self._identity(space, data)
            if recorded is not None:
                self._check_same(recorded, identity)
            study = self._create_or_join(storage, name, space, identity, existing)
            self.study = study
            (cfg.out / "sweep.json").write_text(
                json.dumps(
                    {
                        "study": name,
                        "storage": self.storage_url,
                        "trials": self.trials,
                        "config": cfg.to_dict(),
                        **identity,
                    },
                    indent=1,
                )
                + "\n"
            )
            log.info(
                "study %s in %s: %d trials of %s", name, self.storage_url, self.trials, "; ".join(space.describe())
            )
            board = Leaderboard(cfg.out, name, self.storage_url, self.trials, space, cfg.metric, self.scores)
            loop = TrialLoop(cfg, space, self.trials, self.device, self.scores, storage, name, board, self.started)
            try:
                loop.run(study, data, reduction)
            finally:
                rows = board.write(study.get_trials(deepcopy=False))
            del data
            refitted = refit(cfg, space, rows, full, self.cache, self.device) if cfg.refits else None
        plot = None
        if cfg.plots:
            plot = plot_search(rows, space, importances(study, space), cfg.out / "search.png", cfg.metric)
        best_ckpt = cfg.out / "best.pt" if (cfg.out / "best.pt").is_file() else None
        return SweepResult(
            cfg.out,
            name,
            self.storage_url,
            rows,
            best_ckpt,
            plot,
            loop.trials_here,
            time.perf_counter() - self.started,
            refitted,
            cfg.metric,
        )

    def _create_or_join(self, storage, name: str, space: SearchSpace, identity: dict, existing):
        """The study, created with --seed for its sampler, or joined with a seed of this process (so that workers
        and resumed runs never repeat the first process's draws)."""
        import optuna

        cfg = self.cfg
        pruner = make_pruner(cfg.pruner, cfg.prune_warmup, self.trials)
        if existing is None:
            try:
                study = optuna.create_study(
                    storage=storage,
                    study_name=name,
                    direction="maximize",
                    pruner=pruner,
                    sampler=make_sampler(cfg.strategy, space, self.trials, cfg.seed),
                )
                study.set_user_attr("sweep", identity)
                return study
            except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
                pass
        seed = int(np.random.SeedSequence([cfg.seed, os.getpid(), time.time_ns() % 2**32]).generate_state(1)[0])
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            pruner=pruner,
            sampler=make_sampler(cfg.strategy, space, self.trials, seed),
        )
        for _ in range(50):  # its creator records the settings right after creating it
            recorded = study.user_attrs.get("sweep")
            if recorded is not None:
                self._check_same(recorded, identity)
                return study
            time.sleep(0.1)
        study.set_user_attr("sweep", identity)
        return study

    def _budget(self, space: SearchSpace) -> int:
        cfg = self.cfg
        if cfg.strategy == "grid":
            size = space.grid_size()
            if cfg.trials is not None and cfg.trials > size:
                log.warning("--trials %d: the grid has %d combinations; running %d", cfg.trials, size, size)
            return min(cfg.trials or size, size)
        return cfg.trials or SWEEP_TRIALS

    def _load(self) -> tuple[LabelledData, Reduction | None, LabelledData | None]:
        """The cache, read once for every trial (the clip length is checked per trial), reduced if asked; and the
        full features again for the refit (kept in RAM when they were read into it)."""
        cfg = self.cfg
        base = cfg.train_config(cfg.out, clip_len=None)
        data = load_labelled(self.cache, replace(base, runtime=replace(base.runtime, progress=cfg.runtime.progress)))
        if cfg.reduce_dim is None:
            return data, None, None
        t = time.perf_counter()
        reduction = fit_pca(data.store, data.train_idx, cfg.reduce_dim)
        store = reduce_store(data.store, reduction)
        log.info("reduced %d -> %d dimensions in %.1fs", data.store.dim, reduction.dim, time.perf_counter() - t)
        # The reduced rows are already in standardised coordinates, which the heads take as they are (standardising
        # each component again would whiten them: every direction as loud as the top ones).
        stats = (torch.zeros(reduction.dim), torch.ones(reduction.dim))
        reduced = replace(data, store=store, stats=stats, notes={**data.notes, "reduction": reduction.describe()})
        return reduced, reduction, (data if cfg.refits and data.store.in_memory else None)

    def _identity(self, space: SearchSpace, data: LabelledData) -> dict:
        """What every worker of a study must share: the space and the data its trials see."""
        cfg = self.cfg
        return {
            "space": space.to_dict(),
            "strategy": cfg.strategy,
            "data": {
                "feature_spec_id": data.spec.id,
                "classes": data.classes,
                "split": data.split.method,
                "train": len(data.split.train),
                "val": len(data.split.val),
                "reduce_dim": cfg.reduce_dim,
                "target": cfg.target,
                "metric": cfg.metric,
            },
        }

    def _check_same(self, recorded: dict, identity: dict) -> None:
        diffs = []
        if recorded.get("space") != identity["space"]:
            diffs.append(
                f"space: the study's {json.dumps(recorded.get('space'))} != this {json.dumps(identity['space'])}"
            )
        for k, v in identity["data"].items():
            theirs = recorded.get("data", {}).get(k, LEGACY_DATA.get(k))
            if theirs != v:
                diffs.append(f"{k}: the study's {theirs!r} != this {v!r}")
        if diffs:
            raise SweepError(
                f"study {self.name!r} in {self.storage_url} was made with other settings; every worker "
                f"of a study needs the same space, features, split, --reduce-dim, --target and --metric:\n  "
                + "\n  ".join(d if len(d) < 400 else d[:400] + "..." for d in diffs)
            )
        if recorded.get("strategy") != identity["strategy"]:
            log.warning(
                "study %s was started with --strategy %s; this worker samples with %s",
                self.name,
                recorded.get("strategy"),
                identity["strategy"],
            )

    # ------------------------------------------------------------------------------------------- trials
