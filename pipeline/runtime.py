"""Where and how things run: the device of a --device setting, the CPU cores this process may use.

Imports nothing heavy at module level, so that the CLI's --help stays instant.
"""

from __future__ import annotations

import os


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
