"""A frozen backbone turned into an embedding, with the preprocessing of its weights: a torchvision classifier (one
row per frame), a timm image model (`timm:NAME`, one row per frame: its pooled pre-logits features) or a torchvision
video model (one row per window of frames, see pipeline/extract/windows.py).

Weights come from torchvision (its cache $TORCH_HOME/hub/checkpoints/, downloaded when online), from timm's pretrained
tag in the Hugging Face cache, from a local state-dict file, or are a seeded random initialisation ('none').
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.spec import Preprocessing

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
FINETUNED_PREFIX = "finetuned:"  # weights name of a backbone fine-tuned by `pipeline finetune`, kept in its checkpoint
TIMM_PREFIX = "timm:"  # --backbone timm:NAME: a timm image model
HF_HUB_PREFIX = "hf-hub:"  # weights name of timm's pretrained weights: hf-hub:<repo id>, as timm writes it


class WeightsError(RuntimeError):
    """Weights that cannot be found or loaded; the message names the remedies."""


class WeightsNameError(ValueError):
    """A --weights value that names no weights of the backbone (a usage error, like an unknown --backbone)."""


def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM_PREFIX)


def is_video_model(backbone: str) -> bool:
    """Whether `backbone` is one of torchvision's video models (r3d_18, s3d, mvit_v2_s, swin3d_t, ...)."""
    return not is_timm(backbone) and backbone in torchvision.models.list_models(module=torchvision.models.video)


def model_weights_enum(backbone: str):
    if is_timm(backbone):
        raise ValueError(f"--backbone {backbone!r} is a timm model, which has no torchvision weights enum")
    try:
        return torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError) as e:
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
        raise ValueError(
            f"--backbone {backbone!r} is not a torchvision classification model (for example: {names}, ...)"
        ) from e


def default_preprocessing(weights) -> Preprocessing:
    """The preset of torchvision weights: ImageClassification (shorter side, antialiased) or VideoClassification
    (an exact (H, W) or the shorter side, never antialiased: torchvision hard-codes antialias=False there)."""
    t = weights.transforms()
    size = [int(x) for x in t.resize_size]
    return Preprocessing(
        resize=min(size),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
        antialias=bool(getattr(t, "antialias", False)),
        resize_hw=tuple(size) if len(size) == 2 else None,
    )


def preset_crop(backbone: str) -> int:
    """The crop size of the default weights' preset of a torchvision model."""
    return default_preprocessing(model_weights_enum(backbone).DEFAULT).crop


def weights_clip_len(weights) -> int:
    """Frames per clip that torchvision's video weights were evaluated on (their docs: `clip_len=16`)."""
    found = re.search(r"clip_len=(\d+)", weights.meta.get("_docs", ""))
    if found is None:
        raise ValueError(f"{weights} records no clip length; pass --window")
    return int(found.group(1))


def with_overrides(pre: Preprocessing, resize, crop, mean, std) -> Preprocessing:
    """`pre` with the --resize/--crop/--mean/--std the user gave; --resize resizes the shorter side (also for presets
    that resize to an exact size)."""
    return Preprocessing(
        resize=resize or pre.resize,
        crop=crop or pre.crop,
        mean=tuple(mean or pre.mean),
        std=tuple(std or pre.std),
        interpolation=pre.interpolation,
        antialias=pre.antialias,
        resize_hw=None if resize else pre.resize_hw,
    )


def is_weights_file(weights: str) -> bool:
    return os.sep in weights or weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or Path(weights).is_file()


@dataclass
class LoadedBackbone:
    model: nn.Module
    """The classifier with its last Linear replaced by Identity: (N, 3, crop, crop) -> (N, dim); a timm model's
    PreLogits; a video model: (N, 3, T, crop, crop) -> (N, dim)."""
    weights: str
    weights_sha256: str | None
    preprocessing: Preprocessing
    dim: int
    clip_len: int | None = None
    """Video models: frames per clip of the weights (the default --window); None for image models."""
    backbone: str | None = None
    """The name the feature spec records, when it differs from --backbone (timm:NAME gets its pretrained tag)."""

    @property
    def video(self) -> bool:
        return self.clip_len is not None


class PreLogits(nn.Module):
    """A timm model's embedding: its pooled pre-logits features, forward_features then forward_head(pre_logits=True).

    Shapes: (N, 3, H, W) -> (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order: the identity of weights that live
    inside a checkpoint rather than in a file of their own."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_from_state(
    backbone: str, state: dict[str, torch.Tensor], weights: str, weights_sha256: str, preprocessing: Preprocessing
) -> LoadedBackbone:
    """`backbone` without its classifier, with exactly the tensors of `state` (a fine-tuned backbone kept in a
    checkpoint), frozen. Raises WeightsError when they do not fit or do not hash to `weights_sha256`."""
    if is_timm(backbone):
        timm = import_timm(backbone)
        model = PreLogits(timm.create_model(backbone[len(TIMM_PREFIX) :], pretrained=False))
        dim = embedding_dim(model, preprocessing)
        clip_len = None
    else:
        enum = model_weights_enum(backbone)
        model = torchvision.models.get_model(backbone, weights=None)
        dim = strip_classifier(model)
        clip_len = weights_clip_len(enum.DEFAULT) if is_video_model(backbone) else None
    own = model.state_dict()
    missing, unused = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unused or bad:
        detail = "; ".join(
            text
            for text in (
                missing and f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})",
                unused and f"{len(unused)} tensors it does not have (e.g. {', '.join(unused[:3])})",
                bad and f"shape mismatch for {', '.join(bad[:3])}",
            )
            if text
        )
        raise WeightsError(
            f"the backbone weights {weights!r} do not fit {backbone}: {detail}; they belong to another architecture"
        )
    sha = tensors_sha256(state)
    if sha != weights_sha256:
        raise WeightsError(
            f"the backbone weights {weights!r} hash to {sha[:16]}..., not to the recorded "
            f"{(weights_sha256 or '?')[:16]}...: the checkpoint is damaged or was edited"
        )
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return LoadedBackbone(
        model=model,
        weights=weights,
        weights_sha256=sha,
        preprocessing=preprocessing,
        dim=dim,
        clip_len=clip_len,
        backbone=backbone,
    )


def strip_classifier(model: nn.Module) -> int:
    """Replace the model's last nn.Linear (its classifier) by Identity; returns the embedding size. A model without
    one (S3D) loses its last 1x1 convolution instead, the classifier it applies before pooling."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)) and math.prod(module.kernel_size) == 1:
                last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to remove; choose another --backbone")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, attr)
    dim = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    setattr(parent, attr, nn.Identity())
    return dim


def _unwrap_state_dict(obj) -> dict:
    for key in ("state_dict", "model", "model_state_dict", "backbone"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("the file does not hold a state dict of tensors")
    return obj


def match_state_dict(state: dict, model: nn.Module) -> tuple[dict, str]:
    """Map a state dict's keys onto the model's, stripping the prefix (e.g. 'module.') that matches best."""
    wanted = set(model.state_dict())
    best, best_prefix = -1, ""
    candidates = {""} | {k[: i + 1] for k in state for i, c in enumerate(k) if c == "." and k.count(".", 0, i) < 3}
    for prefix in candidates:
        hits = sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in wanted)
        if hits > best:
            best, best_prefix = hits, prefix
    mapped = {k[len(best_prefix) :]: v for k, v in state.items() if k.startswith(best_prefix)}
    return mapped, best_prefix


def load_backbone(
    backbone: str,
    weights: str,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple | None = None,
    std: tuple | None = None,
    progress: bool = True,
) -> LoadedBackbone:
    """Build `backbone` with `weights`, drop its classifier, freeze it and resolve its preprocessing."""
    if is_timm(backbone):
        return load_timm_backbone(backbone, weights, resize, crop, mean, std, progress)
    enum = model_weights_enum(backbone)
    source_weights = enum.DEFAULT
    sha = None
    if weights.lower() in ("none", "random"):
        log.warning("backbone %s uses RANDOM weights (--weights none): features carry no ImageNet knowledge", backbone)
        torch.manual_seed(RANDOM_INIT_SEED)
        model = torchvision.models.get_model(backbone, weights=None)
        weights_name = f"none(seed={RANDOM_INIT_SEED})"
        state = None
    elif is_weights_file(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; pass an existing state-dict file, a torchvision "
                f"weights name (e.g. DEFAULT) or 'none'"
            )
        try:
            state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        except Exception as e:
            raise WeightsError(f"cannot load weights file {path}: {e}") from e
        model = torchvision.models.get_model(backbone, weights=None)
        weights_name, sha = path.name, sha256_file(path)
    else:
        source_weights = _weights_member(enum, weights, backbone)
        weights_name = f"{enum.__name__}.{source_weights.name}"
        state, sha = _torchvision_state_dict(source_weights, backbone, progress)
        model = torchvision.models.get_model(backbone, weights=None)
    dim = strip_classifier(model)
    if state is not None:
        mapped, prefix = match_state_dict(state, model)
        own = model.state_dict()
        missing = [k for k in own if k not in mapped]
        if missing:
            raise WeightsError(
                f"weights {weights_name} do not fit {backbone}: {len(missing)} tensors missing "
                f"(e.g. {', '.join(missing[:3])}); is it a checkpoint of another architecture?"
            )
        bad = [k for k in own if mapped[k].shape != own[k].shape]
        if bad:
            raise WeightsError(f"weights {weights_name} do not fit {backbone}: shape mismatch for {', '.join(bad[:3])}")
        unused = sorted(set(mapped) - set(own))
        if unused:
            log.info(
                "ignoring %d tensors of %s not in the embedding (classifier): %s",
                len(unused),
                weights_name,
                ", ".join(unused[:4]),
            )
        if prefix:
            log.info("stripped key prefix %r from %s", prefix, weights_name)
        model.load_state_dict({k: mapped[k] for k in own})
    pre = with_overrides(default_preprocessing(source_weights), resize, crop, mean, std)
    clip_len = weights_clip_len(enum.DEFAULT) if is_video_model(backbone) else None
    model.eval().requires_grad_(False)
    return LoadedBackbone(
        model=model, weights=weights_name, weights_sha256=sha, preprocessing=pre, dim=dim, clip_len=clip_len
    )


# ------------------------------------------------------------------------------------------------ timm models
def import_timm(backbone: str):
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"--backbone {backbone} needs timm, an optional extra: pip install 'framecache[timm]'"
        ) from None
    return timm


def timm_preprocessing(model: nn.Module, backbone: str) -> Preprocessing:
    """The eval transform of the model's pretrained config (timm's resolve_data_config + create_transform): resize
    to floor(size / crop_pct) (the shorter side; both sides in 'squash' crop mode), centre-crop `size`, normalise."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"{backbone} takes {height}x{width} inputs; only square inputs are supported")
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise ValueError(f"{backbone}: crop mode {mode!r} of its pretrained config is not supported (center, squash)")
    scale = math.floor(height / (cfg.get("crop_pct") or 0.875))
    return Preprocessing(
        resize=scale,
        crop=height,
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=cfg["interpolation"],
        antialias=True,  # timm's eval transform resizes PIL images, which always filter
        resize_hw=(scale, scale) if mode == "squash" else None,
    )


def embedding_dim(model: nn.Module, pre: Preprocessing) -> int:
    """The size of the model's embedding, measured by one forward pass of a blank image at the crop size (which
    also tells early when the crop does not fit the model)."""
    with torch.inference_mode():
        return int(model.eval()(torch.zeros(1, 3, pre.crop, pre.crop)).flatten(1).shape[1])


def load_timm_backbone(
    backbone: str,
    weights: str,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple | None = None,
    std: tuple | None = None,
    progress: bool = True,
) -> LoadedBackbone:
    """`timm:NAME` with `weights` (DEFAULT or a pretrained tag: timm's weights from the Hugging Face cache; a
    .safetensors/.pth file; or none), as PreLogits, frozen, with the preprocessing of its pretrained config."""
    timm = import_timm(backbone)
    name = backbone[len(TIMM_PREFIX) :]
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        similar = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(
            f"--backbone {backbone!r} is not a timm model"
            + (f" (similar names: {', '.join(similar)}, ...)" if similar else "")
            + "; timm.list_models() lists them"
        )
    random = weights.lower() in ("none", "random")
    if not random and not is_weights_file(weights) and weights != "DEFAULT":
        if tag and weights != tag:
            raise WeightsNameError(f"--weights {weights!r}: --backbone {backbone} already names the tag {tag!r}")
        tag = weights
    if tag:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise WeightsNameError(
                f"{tag!r} is not a pretrained tag of timm's {arch}; choose one of: {', '.join(tags) or '(none)'}, "
                f"a weights file or none"
            )
    if not tag:  # the default tag, so that the spec names the pretrained config that set the preprocessing
        tag = getattr(timm.models.get_pretrained_cfg(arch), "tag", None)
    name = f"{arch}.{tag}" if tag else arch
    sha = None
    try:
        if random:
            log.warning(
                "backbone %s uses RANDOM weights (--weights none): features carry no pretrained knowledge", name
            )
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False)
            weights_name = f"none(seed={RANDOM_INIT_SEED})"
        else:
            model = timm.create_model(name, pretrained=False)  # no weights yet: its pretrained config says where
            if is_weights_file(weights):
                path = Path(weights).expanduser()
                if not path.is_file():
                    raise WeightsError(
                        f"weights file {path} does not exist; pass an existing .safetensors/.pth file, a pretrained "
                        f"tag of {arch} or 'none'"
                    )
                weights_name = path.name
            else:
                path, weights_name = _timm_pretrained_file(model.pretrained_cfg, name, progress)
            sha = sha256_file(path)
            try:
                # timm's own loader: its key conversions (e.g. of OpenCLIP files), strict about every tensor
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
            except Exception as e:
                raise WeightsError(
                    f"cannot load weights file {path} into timm's {name}: {_short(e)}; is it a checkpoint of "
                    f"another architecture?"
                ) from e
    except (RuntimeError, ValueError) as e:
        if isinstance(e, (WeightsError, WeightsNameError)):
            raise
        raise ValueError(f"--backbone {backbone}: timm cannot build it ({_short(e)})") from e
    model = PreLogits(model).eval().requires_grad_(False)
    pre = with_overrides(timm_preprocessing(model.model, backbone), resize, crop, mean, std)
    try:
        dim = embedding_dim(model, pre)
    except Exception as e:
        raise ValueError(
            f"{name} does not take {pre.crop}x{pre.crop} crops ({_short(e)}); choose another --crop"
        ) from e
    return LoadedBackbone(
        model=model,
        weights=weights_name,
        weights_sha256=sha,
        preprocessing=pre,
        dim=dim,
        backbone=TIMM_PREFIX + name,
    )


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _hf_candidates(cfg: dict) -> tuple[str, str, list[str]]:
    """(repo id, revision, file names in the order timm tries them) of a pretrained config's Hugging Face weights."""
    repo, _, revision = cfg["hf_hub_id"].partition("@")
    filename = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    names = [filename]
    if filename in safe:
        names.insert(0, safe[filename])
    elif filename.endswith(".bin"):
        names.insert(0, filename[: -len(".bin")] + ".safetensors")
    return repo, revision or "main", names


def _timm_pretrained_file(cfg: dict, name: str, progress: bool) -> tuple[Path, str]:
    """The local file of timm's pretrained weights for `name`: from the Hugging Face cache, or downloaded into it
    when online. Returns (path, the weights name of the spec)."""
    if not cfg.get("hf_hub_id"):
        url = cfg.get("url") or ""
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if url and target.is_file():
            return target, os.path.basename(url)
        raise WeightsError(
            f"timm's {name} has no pretrained weights on the Hugging Face hub"
            + (f"; download {url} and copy it to {target}" if url else "")
            + ", or pass a local weights file (--weights /path/to/weights.pth) or --weights none"
        )
    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    repo, revision, names = _hf_candidates(cfg)
    for filename in names:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached), HF_HUB_PREFIX + repo
    problem = "HF_HUB_OFFLINE is set"
    if not hf_constants.HF_HUB_OFFLINE:
        for filename in names:
            try:
                path = huggingface_hub.hf_hub_download(repo, filename, revision=revision)
                return Path(path), HF_HUB_PREFIX + repo
            except huggingface_hub.errors.EntryNotFoundError:
                continue
            except Exception as e:  # offline, hub unreachable
                problem = f"{type(e).__name__}: {_short(e)}"
                break
    folder = Path(hf_constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    raise WeightsError(
        f"weights of timm's {name} ({names[0]} of the Hugging Face repo {repo}) are not in the Hugging Face cache "
        f"and could not be downloaded ({problem}).\nRemedies:\n"
        f"  - on a machine with internet, run `huggingface-cli download {repo} {names[0]}` (or extract once with "
        f"this backbone there)\n    and copy its cache folder {folder.name}/ into {folder.parent} (the cache follows "
        f"$HF_HOME / $HF_HUB_CACHE), or\n"
        f"  - pass the file itself: --weights /path/to/{names[0]}, or\n"
        f"  - pass --weights none for a random initialisation (features carry no pretrained knowledge)"
    )


def _weights_member(enum, name: str, backbone: str):
    key = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if "." in key:
        raise WeightsNameError(f"--weights {name!r} names weights of another model; {backbone} takes {enum.__name__}.*")
    try:
        return enum[key]
    except KeyError:
        options = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise WeightsNameError(
            f"--weights {name!r} is not a weights name of {backbone}; choose one of: {options}, "
            f"a state-dict file, or none"
        ) from None


def cached_weights(member) -> list[tuple[str, Path]]:
    """(name, file) of every other weights version of `member`'s architecture whose file is in the torchvision
    cache ($TORCH_HOME/hub/checkpoints), so that an offline error can say which --weights would work now."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = []
    for other in type(member):  # the enum's own members (DEFAULT is an alias of one of them)
        path = checkpoints / os.path.basename(other.url)
        if other is not member and path.is_file():
            found.append((other.name, path))
    return found


def _torchvision_state_dict(member, backbone: str, progress: bool) -> tuple[dict, str]:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    target = checkpoints / os.path.basename(member.url)
    try:
        state = member.get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # offline (URLError), hub unreachable, or a corrupt file in the cache
        present = "".join(
            f"  - use the weights already in the cache: --weights {name} ({path.name})\n"
            for name, path in cached_weights(member)
        )
        raise WeightsError(
            f"weights {type(member).__name__}.{member.name} for {backbone} are not in the torchvision cache and could "
            f"not be downloaded ({type(e).__name__}: {e}).\nRemedies:\n{present}"
            f"  - on a machine with internet, download {member.url}\n"
            f"    and copy it to {target} (the cache follows $TORCH_HOME), or\n"
            f"  - pass a local state-dict file: --weights /path/to/weights.pth, or\n"
            f"  - pass --weights none for a random initialisation (features carry no ImageNet knowledge)"
        ) from e
    return state, sha256_file(target)


class PendingFeatures:
    """Features of one forward pass, maybe still on their way from the device: `result()` waits for them."""

    def __init__(self, features: torch.Tensor, rows: int, done=None, started=None, embedder=None):
        self._features, self.rows = features, rows  # (B, D) float32 on the host (pinned on CUDA)
        self._done, self._started, self._embedder = done, started, embedder

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self) -> torch.Tensor:
        """Shapes: (rows, D) float32 on the CPU."""
        if self._done is not None:
            self._done.synchronize()
            self._embedder.busy_seconds += self._started.elapsed_time(self._done) / 1000.0
            self._done = None
        return self._features[: self.rows]


class FrameEmbedder:
    """Runs a frozen backbone on batches of cropped uint8 frames: channels_last, bf16/fp16 autocast on CUDA.

    On CUDA, `start` only queues the work (normalisation, forward, the copy of the features into pinned host
    memory) and returns; up to `depth` batches are in flight while the host prepares the next ones. With `graph`
    (CUDA, not compiled), the normalisation and forward pass of the batch shape are captured once as a CUDA graph
    and replayed: one launch per batch instead of one per kernel, so the host thread is free sooner (the same
    kernels, so the same features; a capture that fails falls back to eager, with a note)."""

    def __init__(self, loaded: LoadedBackbone, device: torch.device, compile: bool = False, graph: bool = False):
        self.device = device
        self.pre = loaded.preprocessing
        self.dim = loaded.dim
        self.video = loaded.video
        # channels-last (3-D for video models): the layout the convolution kernels are fastest in
        self.memory_format = torch.channels_last_3d if self.video else torch.channels_last
        self.model = loaded.model.to(device, memory_format=self.memory_format)
        if compile:
            self.model = torch.compile(self.model)
        self.autocast_dtype = None
        self.depth = 0
        self.copy_stream = None
        self.busy_seconds = 0.0  # device time of the forward passes (CUDA only), for the benchmarks
        self.graph = graph and device.type == "cuda" and not compile
        self._graphs: dict[tuple, tuple] = {}  # batch shape -> (CUDAGraph, static input, static output)
        if device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.depth = 3
            self.copy_stream = torch.cuda.Stream(device)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Shapes: (N, 3, C, C) uint8 frames or (N, T, 3, C, C) uint8 clips on the device -> (N, D) float32 on the
        device."""
        x = self.pre.normalize(frames)
        if self.video:
            x = x.permute(0, 2, 1, 3, 4)  # (N, T, 3, C, C) -> (N, 3, T, C, C), as VideoClassification hands them on
        x = x.contiguous(memory_format=self.memory_format)
        if self.autocast_dtype is not None:
            # Deterministic kernels chosen for the shape, not by timing: the same frame gives the same bytes
            # in every run (resumed or not).
            with (
                torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True),
                torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype),
            ):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float().flatten(1)

    def _graphed(self, frames: torch.Tensor) -> torch.Tensor | None:
        """The features of `frames` (on the device) through the captured graph of their shape; None when this
        shape cannot be captured (the eager path runs instead)."""
        key = tuple(frames.shape)
        if key not in self._graphs:
            try:
                static_in = torch.zeros_like(frames)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm-up outside the capture: cuDNN and the allocator settle
                        self._forward(static_in)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._forward(static_in)
                self._graphs[key] = (graph, static_in, static_out)
            except Exception as e:  # noqa: BLE001  (a model or driver that cannot be captured: eager it is)
                log.info("the forward pass could not be captured as a CUDA graph (%s); running it eagerly", e)
                self._graphs[key] = None
        entry = self._graphs[key]
        if entry is None:
            return None
        graph, static_in, static_out = entry
        static_in.copy_(frames, non_blocking=True)
        graph.replay()
        return static_out

    def upload(self, frames: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Host frames -> the device, copied on a side stream while the model runs. Returns the device tensor
        and an event after which the host memory may be reused (None: it may be reused now)."""
        if self.device.type != "cuda":
            return frames, None
        with torch.cuda.stream(self.copy_stream):
            out = frames.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        # the allocator must not hand the block out while the compute stream reads it
        out.record_stream(compute)
        return out, copied

    @torch.inference_mode()
    def start(self, frames: torch.Tensor, rows: int | None = None) -> PendingFeatures:
        """Shapes: (N, 3, crop, crop) uint8 frames, or (N, T, 3, crop, crop) uint8 clips for a video model, on the
        host or the device -> features of the first `rows` frames (clips).

        Callers pass batches of one fixed N (padded), so that a frame's features never depend on its batch."""
        rows = len(frames) if rows is None else rows
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        frames = frames.to(self.device, non_blocking=True)
        y = self._graphed(frames) if self.graph else None
        if y is None:
            y = self._forward(frames)  # (N, D)
        if self.device.type != "cuda":
            return PendingFeatures(y.cpu(), rows)
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(y, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return PendingFeatures(host, rows, done, started, self)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """Shapes: (N, 3, crop, crop) or (N, T, 3, crop, crop) uint8 -> (N, D) float32 on the CPU."""
        return self.start(frames).result()
