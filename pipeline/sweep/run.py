"""`pipeline sweep`: many head configurations on one cache, searched by Optuna (grid, random, TPE), weak trials pruned
from their per-epoch validation, in one process or in many cooperating on one study (SQLite, journal file or RDB).

The cache is read (and optionally PCA-reduced) once per process; every trial is a `train_head` run on that shared
data, with its own run folder under OUT/trials/NNNN, or one head of a stack (`pipeline.sweep.stack`) that trains
as that run would. Trials are asked from the study up to --stack at a time (ask and tell, with this process's own
heartbeats); after a reduced sweep the --refit best settings are trained again on the full features (OUT/refit/).

    pipeline sweep cache.h5 --space space.yaml --trials 50 --out runs/sweep-heads
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import FRAME_METRICS, SWEEP_TRIALS, VIDEO_METRICS, SweepConfig, TrainConfig, config_with
from pipeline.data.labelled import LabelledData, load_labelled
from pipeline.runtime import cpu_count, pick_device
from pipeline.sweep.reduce import Reduction, fit_pca, fold_reduction, reduce_store
from pipeline.sweep.space import SearchSpace, SpaceError, default_space, parse_mapping, parse_space
from pipeline.sweep.stack import stack_groups, train_stack
from pipeline.train_head.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train_head.metrics import pyplot, to_json
from pipeline.train_head.recorder import is_better
from pipeline.train_head.train import TrainResult, train_head

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"  # the default storage: SQLite in the sweep folder
HEARTBEAT_S = 15  # RDB storages: a running trial records a heartbeat this often ...
GRACE_S = 60  # ... and one silent for this long is taken as dead (its worker was killed): failed, then retried once
HALVING_RATE = 3  # successive halving / hyperband: keep the best third at each rung
MEDIAN_STARTUP = 5  # median pruner: the first trials (at most this many, a quarter of --trials) are never pruned
DUPLICATES_IN_A_ROW = 25  # draws of already trained settings in a row after which the space counts as exhausted
SHOWN = 10  # leaderboard rows printed
PLOTTED_PARAMS = 3  # panels of search.png besides the value-per-trial one
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
LEGACY_DATA = {"target": "videos", "metric": "top1"}  # what studies recorded before these settings existed


class SweepError(RuntimeError):
    """A study that cannot be used as asked (it exists and --resume was not given; another space or other data)."""


class _TrialError(Exception):
    """A trial whose settings do not fit together; recorded, the sweep goes on."""


@dataclass
class _Pending:
    """A trial asked from the study, until it is told."""

    trial: object
    params: dict
    run: Path
    cfg: TrainConfig | None = None
    best: dict = field(default_factory=lambda: {"score": -1.0, "loss": math.inf, "epoch": 0, "scores": {}, "epochs": 0})
    """Its best val --metric so far (and that epoch's loss and other scores), and the epochs it ran."""
    stopped: str | None = None
    started: bool = False
    done: bool = False


class _Heartbeats:
    """Heartbeats of this process's trials from the moment they are asked (RDB storages): Optuna's own thread beats
    only inside study.optimize, and a trial asked ahead waits for its turn. Other workers take a trial silent for
    GRACE_S as that of a killed worker."""

    def __init__(self, storage):
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.storage = storage if interval else None
        self.ids: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sweep-heartbeats", daemon=True)

    def __enter__(self) -> _Heartbeats:
        if self.storage is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial) -> None:
        if self.storage is not None:
            self.ids.add(trial._trial_id)  # Optuna has no public id of an asked trial
            self.storage.record_heartbeat(trial._trial_id)

    def discard(self, trial) -> None:
        self.ids.discard(trial._trial_id)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for trial_id in list(self.ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a busy database: the next beat retries
                    log.debug("heartbeat of trial %d: %s", trial_id, e)


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


# -------------------------------------------------------------------------------------------------- storage
def open_storage(url: str | None, out: Path):
    """(url, Optuna storage) for --storage: an RDB URL (with heartbeats), a journal file, or OUT/study.db."""
    import optuna

    if url is None:
        url = f"sqlite:///{(out / STUDY_FILE).resolve()}"
    journal = url.startswith("journal:") or ("://" not in url and Path(url).suffix in (".log", ".jsonl", ".journal"))
    if journal:
        path = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except AttributeError:  # Optuna < 4.0
            backend = optuna.storages.JournalFileStorage(str(path))
        return f"journal:{path.resolve()}", optuna.storages.JournalStorage(backend)
    if "://" not in url:
        if Path(url).suffix not in (".db", ".sqlite", ".sqlite3"):
            raise ValueError(
                f"--storage {url!r}: expected an RDB URL (sqlite:///PATH, postgresql://..., "
                f"mysql+pymysql://...), journal:PATH, or a file ending in .db (SQLite) or .log (journal)"
            )
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    retry = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    )
    import inspect

    callback_arg = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )
    kwargs = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S, callback_arg: retry(max_retry=1)}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # workers wait for each other's writes
    import sqlalchemy

    for attempt in range(6):
        try:
            return url, optuna.storages.RDBStorage(url, **kwargs)
        except sqlalchemy.exc.SQLAlchemyError:  # workers creating the same new database at once: one wins, retry
            if attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1) * (1 + np.random.default_rng().random()))
    raise AssertionError("unreachable")


@contextmanager
def _quiet_optuna():
    """Optuna's per-trial INFO lines and experimental-feature warnings off while sweeping (the bar says it all)."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
            # e.g. the importance evaluator on a few trials that tie: the sweep reports no importances instead
            warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def make_sampler(strategy: str, space: SearchSpace, trials: int, seed: int):
    import optuna

    if strategy == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)), constant_liar=True)


def make_pruner(name: str, warmup: int, trials: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=min(MEDIAN_STARTUP, max(1, trials // 4)), n_warmup_steps=warmup
        )
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup, reduction_factor=HALVING_RATE)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup, reduction_factor=HALVING_RATE)
    return optuna.pruners.NopPruner()


def _counted(t) -> bool:
    """Whether a trial takes one of the study's --trials: finished or running ones, and failures of its own settings;
    not a trial of a killed worker (failed without an error of its own, and retried), a retry still waiting to run,
    nor a surplus one."""
    if t.user_attrs.get("surplus") or "duplicate_of" in t.user_attrs or t.state.name == "WAITING":
        return False
    if t.state.name == "FAIL":
        return "error" in t.user_attrs
    return True


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
        self.trials_here = 0
        self.best_copied: int | None = None

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
        with _quiet_optuna():
            self.storage_url, storage = open_storage(cfg.storage, cfg.out)
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
            if (
                existing is not None
                and not cfg.resume
                and any(_counted(t) for t in existing.get_trials(deepcopy=False))
            ):
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
            try:
                self._optimize(study, data, reduction)
            finally:
                rows = self.finish(study)
            del data
            refit = self._refit(rows, full) if cfg.refits else None
        plot = None
        if cfg.plots:
            plot = plot_search(rows, space, _importances(study, space), cfg.out / "search.png", cfg.metric)
        best_ckpt = cfg.out / "best.pt" if (cfg.out / "best.pt").is_file() else None
        return SweepResult(
            cfg.out,
            name,
            self.storage_url,
            rows,
            best_ckpt,
            plot,
            self.trials_here,
            time.perf_counter() - self.started,
            refit,
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
    def _optimize(self, study, data: LabelledData, reduction: Reduction | None) -> None:
        """Ask the study for trials (up to --stack at once) and train them until the study has its --trials, the
        time budget is spent, or the sampler has nothing left."""
        import optuna

        cfg = self.cfg
        optuna.storages.fail_stale_trials(study)  # trials of killed workers: failed (and retried) before counting
        # The time budget counts from the start of the sweep (reading the cache included).
        remaining = None if cfg.timeout is None else cfg.timeout - (time.perf_counter() - self.started)
        self.deadline = None if remaining is None else time.time() + remaining
        done = sum(1 for t in study.get_trials(deepcopy=False) if _counted(t) and t.state.is_finished())
        self.bar = tqdm(
            total=self.trials,
            initial=min(done, self.trials),
            desc="sweep",
            unit="trial",
            disable=not cfg.runtime.progress,
            dynamic_ncols=True,
        )
        try:
            if self._left(study) <= 0:
                log.info("study %s already has its %d trials", self.name, self.trials)
                return
            if remaining is not None and remaining <= 0:
                log.warning("--timeout %gs was spent before the first trial (reading the cache)", cfg.timeout)
                return
            self.duplicates_in_a_row = 0
            with _Heartbeats(self.storage) as self.beats:
                while not self._past_deadline() and (left := self._left(study)) > 0:
                    asked = self._ask(study, min(left, cfg.stack_size))
                    if not asked:
                        if self.duplicates_in_a_row and not self._exhausted(study):
                            continue  # only settings trained before were drawn: ask again
                        break
                    self._run(study, asked, data, reduction)
        finally:
            self.bar.close()

    def _left(self, study) -> int:
        import optuna

        optuna.storages.fail_stale_trials(study)
        return self.trials - sum(1 for t in study.get_trials(deepcopy=False) if _counted(t))

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def _ask(self, study, n: int) -> list[_Pending]:
        """Up to n new trials with their settings; a trial whose settings do not fit together fails at once."""
        asked = []
        for _ in range(n):
            trial = study.ask()
            self.beats.add(trial)
            ahead = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t))
            if ahead >= self.trials:  # other workers took the last places since we counted
                trial.set_user_attr("surplus", True)
                self._tell(study, trial, state="FAIL")
                break
            params = self.space.suggest(trial)
            if self._duplicate(study, trial):
                continue
            self.duplicates_in_a_row = 0
            run = self.cfg.out / "trials" / f"{trial.number:04d}"
            trial.set_user_attr("run", str(run.resolve()))
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            item = _Pending(trial, params, run)
            try:
                item.cfg = self.cfg.train_config(run, **params)
            except ValueError as e:
                self._conclude(study, item, _TrialError(f"settings do not fit together: {e}"), 0.0, None)
                continue
            asked.append(item)
        return asked

    def _duplicate(self, study, trial) -> bool:
        """Whether `trial` drew the settings of a trial that finished or is running; then it is told at once and
        never trained: the earlier value for a complete one (the sampler learns the same as from a retraining),
        pruned for a pruned or running one. Duplicates take no place of --trials and no row of the leaderboard."""
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or "duplicate_of" in t.user_attrs or t.params != trial.params:
                continue
            if t.state.name not in ("COMPLETE", "PRUNED", "RUNNING") or t.user_attrs.get("surplus"):
                continue
            trial.set_user_attr("duplicate_of", t.number)
            log.info(
                "trial %d drew the settings of trial %d (%s): not trained again",
                trial.number,
                t.number,
                t.state.name.lower(),
            )
            if t.state.name == "COMPLETE":
                self._tell(study, trial, value=t.value)
            else:
                self._tell(study, trial, state="PRUNED")
            self.duplicates_in_a_row += 1
            return True
        return False

    def _exhausted(self, study) -> bool:
        """True when every setting of the space has been trained (a space with a grid), or the sampler has drawn
        only trained settings DUPLICATES_IN_A_ROW times in a row."""
        if self.duplicates_in_a_row >= DUPLICATES_IN_A_ROW:
            log.warning(
                "the last %d trials drew settings that were trained already: stopping (the space looks "
                "exhausted; widen it to search more)",
                self.duplicates_in_a_row,
            )
            return True
        try:
            size = self.space.grid_size()
        except SpaceError:  # a continuous range: no end
            return False
        trained = {
            json.dumps(t.params, sort_keys=True)
            for t in study.get_trials(deepcopy=False)
            if _counted(t) and t.state.name in ("COMPLETE", "PRUNED", "RUNNING")
        }
        if len(trained) >= size:
            log.warning(
                "all %d settings of the space have been trained: stopping before --trials %d", size, self.trials
            )
            return True
        return False

    def _run(self, study, asked: list[_Pending], data: LabelledData, reduction: Reduction | None) -> None:
        """Train the asked trials: those of one stack_key as one model, the others one by one."""
        groups = [[asked[i] for i in g] for g in stack_groups([item.cfg for item in asked], self.device)]
        try:
            for group in groups:
                if self._past_deadline():
                    break
                if len(group) == 1:
                    self._train_alone(study, group[0], data, reduction)
                else:
                    self._train_stacked(study, group, data, reduction)
        finally:  # trials asked but not trained (the time budget, an interrupt): queued again for a later run
            for item in asked:
                if not item.done:
                    study.enqueue_trial(item.trial.params, user_attrs={"retry_of": item.trial.number})
                    if not item.started:
                        item.trial.set_user_attr("surplus", True)
                    self._tell(study, item.trial, state="FAIL")

    def _train_alone(self, study, item: _Pending, data: LabelledData, reduction: Reduction | None) -> None:
        import optuna

        item.started = True
        self.trials_here += 1
        started = time.perf_counter()
        try:
            outcome = train_head(data.cache, config=item.cfg, data=data, on_epoch=self._hook(item))
        except (optuna.TrialPruned, ValueError, RuntimeError) as e:  # pruned; a clip longer than every sequence; OOM
            outcome = e
        self._conclude(study, item, outcome, time.perf_counter() - started, reduction)

    def _train_stacked(self, study, group: list[_Pending], data: LabelledData, reduction: Reduction | None) -> None:
        for item in group:
            item.started = True
            item.trial.set_user_attr("stack", [i.trial.number for i in group])
        self.trials_here += len(group)
        started = time.perf_counter()
        try:
            outcomes = train_stack(data, [i.cfg for i in group], self.device, [self._hook(i) for i in group])
        except (ValueError, RuntimeError) as e:  # settings that fail every head alike (a clip too long)
            outcomes = [e] * len(group)
        share = (time.perf_counter() - started) / len(group)  # a stacked trial's seconds: its share of the stack's
        for item, outcome in zip(group, outcomes, strict=True):
            self._conclude(study, item, outcome, share, reduction)

    def _hook(self, item: _Pending):
        """The trial's on_epoch: report its best val --metric so far; stop it when pruned or out of time."""
        import optuna

        best, metric = item.best, self.cfg.metric

        def on_epoch(row: dict) -> None:
            best["epochs"] = row["epoch"]
            if is_better(row["val_" + metric], row["val_loss"], best):
                best.update(score=row["val_" + metric], loss=row["val_loss"], epoch=row["epoch"])
                best["scores"] = {s: row["val_" + s] for s in self.scores}
            item.trial.report(best["score"], row["epoch"])
            if self._past_deadline():
                item.stopped = "timeout"
                raise optuna.TrialPruned(f"time budget spent at epoch {row['epoch']}")
            if item.trial.should_prune():
                item.stopped = f"pruned at epoch {row['epoch']}"
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']}")

        return on_epoch

    def _conclude(self, study, item: _Pending, outcome, seconds: float, reduction: Reduction | None) -> None:
        """Record a trained (or failed) trial in the study: its value, pruned, or its error."""
        import optuna

        trial, best = item.trial, item.best
        if reduction is not None:
            _fold_run(item.run, reduction)
        if isinstance(outcome, TrainResult):
            s = outcome.summary
            best.update(loss=s["val_loss"], scores={k: s[k] for k in self.scores})
            item.stopped = "early stop" if s["stopped_early"] else None
        for k, v in {
            "epochs_run": best["epochs"],
            "best_epoch": best["epoch"],
            **{k: best["scores"].get(k) for k in self.scores if k != self.cfg.metric},
            "val_loss": None if best["loss"] == math.inf else best["loss"],
            "seconds": seconds,
            "stopped": item.stopped,
        }.items():
            trial.set_user_attr(k, v)
        if isinstance(outcome, TrainResult):
            self._tell(study, trial, value=outcome.summary[self.cfg.metric])
        elif isinstance(outcome, optuna.TrialPruned):
            self._tell(study, trial, state="PRUNED")
        else:
            message = str(outcome) if isinstance(outcome, _TrialError) else f"{type(outcome).__name__}: {outcome}"
            trial.set_user_attr("error", message)
            log.warning("trial %d failed: %s", trial.number, message)
            self._tell(study, trial, state="FAIL")
        item.done = True
        self._after_trial(study)

    def _tell(self, study, trial, value: float | None = None, state: str | None = None) -> None:
        from optuna.trial import TrialState

        try:
            study.tell(trial, value, state=None if state is None else TrialState[state])
        except RuntimeError as e:  # the grid sampler stops an optimize loop at its last point; the trial is told
            if "Study.stop" not in str(e):
                raise
        finally:
            self.beats.discard(trial)

    def _after_trial(self, study) -> None:
        trials = study.get_trials(deepcopy=False)
        finished = sum(1 for t in trials if _counted(t) and t.state.is_finished())
        self.bar.n = min(finished, self.trials)
        rows = self.write_results(trials)
        if rows and rows[0][self.cfg.metric] is not None:
            self.bar.set_postfix(best=f"{rows[0][self.cfg.metric]:.1%}", trial=rows[0]["trial"])
        self.bar.refresh()

    # ------------------------------------------------------------------------------------------- refit
    def _refit(self, rows: list[dict], full: LabelledData | None) -> dict | None:
        """Train the settings of the --refit best trials again on the full features, each as `pipeline train-head`
        would (same seed, split and epochs, no pruning; those of one stack_key as one stack), into OUT/refit/NNNN/;
        the best of them (val top-1, then val loss) becomes best.pt. Returns its entry of best.json's `refits`."""
        cfg = self.cfg
        chosen = [r for r in rows if r[cfg.metric] is not None][: cfg.refits]
        if not chosen:
            return None
        configs = [
            cfg.train_config(cfg.out / "refit" / f"{r['trial']:04d}", **{**self.space.fixed, **r["params"]})
            for r in chosen
        ]
        configs = [replace(c, runtime=replace(c.runtime, progress=cfg.runtime.progress)) for c in configs]
        what = f"refit on the full features: trials {', '.join(str(r['trial']) for r in chosen)}"
        if cfg.runtime.progress:
            tqdm.write(what, file=sys.stderr)
        else:
            log.info(what)
        started = time.perf_counter()
        if full is None:  # the cache was read lazily: read it again
            full = load_labelled(self.cache, configs[0])
        results: dict[int, TrainResult] = {}
        for members in stack_groups(configs, self.device):
            if len(members) == 1:
                results[members[0]] = train_head(full.cache, config=configs[members[0]], data=full)
                continue
            stacked = train_stack(full, [configs[i] for i in members], self.device, progress=cfg.runtime.progress)
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
        _write_atomic(cfg.out / "best.json", to_json({**row, "refit": best, "refits": refits}))
        log.info(
            "refit: trial %d's settings score %.1f%% on the full features (%.1f%% reduced)",
            best["trial"],
            100 * best["top1"],
            100 * best["reduced_top1"],
        )
        return best

    # ----------------------------------------------------------------------------------------- results
    def finish(self, study) -> list[dict]:
        return self.write_results(study.get_trials(deepcopy=False))

    def write_results(self, trials) -> list[dict]:
        """leaderboard.csv/.json from the whole study, and best.pt when the best trial's run folder is here."""
        rows = leaderboard_rows(trials, self.cfg.metric, self.scores)
        out = self.cfg.out
        names = list(self.space.varying)
        names += sorted({k for r in rows for k in r["params"]} - set(names))
        _write_atomic(
            out / "leaderboard.json",
            to_json(
                {
                    "study": self.name,
                    "storage": self.storage_url,
                    "trials": self.trials,
                    "space": self.space.to_dict(),
                    "rows": rows,
                }
            ),
        )
        columns = [
            "rank",
            "trial",
            "state",
            self.cfg.metric,
            *[s for s in self.scores if s != self.cfg.metric],
            "val_loss",
            "epochs_run",
            "best_epoch",
            "seconds",
            *names,
            "stopped",
            "error",
            "run",
            "worker",
            "stack",
        ]
        tmp = out / f".leaderboard.csv.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for rank, r in enumerate(rows, start=1):
                cells = {**{k: v for k, v in r.items() if k != "params"}, **r["params"], "rank": rank}
                writer.writerow({k: _cell(cells.get(k)) for k in columns})
        os.replace(tmp, out / "leaderboard.csv")
        self._copy_best(rows)
        return rows

    def _copy_best(self, rows: list[dict]) -> None:
        for r in rows:
            if r[self.cfg.metric] is None:
                return
            source = Path(r["run"]) / "best.pt" if r["run"] else None
            if source is not None and source.is_file():
                if self.best_copied != r["trial"]:
                    target = self.cfg.out / "best.pt"
                    tmp = target.with_name(f".best.pt.{os.getpid()}.tmp")
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
                    _write_atomic(self.cfg.out / "best.json", json.dumps(r, indent=1) + "\n")
                    self.best_copied = r["trial"]
                return


def _fold_run(run: Path, reduction: Reduction) -> None:
    """Rewrite a trial's checkpoints trained on reduced rows as checkpoints on the cache's own features."""
    for name in ("best.pt", "last.pt"):
        path = run / name
        if path.is_file():
            ckpt = load_checkpoint(path)
            if ckpt.dims.in_dim == reduction.dim:
                save_checkpoint(fold_reduction(ckpt, reduction), path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return " ".join(map(str, v))
    return str(v)


# ------------------------------------------------------------------------------------------------- leaderboard
def leaderboard_rows(trials, metric: str = "top1", scores: tuple[str, ...] = VIDEO_METRICS) -> list[dict]:
    """One row per trial (surplus ones left out), best first: by its val `metric` (the study's value), then val
    loss, then trial number. Rows hold the metric and the other `scores` under their names."""
    rows = []
    for t in trials:
        a = t.user_attrs
        if a.get("surplus") or "duplicate_of" in a:
            continue
        seconds = a.get("seconds")
        if seconds is None and t.datetime_start is not None and t.datetime_complete is not None:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "trial": t.number,
                "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
                metric: t.value,
                **{s: a.get(s) for s in scores if s != metric},
                "val_loss": a.get("val_loss"),
                "epochs_run": a.get("epochs_run"),
                "best_epoch": a.get("best_epoch"),
                "seconds": seconds,
                "params": dict(t.params or t.system_attrs.get("fixed_params", {})),  # waiting: queued settings
                "stopped": a.get("stopped"),
                "error": a.get("error"),
                "run": a.get("run"),
                "worker": a.get("worker"),
                "stack": a.get("stack"),
            }
        )

    def key(r):
        return (
            r[metric] is None,
            -(r[metric] or 0.0),
            math.inf if r["val_loss"] is None else r["val_loss"],
            r["trial"],
        )

    return sorted(rows, key=key)


def leaderboard_table(rows: list[dict], n: int = SHOWN, metric: str = "top1") -> str:
    """The first n rows as an aligned text table."""
    names = []
    for r in rows:
        names += [k for k in r["params"] if k not in names]
    header = ["#", "trial", "state", "top-1" if metric == "top1" else metric, "epochs", "sec", *names]
    lines = [header]
    for rank, r in enumerate(rows[:n], start=1):
        state = r["state"] if not r["stopped"] or r["state"] != "pruned" else r["stopped"]
        lines.append(
            [
                str(rank),
                str(r["trial"]),
                state,
                "-" if r[metric] is None else f"{r[metric]:.1%}",
                "-" if r["epochs_run"] is None else str(r["epochs_run"]),
                "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
                *[_short(r["params"].get(k)) for k in names],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(
            c.rjust(w) if i in (0, 1, 3, 4, 5) else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )
    if len(rows) > n:
        text += f"\n... {len(rows) - n} more in leaderboard.csv"
    return text


def _short(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------- plot
def _importances(study, space: SearchSpace) -> dict[str, float]:
    """Optuna's parameter importances (complete trials); empty when it cannot say (too few trials, one value)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not space.varying:
        return {}
    try:
        with _quiet_optuna():
            return dict(optuna.importance.get_param_importances(study))
    except (ImportError, RuntimeError, ValueError) as e:  # an evaluator needing scikit-learn; a degenerate study
        log.info("no parameter importances: %s", e)
        return {}


def plot_search(
    rows: list[dict], space: SearchSpace, importances: dict[str, float], path: Path, metric: str = "top1"
) -> Path | None:
    """search.png: the val metric per trial (best so far as a line), then against the most important parameters
    (pruned trials as crosses: their best before they were stopped). None without matplotlib."""
    plt = pyplot()
    scored = [r for r in rows if r[metric] is not None]
    if plt is None or not scored:
        return None
    order = [n for n in importances if n in space.varying] + [n for n in space.varying if n not in importances]
    shown = order[:PLOTTED_PARAMS]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.2 * (1 + len(shown)), 3.8), squeeze=False)
    axes = axes[0]
    by_trial = sorted(scored, key=lambda r: r["trial"])
    for state, marker in (("complete", "o"), ("pruned", "x")):
        pts = [r for r in by_trial if r["state"] == state]
        axes[0].scatter([r["trial"] for r in pts], [r[metric] for r in pts], marker=marker, label=state, alpha=0.8)
    axes[0].plot(
        [r["trial"] for r in by_trial],
        np.maximum.accumulate([r[metric] for r in by_trial]),
        color="k",
        lw=1,
        label="best so far",
    )
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel(f"val {metric}")
    axes[0].legend(fontsize=8)
    for ax, name in zip(axes[1:], shown, strict=True):
        p = space.params[name]
        pts = [r for r in scored if name in r["params"]]
        if p.kind == "choice":
            labels = [_short(v) for v in p.values]
            xs = [labels.index(_short(r["params"][name])) if _short(r["params"][name]) in labels else -1 for r in pts]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [r["params"][name] for r in pts]
            if p.log:
                ax.set_xscale("log")
        for state, marker in (("complete", "o"), ("pruned", "x")):
            sel = [i for i, r in enumerate(pts) if r["state"] == state]
            ax.scatter([xs[i] for i in sel], [pts[i][metric] for i in sel], marker=marker, alpha=0.8)
        imp = importances.get(name)
        ax.set_title(name + (f" (importance {imp:.2f})" if imp is not None else ""), fontsize=10)
        ax.set_xlabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
