"""The ask/tell loop of one sweep worker: trials asked from the study (up to --stack at once), trained alone or
stacked, reported per epoch for pruning, and told; settings drawn twice are never trained twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import SweepConfig, TrainConfig
from pipeline.data.labelled import LabelledData
from pipeline.runtime import progress_bar
from pipeline.sweep.reduce import Reduction, fold_reduction
from pipeline.sweep.results import Leaderboard
from pipeline.sweep.space import SearchSpace, SpaceError
from pipeline.sweep.stack import stack_groups, train_stack
from pipeline.sweep.storage import Heartbeats, counted
from pipeline.train_head.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train_head.recorder import is_better
from pipeline.train_head.train import TrainResult, train_head

log = logging.getLogger(__name__)

HALVING_RATE = 3  # successive halving / hyperband: keep the best third at each rung
MEDIAN_STARTUP = 5  # median pruner: the first trials (at most this many, a quarter of --trials) are never pruned
DUPLICATES_IN_A_ROW = 25  # draws of already trained settings in a row after which the space counts as exhausted


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


class TrialLoop:
    """Runs trials of `study` until it has its `trials` (counted over every worker), the time budget is spent, or
    the sampler has nothing left; the leaderboard is rewritten after each trial."""

    def __init__(
        self,
        cfg: SweepConfig,
        space: SearchSpace,
        trials: int,
        device,
        scores: tuple[str, ...],
        storage,
        name: str,
        leaderboard: Leaderboard,
        started: float,
    ):
        self.cfg, self.space, self.trials, self.device, self.scores = cfg, space, trials, device, scores
        self.storage, self.name, self.leaderboard, self.started = storage, name, leaderboard, started
        self.trials_here = 0

    def run(self, study, data: LabelledData, reduction: Reduction | None) -> None:
        """Ask the study for trials (up to --stack at once) and train them until the study has its --trials, the
        time budget is spent, or the sampler has nothing left."""
        import optuna

        cfg = self.cfg
        self.train_videos = len(data.split.train)
        optuna.storages.fail_stale_trials(study)  # trials of killed workers: failed (and retried) before counting
        # The time budget counts from the start of the sweep (reading the cache included).
        remaining = None if cfg.timeout is None else cfg.timeout - (time.perf_counter() - self.started)
        self.deadline = None if remaining is None else time.time() + remaining
        done = sum(1 for t in study.get_trials(deepcopy=False) if counted(t) and t.state.is_finished())
        self.bar = progress_bar(
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
            with Heartbeats(self.storage) as self.beats:
                while not self._past_deadline() and (left := self._left(study)) > 0:
                    asked = self._ask(study, min(left, cfg.stack_size))
                    if not asked:
                        if self.duplicates_in_a_row and not self._exhausted(study):
                            continue  # only settings trained before were drawn: ask again
                        break
                    self._train_asked(study, asked, data, reduction)
        finally:
            self.bar.close()

    def _left(self, study) -> int:
        import optuna

        optuna.storages.fail_stale_trials(study)
        return self.trials - sum(1 for t in study.get_trials(deepcopy=False) if counted(t))

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def _ask(self, study, n: int) -> list[_Pending]:
        """Up to n new trials with their settings; a trial whose settings do not fit together fails at once."""
        asked = []
        for _ in range(n):
            trial = study.ask()
            self.beats.add(trial)
            ahead = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t))
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
                item.cfg = self.cfg.train_config(run, self.train_videos, **params)
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
            if counted(t) and t.state.name in ("COMPLETE", "PRUNED", "RUNNING")
        }
        if len(trained) >= size:
            log.warning(
                "all %d settings of the space have been trained: stopping before --trials %d", size, self.trials
            )
            return True
        return False

    def _train_asked(self, study, asked: list[_Pending], data: LabelledData, reduction: Reduction | None) -> None:
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
        finished = sum(1 for t in trials if counted(t) and t.state.is_finished())
        self.bar.n = min(finished, self.trials)
        rows = self.leaderboard.write(trials)
        if rows and rows[0][self.cfg.metric] is not None:
            self.bar.set_postfix(best=f"{rows[0][self.cfg.metric]:.1%}", trial=rows[0]["trial"])
        self.bar.refresh()


def _fold_run(run: Path, reduction: Reduction) -> None:
    """Rewrite a trial's checkpoints trained on reduced rows as checkpoints on the cache's own features."""
    for name in ("best.pt", "last.pt"):
        path = run / name
        if path.is_file():
            ckpt = load_checkpoint(path)
            if ckpt.dims.in_dim == reduction.dim:
                save_checkpoint(fold_reduction(ckpt, reduction), path)
