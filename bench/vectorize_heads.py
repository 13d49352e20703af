"""Does training N sweep trials of one shape as one vectorised model pay on this CPU? Seconds per optimisation step
of N heads trained one after the other (each gathering its own batch from a float16 RAM store, as separate trials
do) against the same N heads as one model: torch.func (stack_module_state + vmap over functional_call, one fused
AdamW) and, for mean-pool heads, the sweep's own stack (pipeline/sweep/stack.py: one batch, one (B*T, D) x (D, N*H)
projection, batched LayerNorm, pooling and classifiers, each head's own AdamW and dropout stream).

    python bench/vectorize_heads.py                 # the table in docs/performance.md
    python bench/vectorize_heads.py --heads 4 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.nn import functional as F

from pipeline.runtime import cpu_count
from pipeline.sweep.stack import stacked_logits
from pipeline.train_head.model import HeadDims, build_head
from pipeline.train_head.train import make_optimizer

STORE_ROWS = 20_000  # rows of the fake RAM store batches are gathered from
CASES = [
    ("meanpool", 2048, 256),
    ("meanpool", 2048, 64),
    ("meanpool", 256, 256),
    ("meanpool", 256, 64),
    ("attention", 256, 64),
    ("gru", 256, 64),
]


def gather(data: torch.Tensor, rows: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The library's RAM-store gather: float16 rows -> one float32 (B, T, D) batch."""
    x = torch.empty(b, t, data.shape[1])
    x.view(-1, data.shape[1]).copy_(data.index_select(0, rows))
    return x


def timed(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(head: str, dim: int, hidden: int, n: int, batch: int, frames: int, classes: int, steps: int) -> dict:
    torch.manual_seed(0)
    data = torch.randn(STORE_ROWS, dim).half()
    dims = HeadDims(head=head, in_dim=dim, num_classes=classes, hidden=hidden, layers=1, dropout=0.3, activation="gelu")
    models = [build_head(dims) for _ in range(n)]
    lengths = torch.full((batch,), frames)
    y = torch.randint(0, classes, (batch,))

    def rows():
        return torch.randint(0, STORE_ROWS, (batch * frames,))

    # 1. N separate trials: each gathers its batch and steps its own model and optimizer
    optimizers = [make_optimizer(m, 1e-3, 0.01) for m in models]

    def sequential():
        for m, opt in zip(models, optimizers, strict=True):
            loss = F.cross_entropy(m(gather(data, rows(), batch, frames), lengths), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    out = {"sequential": timed(sequential, steps)}

    # 2. torch.func: the N heads' parameters stacked, vmap over functional_call, one fused AdamW
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = build_head(dims).to("meta")
    batched = vmap(
        lambda p, b, x: functional_call(base, (p, b), (x, lengths)), in_dims=(0, 0, None), randomness="different"
    )
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, fused=True)

    def vectorised():
        logits = batched(params, buffers, gather(data, rows(), batch, frames))  # (N, B, C)
        loss = F.cross_entropy(logits.reshape(-1, classes), y.repeat(n), reduction="sum") / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        out["vmap"] = timed(vectorised, steps)
    except RuntimeError as e:  # e.g. no batching rule for aten::gru
        out["vmap"] = None
        out["vmap_error"] = str(e).splitlines()[0][:90]

    # 3. mean-pool only: the library's stack (pipeline/sweep/stack.py), each head with its own AdamW and dropout stream
    if head == "meanpool":
        generators = [torch.Generator() for _ in models]

        def stacked():
            logits = stacked_logits(models, gather(data, rows(), batch, frames), lengths, generators)  # (B, N, C)
            losses = torch.stack([F.cross_entropy(logits[:, i], y) for i in range(n)])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            for opt in optimizers:
                opt.step()

        out["stack"] = timed(stacked, steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--heads", type=int, default=8, help="trials trained together")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--classes", type=int, default=101)
    p.add_argument("--steps", type=int, default=20, help="timed steps per figure (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: all cores")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or cpu_count())
    print(
        f"{args.heads} heads, batch {args.batch_size} x {args.clip_len} rows, {args.classes} classes, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms per step of all heads together"
    )
    print()
    print("| head      |    D |   H | sequential | vmap              | stack.py          |")
    print("|-----------|-----:|----:|-----------:|-------------------|-------------------|")
    for head, dim, hidden in CASES:
        r = measure(head, dim, hidden, args.heads, args.batch_size, args.clip_len, args.classes, args.steps)
        seq = r["sequential"]
        cells = [
            ("fails" if key == "vmap" else "n/a")
            if r.get(key) is None
            else f"{r[key] * 1000:6.1f} ms ({seq / r[key]:.2f}x)"
            for key in ("vmap", "stack")
        ]
        print(
            f"| {head:<9} | {dim:4d} | {hidden:3d} | {seq * 1000:7.1f} ms | {cells[0]:<17} | {cells[1]:<17} |",
            flush=True,
        )
        if r.get("vmap_error"):
            print(f"|   vmap: {r['vmap_error']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
