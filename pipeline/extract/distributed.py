"""Which share of the inputs a process extracts: all of them, --shard i/n, or its rank under torchrun."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import parse_shard


def balance(weights: list[int], n: int) -> list[list[int]]:
    """Split item indices into n lists of similar total weight (largest first, each to the lightest list).
    Each list keeps the items' original order."""
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += max(weights[i], 1)
    return [sorted(b) for b in bins]


@dataclass
class Distributed:
    """Which share of the inputs this process extracts: all of them, --shard i/n, or a torchrun rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    torchrun: bool = False

    @classmethod
    def from_env(cls, shard: str | None) -> Distributed:
        import os

        if shard is not None:
            i, n = parse_shard(shard)
            return cls(rank=i, world=n)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import datetime

        import torch.distributed as torch_dist

        if not torch_dist.is_initialized():
            # gloo for the two barriers only (CPU or GPU): ranks never wait on each other while extracting.
            torch_dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return cls(
            rank=int(os.environ["RANK"]),
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            torchrun=True,
        )

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.world > 1 else None

    def device(self, requested: str) -> str:
        """Each rank on its own GPU: cuda -> cuda:LOCAL_RANK."""
        if self.torchrun and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        import torch.distributed as torch_dist

        torch_dist.barrier()
