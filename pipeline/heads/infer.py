"""A trained head on new data: `evaluate_checkpoint` scores it on any cache of the same features, `predict` classifies
new videos after extracting them exactly as the head's training features were (stage one, with its resumable cache).

    pipeline evaluate runs/lstm/best.pt test.h5
    pipeline predict runs/lstm/best.pt new_videos/ -o preds.csv
"""

from __future__ import annotations

import csv
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import EvalConfig, ExtractConfig, PredictConfig, Sampling, cpu_count, pick_device
from pipeline.data.cache import FeatureSpec, open_cache
from pipeline.data.sequences import load_sequences
from pipeline.data.splits import KeyMatcher, SplitError, read_list
from pipeline.extract.backbone import (
    FINETUNED_PREFIX,
    RANDOM_INIT_SEED,
    LoadedBackbone,
    Preprocessing,
    WeightsError,
    backbone_from_state,
    load_backbone,
    model_weights_enum,
    sha256_file,
)
from pipeline.heads.checkpoint import FeatureMismatchError, HeadCheckpoint, load_checkpoint
from pipeline.heads.metrics import classification_report, plot_confusion, to_json
from pipeline.heads.train import predict_store, video_labels

log = logging.getLogger(__name__)

TORCHVISION_WEIGHTS = re.compile(r"^\w+_Weights\.\w+$")  # ResNet50_Weights.IMAGENET1K_V2
RANDOM_WEIGHTS = re.compile(r"^none\(seed=(\d+)\)$")
PREDICT_CACHE_NAME = "predict_features.h5"


def _options(cls, config, options: dict):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(unknown)}")
    return replace(config or cls(), **options)


def _eval_clips(ckpt: HeadCheckpoint, requested: int | None) -> int:
    clips = ckpt.eval_clips if requested is None else requested
    if clips and ckpt.clip_len is None:
        raise ValueError("--eval-clips needs a head trained on clips; this one was trained on whole sequences")
    return clips


# ---------------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalReport:
    checkpoint: Path
    cache: Path
    metrics: dict
    """classification_report: videos, top1, top5, loss, per_class_accuracy, confusion_matrix, classes."""
    eval: str
    skipped: dict[str, str] = field(default_factory=dict)
    """key -> why it was not scored (a label the head does not know)."""

    def summary_line(self) -> str:
        m = self.metrics
        extra = f"; {len(self.skipped)} videos of unknown classes skipped" if self.skipped else ""
        return (f"top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} on {m['videos']} videos of {self.cache} "
                f"({self.eval}{extra})")


def evaluate_checkpoint(checkpoint: str | Path, cache: str | Path, *, config: EvalConfig | None = None,
                        **options) -> EvalReport:
    """Top-1, top-5, per-class accuracy and the confusion matrix of a head on the labelled videos of `cache`.

    Refuses (FeatureMismatchError) a cache whose features differ from those the head was trained on.
    Options are EvalConfig fields (eval_clips=..., labels=..., keys_list=..., out=...).
    """
    cfg = _options(EvalConfig, config, options)
    torch.set_num_threads(cfg.threads or cpu_count())
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(checkpoint)
    c = open_cache(cache)
    ckpt.check_features(c, checkpoint)
    clips = _eval_clips(ckpt, cfg.eval_clips)
    labels = video_labels(c, cfg.labels)
    if cfg.keys_list is not None:
        match = KeyMatcher(c.keys())
        listed = {match(e) for e in read_list(cfg.keys_list)} - {None}
        labels = {k: v for k, v in labels.items() if k in listed}
        if not labels:
            raise SplitError(f"no labelled video of {c.path} is named in {cfg.keys_list}")
    known = set(ckpt.classes)
    skipped = {k: f"label {v!r} is not a class of the head" for k, v in labels.items() if v not in known}
    if skipped:
        log.warning("%d videos have labels the head was not trained on and are skipped (e.g. %r)", len(skipped),
                    labels[next(iter(skipped))])
    keys = [k for k in labels if k not in skipped]
    if not keys:
        raise SplitError(f"no video of {c.path} has a label among the head's {len(known)} classes "
                         f"({', '.join(ckpt.classes[:5])}{', ...' if len(known) > 5 else ''})")
    store = load_sequences(c, keys, cfg.memory, cfg.progress)
    index = {name: i for i, name in enumerate(ckpt.classes)}
    y = np.array([index[labels[k]] for k in keys], dtype=np.int64)
    probs = predict_store(ckpt.model(device), store, np.arange(len(keys)), clip_len=ckpt.clip_len,
                          clip_stride=ckpt.clip_stride, eval_clips=clips, batch_size=cfg.batch_size, device=device,
                          workers=0 if store.in_memory else cfg.workers)
    metrics = classification_report(probs, y, ckpt.classes)
    report = EvalReport(Path(checkpoint), Path(cache), metrics, _describe(ckpt, clips), skipped)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(to_json(
            {"checkpoint": str(checkpoint), "cache": str(cache), "eval": report.eval, **metrics,
             "skipped": len(skipped)}))
        plot_confusion(np.array(metrics["confusion_matrix"]), ckpt.classes, out / "confusion.png",
                       f"top-1 {metrics['top1']:.1%} on {Path(cache).name}")
    return report


def _describe(ckpt: HeadCheckpoint, clips: int) -> str:
    stride = f", stride {ckpt.clip_stride}" if ckpt.clip_stride > 1 else ""
    if clips and ckpt.clip_len is not None:
        return f"mean of {clips} clips of {ckpt.clip_len} rows{stride}"
    return f"whole sequences{stride}"


# ----------------------------------------------------------------------------------------------------- predict
@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]
    """(class, probability), most probable first; empty when the video failed."""
    error: str | None = None


@dataclass
class PredictReport:
    predictions: list[Prediction]
    output: Path
    extracted: int
    reused: int

    @property
    def failed(self) -> list[Prediction]:
        return [p for p in self.predictions if p.error]

    def summary(self) -> str:
        return (f"{len(self.predictions) - len(self.failed)} videos predicted ({self.extracted} extracted, "
                f"{self.reused} already in the prediction cache), {len(self.failed)} failed -> {self.output}")


def extract_config_for(spec: FeatureSpec, output: Path, weights: Path | None = None, **options) -> ExtractConfig:
    """The ExtractConfig that reproduces the features of `spec` (backbone, weights, preprocessing, sampling).

    Weights files are checked against the recorded sha256. Options are further ExtractConfig fields (device, ...).
    """
    pre = spec.preprocessing
    chosen = _weights_for(spec, weights)
    return ExtractConfig(output=output, backbone=spec.backbone, weights=chosen, resize=pre["resize"], crop=pre["crop"],
                         mean=tuple(pre["mean"]), std=tuple(pre["std"]), sampling=Sampling(**spec.sampling), **options)


def _weights_for(spec: FeatureSpec, weights: Path | None) -> str:
    if spec.weights.startswith(FINETUNED_PREFIX):
        if weights is not None:
            raise WeightsError(f"the head's features come from the fine-tuned backbone {spec.weights!r} stored in the "
                               f"checkpoint itself: drop --weights")
        return spec.weights  # not loadable by name: extract_videos gets checkpoint_backbone(...) instead
    random = RANDOM_WEIGHTS.match(spec.weights)
    if random or TORCHVISION_WEIGHTS.match(spec.weights):
        if weights is not None:
            raise WeightsError(f"the head's features come from {spec.weights}, not from a weights file: drop --weights")
        if random:
            if int(random.group(1)) != RANDOM_INIT_SEED:
                raise WeightsError(f"the head's features come from random weights with seed {random.group(1)}; this "
                                   f"pipeline initialises with seed {RANDOM_INIT_SEED}")
            return "none"
        return spec.weights
    if weights is None:
        raise WeightsError(f"the head's features come from the weights file {spec.weights!r} (sha256 "
                           f"{(spec.weights_sha256 or '?')[:16]}...): pass it with --weights PATH")
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise WeightsError(f"--weights {weights}: no such file")
    sha = sha256_file(weights)
    if sha != spec.weights_sha256:
        raise WeightsError(f"--weights {weights} has sha256 {sha[:16]}..., but the head was trained on features of "
                           f"{spec.weights!r} with sha256 {(spec.weights_sha256 or '?')[:16]}...: another file")
    return str(weights)


def checkpoint_backbone(ckpt: HeadCheckpoint, checkpoint: str | Path = "the checkpoint", weights: Path | None = None,
                        progress: bool = True) -> LoadedBackbone:
    """The frozen backbone that makes the features of `ckpt`: its own fine-tuned one, or the spec's backbone with the
    spec's weights (a weights file must be passed and match the recorded sha256). The result's weights name and
    sha256 are the spec's, so extract_videos(backbone_model=...) writes features of exactly that spec.

    Raises WeightsError for weights that cannot be had or that differ, and for a spec that names no torchvision
    backbone or one whose embedding does not fit the head.
    """
    spec = ckpt.feature_spec
    try:
        model_weights_enum(spec.backbone)
    except ValueError:
        raise WeightsError(f"{checkpoint} was trained on features of {spec.backbone!r}, which is not a torchvision "
                           f"classification model, so no backbone can make them again") from None
    if ckpt.backbone_state is not None:
        if weights is not None:
            raise WeightsError(f"{checkpoint} carries its own fine-tuned backbone: drop --weights")
        loaded = backbone_from_state(spec.backbone, ckpt.backbone_state, spec.weights, spec.weights_sha256,
                                     Preprocessing.from_dict(spec.preprocessing))
    else:
        cfg = extract_config_for(spec, Path("unused.h5"), weights)
        loaded = load_backbone(cfg.backbone, cfg.weights, cfg.resize, cfg.crop, cfg.mean, cfg.std, progress=progress)
        if spec.weights_sha256 and loaded.weights_sha256 != spec.weights_sha256:
            raise WeightsError(f"weights {loaded.weights} of {spec.backbone} hash to "
                               f"{(loaded.weights_sha256 or '?')[:16]}..., but the head was trained on features of "
                               f"{spec.weights!r} with sha256 {spec.weights_sha256[:16]}...")
    if loaded.dim != ckpt.dims.in_dim or loaded.dim != spec.dim:
        raise WeightsError(f"{checkpoint}: the head takes {ckpt.dims.in_dim}-dim features (spec: {spec.dim}), but "
                           f"{spec.backbone} gives {loaded.dim}: the checkpoint belongs to another backbone")
    if loaded.preprocessing.to_dict() != spec.preprocessing:
        raise WeightsError(f"{checkpoint}: {spec.backbone}'s preprocessing {loaded.preprocessing.to_dict()} differs "
                           f"from the recorded {spec.preprocessing}")
    return LoadedBackbone(model=loaded.model, weights=spec.weights, weights_sha256=spec.weights_sha256,
                          preprocessing=loaded.preprocessing, dim=loaded.dim)


SPEC_OPTIONS = ("backbone", "resize", "crop", "mean", "std")  # ExtractConfig fields a checkpoint's spec fixes


def extract_with_checkpoint(checkpoint: str | Path, inputs: list, output, *, config: ExtractConfig | None = None,
                            weights: Path | None = None, **options):
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
    conflicts = [name for name in SPEC_OPTIONS if getattr(cfg, name) != getattr(defaults, name)
                 and getattr(cfg, name) != getattr(wanted, name)]
    if cfg.sampling != defaults.sampling and cfg.sampling != wanted.sampling:
        conflicts.append("sampling")
    if conflicts:
        raise ValueError(f"--backbone-checkpoint takes the backbone, weights, preprocessing and sampling from "
                         f"{checkpoint} ({spec.describe()}); drop the options that differ: {', '.join(conflicts)}")
    loaded = checkpoint_backbone(ckpt, checkpoint, weights, progress=cfg.progress)
    cfg = replace(cfg, backbone=wanted.backbone, weights=wanted.weights, resize=wanted.resize, crop=wanted.crop,
                  mean=wanted.mean, std=wanted.std, sampling=wanted.sampling)
    report = extract_videos(inputs, cfg.output, config=cfg, backbone_model=loaded)
    if report.spec != spec:
        raise FeatureMismatchError(f"extraction with {checkpoint}'s backbone gave features of another spec: "
                                   + "; ".join(report.spec.differences(spec)))
    return report


def predict(checkpoint: str | Path, inputs: list, output: str | Path | None = None, *,
            config: PredictConfig | None = None, **options) -> PredictReport:
    """Classify videos or frame folders `inputs` with a head; write path, top-k classes and probabilities as CSV
    (and JSON with json=True). Videos are extracted with the checkpoint's feature spec into a resumable cache
    (config.cache, default beside the checkpoint), so predicting them again costs no extraction.
    """
    from pipeline.extract.inputs import discover
    from pipeline.extract.run import extract_videos

    if output is not None:
        options["output"] = output
    cfg = _options(PredictConfig, config, options)
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    clips = _eval_clips(ckpt, cfg.eval_clips)
    cache_path = Path(cfg.cache) if cfg.cache is not None else checkpoint.parent / PREDICT_CACHE_NAME
    items = discover(inputs)
    extract_cfg = extract_config_for(ckpt.feature_spec, cache_path, cfg.weights, dtype=ckpt.feature_dtype,
                                     device=cfg.device, batch_size=cfg.batch_size, workers=cfg.workers,
                                     threads=cfg.threads, progress=cfg.progress)
    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as tmp:
        if cfg.weights is not None:
            # The same bytes under the recorded file name, so that the new features get exactly the head's spec.
            link = Path(tmp) / ckpt.feature_spec.weights
            link.symlink_to(Path(cfg.weights).expanduser().resolve())
            extract_cfg = replace(extract_cfg, weights=str(link))
        # Keys are absolute paths: the same file is found again whatever folder it is given from.
        manifest = Path(tmp) / "inputs.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
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
        torch.set_num_threads(cfg.threads or cpu_count())
        device = pick_device(cfg.device)
        store = load_sequences(cache, ok, "ram", progress=False)
        probs = predict_store(ckpt.model(device), store, np.arange(len(ok)), clip_len=ckpt.clip_len,
                              clip_stride=ckpt.clip_stride, eval_clips=clips, batch_size=64, device=device)
    row_of = {k: i for i, k in enumerate(ok)}
    k_top = min(cfg.top_k, len(ckpt.classes))
    predictions = []
    for item, key in zip(items, keys, strict=True):
        if key in row_of:
            p = probs[row_of[key]]
            best = np.argsort(-p, kind="stable")[:k_top]
            predictions.append(Prediction(str(item.path), [(ckpt.classes[j], float(p[j])) for j in best]))
        else:
            reason = report.failed.get(key, (None, "not in the prediction cache"))[1]
            predictions.append(Prediction(str(item.path), [], reason))
    write_predictions(predictions, cfg.output, k_top, cfg.json)
    return PredictReport(predictions, cfg.output, len(report.extracted), len(report.skipped))


def write_predictions(predictions: list[Prediction], output: Path, k: int, as_json: bool = False) -> None:
    """CSV: path, label_1, prob_1, ..., label_k, prob_k, error. JSON (beside it): a list of
    {path, predictions: [{label, prob}], error}."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")] + ["error"])
        for p in predictions:
            cells = [c for label, prob in p.top for c in (label, f"{prob:.6f}")]
            writer.writerow([p.path] + cells + [""] * (2 * k - len(cells)) + [p.error or ""])
    if as_json:
        output.with_suffix(".json").write_text(json.dumps(
            [{"path": p.path, "predictions": [{"label": label, "prob": prob} for label, prob in p.top],
              "error": p.error} for p in predictions], indent=1) + "\n", encoding="utf-8")
