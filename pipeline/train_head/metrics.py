"""Classification metrics from per-video probabilities, and the optional PNG plots (matplotlib)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from pipeline.config import FRAME_METRICS

log = logging.getLogger(__name__)

TOP_K = 5


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def topk_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable. Shapes: probs (N, C), y (N,)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def classification_report(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """top1, top5, loss (NLL of the probabilities), per-class accuracy (None for classes without videos),
    confusion matrix. Shapes: probs (N, C), y (N,)."""
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(classes))
    support = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {
        "videos": len(y),
        "top1": float((pred == y).mean()),
        "top5": topk_accuracy(probs, y, TOP_K),
        "loss": loss,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def scores_line(report: dict, target: str = "videos") -> str:
    """The scores of a report in words: 'top-1 x, top-5 y', or for a head that labels frames 'frame acc x, edit y,
    F1@10 ..., F1@25 ..., F1@50 ...'."""
    if target == "frames":
        return f"frame acc {report['acc']:.1%}, edit {report['edit']:.1%}, " + ", ".join(
            f"F1@{k[3:]} {report[k]:.1%}" for k in FRAME_METRICS[2:]
        )
    return f"top-1 {report['top1']:.1%}, top-5 {report['top5']:.1%}"


def to_json(obj) -> str:
    """Indented JSON with every list of numbers (a confusion-matrix row) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-\d.e,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


_said_no_plots = False  # the missing-matplotlib warning is given once per process, not once per plot or trial


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning, the first time) when it is not installed."""
    global _said_no_plots
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _said_no_plots:
            log.warning(
                "matplotlib is not installed: plots are skipped (get them with "
                "pip install 'framecache[plots]', or pass --no-plots)"
            )
            _said_no_plots = True
        return None
    return plt


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Loss and the accuracies per epoch (rows of metrics.csv: every val_ column) -> PNG. False when matplotlib is
    missing."""
    plt = pyplot()
    if plt is None or not rows:
        return False
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["train_loss"] for r in rows], label="train")
    a.plot(epochs, [r["val_loss"] for r in rows], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    frames = "val_acc" in rows[0]  # a head that labels frames: its accuracy is of rows
    b.plot(epochs, [r["train_acc"] for r in rows], label="train (rows)" if frames else "train (clips)")
    for name in [k for k in rows[0] if k.startswith("val_") and k != "val_loss"]:
        b.plot(epochs, [r[name] for r in rows], label="val " + name[4:], alpha=1.0 if name == "val_top1" else 0.7)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> bool:
    """Row-normalised confusion matrix -> PNG (class names shown up to 40 classes)."""
    plt = pyplot()
    if plt is None:
        return False
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(4 + 0.25 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black"
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
