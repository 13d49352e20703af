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
    """Which share of the inputs this process extracts: all of them, --shard i/n, or a torchrun rank.

    Under torchrun on several nodes the share is the global RANK of WORLD_SIZE (never LOCAL_RANK, which repeats on
    every node); LOCAL_RANK picks the GPU and LOCAL_WORLD_SIZE the share of the node's cores; global rank 0 alone
    builds the index, once every rank of every node is done."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    node: int = 0
    torchrun: bool = False

    @classmethod
    def from_env(cls, shard: str | None) -> Distributed:
        """From --shard, else torchrun's environment (then the gloo process group for the barriers is started)."""
        import os

        dist = cls.parse(shard, os.environ)
        if dist.torchrun:
            import datetime

            import torch.distributed as torch_dist

            if not torch_dist.is_initialized():
                # gloo for the two barriers only (CPU or GPU): ranks never wait on each other while extracting.
                torch_dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return dist

    @classmethod
    def parse(cls, shard: str | None, env) -> Distributed:
        """The share that --shard or torchrun's variables (`env`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        GROUP_RANK, the node's rank) give; starts nothing."""
        if shard is not None:
            i, n = parse_shard(shard)
            return cls(rank=i, world=n)
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(
            rank=int(env["RANK"]),
            world=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node=int(env.get("GROUP_RANK", 0)),
            torchrun=True,
        )

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.world > 1 else None

    @property
    def merges(self) -> bool:
        """Whether this process builds the index after the last barrier: global rank 0 only (one per job, not one
        per node)."""
        return self.torchrun and self.rank == 0

    def threads(self, requested: int | None, cores: int) -> int:
        """Torch threads of this process: `requested`, else the node's cores shared by the ranks on the node."""
        return requested or max(1, cores // self.local_world)

    def device(self, requested: str) -> str:
        """Each rank on its own GPU: cuda -> cuda:LOCAL_RANK."""
        if self.torchrun and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def describe(self) -> str:
        if not self.torchrun:
            return f"shard {self.rank}/{self.world}" if self.shard else "one process"
        return f"rank {self.rank}/{self.world} (node {self.node}, local rank {self.local_rank}/{self.local_world})"

    def barrier(self) -> None:
        import torch.distributed as torch_dist

        torch_dist.barrier()
