"""Stage one and stage two composed: `predict` classifies new videos (or labels their frames) after extracting them
exactly as a head's training features were (stage one, with its resumable cache); `extract_with_checkpoint` makes a
cache of a checkpoint's features (its fine-tuned backbone when it has one).

    pipeline predict runs/lstm/best.pt new_videos/ -o preds.csv
    pipeline predict runs/tcn/best.pt new_videos/ -o segments.csv      # + segments.frames.csv, a label per row
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import _callable_stage
from pipeline.config import HEAD_BATCH, ExtractConfig, PredictConfig, config_with
from pipeline.data.cache import open_cache
from pipeline.data.sequences import load_sequences
from pipeline.extract.backbone import LoadedBackbone, WeightsError
from pipeline.extract.reproduce import backbone_for_spec, extract_config_for
from pipeline.runtime import cpu_count, pick_device
from pipeline.train_head.checkpoint import FeatureMismatchError, HeadCheckpoint, load_checkpoint
from pipeline.train_head.segmentation import merge_segments
from pipeline.train_head.train import score_store

log = logging.getLogger(__name__)

PREDICT_CACHE_NAME = "predict_features.h5"


# ----------------------------------------------------------------------------------------------------- predict
@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]
    """(class, probability), most probable first; empty when the video failed. A head that labels frames: (class,
    share of the video's rows labelled so)."""
    error: str | None = None
    segments: list[dict] | None = None
    """A head that labels frames: the runs of equal labels (label, start/end row, frame and seconds, ends
    exclusive; see segmentation.merge_segments)."""
    rows: list[dict] | None = None
    """A head that labels frames: every row's frame, time (s), label and its probability."""


@dataclass
class PredictReport:
    predictions: list[Prediction]
    output: Path
    extracted: int
    reused: int
    json_output: Path | None = None
    """The JSON copy of the predictions (with --json): OUTPUT with the suffix .json."""
    frames_output: Path | None = None
    """A head that labels frames: the label of every row (OUTPUT.frames.csv); OUTPUT holds the segments."""

    @property
    def failed(self) -> list[Prediction]:
        return [p for p in self.predictions if p.error]

    def summary(self) -> str:
        return (
            f"{len(self.predictions) - len(self.failed)} videos predicted ({self.extracted} extracted, "
            f"{self.reused} already in the prediction cache), {len(self.failed)} failed -> {self.output}"
            + (f", {self.frames_output}" if self.frames_output else "")
            + (f" and {self.json_output}" if self.json_output else "")
        )


def checkpoint_backbone(
    ckpt: HeadCheckpoint, checkpoint: str | Path = "the checkpoint", weights: Path | None = None, progress: bool = True
) -> LoadedBackbone:
    """The frozen backbone that makes the features of `ckpt` (see backbone_for_spec), checked against the head."""
    loaded = backbone_for_spec(ckpt.feature_spec, ckpt.backbone_state, weights, str(checkpoint), progress)
    if loaded.dim != ckpt.dims.in_dim:
        raise WeightsError(
            f"{checkpoint}: the head takes {ckpt.dims.in_dim}-dim features, but "
            f"{ckpt.feature_spec.backbone} gives {loaded.dim}: the checkpoint belongs to another backbone"
        )
    return loaded


SPEC_OPTIONS = ("backbone", "resize", "crop", "mean", "std", "sampling")  # ExtractConfig fields a spec fixes


def extract_with_checkpoint(
    checkpoint: str | Path,
    inputs: list,
    output,
    *,
    config: ExtractConfig | None = None,
    weights: Path | None = None,
    **options,
):
    """Extract `inputs` into the cache `output` with exactly the features of `checkpoint` (its fine-tuned backbone
    when it has one): same backbone, weights, preprocessing and sampling, so the cache's spec is the checkpoint's.

        pipeline extract videos/ -o ft.h5 --backbone-checkpoint runs/lstm-ft/best.pt

    Options are ExtractConfig fields that do not change the features (dtype, device, batch_size, workers, ...);
    `weights` is the weights file of a head trained on features of one. Returns the ExtractReport.
    """
    from pipeline.extract.run import build_config, extract_videos

    cfg = build_config(output, config, **options)
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt.feature_spec
    wanted = extract_config_for(spec, cfg.output, None if ckpt.backbone_state is not None else weights)
    defaults = ExtractConfig(output=cfg.output)
    conflicts = [
        name
        for name in SPEC_OPTIONS
        if getattr(cfg, name) != getattr(defaults, name) and getattr(cfg, name) != getattr(wanted, name)
    ]
    if conflicts:
        raise ValueError(
            f"--backbone-checkpoint takes the backbone, weights, preprocessing and sampling from "
            f"{checkpoint} ({spec.describe()}); drop the options that differ: {', '.join(conflicts)}"
        )
    loaded = checkpoint_backbone(ckpt, checkpoint, weights, progress=cfg.runtime.progress)
    cfg = replace(cfg, weights=wanted.weights, **{name: getattr(wanted, name) for name in SPEC_OPTIONS})
    report = extract_videos(inputs, cfg.output, config=cfg, backbone_model=loaded)
    if report.spec != spec:
        raise FeatureMismatchError(
            f"extraction with {checkpoint}'s backbone gave features of another spec: "
            + "; ".join(report.spec.differences(spec))
        )
    return report


def predict(
    checkpoint: str | Path,
    inputs: list,
    output: str | Path | None = None,
    *,
    config: PredictConfig | None = None,
    **options,
) -> PredictReport:
    """Classify videos or frame folders `inputs` with a head; write path, top-k classes and probabilities as CSV
    (and JSON with json=True). Videos are extracted with the checkpoint's feature spec into a resumable cache
    (config.cache, default beside the checkpoint), so predicting them again costs no extraction.
    """
    from pipeline.extract.inputs import discover
    from pipeline.extract.run import extract_videos

    if output is not None:
        options["output"] = output
    cfg = config_with(PredictConfig, config, {}, options, "predict")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    clips = ckpt.eval_clips_for(cfg.eval_clips)
    cache_path = Path(cfg.cache) if cfg.cache is not None else checkpoint.parent / PREDICT_CACHE_NAME
    items = discover(inputs)
    extract_cfg = extract_config_for(
        ckpt.feature_spec,
        cache_path,
        cfg.weights,
        dtype=ckpt.feature_dtype,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        runtime=cfg.runtime,
    )
    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as tmp:
        if cfg.weights is not None:
            # The same bytes under the recorded file name, so that the new features get exactly the head's spec.
            link = Path(tmp) / ckpt.feature_spec.weights
            link.symlink_to(Path(cfg.weights).expanduser().resolve())
            extract_cfg = replace(extract_cfg, weights=str(link))
        # Keys are absolute paths: the same file is found again whatever folder it is given from.
        manifest = Path(tmp) / "inputs.csv"
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, which read_manifest
        # accepts
        with open(manifest, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            for item in items:
                writer.writerow([str(item.path.resolve()), item.label or ""])
        backbone = checkpoint_backbone(ckpt, checkpoint) if ckpt.backbone_state is not None else None
        report = extract_videos([manifest], cache_path, config=extract_cfg, backbone_model=backbone)
    cache = open_cache(cache_path)
    ckpt.check_features(cache, checkpoint)
    keys = [str(item.path.resolve()) for item in items]
    ok = [k for k in keys if k in cache and k not in report.failed]
    probs = np.zeros((0, len(ckpt.classes)))
    if ok:
        torch.set_num_threads(cfg.runtime.threads or cpu_count())
        device = pick_device(cfg.runtime.device)
        store = load_sequences(cache, ok, "ram", progress=False)
        probs = score_store(ckpt, store, clips, HEAD_BATCH, device)
    row_of = {k: i for i, k in enumerate(ok)}
    k_top = min(cfg.top_k, len(ckpt.classes))
    predictions = []
    for item, key in zip(items, keys, strict=True):
        if key not in row_of:
            reason = report.failed.get(key, (None, "not in the prediction cache"))[1]
            predictions.append(Prediction(str(item.path), [], reason))
        elif ckpt.target == "frames":
            predictions.append(frame_prediction(str(item.path), probs[row_of[key]], cache, key, ckpt.classes, k_top))
        else:
            p = probs[row_of[key]]
            best = np.argsort(-p, kind="stable")[:k_top]
            predictions.append(Prediction(str(item.path), [(ckpt.classes[j], float(p[j])) for j in best]))
    if ckpt.target == "frames":
        write_frame_predictions(predictions, cfg.output, cfg.json)
    else:
        write_predictions(predictions, cfg.output, k_top, cfg.json)
    return PredictReport(
        predictions,
        cfg.output,
        len(report.extracted),
        len(report.skipped),
        json_path(cfg.output) if cfg.json else None,
        frames_path(cfg.output) if ckpt.target == "frames" else None,
    )


def frame_prediction(path: str, probs: np.ndarray, cache, key: str, classes: list[str], k: int) -> Prediction:
    """A frame head's prediction of one video from its rows' probabilities (T, C): each row's label, the merged
    segments, and as `top` the k labels covering most rows."""
    labels = probs.argmax(1)
    frames, times = cache.frame_indices(key), cache.timestamps(key)
    share = np.bincount(labels, minlength=len(classes)) / max(len(labels), 1)
    top = [(classes[j], float(share[j])) for j in np.argsort(-share, kind="stable")[:k] if share[j] > 0]
    rows = [
        {"frame": int(f), "time_s": float(t), "label": classes[c], "prob": float(probs[r, c])}
        for r, (f, t, c) in enumerate(zip(frames, times, labels, strict=True))
    ]
    return Prediction(path, top, segments=merge_segments(labels, frames, times, classes), rows=rows)


def json_path(output: Path) -> Path:
    """Where --json writes: OUTPUT with the suffix .json (preds.csv -> preds.json)."""
    return Path(output).with_suffix(".json")


def frames_path(output: Path) -> Path:
    """Where a frame head's per-row labels go: OUTPUT with the suffix .frames.csv (segments.csv ->
    segments.frames.csv)."""
    return Path(output).with_suffix(".frames.csv")


def write_frame_predictions(predictions: list[Prediction], output: Path, as_json: bool = False) -> None:
    """A frame head's predictions. OUTPUT (CSV): a row per segment, path, label, start_frame, end_frame, start_s,
    end_s (ends exclusive), error (a failed video: one row with only its path and error). OUTPUT.frames.csv: a row
    per cached row, path, frame, time_s, label, prob. JSON (beside OUTPUT, with as_json): a list of {path,
    segments, frames, error}."""
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = ("label", "start_frame", "end_frame", "start_s", "end_s")
    with open(output, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *columns, "error"])
        for p in predictions:
            if p.error:
                writer.writerow([p.path, *[""] * len(columns), p.error])
            for seg in p.segments or []:
                writer.writerow([p.path, *(_cell(seg[c]) for c in columns), ""])
    with open(frames_path(output), "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "frame", "time_s", "label", "prob"])
        for p in predictions:
            for r in p.rows or []:
                writer.writerow([p.path, r["frame"], f"{r['time_s']:.6g}", r["label"], f"{r['prob']:.6f}"])
    if as_json:
        json_path(output).write_text(
            json.dumps(
                [{"path": p.path, "segments": p.segments, "frames": p.rows, "error": p.error} for p in predictions],
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_predictions(predictions: list[Prediction], output: Path, k: int, as_json: bool = False) -> None:
    """CSV: path, label_1, prob_1, ..., label_k, prob_k, error. JSON (beside it): a list of
    {path, predictions: [{label, prob}], error}."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # paths as on disk
        writer = csv.writer(f)
        writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["error"])
        for p in predictions:
            cells = [c for label, prob in p.top for c in (label, f"{prob:.6f}")]
            writer.writerow([p.path] + cells + [""] * (2 * k - len(cells)) + [p.error or ""])
    if as_json:
        json_path(output).write_text(
            json.dumps(
                [
                    {
                        "path": p.path,
                        "predictions": [{"label": label, "prob": prob} for label, prob in p.top],
                        "error": p.error,
                    }
                    for p in predictions
                ],
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )


_callable_stage(__name__)  # `pipeline.predict(...)` calls predict() above
