"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temporary folder, on a free localhost port.

Debian's `postgresql` package puts the server programs in /usr/lib/postgresql/<version>/bin (not on PATH); CI
installs it (.ci/run). The server refuses to run as root, so under root it runs as `nobody`."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "pipeline"  # the database superuser of the throwaway server (trust authentication, localhost only)


def server_programs() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    if server_programs() is None:
        return (
            "PostgreSQL's server is not installed (initdb not on PATH nor in /usr/lib/postgresql/*/bin): "
            "apt-get install postgresql"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed: pip install 'framecache[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no `nobody` user to run the server as"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server, yield its URL (postgresql://pipeline@localhost:PORT/postgres), stop it and delete its data."""
    bin_dir = server_programs()
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    run_as = {}
    if os.geteuid() == 0:  # the server refuses root: the folder and the processes belong to nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data, port = root / "data", free_port()
    env = {**os.environ, "LC_ALL": "C", "HOME": str(root)}

    def run(*cmd: str) -> None:
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, **run_as)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {root} -c listen_addresses=localhost -c fsync=off -c max_connections=100"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        try:
            yield f"postgresql://{USER}@localhost:{port}/postgres"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
