"""The weights' preprocessing on whole batches of native-size frames, on the model's device.

On a GPU the decode workers hand over raw RGB frames and the resize of the short side (bilinear, antialiased),
the centre crop, the scaling and the normalisation run here on whole chunks of frames of one size; on a CPU
the workers crop each frame themselves (`Preprocessing.crop_frame`), which measured faster there
(docs/performance.md). Both paths run the same torchvision operations, so a frame gets the same crop whichever
path it takes.
"""

from __future__ import annotations

import torch

from pipeline.spec import Preprocessing

PREPROCESS_MODES = ("auto", "workers", "device")


def crop_batch(pre: Preprocessing, frames: torch.Tensor) -> torch.Tensor:
    """Shapes: (N, H, W, 3) uint8 RGB frames of one size, on any device -> (N, 3, crop, crop) uint8, same
    device.

    The same resize and centre crop as `pre.crop_frame` on each frame alone: torchvision resizes each image of
    a batch independently (on a CPU with the same uint8 kernel; on a GPU through float32 and back to
    uint8)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB frames, got shape {tuple(frames.shape)}")
    return pre.crop_frame(frames.permute(0, 3, 1, 2))  # (N, 3, H, W), a view of the HWC frames


def crop_frames(pre: Preprocessing, frames: list[torch.Tensor]) -> torch.Tensor:
    """Shapes: a list of (H_k, W_k, 3) uint8 frames of any sizes -> (N, 3, crop, crop) uint8, in the list's
    order.

    Frames of one size are cropped as one batch."""
    if not frames:
        return torch.empty((0, 3, pre.crop, pre.crop), dtype=torch.uint8)
    groups: dict[tuple, list[int]] = {}
    for k, f in enumerate(frames):
        groups.setdefault(tuple(f.shape), []).append(k)
    out = torch.empty((len(frames), 3, pre.crop, pre.crop), dtype=torch.uint8, device=frames[0].device)
    for ks in groups.values():
        out[ks] = crop_batch(pre, torch.stack([frames[k] for k in ks]))
    return out


def resolve_mode(mode: str, device: torch.device) -> str:
    """'workers' (decode workers crop each frame) or 'device' (the model's device crops whole chunks) for a
    --preprocess setting: auto is device on CUDA and workers elsewhere."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
    if mode == "auto":
        return "device" if device.type == "cuda" else "workers"
    return mode
