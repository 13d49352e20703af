"""Temporal heads over sequences of frame embeddings: lstm, gru, bilstm, meanpool (order-blind baseline), attention
and tcn (dilated temporal convolutions).

Two targets (HeadDims.target): "videos" heads give one class per sequence (`Head`: (B, T, D) -> (B, C)), "frames"
heads one class per row (`FrameHead`: (B, T, D) -> (B, T, C), for temporal action segmentation and event spotting).
All share an input projection (Linear -> LayerNorm -> activation -> dropout). Padded steps never change a result:
recurrent heads run on packed sequences, meanpool and attention mask the padding out, and convolutional heads zero
the padded steps before every convolution that could read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.config import ACTIVATIONS, HEADS, TARGETS


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
    target: str = "videos"
    """videos: one class per sequence; frames: one class per row. Checkpoints written before the field existed hold
    video heads."""
    stages: int = 1
    """Stages of a frames tcn head (a prediction stage, then refinement stages); every other head has one."""

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.stages < 1:
            raise ValueError(f"a head needs at least one stage, got stages={self.stages}")

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


class Projected(nn.Module):
    """What every head has: its dims, the input projection (`proj`), and the dropout and linear classifier that
    `_classifier` adds once the width of what it classifies is known."""

    def __init__(self, dims: HeadDims):
        super().__init__()
        self.dims = dims
        self.proj = InputProjection(dims.in_dim, dims.hidden, dims.activation, dims.dropout)

    def _classifier(self, width: int) -> None:
        self.drop = Dropout(self.dims.dropout)
        self.classifier = nn.Linear(width, self.dims.num_classes)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., C): dropout, then the linear classifier (at every step, for a frame head)."""
        return self.classifier(self.drop(z))


def recurrent_layers(dims: HeadDims) -> nn.LSTM | nn.GRU:
    """The recurrent part of an lstm, gru or bilstm head: `dims.layers` layers of `dims.hidden` units, batch first,
    dropout between layers."""
    rnn = nn.GRU if dims.head == "gru" else nn.LSTM
    return rnn(
        dims.hidden,
        dims.hidden,
        num_layers=dims.layers,
        batch_first=True,
        dropout=dims.dropout if dims.layers > 1 else 0.0,
        bidirectional=dims.head == "bilstm",
    )


class Head(Projected):
    """Base of every videos-target head: `forward_features` pools a padded batch into one vector per sequence,
    `forward_head` classifies it.

    Shapes: x (B, T, in_dim) float32, lengths (B,) int64 with 1 <= lengths <= T -> logits (B, num_classes).
    """

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classify(pooled)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))


class RecurrentHead(Head):
    """LSTM, GRU or bidirectional LSTM; the sequence is summarised by the last layer's final hidden state(s)."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self.bidirectional = dims.head == "bilstm"
        self.rnn = recurrent_layers(dims)
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


def transformer_encoder(dims: HeadDims) -> nn.TransformerEncoder:
    """`dims.layers` pre-norm transformer layers of width `dims.hidden` (feed-forward 2 x hidden, gelu)."""
    layer = nn.TransformerEncoderLayer(
        dims.hidden,
        attention_heads(dims.hidden),
        dim_feedforward=2 * dims.hidden,
        dropout=dims.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, dims.layers, enable_nested_tensor=False)


def encode_positions(encoder: nn.TransformerEncoder, norm: nn.LayerNorm, z: torch.Tensor, mask: torch.Tensor):
    """(B, T, H) projected frames, (B, T) real-step mask -> (B, T, H): sine positions added, the encoder (padding
    masked out of every attention), a final LayerNorm."""
    z = z + sinusoidal_positions(z.shape[1], z.shape[2], z.device)
    return norm(encoder(z, src_key_padding_mask=~mask))


class AttentionHead(Head):
    """A small pre-norm transformer encoder over the projected frames (with sine positions, so order counts),
    then attention pooling: a learned score per real step, softmax over the real steps, weighted sum."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self.encoder = transformer_encoder(dims)
        self.norm = nn.LayerNorm(dims.hidden)
        self.score = nn.Linear(dims.hidden, 1)
        self._classifier(dims.hidden)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        mask = length_mask(lengths, z.shape[1], z.device)
        z = encode_positions(self.encoder, self.norm, z, mask)
        scores = self.score(z).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * z.masked_fill(~mask.unsqueeze(-1), 0.0)).sum(1)


class DilatedResidualLayer(nn.Module):
    """One layer of a temporal convolutional network: a kernel-3 convolution with `dilation` ('same' zero padding)
    -> ReLU -> 1x1 convolution -> dropout, added to the input. Works on (B, H, T); `mask` (B, 1, T) is 1 at real
    steps: the output is multiplied by it, so the padded steps the next layer reads are zeros, as they would be
    past the end of a sequence given alone."""

    def __init__(self, channels: int, dilation: int, dropout: float):
        super().__init__()
        self.dilation = dilation
        self.dilated = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.pointwise = nn.Conv1d(channels, channels, 1)
        self.drop = Dropout(dropout)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.dilation >= z.shape[2]:
            # Both side taps fall outside the sequence and read only zero padding: the centre tap alone gives the
            # same result at a third of the cost (the deep layers of a stage, on clips shorter than their dilation).
            h = F.conv1d(z, self.dilated.weight[:, :, 1:2], self.dilated.bias)
        else:
            h = self.dilated(z)
        return (z + self.drop(self.pointwise(F.relu(h)))) * mask


def dilated_layers(channels: int, layers: int, dropout: float) -> nn.ModuleList:
    """`layers` dilated residual layers with dilations 1, 2, 4, ..., 2**(layers - 1): a receptive field of
    2**(layers + 1) - 1 steps."""
    return nn.ModuleList(DilatedResidualLayer(channels, 2**i, dropout) for i in range(layers))


def conv_mask(lengths: torch.Tensor, steps: int, like: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B, 1, T) float mask in `like`'s dtype, 1 at real steps."""
    return length_mask(lengths, steps, like.device).unsqueeze(1).to(like.dtype)


class TCNHead(Head):
    """Video target of the tcn head: one stage of dilated residual layers over the projected frames, then the mean
    over the real steps and a linear classifier."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self.layers = dilated_layers(dims.hidden, dims.layers, dims.dropout)
        self._classifier(dims.hidden)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x).transpose(1, 2)  # (B, H, T)
        mask = conv_mask(lengths, z.shape[2], z)
        z = z * mask
        for layer in self.layers:
            z = layer(z, mask)
        return z.sum(2) / mask.sum(2)


class FrameHead(Projected):
    """Base of every frames-target head: one class per row.

    Shapes: x (B, T, in_dim) float32 zero-padded, lengths (B,) int64 with 1 <= lengths <= T.
    `forward` -> logits (B, T, C); `forward_stages` -> (S, B, T, C), the logits of every stage (S = dims.stages for
    tcn, else 1; the last is `forward`'s), which the training loss sums over. Logits at padded rows are
    meaningless: rows past a sequence's length never change the logits at its real rows.
    """

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_stages(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward(x, lengths).unsqueeze(0)


class FrameRecurrentHead(FrameHead):
    """lstm and gru: causal per-step outputs (the output at row t depends only on rows <= t), so the head can run
    online, a row at a time. bilstm: per-step outputs of both directions (offline: it sees the whole sequence)."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self.bidirectional = dims.head == "bilstm"
        self.rnn = recurrent_layers(dims)
        self._classifier(dims.hidden * (2 if self.bidirectional else 1))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        steps = z.shape[1]
        lengths = lengths.cpu()
        if bool((lengths == steps).all()):
            out, _ = self.rnn(z)
        else:
            packed, _ = self.rnn(pack_padded_sequence(z, lengths, batch_first=True, enforce_sorted=False))
            out, _ = pad_packed_sequence(packed, batch_first=True, total_length=steps)  # the batch's own order
        return self.classify(out)


class FrameMeanPoolHead(FrameHead):
    """Order-blind baseline: each row is classified alone from its projection, with no temporal context (permuting
    the rows permutes the logits). What a temporal head scores above it is what context adds."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self._classifier(dims.hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classify(self.proj(x))


class FrameAttentionHead(FrameHead):
    """The attention head's encoder (sine positions, padding masked out), then a classifier at every step."""

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        self.encoder = transformer_encoder(dims)
        self.norm = nn.LayerNorm(dims.hidden)
        self._classifier(dims.hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, T, H)
        mask = length_mask(lengths, z.shape[1], z.device)
        return self.classify(encode_positions(self.encoder, self.norm, z, mask))


class TCNStage(nn.Module):
    """One stage of a multi-stage TCN on (B, channels, T): an optional 1x1 convolution to `hidden` channels (later
    stages; the first stage's input is the head's projection), dilated residual layers, a 1x1 convolution to the
    class logits."""

    def __init__(self, in_channels: int | None, hidden: int, classes: int, layers: int, dropout: float):
        super().__init__()
        self.inp = None if in_channels is None else nn.Conv1d(in_channels, hidden, 1)
        self.layers = dilated_layers(hidden, layers, dropout)
        self.out = nn.Conv1d(hidden, classes, 1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.inp is not None:
            z = self.inp(z) * mask
        for layer in self.layers:
            z = layer(z, mask)
        return self.out(z)


class FrameTCNHead(FrameHead):
    """Multi-stage temporal convolutional network in the style of MS-TCN (Farha & Gall, CVPR 2019).

    Stage 1: the input projection to `hidden` channels, `layers` dilated residual layers (kernel 3, dilations
    1, 2, ..., 2**(layers - 1)), a 1x1 convolution to the class logits. Stages 2..`stages` refine the previous
    stage's prediction from its softmax alone: a 1x1 convolution to `hidden`, the same kind of layers, a 1x1
    convolution to the logits. Offline: each stage widens the context of a row by 2**layers - 1 rows either side.
    Padded steps are zeroed after the projection and after every layer, so a sequence padded in a batch gets the
    logits it gets alone.
    """

    def __init__(self, dims: HeadDims):
        super().__init__(dims)
        classes = dims.num_classes
        self.stages = nn.ModuleList(
            TCNStage(None if s == 0 else classes, dims.hidden, classes, dims.layers, dims.dropout)
            for s in range(dims.stages)
        )

    def forward_stages(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.proj(x).transpose(1, 2)  # (B, H, T)
        mask = conv_mask(lengths, z.shape[2], z)
        logits = self.stages[0](z * mask, mask)  # (B, C, T)
        out = [logits]
        for stage in self.stages[1:]:
            logits = stage(torch.softmax(logits, dim=1), mask)
            out.append(logits)
        return torch.stack(out).transpose(2, 3)  # (S, B, T, C)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x, lengths)[-1]


def build_head(dims: HeadDims) -> Head | FrameHead:
    """The head `dims` describes, freshly initialised: a `Head` (target videos) or a `FrameHead` (target frames)."""
    if dims.target == "frames":
        if dims.head in ("lstm", "gru", "bilstm"):
            return FrameRecurrentHead(dims)
        if dims.head == "meanpool":
            return FrameMeanPoolHead(dims)
        if dims.head == "tcn":
            return FrameTCNHead(dims)
        return FrameAttentionHead(dims)
    if dims.head in ("lstm", "gru", "bilstm"):
        return RecurrentHead(dims)
    if dims.head == "meanpool":
        return MeanPoolHead(dims)
    if dims.head == "tcn":
        return TCNHead(dims)
    return AttentionHead(dims)
