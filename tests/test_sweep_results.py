"""What a study shows (pipeline/sweep/results.py): leaderboard rows and their order, the text table, the files and
best.pt, from trials made directly in Optuna (no training)."""

from __future__ import annotations

import csv
import json

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline.config import VIDEO_METRICS
from pipeline.sweep.results import Leaderboard, leaderboard_rows, leaderboard_table
from pipeline.sweep.space import parse_space

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def trial(number: int, state: TrialState, value: float | None, lr: float, **attrs):
    t = create_trial(
        state=state, value=value, params={"lr": lr}, distributions=LR, user_attrs={"seconds": 1.0, **attrs}
    )
    t.number = number
    return t


def study_trials(tmp_path):
    run = tmp_path / "trials" / "0002"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"checkpoint of trial 2")
    return [
        trial(0, TrialState.COMPLETE, 0.50, 1e-3, val_loss=0.9, epochs_run=3),
        trial(1, TrialState.PRUNED, 0.25, 1e-2, stopped="pruned at epoch 1", epochs_run=1),
        trial(2, TrialState.COMPLETE, 0.75, 3e-3, val_loss=0.7, epochs_run=3, run=str(run)),
        trial(3, TrialState.COMPLETE, 0.75, 4e-3, val_loss=0.6, epochs_run=3),  # same score, lower loss: first
        trial(4, TrialState.FAIL, None, 5e-2, error="settings do not fit together"),
        trial(5, TrialState.COMPLETE, 0.99, 2e-3, surplus=True),  # past --trials: no row
        trial(6, TrialState.COMPLETE, 0.50, 2e-3, duplicate_of=0),  # drew trial 0's settings: no row
    ]


def test_rows_best_first_ties_by_loss_and_surplus_left_out(tmp_path):
    rows = leaderboard_rows(study_trials(tmp_path), "top1", VIDEO_METRICS)
    assert [r["trial"] for r in rows] == [3, 2, 0, 1, 4]
    assert [r["state"] for r in rows] == ["complete", "complete", "complete", "pruned", "failed"]
    assert rows[0]["params"] == {"lr": 4e-3} and rows[-1]["error"] == "settings do not fit together"
    table = leaderboard_table(rows, n=3)
    lines = table.splitlines()
    assert lines[0].split() == ["#", "trial", "state", "top-1", "epochs", "sec", "lr"]
    assert lines[1].split()[:4] == ["1", "3", "complete", "75.0%"] and lines[-1] == "... 2 more in leaderboard.csv"


def test_the_files_and_best_pt_of_the_best_trial_whose_run_is_here(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    space = parse_space(None, ["lr=1e-4:1e-1:log"])
    board = Leaderboard(out, "s", "sqlite:///x.db", 5, space, "top1", VIDEO_METRICS)
    rows = board.write(study_trials(tmp_path))
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["study"] == "s" and saved["trials"] == 5 and [r["trial"] for r in saved["rows"]] == [3, 2, 0, 1, 4]
    with open(out / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["3", "2", "0", "1", "4"] and table[0]["lr"] == "0.004"
    # trial 3 is best but its run folder is elsewhere (another host): best.pt comes from the best one here
    assert (out / "best.pt").read_bytes() == b"checkpoint of trial 2"
    assert json.loads((out / "best.json").read_text())["trial"] == 2 and rows[0]["trial"] == 3
