"""The features of a recorded feature spec, made again: its backbone (with the spec's weights, checked by sha256,
or a fine-tuned backbone's own tensors) and the ExtractConfig that reproduces its preprocessing and sampling.

Used by `pipeline predict`, `pipeline finetune` and `extract --backbone-checkpoint`; a spec is all it needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.config import ExtractConfig
from pipeline.extract.backbone import (
    FINETUNED_PREFIX,
    HF_HUB_PREFIX,
    RANDOM_INIT_SEED,
    TIMM_PREFIX,
    LoadedBackbone,
    WeightsError,
    backbone_from_state,
    import_timm,
    is_timm,
    load_backbone,
    model_weights_enum,
    sha256_file,
)
from pipeline.spec import FeatureSpec

TORCHVISION_WEIGHTS = re.compile(r"^\w+_Weights\.\w+$")  # ResNet50_Weights.IMAGENET1K_V2
RANDOM_WEIGHTS = re.compile(r"^none\(seed=(\d+)\)$")


def extract_config_for(spec: FeatureSpec, output: Path, weights: Path | None = None, **options) -> ExtractConfig:
    """The ExtractConfig that reproduces the features of `spec` (backbone, weights, preprocessing, sampling).

    Weights files are checked against the recorded sha256. Options are further ExtractConfig fields (device, ...).
    """
    pre = spec.preprocessing
    chosen = _weights_for(spec, weights)
    return ExtractConfig(
        output=output,
        backbone=spec.backbone,
        weights=chosen,
        resize=None if pre.resize_hw else pre.resize,  # an exact-size resize is the preset's own
        crop=pre.crop,
        mean=pre.mean,
        std=pre.std,
        sampling=spec.sampling,
        window=spec.window.size if spec.window else None,
        window_stride=spec.window.stride if spec.window else None,
        **options,
    )


def _weights_for(spec: FeatureSpec, weights: Path | None) -> str:
    if spec.weights.startswith(FINETUNED_PREFIX):
        if weights is not None:
            raise WeightsError(
                f"the head's features come from the fine-tuned backbone {spec.weights!r} stored in the "
                f"checkpoint itself: drop --weights"
            )
        return spec.weights  # not loadable by name: extract_videos gets checkpoint_backbone(...) instead
    random = RANDOM_WEIGHTS.match(spec.weights)
    hub = is_timm(spec.backbone) and spec.weights.startswith(HF_HUB_PREFIX)
    if random or hub or TORCHVISION_WEIGHTS.match(spec.weights):
        if weights is not None:
            raise WeightsError(f"the head's features come from {spec.weights}, not from a weights file: drop --weights")
        if random:
            if int(random.group(1)) != RANDOM_INIT_SEED:
                raise WeightsError(
                    f"the head's features come from random weights with seed {random.group(1)}; this "
                    f"pipeline initialises with seed {RANDOM_INIT_SEED}"
                )
            return "none"
        return "DEFAULT" if hub else spec.weights  # timm: the pretrained tag named in the spec's backbone
    if weights is None:
        raise WeightsError(
            f"the head's features come from the weights file {spec.weights!r} (sha256 "
            f"{(spec.weights_sha256 or '?')[:16]}...): pass it with --weights PATH"
        )
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise WeightsError(f"--weights {weights}: no such file")
    sha = sha256_file(weights)
    if sha != spec.weights_sha256:
        raise WeightsError(
            f"--weights {weights} has sha256 {sha[:16]}..., but the head was trained on features of "
            f"{spec.weights!r} with sha256 {(spec.weights_sha256 or '?')[:16]}...: another file"
        )
    return str(weights)


def backbone_for_spec(
    spec: FeatureSpec,
    backbone_state: dict[str, torch.Tensor] | None = None,
    weights: Path | None = None,
    source: str = "the checkpoint",
    progress: bool = True,
) -> LoadedBackbone:
    """The frozen backbone that makes the features of `spec`: the fine-tuned tensors `backbone_state` when given, else
    the spec's backbone with the spec's weights (a weights file must be passed and match the recorded sha256). The
    result's weights name and sha256 are the spec's, so extract_videos(backbone_model=...) writes features of exactly
    that spec. `source` names what holds the spec in messages.

    Raises WeightsError for weights that cannot be had or that differ, and for a spec that names no torchvision
    backbone or one whose embedding differs from the recorded dim.
    """
    try:
        if is_timm(spec.backbone):
            if not import_timm(spec.backbone).is_model(spec.backbone[len(TIMM_PREFIX) :]):
                raise ValueError(spec.backbone)
        else:
            model_weights_enum(spec.backbone)
    except ValueError:
        raise WeightsError(
            f"{source} was trained on features of {spec.backbone!r}, which is not a torchvision classification model "
            f"(or video model), nor a timm model here (timm:NAME needs `pip install 'framecache[timm]'`), so no "
            f"backbone can make them again"
        ) from None
    if backbone_state is not None:
        if weights is not None:
            raise WeightsError(f"{source} carries its own fine-tuned backbone: drop --weights")
        loaded = backbone_from_state(
            spec.backbone, backbone_state, spec.weights, spec.weights_sha256, spec.preprocessing
        )
    else:
        cfg = extract_config_for(spec, Path("unused.h5"), weights)
        loaded = load_backbone(cfg.backbone, cfg.weights, cfg.resize, cfg.crop, cfg.mean, cfg.std, progress=progress)
        if spec.weights_sha256 and loaded.weights_sha256 != spec.weights_sha256:
            raise WeightsError(
                f"weights {loaded.weights} of {spec.backbone} hash to "
                f"{(loaded.weights_sha256 or '?')[:16]}..., but the head was trained on features of "
                f"{spec.weights!r} with sha256 {spec.weights_sha256[:16]}..."
            )
    if loaded.dim != spec.dim:
        raise WeightsError(
            f"{source}: the head takes {spec.dim}-dim features (its feature spec), but {spec.backbone} "
            f"gives {loaded.dim}: the checkpoint belongs to another backbone"
        )
    if loaded.preprocessing != spec.preprocessing:
        raise WeightsError(
            f"{source}: {spec.backbone}'s preprocessing {loaded.preprocessing.to_dict()} differs "
            f"from the recorded {spec.preprocessing.to_dict()}"
        )
    return LoadedBackbone(
        model=loaded.model,
        weights=spec.weights,
        weights_sha256=spec.weights_sha256,
        preprocessing=loaded.preprocessing,
        dim=loaded.dim,
        clip_len=loaded.clip_len,
        backbone=spec.backbone,
    )
