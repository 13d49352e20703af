"""The batcher: chunks of cropped frames (or window clips) of many videos in, forward passes of one fixed shape out.

Every forward pass has the same shape (the last one is padded with zero frames whose features are dropped), so a
frame's features are the same bytes whatever else shared its batch: a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Owner:
    """Rows of one video in a batch, in batch order: `attempt` tells a video restarted on another decoder apart."""

    video: int
    attempt: int
    frame_indices: np.ndarray
    timestamps: np.ndarray
    spans: np.ndarray | None = None
    """Window rows (a video backbone): (n, 2) first and last decoded frame of each window; None for frame rows."""

    def __len__(self) -> int:
        return len(self.frame_indices)

    def rows(self, part: slice) -> Owner:
        """The owner of a slice of these rows."""
        spans = None if self.spans is None else self.spans[part]
        return Owner(self.video, self.attempt, self.frame_indices[part], self.timestamps[part], spans)


class Batcher:
    """Queues (video, crops) chunks and cuts them into batches of `batch_size` rows, splitting chunks as needed. A row
    is a frame (3, C, C) or, for a video backbone, a window clip (T, 3, C, C)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._queue: deque = deque()  # (Owner, crops (n, 3, C, C) uint8 on the host or the device)
        self.queued = 0

    def add(self, owner: Owner, crops: torch.Tensor) -> None:
        self._queue.append((owner, crops))
        self.queued += len(crops)

    def full(self) -> bool:
        return self.queued >= self.batch_size

    def take(self) -> tuple[torch.Tensor, int, list[Owner]]:
        """The next batch: (batch_size, 3, C, C) frames, how many are real (the rest is padding), their owners."""
        n = rows = min(self.queued, self.batch_size)
        pieces, owners = [], []
        while n > 0:
            owner, crops = self._queue.popleft()
            if len(crops) > n:  # the rest of the chunk stays at the front for the next batch
                self._queue.appendleft((owner.rows(slice(n, None)), crops[n:]))
                owner, crops = owner.rows(slice(None, n)), crops[:n]
            pieces.append(crops)
            owners.append(owner)
            n -= len(crops)
        self.queued -= rows
        batch = torch.cat(pieces)  # (rows, 3, C, C), or (rows, T, 3, C, C) window clips
        if rows < self.batch_size:  # padding rows: computed and dropped
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - rows, *batch.shape[1:]))])
        return batch, rows, owners

    def drop(self, video: int) -> None:
        """Forget the rows of `video` still waiting (it failed, or went to another decoder)."""
        kept = deque(entry for entry in self._queue if entry[0].video != video)
        self.queued = sum(len(crops) for _, crops in kept)
        self._queue = kept
