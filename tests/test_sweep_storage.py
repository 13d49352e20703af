"""Where a study lives (pipeline/sweep/storage.py): --storage forms, the driver check, heartbeats, which trials
count; and three `pipeline sweep` workers on one study in a real PostgreSQL server, one of them killed mid-trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import feature_cache, separable_videos
from postgres import postgres_server, unavailable_reason

from pipeline.sweep.storage import Heartbeats, check_driver, counted, open_storage, quiet_optuna


def test_storage_forms(tmp_path):
    with quiet_optuna():
        url, storage = open_storage(None, tmp_path / "out", 15, 60)
        assert url == f"sqlite:///{(tmp_path / 'out' / 'study.db').resolve()}"
        assert storage.get_heartbeat_interval() == 15
        url, _ = open_storage(str(tmp_path / "s" / "study.db"), tmp_path, 15, 60)
        assert url.startswith("sqlite:///") and (tmp_path / "s").is_dir()
        url, _ = open_storage(str(tmp_path / "j" / "study.log"), tmp_path, 15, 60)
        assert url == f"journal:{(tmp_path / 'j' / 'study.log').resolve()}"
        with pytest.raises(ValueError, match="expected an RDB URL"):
            open_storage(str(tmp_path / "study.txt"), tmp_path, 15, 60)


def test_a_missing_database_driver_names_what_to_install():
    check_driver("postgresql://u@host/db")  # psycopg: installed with the dev extra (the postgres extra)
    with pytest.raises(ValueError, match=r"driver pg8000 is not installed; pip install 'framecache\[postgres\]'"):
        check_driver("postgresql+pg8000://u@host/db")
    with pytest.raises(ValueError, match="driver pymysql is not installed; pip install mysqlclient"):
        check_driver("mysql+pymysql://u@host/db")
    check_driver("sqlite:///x.db")


def test_which_trials_count():
    from optuna.trial import TrialState, create_trial

    def trial(state, **attrs):
        return create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, user_attrs=attrs)

    assert counted(trial(TrialState.COMPLETE)) and counted(trial(TrialState.PRUNED))
    assert counted(trial(TrialState.RUNNING))
    assert counted(trial(TrialState.FAIL, error="settings do not fit"))  # its own settings failed: counted
    assert not counted(trial(TrialState.FAIL))  # a killed worker's trial: retried, not counted
    assert not counted(trial(TrialState.WAITING))
    assert not counted(trial(TrialState.COMPLETE, surplus=True))
    assert not counted(trial(TrialState.COMPLETE, duplicate_of=3))


@pytest.mark.slow
def test_trials_asked_ahead_keep_their_heartbeat_until_told(tmp_path):
    import optuna

    with quiet_optuna():
        _, storage = open_storage(None, tmp_path, 1, 2)
        study = optuna.create_study(storage=storage, study_name="beats")
        waiting, running = study.ask(), study.ask()
        with Heartbeats(storage) as beats:
            beats.add(waiting)
            beats.add(running)
            time.sleep(3.5)  # longer than the grace period: only the heartbeats keep them alive
            optuna.storages.fail_stale_trials(study)
            assert [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]
            beats.discard(waiting)  # no more beats: another worker takes it for the trial of a killed one
            time.sleep(3.5)
            optuna.storages.fail_stale_trials(study)
            assert [t.state.name for t in study.get_trials()][:2] == ["FAIL", "RUNNING"]


# ------------------------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="module")
def postgres():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server for the shared-study test: {reason}")
    with postgres_server() as url:
        yield url


TRIALS = 6
HEARTBEAT, GRACE = 1, 3


def _worker(cache: Path, out: Path, url: str) -> subprocess.Popen:
    args = [
        *(sys.executable, "-m", "pipeline", "sweep", str(cache), "--out", str(out), "--storage", url),
        *(
            "--study",
            "pg",
            "--resume",
            "--trials",
            str(TRIALS),
            "--strategy",
            "random",
            "--stack",
            "1",
            "--pruner",
            "none",
        ),
        *("--heartbeat", str(HEARTBEAT), "--grace", str(GRACE), "--threads", "1", "--no-plots", "-q"),
        *("--param", "hidden=8:64", "--param", "lr=1e-3:3e-2:log", "--param", "head=gru,lstm"),
        *("--param", "epochs=150", "--param", "batch_size=8", "--param", "clip_len=5", "--param", "patience=0"),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_three_workers_on_postgresql_one_killed_mid_trial(postgres, tmp_path):
    import optuna

    cache = feature_cache(tmp_path / "c.h5", separable_videos(per_class=6))
    out = tmp_path / "out"
    workers = [_worker(cache, out, postgres) for _ in range(3)]
    victim = None
    deadline = time.time() + 180
    while victim is None:  # the first trial whose metrics.csv has an epoch row: kill its worker mid-trial
        assert time.time() < deadline, "no trial started training"
        assert all(w.poll() is None for w in workers), [w.communicate()[0] for w in workers if w.poll() is not None]
        try:
            with quiet_optuna():
                running = optuna.load_study(study_name="pg", storage=postgres).get_trials(deepcopy=False)
        except KeyError:  # no worker has created the study yet
            running = []
        for t in running:
            metrics = out / "trials" / f"{t.number:04d}" / "metrics.csv"
            if t.state.name == "RUNNING" and metrics.is_file() and len(metrics.read_text().split()) > 2:
                pid = int(t.user_attrs["worker"].rsplit(":", 1)[1])
                victim = next(w for w in workers if w.pid == pid), t.number
                break
        time.sleep(0.05)
    killed_worker, killed = victim
    killed_worker.send_signal(signal.SIGKILL)
    outputs = [w.communicate(timeout=300)[0] for w in workers if w is not killed_worker]
    assert killed_worker.wait() == -signal.SIGKILL
    assert all(w.returncode == 0 for w in workers if w is not killed_worker), outputs

    with quiet_optuna():
        trials = optuna.load_study(study_name="pg", storage=postgres).get_trials()
    dead = trials[killed]
    assert dead.state.name == "FAIL" and "error" not in dead.user_attrs  # failed by its silence, not by an error
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params and retries[0].state.name == "COMPLETE"
    count = [t for t in trials if counted(t)]
    assert len(count) == TRIALS and all(t.state.name == "COMPLETE" for t in count)  # every trial once, all done
    assert len({t.number for t in count}) == TRIALS and dead not in count

    board = json.loads((out / "leaderboard.json").read_text())  # one leaderboard of the whole study
    assert board["storage"] == postgres and board["trials"] == TRIALS
    states = sorted(r["state"] for r in board["rows"])
    assert states == ["complete"] * TRIALS + ["failed"]
    assert sorted(r["trial"] for r in board["rows"]) == sorted(t.number for t in [*count, dead])
    for text in outputs:  # each surviving worker ends with the same study's summary
        assert "sweep pg: best val top-1" in text and f"{TRIALS + 1} trials" in text, text
