"""Where and how things run: the device of a --device setting, the CPU cores, threads and worker processes, and
the progress bars.

Imports nothing heavy at module level, so that the CLI's --help stays instant.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# Threading settings the `pipeline` command, `import pipeline` and the worker processes they start use unless the
# user set them. OpenMP's default lets idle threads spin for a while before they sleep; on a CPU shared with other
# work (decode workers, other jobs, a loaded 2-core machine) the spinning threads take the cores the busy ones need,
# and runs take 2-3.5x longer (docs/performance.md). PASSIVE threads sleep at once.
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def default_threading() -> dict[str, str]:
    """Put THREAD_ENV into os.environ where the user did not set the variable; returns what this process uses.

    OpenMP reads the variable once, when torch loads it: called first thing by `pipeline/__init__.py`, so that it
    takes effect in this process whenever torch is imported after `pipeline`. A program that imported torch first
    keeps torch's default in its own process (its worker processes, which load torch anew, still get the setting).
    """
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in THREAD_ENV}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0.0 elsewhere): the interpreter's start and imports."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return 0.0
    started = int(stat[stat.rindex(b")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, uptime - started)


def pick_device(device: str):
    """The torch.device of a --device setting (auto: cuda, else mps, else cpu); an error when it is not there."""
    import torch  # here, so that importing the settings (the CLI's --help) stays light

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return dev


# ---------------------------------------------------------------------------------------- worker processes
def default_workers(device, ranks: int = 1) -> int:  # device: a torch.device
    """Decode workers: on a CPU few (the model needs the cores); with a GPU every core but two (the main
    process and the commit thread), as the GPU outruns the decoders. `ranks` processes on one machine share
    its cores."""
    if device.type == "cpu":
        return 1 if cpu_count() <= 4 else min(4, cpu_count() // 4)
    return max(1, cpu_count() // max(ranks, 1) - 2)


def worker_init(_: int = 0, opencv: bool = True) -> None:
    """A worker process (decode, or cache reader with `opencv` False) runs one thread: the cores belong to the
    model and to the other workers. Takes the DataLoader's worker id, unused."""
    import torch

    torch.set_num_threads(1)
    if opencv:
        import cv2

        cv2.setNumThreads(1)


@contextlib.contextmanager
def opencv_single_thread():
    """OpenCV's thread pool at one thread while decode workers fork.

    A forked worker inherits OpenCV's pool but not its threads: resizing the pool there (worker_init) joins
    threads that do not exist and hangs for ever once this process has used the pool (any cv2 call on a large
    image)."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def start_workers(source) -> Iterator:
    """iter(source) (e.g. a DataLoader, which forks its workers there), with OpenCV's pool at one thread."""
    with opencv_single_thread():
        return iter(source)


# ------------------------------------------------------------------------ processes that die with the run
# A forked child inherits every descriptor of its parent: the parent's ends of its own pipes (so the parent's death
# never reaches it as end-of-file), the other workers' pipes and the cache's lock (so a child that outlives a killed
# run keeps the cache locked). Two lines of defence, installed for every fork of this process (decode workers,
# DataLoader workers of finetune and lazy training, anything else):
#   1. the child closes at once what only the parent may hold (registered with `parent_only`);
#   2. the child asks the kernel to kill it when the parent dies (PR_SET_PDEATHSIG), and exits if that happened
#      already, between the fork and the request.
_PARENT_ONLY: dict[int, object] = {}  # id -> an object with close(), or a raw descriptor (int)
_PARENT = {"pid": 0, "main_thread": True}
PR_SET_PDEATHSIG = 1


def parent_only(resource, token: int | None = None) -> int:
    """Register a descriptor (int) or an object with close() (a Connection) that forked children must not keep;
    returns the token that `forget` takes once the parent has closed it."""
    token = id(resource) if token is None else token
    _PARENT_ONLY[token] = resource
    return token


def forget(token: int) -> None:
    _PARENT_ONLY.pop(token, None)


def _before_fork() -> None:
    import threading

    _PARENT["pid"] = os.getpid()
    # The kernel sends the parent-death signal when the *thread* that forked exits: only ask for it when the
    # forking thread is the main one, which lives as long as the process.
    _PARENT["main_thread"] = threading.current_thread() is threading.main_thread()


def _in_child() -> None:
    resources = list(_PARENT_ONLY.values())
    _PARENT_ONLY.clear()
    for resource in resources:
        with contextlib.suppress(OSError, ValueError):
            os.close(resource) if isinstance(resource, int) else resource.close()
    if _PARENT["main_thread"]:
        die_with_parent(_PARENT["pid"])


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` dies (Linux), and exit now if it is gone already."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)


# A progress bar writing to a log file or a CI console (stderr not a terminal) redraws at most this often: tqdm's
# default of ten times a second leaves hundreds of lines in a log for a run of a minute.
LOG_REFRESH_S = 30.0


def progress_bar(iterable=None, **options):
    """A tqdm bar over `iterable` (tqdm's options), redrawn at most every LOG_REFRESH_S seconds when stderr is not a
    terminal; its last state is always written when it closes."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        options.setdefault("mininterval", LOG_REFRESH_S)
    return tqdm(iterable, **options)
