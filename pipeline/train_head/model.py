"""Temporal heads over sequences of frame embeddings: lstm, gru, bilstm, meanpool (order-blind baseline), attention.

All share an input projection (Linear -> LayerNorm -> activation -> dropout). Padded steps never change a result:
recurrent heads run on packed sequences, meanpool and attention mask the padding out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.config import ACTIVATIONS, HEADS


@dataclass(frozen=True)
class HeadDims:
    """Everything needed to rebuild a head; stored in checkpoints (defaults live in pipeline.config.TrainConfig)."""

    head: str
    in_dim: int
    num_classes: int
    hidden: int
    layers: int
    dropout: float
    activation: str

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class StandardizedLinear(nn.Linear):
    """Linear on standardised inputs: W (x - mean) / std + b, with the train split's per-dimension mean and std kept
    as buffers (so they travel in the checkpoint).

    CNN embeddings are non-negative with very uneven scales: without standardising, the small frame-to-frame changes
    that carry order drown in the per-video offsets and training stalls for many epochs. The standardisation is
    folded into the weights at each call, an (H, D) operation instead of a (B, T, D) one.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight / self.std
        return F.linear(x, weight, self.bias - weight @ self.mean)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on CPU: every 32-bit random number gives four 8-bit draws, so the rate is rounded
    to a multiple of 1/256 (0.3 -> 77/256). torch's per-element Bernoulli draws cost as much as the projection's
    forward matmul on a 2-core CPU (about 7 ms for a (128, 16, 256) batch; this mask about 3 ms). Other devices use
    nn.Dropout as is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, x.dtype)


def dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Dropout's CPU mask of `shape` (0 or 1 / (1 - p')), drawn from `generator` (default: torch's global one)."""
    cut = min(round(p * 256), 255)
    n = math.prod(shape)
    draws = torch.randint(-(2**31), 2**31, ((n + 3) // 4,), dtype=torch.int32, generator=generator)
    return (draws.view(torch.uint8)[:n].view(shape) >= cut).to(dtype).mul_(256 / (256 - cut))


class InputProjection(nn.Sequential):
    """(B, T, in_dim) -> (B, T, hidden): the projection layer of the classic TimeDistributed CNN + LSTM recipe
    (Linear on standardised features -> LayerNorm -> activation -> dropout)."""

    def __init__(self, in_dim: int, hidden: int, activation: str, dropout: float):
        act = nn.GELU() if activation == "gelu" else nn.ReLU()
        super().__init__(StandardizedLinear(in_dim, hidden), nn.LayerNorm(hidden), act, Dropout(dropout))


def length_mask(lengths: torch.Tensor, steps: int, device: torch.device) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at real steps."""
    return torch.arange(steps, device=device)[None, :] < lengths.to(device)[:, None]


class Head(nn.Module):
    """Base of every head: `forward_features` pools a padded batch into one vector per sequence, `forward_head`
    classifies it.

    Shapes: x (B, T, in_dim) float32, lengths (B,) int64 with 1 <= lengths <= T -> logits (B, num_classes).
    """

    def __init__(self, dims: HeadDims):
        super().__init__()
        self.dims = dims
        self.proj = InputProjection(dims.in_dim, dims.hidden, dims.activation, dims.dropout)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(pooled))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def _classifier(self, pooled_dim: int) -> None:
        self.drop = Dropout(self.dims.dropout)
        self.classifier = nn.Linear(pooled_dim, self.dims.num_classes)


class RecurrentHead(Head):
    """LSTM, GRU or bidirectional LSTM; the sequence is summarised by the last layer's final hidden state(s)."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        rnn = nn.GRU if dims.head == "gru" else nn.LSTM
        self.bidirectional = dims.head == "bilstm"
        self.rnn = rnn(
            dims.hidden,
            dims.hidden,
            num_layers=dims.layers,
            batch_first=True,
            dropout=dims.dropout if dims.layers > 1 else 0.0,
            bidirectional=self.bidirectional,
        )
        self._classifier(dims.hidden * (2 if self.bidirectional else 1))

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        lengths = lengths.cpu()
        if bool((lengths == z.shape[1]).all()):
            _, h = self.rnn(z)  # nothing padded: packing would only cost time
        else:
            _, h = self.rnn(pack_padded_sequence(z, lengths, batch_first=True, enforce_sorted=False))
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        # h: (layers * directions, B, H), returned in the batch's own order
        if self.bidirectional:
            return torch.cat([h[-2], h[-1]], dim=1)
        return h[-1]


class MeanPoolHead(Head):
    """Order-blind baseline: the mean of the projected real frames, then a linear classifier."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self._classifier(dims.hidden)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        mask = length_mask(lengths, z.shape[1], z.device).unsqueeze(-1).to(z.dtype)
        return (z * mask).sum(1) / mask.sum(1)


def sinusoidal_positions(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """(T, dim) fixed sine/cosine position codes, defined for any length."""
    position = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(steps, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return pe


def attention_heads(hidden: int) -> int:
    """Most heads of at least 32 dims each that divide `hidden` (at most 8)."""
    return next((h for h in (8, 4, 2) if hidden % h == 0 and hidden // h >= 32), 1)


class AttentionHead(Head):
    """A small pre-norm transformer encoder over the projected frames (with sine positions, so order counts),
    then attention pooling: a learned score per real step, softmax over the real steps, weighted sum."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        layer = nn.TransformerEncoderLayer(
            dims.hidden,
            attention_heads(dims.hidden),
            dim_feedforward=2 * dims.hidden,
            dropout=dims.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, dims.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dims.hidden)
        self.score = nn.Linear(dims.hidden, 1)
        self._classifier(dims.hidden)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        steps = z.shape[1]
        mask = length_mask(lengths, steps, z.device)
        z = z + sinusoidal_positions(steps, z.shape[2], z.device)
        z = self.norm(self.encoder(z, src_key_padding_mask=~mask))
        scores = self.score(z).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * z.masked_fill(~mask.unsqueeze(-1), 0.0)).sum(1)


def build_head(dims: HeadDims) -> Head:
    if dims.head in ("lstm", "gru", "bilstm"):
        return RecurrentHead(dims)
    if dims.head == "meanpool":
        return MeanPoolHead(dims)
    return AttentionHead(dims)
