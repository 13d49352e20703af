"""Per-frame metrics of temporal action segmentation (frame accuracy, segmental edit score, F1@k), the runs a
frame head's prediction is written as, and the optional colour-strip plot (matplotlib)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import FRAME_METRICS, FRAME_OVERLAPS
from pipeline.train_head.metrics import confusion_matrix, pyplot

SEGMENT_METRICS = FRAME_METRICS  # acc, edit, then F1 at each of FRAME_OVERLAPS
F1_KEYS = FRAME_METRICS[2:]


def segments(labels: np.ndarray, background: Collection[int] = ()) -> list[tuple[int, int, int]]:
    """Runs of equal consecutive labels as (label, start, end), end exclusive, in order. Runs of a background
    label are left out, and so are labels < 0 (padding, unlabelled rows): they break runs and belong to none.

    Shapes: labels (T,) ints.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return []
    starts = np.flatnonzero(np.diff(labels)) + 1
    bounds = np.concatenate(([0], starts, [labels.size]))
    skip = {int(b) for b in background}
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        label = int(labels[s])
        if label >= 0 and label not in skip:
            out.append((label, int(s), int(e)))
    return out


def _levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Insertions, deletions and substitutions that turn a into b (one row of the table at a time)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = row
    return prev[-1]


def edit_score(pred: np.ndarray, true: np.ndarray, background: Collection[int] = ()) -> float:
    """Segmental edit score in [0, 1]: 1 - Levenshtein distance between the two sequences of segment labels / the
    longer one's length; 1.0 when neither has a segment. It ignores where segments are, only their order.

    Shapes: pred (T,), true (T,).
    """
    p = [s[0] for s in segments(pred, background)]
    t = [s[0] for s in segments(true, background)]
    longest = max(len(p), len(t))
    if longest == 0:
        return 1.0
    return 1.0 - _levenshtein(p, t) / longest


def f1_counts(
    pred: np.ndarray, true: np.ndarray, overlap: float, background: Collection[int] = ()
) -> tuple[int, int, int]:
    """(tp, fp, fn) of segmental F1 at a temporal IoU threshold. Each predicted segment, in order, is matched to
    the ground-truth segment of its label with the highest IoU: a true positive when that IoU >= overlap and the
    segment was not matched before, else a false positive (so over-segmentation costs precision). fn counts the
    ground-truth segments never matched.

    Shapes: pred (T,), true (T,).
    """
    gt = segments(true, background)
    matched = [False] * len(gt)
    tp = fp = 0
    for label, ps, pe in segments(pred, background):
        best, best_iou = -1, 0.0
        for i, (g_label, gs, ge) in enumerate(gt):
            if g_label != label:
                continue
            inter = min(pe, ge) - max(ps, gs)
            if inter <= 0:
                continue
            iou = inter / ((pe - ps) + (ge - gs) - inter)
            if iou > best_iou:  # strict: the first of equal IoUs wins
                best, best_iou = i, iou
        if best >= 0 and best_iou >= overlap and not matched[best]:
            matched[best] = True
            tp += 1
        else:
            fp += 1
    return tp, fp, len(gt) - sum(matched)


def f1(tp: int, fp: int, fn: int) -> float:
    """Harmonic mean of precision and recall, 2 tp / (2 tp + fp + fn); 0 when there is nothing to count."""
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def segmentation_report(
    preds: Sequence[np.ndarray],
    trues: Sequence[np.ndarray],
    classes: list[str],
    keys: Sequence[str] | None = None,
    background: Collection[int] = (),
    probs: Sequence[np.ndarray] | None = None,
) -> dict:
    """Frame accuracy, loss (NLL, when probs are given), edit score and F1 at FRAME_OVERLAPS, overall and per
    video, per-class frame accuracy and the frame confusion matrix, as a JSON-able dict.

    Overall F1 comes from the counts summed over all videos (as the literature reports it), edit is the mean of
    the videos' scores. Frame metrics count background frames; rows whose true label is < 0 are unlabelled and
    count in none ("frames" is the number of labelled rows).

    Shapes: preds[i], trues[i] (T_i,) class indices; probs[i] (T_i, C).
    """
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predicted sequences but {len(trues)} true ones")
    if keys is None:
        keys = [str(i) for i in range(len(preds))]
    num_classes = len(classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    counts = {o: np.zeros(3, dtype=np.int64) for o in FRAME_OVERLAPS}
    frames = correct = 0
    nll = 0.0
    per_video = []
    for i, (key, pred, true) in enumerate(zip(keys, preds, trues)):
        pred = np.asarray(pred).reshape(-1)
        true = np.asarray(true).reshape(-1)
        if pred.shape != true.shape:
            raise ValueError(f"video {key}: {pred.size} predicted rows but {true.size} true ones")
        scored = true >= 0
        n = int(scored.sum())
        hits = int((pred[scored] == true[scored]).sum())
        valid = scored & (pred >= 0) & (pred < num_classes)  # a prediction outside the classes is only a miss
        cm += confusion_matrix(true[valid], pred[valid], num_classes)
        if probs is not None:
            p = np.asarray(probs[i])
            nll += float(-np.log(np.clip(p[np.flatnonzero(scored), true[scored]], 1e-12, None)).sum())
        frames += n
        correct += hits
        row = {"key": key, "frames": n, "acc": hits / n if n else None, "edit": edit_score(pred, true, background)}
        for o, name in zip(FRAME_OVERLAPS, F1_KEYS):
            c = f1_counts(pred, true, o, background)
            counts[o] += c
            row[name] = f1(*c)
        per_video.append(row)
    support = cm.sum(axis=1)
    report = {
        "videos": len(per_video),
        "frames": frames,
        "acc": correct / frames if frames else None,
        "edit": float(np.mean([r["edit"] for r in per_video])) if per_video else None,
    }
    for o, name in zip(FRAME_OVERLAPS, F1_KEYS):
        report[name] = f1(*(int(x) for x in counts[o]))
    report |= {
        "loss": nll / frames if probs is not None and frames else None,
        "per_video": per_video,
        "per_class_accuracy": {
            c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "background": [classes[b] for b in sorted(set(background))],
    }
    return report


def merge_segments(
    labels: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray, classes: list[str]
) -> list[dict]:
    """The runs of a per-row prediction, with their rows, frames and seconds (ends exclusive). Rows may be a
    subsample of the decoded frames, so frames come from frame_indices; a run ends (in frames and in seconds) where
    the next row starts, and the last one a median step after its last row (a single row: one frame, 0 s).

    Shapes: labels, frame_indices, timestamps (T,).
    """
    frame_indices = np.asarray(frame_indices).reshape(-1)
    timestamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    step = float(np.median(np.diff(timestamps))) if timestamps.size > 1 else 0.0
    frame_step = int(np.median(np.diff(frame_indices))) if frame_indices.size > 1 else 1
    out = []
    for label, start, end in segments(labels):
        end_s = timestamps[end] if end < timestamps.size else timestamps[-1] + step
        out.append(
            {
                "label": classes[label],
                "start_row": start,
                "end_row": end,
                "start_frame": int(frame_indices[start]),
                "end_frame": int(frame_indices[end])
                if end < frame_indices.size
                else int(frame_indices[-1]) + frame_step,
                "start_s": float(timestamps[start]),
                "end_s": float(end_s),
            }
        )
    return out


def _class_colours(n: int) -> np.ndarray:
    """(n, 3) RGB: tab20, then tab20b and tab20c (60 distinct colours), then evenly spaced hues beyond."""
    import matplotlib

    if n <= 60:
        tables = [matplotlib.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c")]
        return np.asarray([c for t in tables for c in t][:n], dtype=np.float64)[:, :3]
    return matplotlib.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))[:, :3]


def plot_strips(
    items: Sequence[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path, title: str = ""
) -> bool:
    """Per video, a ground-truth colour strip above a prediction strip (x in rows, labels < 0 white, one colour
    per class across the figure, a legend of the classes that appear) -> PNG. False when matplotlib is missing.

    Shapes: items[i] = (key, true (T_i,), pred (T_i,)).
    """
    plt = pyplot()
    if plt is None or not items:
        return False
    from matplotlib.patches import Patch

    n = len(classes)
    palette = np.vstack([_class_colours(n), np.ones((1, 3))])  # the extra last row: white, for labels < 0
    seen: set[int] = set()
    fig, axes = plt.subplots(len(items), 1, figsize=(10, 0.3 + 0.75 * len(items)), squeeze=False)
    for ax, (key, true, pred) in zip(axes[:, 0], items):
        true = np.asarray(true).reshape(-1)
        pred = np.asarray(pred).reshape(-1)
        length = max(true.size, pred.size, 1)
        strip = np.full((2, length), -1, dtype=np.int64)  # a shorter sequence is padded with white
        strip[0, : true.size] = true
        strip[1, : pred.size] = pred
        strip[(strip < 0) | (strip >= n)] = n
        seen.update(int(x) for x in np.unique(strip) if x < n)
        ax.imshow(palette[strip], aspect="auto", interpolation="nearest", extent=(0, length, 2, 0))
        ax.axhline(1, color="white", linewidth=1)  # keeps the two strips apart where their colours meet
        ax.set_yticks([0.5, 1.5], ["true", "pred"], fontsize=7)
        ax.set_ylabel(str(key), rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("row")
    if title:
        fig.suptitle(title)
    handles = [Patch(facecolor=palette[c], edgecolor="none", label=classes[c]) for c in sorted(seen)]
    if handles:
        # Columns that keep the legend about as tall as the strips, however many classes appear.
        per_column = max(6, int(fig.get_figheight() / 0.17))
        fig.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
            ncol=-(-len(handles) // per_column),
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
