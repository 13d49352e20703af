"""PCA of the cached features for fast exploration: fit on the train split once, project every sequence once, and fold
the projection into a trained head's first layer so that its checkpoint takes the cache's own features again.

The PCA works on standardised features, (x - mu) / sigma per dimension, the inputs a head on the full features sees,
and is not whitened: z = ((x - mu) / sigma) P keeps the top-K directions of exactly that geometry, so a head on z is
a head on the full features whose first layer is restricted to those directions. A head trained on z computes
W (z - m) / s + b in its first Linear (m = 0, s = 1 in a sweep); that equals W' (x - mu) / sigma + b' with
W' = (W / s) P^T and b' = b - (W / s) m: the same StandardizedLinear with the cache's dimension, mean mu and std
sigma, like any head trained on the full features. The folded checkpoint is an ordinary head checkpoint:
`evaluate`, `predict` and anything else that loads checkpoints apply the reduction without knowing about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.data.sequences import RamStore, SequenceStore, sample_rows
from pipeline.train_head.checkpoint import HeadCheckpoint
from pipeline.train_head.model import build_head

log = logging.getLogger(__name__)

PCA_ROWS = 20_000  # train rows sampled evenly to fit the PCA (10x the 2048 dimensions of ResNet-50 features)
PROJECT_CHUNK = 16_384  # rows projected at a time (128 MiB of float32 for D=2048)


@dataclass
class Reduction:
    """x (D,) -> ((x - mean) / scale) @ components (K,).

    Shapes: mean (D,), scale (D,), components (D, K) float64 with orthonormal columns.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    components: torch.Tensor
    explained: float
    """Share of the standardised train rows' variance that the K components keep."""
    rows: int
    """Train rows the PCA was fit on."""

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @property
    def projection(self) -> torch.Tensor:
        """(D, K) float64: z = (x - mean) @ projection."""
        return self.components / self.scale[:, None]

    def describe(self) -> dict:
        return {
            "method": "pca of standardised features",
            "from_dim": int(self.mean.numel()),
            "dim": self.dim,
            "explained_variance": round(self.explained, 6),
            "fit_rows": self.rows,
            "fit_on": "train split",
            "folded_into": "the first Linear (proj.0) of each checkpoint",
        }


def fit_pca(store: SequenceStore, videos: np.ndarray, dim: int, max_rows: int = PCA_ROWS) -> Reduction:
    """The top `dim` principal components of the standardised rows of `videos` (store indices: the train split)."""
    if not 1 <= dim < store.dim:
        raise ValueError(f"--reduce-dim {dim} must be between 1 and the features' {store.dim} dimensions (exclusive)")
    # One pass: the row sum and the uncentred second moment (float32 GEMMs per chunk, float64 sums).
    n = 0
    total = torch.zeros(store.dim, dtype=torch.float64)
    second = torch.zeros(store.dim, store.dim, dtype=torch.float64)
    for x in sample_rows(store, videos, max_rows):
        n += len(x)
        total += x.sum(0, dtype=torch.float64)
        second += (x.T @ x).double()
    if n <= dim:
        raise ValueError(f"--reduce-dim {dim} needs more train rows than dimensions; the train split has {n}")
    mean = total / n
    cov = (second - n * torch.outer(mean, mean)) / (n - 1)
    # Standardise as the heads do (sigma floored at 1% of the median, as in feature_stats): the correlation matrix.
    scale = cov.diagonal().clamp(min=0).sqrt()
    scale = scale.clamp(min=max(float(scale.median()) * 0.01, 1e-6))
    corr = cov / torch.outer(scale, scale)
    values, vectors = torch.linalg.eigh(corr.float())  # ascending; float32 halves the time, plenty for a PCA
    values = values.double().clamp(min=0)
    top = vectors[:, -dim:].flip(1).double()  # (D, K), largest first
    # A stable sign per component (largest entry positive), so that a refit gives the same vectors.
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    top = top * torch.where(signs == 0, 1.0, signs)
    explained = float(values[-dim:].sum() / values.sum().clamp(min=1e-30))
    log.info("PCA %d -> %d on %d train rows keeps %.1f%% of the variance", store.dim, dim, n, 100 * explained)
    return Reduction(mean=mean, scale=scale, components=top, explained=explained, rows=n)


def reduce_store(store: SequenceStore, reduction: Reduction) -> RamStore:
    """Every row of `store` projected once into a RAM store of float32 (rows, K) (a lazy store is read video by
    video, so the full-size features never need to fit in memory)."""
    proj = reduction.projection.float()
    shift = (reduction.mean @ reduction.projection).float()  # (x - mean) A = x A - mean A: no centred copy of x
    total = int(store.lengths.sum())
    out = np.empty((total, reduction.dim), dtype=np.float32)
    target = torch.from_numpy(out)
    if isinstance(store, RamStore):
        for i in range(0, total, PROJECT_CHUNK):
            x = store.data[i : i + PROJECT_CHUNK].float()
            torch.mm(x, proj, out=target[i : i + len(x)]).sub_(shift)
    else:
        row = 0
        for key, n in zip(store.keys, store.lengths, strict=True):
            x = torch.from_numpy(store.cache.features(key).astype(np.float32))
            torch.mm(x, proj, out=target[row : row + n]).sub_(shift)
            row += n
        store.cache.close()
    return RamStore(list(store.keys), out, store.lengths.copy())


def fold_reduction(ckpt: HeadCheckpoint, reduction: Reduction) -> HeadCheckpoint:
    """The same head taking the full features: the reduction folded into its first Linear (see the module doc).

    Shapes: the checkpoint's dims.in_dim goes from K to D; nothing else changes.
    """
    if ckpt.dims.in_dim != reduction.dim:
        raise ValueError(f"the head takes {ckpt.dims.in_dim} inputs, the reduction gives {reduction.dim}")
    reduced = ckpt.model()
    lin = reduced.proj[0]
    scaled = lin.weight.detach().double() / lin.std.double()  # (H, K)
    dims = replace(ckpt.dims, in_dim=int(reduction.mean.numel()))
    full = build_head(dims)
    state = {k: v for k, v in reduced.state_dict().items() if not k.startswith("proj.0.")}
    state.update(
        {
            "proj.0.weight": (scaled @ reduction.components.T).float(),
            "proj.0.bias": (lin.bias.detach().double() - scaled @ lin.mean.double()).float(),
            "proj.0.mean": reduction.mean.float(),
            "proj.0.std": reduction.scale.float(),
        }
    )
    full.load_state_dict(state)
    config = {**ckpt.config, "reduction": reduction.describe()}
    return replace(ckpt, dims=dims, state_dict=full.state_dict(), config=config)
