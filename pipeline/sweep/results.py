"""What a study shows: leaderboard.csv/.json (one row per trial, best first), best.pt of the best trial, the
leaderboard as text, Optuna's parameter importances and search.png.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.config import VIDEO_METRICS
from pipeline.sweep.space import SearchSpace
from pipeline.sweep.storage import quiet_optuna
from pipeline.train_head.metrics import pyplot, to_json

log = logging.getLogger(__name__)

SHOWN = 10  # leaderboard rows printed
PLOTTED_PARAMS = 3  # panels of search.png besides the value-per-trial one
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


class Leaderboard:
    """Writes the leaderboard files of a study into the sweep folder `out` (every worker writes the whole study's)
    and copies the best trial's checkpoint to OUT/best.pt when its run folder is reachable from here."""

    def __init__(self, out: Path, study: str, storage_url: str, trials: int, space: SearchSpace, metric: str, scores):
        self.out, self.study, self.storage_url, self.trials = out, study, storage_url, trials
        self.space, self.metric, self.scores = space, metric, scores
        self.best_copied: int | None = None

    def write(self, trials) -> list[dict]:
        """leaderboard.csv/.json from the whole study, and best.pt when the best trial's run folder is here."""
        rows = leaderboard_rows(trials, self.metric, self.scores)
        out = self.out
        names = list(self.space.varying)
        names += sorted({k for r in rows for k in r["params"]} - set(names))
        write_atomic(
            out / "leaderboard.json",
            to_json(
                {
                    "study": self.study,
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
            self.metric,
            *[s for s in self.scores if s != self.metric],
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
            if r[self.metric] is None:
                return
            source = Path(r["run"]) / "best.pt" if r["run"] else None
            if source is not None and source.is_file():
                if self.best_copied != r["trial"]:
                    target = self.out / "best.pt"
                    tmp = target.with_name(f".best.pt.{os.getpid()}.tmp")
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
                    write_atomic(self.out / "best.json", json.dumps(r, indent=1) + "\n")
                    self.best_copied = r["trial"]
                return


def write_atomic(path: Path, text: str) -> None:
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
def importances(study, space: SearchSpace) -> dict[str, float]:
    """Optuna's parameter importances (complete trials); empty when it cannot say (too few trials, one value)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not space.varying:
        return {}
    try:
        with quiet_optuna():
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
