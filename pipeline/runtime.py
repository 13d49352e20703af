"""Where and how things run: the device of a --device setting, the CPU cores this process may use.

Imports nothing heavy at module level, so that the CLI's --help stays instant.
"""

from __future__ import annotations

import os

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
