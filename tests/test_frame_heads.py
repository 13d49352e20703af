"""Frames-target heads (one class per row), the tcn head and the frame loss. CPU, small dims, a few seconds."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipeline.config import HEADS
from pipeline.train_head.losses import frame_loss
from pipeline.train_head.model import FrameHead, Head, HeadDims, build_head

IN, HIDDEN, CLASSES, TCN_LAYERS, TCN_STAGES = 12, 16, 3, 3, 2


def frames_head(head: str, seed: int = 0, **changes) -> FrameHead:
    torch.manual_seed(seed)
    opts = dict(head=head, in_dim=IN, num_classes=CLASSES, hidden=HIDDEN, layers=2, dropout=0.2, activation="gelu")
    opts.update(target="frames")
    if head == "tcn":
        opts.update(layers=TCN_LAYERS, stages=TCN_STAGES)
    opts.update(changes)
    model = build_head(HeadDims(**opts))
    assert isinstance(model, FrameHead)
    return model


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("head", HEADS)
def test_frame_heads_give_one_row_of_logits_per_step_and_per_stage(head):
    model = frames_head(head)
    x = torch.randn(3, 11, IN)
    lengths = torch.tensor([11, 5, 8])
    logits = model(x, lengths)
    stages = model.forward_stages(x, lengths)
    assert logits.shape == (3, 11, CLASSES)
    assert stages.shape == ((TCN_STAGES if head == "tcn" else 1), 3, 11, CLASSES)
    assert torch.isfinite(logits).all() and torch.isfinite(stages).all()
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_stages(x, lengths)[-1], model(x, lengths))


def test_head_dims_check_the_target_and_the_stages():
    base = dict(head="tcn", in_dim=IN, num_classes=CLASSES, hidden=HIDDEN, layers=2, dropout=0.0, activation="relu")
    with pytest.raises(ValueError, match="target"):
        HeadDims(**base, target="clips")
    with pytest.raises(ValueError, match="stage"):
        HeadDims(**base, stages=0)
    assert HeadDims(**base, target="frames", stages=3).to_dict()["stages"] == 3


# ------------------------------------------------------------------------------------------------- padding
def padded_pair(model, *, frames: bool):
    """The logits of a length-7 sequence alone and at its real rows in a batch padded to 15 (garbage in the
    padding) next to a length-15 sequence."""
    torch.manual_seed(1)
    short = torch.randn(1, 7, IN)
    batch = torch.randn(2, 15, IN) * 5  # padded steps hold garbage: only masking/packing can make them harmless
    batch[1, :7] = short[0]
    model.eval()
    with torch.inference_mode():
        alone = model(short, torch.tensor([7]))
        padded = model(batch, torch.tensor([15, 7]))
    return alone, (padded[1:2, :7] if frames else padded[1:2])


@pytest.mark.parametrize("head", HEADS)
def test_a_sequence_padded_in_a_batch_gets_the_frame_logits_it_gets_alone(head):
    alone, padded = padded_pair(frames_head(head), frames=True)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_every_tcn_stage_ignores_the_padding():
    model = frames_head("tcn", stages=3).eval()
    torch.manual_seed(2)
    short = torch.randn(1, 7, IN)
    batch = torch.randn(2, 15, IN) * 5
    batch[1, :7] = short[0]
    with torch.inference_mode():
        alone = model.forward_stages(short, torch.tensor([7]))
        padded = model.forward_stages(batch, torch.tensor([15, 7]))
    torch.testing.assert_close(padded[:, 1:2, :7], alone, rtol=1e-4, atol=1e-5)


def test_the_tcn_video_head_ignores_the_padding():
    torch.manual_seed(0)
    model = build_head(
        HeadDims(head="tcn", in_dim=IN, num_classes=CLASSES, hidden=HIDDEN, layers=4, dropout=0.2, activation="gelu")
    )
    assert isinstance(model, Head)
    alone, padded = padded_pair(model, frames=False)
    assert alone.shape == (1, CLASSES)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_deep_dilations_on_short_sequences_equal_the_full_convolution():
    """Layers whose dilation reaches past the sequence use the centre tap only; the result is the convolution's."""
    from pipeline.train_head.model import DilatedResidualLayer

    torch.manual_seed(0)
    layer = DilatedResidualLayer(HIDDEN, 8, 0.0).eval()
    z = torch.randn(2, HIDDEN, 6)
    mask = torch.ones(2, 1, 6)
    full = z + layer.pointwise(F.relu(layer.dilated(z)))
    torch.testing.assert_close(layer(z, mask), full, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("head", HEADS)
def test_lstm_and_gru_are_causal_and_the_offline_heads_look_ahead(head):
    model = frames_head(head).eval()
    k = 4
    torch.manual_seed(3)
    x = torch.randn(2, 10, IN)
    changed = x.clone()
    changed[:, k:] = torch.randn(2, 10 - k, IN) * 3
    lengths = torch.tensor([10, 8])
    with torch.inference_mode():
        before, after = model(x, lengths), model(changed, lengths)
    assert not torch.allclose(before[:, k:], after[:, k:], atol=1e-4)  # the changed rows do count
    if head in ("lstm", "gru", "meanpool"):
        torch.testing.assert_close(after[:, :k], before[:, :k], rtol=1e-5, atol=1e-6)
    else:  # bilstm, attention, tcn see later rows
        assert not torch.allclose(after[:, :k], before[:, :k], atol=1e-4)


def test_meanpool_frames_is_order_blind():
    model = frames_head("meanpool").eval()
    torch.manual_seed(4)
    x = torch.randn(1, 9, IN)
    perm = torch.randperm(9)
    lengths = torch.tensor([9])
    with torch.inference_mode():
        torch.testing.assert_close(model(x[:, perm], lengths), model(x, lengths)[:, perm])


# ------------------------------------------------------------------------------------------------- loss
def test_frame_loss_ignores_padded_and_unlabelled_rows():
    torch.manual_seed(5)
    stages = torch.randn(2, 2, 6, CLASSES)
    y = torch.tensor([[0, 1, 1, 2, -1, -1], [2, -1, 0, 0, 1, 1]])
    loss = frame_loss(stages, y)
    other = stages.clone()
    other[:, 0, 4:] = torch.randn(2, 2, CLASSES) * 10
    other[:, 1, 1] = torch.randn(2, CLASSES) * 10
    torch.testing.assert_close(frame_loss(other, y), loss)
    assert not torch.allclose(frame_loss(other, torch.where(y < 0, 0, y)), loss)  # those rows would count


def test_frame_loss_smoothing_term_is_zero_when_every_row_predicts_the_same():
    torch.manual_seed(6)
    row = torch.randn(1, 1, 1, CLASSES)
    stages = row.expand(1, 2, 5, CLASSES).clone()
    y = torch.tensor([[0, 1, 2, 0, -1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(frame_loss(stages, y, smoothing=5.0), frame_loss(stages, y, smoothing=0.0))


def test_frame_loss_is_the_hand_computed_cross_entropy_without_smoothing():
    logits = torch.tensor([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]]]])  # (1, 1, 3, 3)
    y = torch.tensor([[0, 2, -1]])
    e = torch.exp(torch.tensor(1.0))
    first = -torch.log(e**2 / (e**2 + 2.0))  # row 0: logits (2, 0, 0), class 0
    second = -torch.log(1.0 / (e + 2.0))  # row 1: logits (0, 1, 0), class 2; row 2 ignored
    torch.testing.assert_close(frame_loss(logits, y, smoothing=0.0), (first + second) / 2)
    # two stages: the sum
    torch.testing.assert_close(frame_loss(logits.expand(2, -1, -1, -1), y, smoothing=0.0), first + second)
    # class weights: F.cross_entropy's weighted mean
    w = torch.tensor([1.0, 1.0, 3.0])
    torch.testing.assert_close(frame_loss(logits, y, smoothing=0.0, weight=w), (first + 3 * second) / 4)


def test_frame_loss_smoothing_term_by_hand_and_growing_with_flicker():
    logits = torch.tensor([[[[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 4, 2), last row padded
    y = torch.tensor([[0, 1, 0, -1]])
    logp = F.log_softmax(logits[0, 0, :3], dim=-1)
    tmse = (logp[1:] - logp[:-1]).pow(2).clamp(max=16).mean()  # two real pairs
    ce = frame_loss(logits, y, smoothing=0.0)
    torch.testing.assert_close(frame_loss(logits, y, smoothing=0.5), ce + 0.5 * tmse)
    assert frame_loss(logits, y, smoothing=0.3) > frame_loss(logits, y, smoothing=0.15) > ce
    # the squared change is truncated at 16: a confident flip costs 16 per class and pair, not its square
    flip = torch.tensor([[[[30.0, 0.0], [0.0, 30.0], [30.0, 0.0], [0.0, 0.0]]]])
    ce = frame_loss(flip, y, smoothing=0.0)
    torch.testing.assert_close(frame_loss(flip, y, smoothing=0.5), ce + 0.5 * 16.0)
    # a steady prediction of the same rows has no smoothing cost, a flickering one has
    steady = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(frame_loss(steady, y, smoothing=1.0), frame_loss(steady, y, smoothing=0.0))


def test_frame_loss_pulls_a_row_towards_the_previous_one_only():
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]], requires_grad=True)
    frame_loss(logits, torch.tensor([[-1, -1]]), smoothing=1.0).backward()  # no real row: 0, no gradient
    assert logits.grad is not None and not logits.grad.any()
    logits.grad = None
    y = torch.tensor([[0, 1]])
    (frame_loss(logits, y, smoothing=1.0) - frame_loss(logits, y, smoothing=0.0)).backward()
    assert not logits.grad[0, 0, 0].any() and logits.grad[0, 0, 1].abs().sum() > 0  # the earlier row is detached


# ------------------------------------------------------------------------------------------------- learning
def context_task(batch: int, steps: int, generator: torch.Generator, noise: float = 3.0):
    """Rows of segments of 6 to 13 rows; a row's features are its segment's class mean plus strong noise, so one
    row alone says little and its neighbours (same segment) say much more."""
    means = torch.randn(CLASSES, IN, generator=torch.Generator().manual_seed(99))
    segments = steps // 6 + 1
    ends = torch.randint(6, 14, (batch, segments), generator=generator).cumsum(1)
    segment = torch.searchsorted(ends, torch.arange(steps).expand(batch, steps).contiguous(), right=True)
    y = torch.randint(0, CLASSES, (batch, segments), generator=generator).gather(1, segment)
    return means[y] + noise * torch.randn(batch, steps, IN, generator=generator), y


def frame_accuracy(model, x, y) -> float:
    model.eval()
    with torch.inference_mode():
        pred = model(x, torch.full((len(x),), x.shape[1])).argmax(-1)
    return float((pred == y).float().mean())


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread (no wake-ups of idle workers between small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("head", ["tcn", "bilstm"])
def test_temporal_frame_heads_learn_from_context(head, one_thread):
    gen = torch.Generator().manual_seed(0)
    test_x, test_y = context_task(16, 48, gen)
    model = frames_head(head, layers=TCN_LAYERS if head == "tcn" else 1, dropout=0.1)
    alone = frames_head("meanpool", dropout=0.1)
    for m in (model, alone):
        m.proj[0].set_stats(torch.zeros(IN), torch.full((IN,), 3.0))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        m.train()
        for _ in range(100):
            x, y = context_task(8, 32, gen)
            loss = frame_loss(m.forward_stages(x, torch.full((8,), 32)), y, smoothing=0.15)
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc, acc_alone = frame_accuracy(model, test_x, test_y), frame_accuracy(alone, test_x, test_y)
    assert acc > 1 / CLASSES + 0.4, (acc, acc_alone)
    assert acc > acc_alone + 0.1, (acc, acc_alone)  # context beats a row alone


# ------------------------------------------------------------------------------------------------- old dims
PROJ = ["proj.0.weight", "proj.0.bias", "proj.0.mean", "proj.0.std", "proj.1.weight", "proj.1.bias"]
CLS = ["classifier.weight", "classifier.bias"]


def rnn_keys(reverse: bool) -> list[str]:
    return [
        f"rnn.{kind}_l{layer}{suffix}"
        for layer in (0, 1)
        for suffix in ([""] + (["_reverse"] if reverse else []))
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]


ENCODER_LAYER = [
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
]
VIDEO_KEYS = {
    "lstm": PROJ + rnn_keys(False) + CLS,
    "gru": PROJ + rnn_keys(False) + CLS,
    "bilstm": PROJ + rnn_keys(True) + CLS,
    "meanpool": PROJ + CLS,
    "attention": PROJ
    + [f"encoder.layers.{i}.{k}" for i in (0, 1) for k in ENCODER_LAYER]
    + ["norm.weight", "norm.bias", "score.weight", "score.bias"]
    + CLS,
}


@pytest.mark.parametrize("head", sorted(VIDEO_KEYS))
def test_dims_of_old_checkpoints_build_the_same_video_heads(head):
    old = dict(head=head, in_dim=IN, num_classes=CLASSES, hidden=HIDDEN, layers=2, dropout=0.1, activation="gelu")
    dims = HeadDims(**old)
    assert (dims.target, dims.stages) == ("videos", 1)
    model = build_head(dims)
    assert isinstance(model, Head) and not isinstance(model, FrameHead)
    assert sorted(model.state_dict()) == sorted(VIDEO_KEYS[head])
    again = build_head(HeadDims(**dims.to_dict()))
    again.load_state_dict(model.state_dict())  # strict: a checkpoint of today's dims loads too
    x = torch.randn(2, 6, IN)
    with torch.inference_mode():
        out = model.eval()(x, torch.tensor([6, 3]))
        torch.testing.assert_close(again.eval()(x, torch.tensor([6, 3])), out)
    assert out.shape == (2, CLASSES)
