"""Training losses of the frames-target heads (one class per row)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

SMOOTHING_CLAMP = 16.0  # the truncation of the squared log-probability change between neighbouring rows


def frame_loss(
    stages: torch.Tensor,
    y: torch.Tensor,
    *,
    smoothing: float = 0.15,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss of a frames head, summed over its stages: per stage, the cross-entropy over the real rows plus
    `smoothing` times the truncated mean squared error of MS-TCN (Farha & Gall, CVPR 2019).

    stages: (S, B, T, C) logits (`FrameHead.forward_stages`); y: (B, T) int64 class per row, -1 at padding (and
    at any row to ignore). `weight` (C,) and `label_smoothing` go to the cross-entropy, which is averaged over the
    real rows (weighted, as F.cross_entropy does).

    The smoothing term penalises flicker: for every pair of consecutive real rows (t - 1, t) of a sequence,
    min((log_softmax_t - log_softmax_{t-1})^2, 16) averaged over the classes, with the earlier row detached
    (it is the reference the later one is pulled towards); the mean over those pairs. A pair with a padded or
    ignored row does not count. A batch without a real row gives 0.
    """
    if stages.dim() != 4 or y.shape != stages.shape[1:3]:
        raise ValueError(
            f"frame_loss needs stages (S, B, T, C) and y (B, T), got {tuple(stages.shape)} and {tuple(y.shape)}"
        )
    classes = stages.shape[-1]
    real = y >= 0  # (B, T)
    if not bool(real.any()):
        return stages.sum() * 0.0
    pairs = real[:, 1:] & real[:, :-1]  # (B, T - 1): both rows real
    smooth = bool(smoothing) and bool(pairs.any())
    targets = y.masked_fill(~real, -1).reshape(-1)
    total = stages.new_zeros(())
    for logits in stages:
        total = total + F.cross_entropy(
            logits.reshape(-1, classes),
            targets,
            weight=weight,
            ignore_index=-1,
            label_smoothing=label_smoothing,
        )
        if smooth:
            logp = F.log_softmax(logits, dim=-1)
            change = (logp[:, 1:][pairs] - logp[:, :-1][pairs].detach()).pow(2)  # (pairs, C)
            total = total + smoothing * change.clamp(max=SMOOTHING_CLAMP).mean()
    return total
