"""Where a study lives and how its workers see each other: an Optuna storage opened from --storage (SQLite,
PostgreSQL or MySQL with heartbeats, or a journal file), the heartbeats of this process's trials, and which trials
count towards --trials.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"  # the default storage: SQLite in the sweep folder
# How to install the database driver of a dialect (SQLAlchemy names the driver a URL without +driver needs)
DRIVER_FIX = {
    "postgresql": "pip install 'framecache[postgres]'",
    "mysql": "pip install mysqlclient, or name another driver: mysql+pymysql://...",
}


class Heartbeats:
    """Heartbeats of this process's trials from the moment they are asked (RDB storages): Optuna's own thread beats
    only inside study.optimize, and a trial asked ahead waits for its turn. Other workers take a trial silent for
    the storage's grace period as that of a killed worker."""

    def __init__(self, storage):
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.storage = storage if interval else None
        self.interval = interval
        self.ids: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sweep-heartbeats", daemon=True)

    def __enter__(self) -> Heartbeats:
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
        while not self.stop.wait(self.interval):
            for trial_id in list(self.ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a busy database: the next beat retries
                    log.debug("heartbeat of trial %d: %s", trial_id, e)


def check_driver(url: str) -> None:
    """Refuse an RDB URL whose database driver is not installed, saying what to install (SQLAlchemy's own error
    names a module, not the fix)."""
    import importlib.util

    from sqlalchemy.engine.url import make_url

    dialect = make_url(url).get_backend_name()
    if dialect not in DRIVER_FIX:
        return
    try:
        driver = make_url(url).get_dialect().driver  # postgresql:// -> psycopg (SQLAlchemy 2.1) or psycopg2
    except Exception:  # noqa: BLE001  (a driver SQLAlchemy does not know: its own error follows at connect)
        return
    module = {"mysqldb": "MySQLdb", "pysqlite": "sqlite3"}.get(driver, driver)
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"--storage {dialect}+{driver}://...: the database driver {module} is not installed; " + DRIVER_FIX[dialect]
        )


def open_storage(url: str | None, out: Path, heartbeat: int, grace: int):
    """(url, Optuna storage) for --storage: an RDB URL (with a heartbeat every `heartbeat` s, a trial silent for
    `grace` s failed and retried once), a journal file, or OUT/study.db."""
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
    check_driver(url)
    retry = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    )
    callback_arg = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )
    kwargs = {"heartbeat_interval": heartbeat, "grace_period": grace, callback_arg: retry(max_retry=1)}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # workers wait for each other's writes
    else:
        # A worker uses two connections at a time (its trials, its heartbeat thread): a small pool lets a hundred
        # workers share a server's default 100 connections, where SQLAlchemy's default (up to 15 each) would not.
        kwargs["engine_kwargs"] = {"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True}
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
def quiet_optuna():
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


def counted(t) -> bool:
    """Whether a trial takes one of the study's --trials: finished or running ones, and failures of its own settings;
    not a trial of a killed worker (failed without an error of its own, and retried), a retry still waiting to run,
    nor a surplus one."""
    if t.user_attrs.get("surplus") or "duplicate_of" in t.user_attrs or t.state.name == "WAITING":
        return False
    if t.state.name == "FAIL":
        return "error" in t.user_attrs
    return True
