"""Several mean-pool heads of one shape trained as one model: what a sweep does with trials that differ only in their
optimiser and regularisation settings (a grid over learning rates, say).

Every head keeps its own modules, AdamW, schedule, dropout stream and run folder (a `HeadRun` each, as in
`train_head`); only the work is shared. Each batch is gathered once, the heads' first Linears run as one
(B*T, D) x (D, N*H) matmul, and their LayerNorms, masks, pools and classifiers as batched ops. The loss is the sum of
the heads' own losses, so each head's gradient is the one it gets alone, and each head draws its dropout masks from
a generator that starts where `train_head`'s global stream would (the same seed, after the same initialisation).
A stacked head therefore trains as it would alone, up to float rounding of the grouped matmul: same seed, same
metrics within tolerance (tests/test_sweep.py checks it against `train_head`).

Only mean-pool heads stack: recurrent heads cannot be batched this way on a CPU (no vmap rule for aten::lstm/gru,
and a hand-grouped recurrence is slower than oneDNN's fused one), and attention heads gain little
(docs/performance.md, bench/vectorize_heads.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.data.labelled import LabelledData
from pipeline.data.sequences import batches, eval_plans
from pipeline.runtime import progress_bar
from pipeline.train_head.model import MeanPoolHead, dropout_mask, length_mask
from pipeline.train_head.train import HeadRun, TrainResult

STACKABLE = ("meanpool",)
PER_HEAD = ("out", "lr", "weight_decay", "dropout", "label_smoothing", "patience", "plots", "progress")
"""The settings heads of one stack may differ in; every other TrainConfig field (shape, seed, batches, clips,
epochs, schedule) must be equal, so that the heads see the same batches in the same order."""


def stack_key(cfg: TrainConfig) -> str | None:
    """Equal for configurations that can train as one stack; None for one that cannot stack."""
    if cfg.head not in STACKABLE or cfg.target != "videos":
        return None
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in PER_HEAD}, sort_keys=True, default=str)


def stack_groups(configs: list[TrainConfig], device: torch.device) -> list[list[int]]:
    """Indices of `configs` in groups that can train as one stack (one per stack_key, on the CPU), in the order
    of their first member; a configuration that cannot stack is a group of its own."""
    groups: dict = {}
    for i, cfg in enumerate(configs):
        key = stack_key(cfg) if device.type == "cpu" else None
        groups.setdefault(i if key is None else key, []).append(i)
    return list(groups.values())


@dataclass
class _Member:
    run: HeadRun
    generator: torch.Generator
    """The head's dropout stream."""
    result: TrainResult | Exception | None = None

    @property
    def active(self) -> bool:
        return self.result is None


def stacked_logits(
    heads: list[MeanPoolHead], x: torch.Tensor, lengths: torch.Tensor, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """The logits of every head, (B, N, C), for a batch x (B, T, D); with generators (training) each head's dropout
    masks are drawn from its own, in the order its own forward draws them."""
    b, t, _ = x.shape
    n, hidden = len(heads), heads[0].dims.hidden
    lins = [h.proj[0] for h in heads]
    scaled = [lin.weight / lin.std for lin in lins]  # StandardizedLinear, folded as in its forward
    weight = torch.cat(scaled)  # (N*H, D)
    bias = torch.cat([lin.bias - w @ lin.mean for lin, w in zip(lins, scaled, strict=True)])
    z = F.linear(x, weight, bias).view(b, t, n, hidden)
    norms = [h.proj[1] for h in heads]
    z = F.layer_norm(z, (hidden,), eps=norms[0].eps) * torch.stack([m.weight for m in norms]) + torch.stack(
        [m.bias for m in norms]
    )
    z = F.gelu(z) if heads[0].dims.activation == "gelu" else F.relu(z)
    if generators is not None:
        z = z * _masks(heads, generators, (b, t, hidden), z.dtype, dim=2)
    mask = length_mask(lengths, t, z.device)[:, :, None, None].to(z.dtype)
    pooled = (z * mask).sum(1) / mask.sum(1)  # (B, N, H)
    if generators is not None:
        pooled = pooled * _masks(heads, generators, (b, hidden), z.dtype, dim=1)
    weights = torch.stack([h.classifier.weight for h in heads])  # (N, C, H)
    return torch.einsum("bnh,nch->bnc", pooled, weights) + torch.stack([h.classifier.bias for h in heads])


def _masks(heads, generators, shape, dtype, dim: int) -> torch.Tensor:
    """Each head's dropout mask of `shape` (ones, and no draw, for a rate of 0), stacked along `dim`."""
    return torch.stack(
        [
            dropout_mask(shape, h.dims.dropout, dtype, g) if h.dims.dropout > 0 else torch.ones(shape, dtype=dtype)
            for h, g in zip(heads, generators, strict=True)
        ],
        dim=dim,
    )


def train_stack(
    data: LabelledData,
    configs: list[TrainConfig],
    device: torch.device,
    hooks: list[Callable[[dict], None] | None] | None = None,
    progress: bool = False,
) -> list[TrainResult | Exception]:
    """Train the heads of `configs` (one stack_key) on `data` as one model; each writes its own run folder.

    `hooks[i]` is head i's `on_epoch`: an exception it raises stops that head only (its run folder keeps its epochs),
    and is returned in its place; the others go on. Returns each head's TrainResult or exception, in order.
    `progress` shows a bar over the epochs.
    """
    keys = {stack_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise ValueError(
            "train_stack: the configurations must be mean-pool heads that differ only in " + ", ".join(PER_HEAD)
        )
    if device.type != "cpu":
        raise ValueError("train_stack: stacked heads train on the CPU")
    started = time.perf_counter()
    hooks = hooks or [None] * len(configs)
    members = []
    for cfg, hook in zip(configs, hooks, strict=True):
        run = HeadRun(cfg, data, device, hook, started)  # seeds torch and initialises the head, as train_head does
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())  # where train_head's dropout draws would start
        members.append(_Member(run, generator))
    lead = members[0].run
    cfg = lead.cfg  # with its epochs set (config.head_budget)
    bar = progress_bar(
        range(1, cfg.epochs + 1), desc=f"{len(configs)} x {cfg.head}", unit="epoch", disable=not progress
    )
    try:
        for epoch in bar:
            active = [m for m in members if m.active]
            if not active:
                break
            t0 = time.perf_counter()
            lrs = [m.run.optimizer.param_groups[0]["lr"] for m in active]
            stats = _train_epoch(active, batches(data.store, lead.epoch_plans(epoch), lead.workers), device)
            t1 = time.perf_counter()
            probs = _validate(active, data, cfg, lead.workers, device)
            share = len(active)
            train_s, val_s = (t1 - t0) / share, (time.perf_counter() - t1) / share
            for m, st, p, lr in zip(active, stats, probs, lrs, strict=True):
                try:
                    if not m.run.end_epoch(epoch, st, p, lr, train_s, val_s):
                        m.result = m.run.finish()
                except Exception as e:  # the head's hook stopped it (e.g. a pruned trial): the others go on
                    m.run.close()
                    m.result = e
            bar.set_postfix(best=f"{max(m.run.best['score'] for m in members):.1%}", refresh=False)
        for m in members:
            if m.active:
                m.result = m.run.finish()
    finally:
        bar.close()
        for m in members:
            m.run.close()
    return [m.result for m in members]


def _train_epoch(active: list[_Member], batch_iter, device: torch.device) -> list[dict]:
    """One pass over the shared training batches; each head's mean loss and clip accuracy, as train_one_epoch."""
    heads = [m.run.model for m in active]
    generators = [m.generator for m in active]
    for h in heads:
        h.train()
    n = len(active)
    loss_sum, correct, seen = np.zeros(n), np.zeros(n), 0
    for batch in batch_iter:
        batch = batch.to(device)
        logits = stacked_logits(heads, batch.x, batch.lengths, generators)  # (B, N, C)
        losses = torch.stack([m.run.loss_fn(logits[:, i], batch.y) for i, m in enumerate(active)])
        for m in active:
            m.run.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # each head's gradient is that of its own loss
        for m in active:
            m.run.optimizer.step()
            m.run.scheduler.step()
        size = len(batch.y)
        loss_sum += losses.detach().numpy() * size
        correct += (logits.detach().argmax(2) == batch.y[:, None]).sum(0).numpy()
        seen += size
    seen = max(seen, 1)
    return [{"train_loss": float(loss_sum[i] / seen), "train_acc": float(correct[i] / seen)} for i in range(n)]


@torch.inference_mode()
def _validate(
    active: list[_Member], data: LabelledData, cfg: TrainConfig, workers: int, device: torch.device
) -> list[np.ndarray]:
    """Each head's (val videos, C) probabilities, averaged over clips as `evaluate` does."""
    heads = [m.run.model for m in active]
    for h in heads:
        h.eval()
    videos = data.val_idx
    plans = eval_plans(
        videos,
        data.store.lengths,
        np.zeros(len(data.store.keys), dtype=np.int64),
        cfg.batch_size,
        cfg.clip_len,
        cfg.clip_stride,
        cfg.eval_clips,
        cfg.sampling,
    )
    sums = torch.zeros(len(heads), len(videos), heads[0].dims.num_classes, dtype=torch.float64)
    counts = torch.zeros(len(videos), dtype=torch.float64)
    for batch in batches(data.store, plans, workers):
        batch = batch.to(device)
        probs = torch.softmax(stacked_logits(heads, batch.x, batch.lengths).float(), dim=2).double().cpu()
        sums.index_add_(1, batch.owners, probs.transpose(0, 1))
        counts.index_add_(0, batch.owners, torch.ones(len(batch.owners), dtype=torch.float64))
    return list((sums / counts.clamp(min=1)[None, :, None]).numpy())
