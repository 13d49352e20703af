"""A frozen torchvision classifier turned into a per-frame embedding, with the preprocessing of its weights.

Weights come from torchvision (its cache $TORCH_HOME/hub/checkpoints/, downloaded when online), from a local state-dict
file, or are a seeded random initialisation ('none').
"""

from __future__ import annotations

import hashlib
import logging
import os
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


class WeightsError(RuntimeError):
    """Weights that cannot be found or loaded; the message names the remedies."""


class WeightsNameError(ValueError):
    """A --weights value that names no weights of the backbone (a usage error, like an unknown --backbone)."""


def model_weights_enum(backbone: str):
    try:
        return torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError) as e:
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
        raise ValueError(
            f"--backbone {backbone!r} is not a torchvision classification model (for example: {names}, ...)"
        ) from e


def default_preprocessing(weights) -> Preprocessing:
    t = weights.transforms()
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
        antialias=bool(t.antialias),
    )


def is_weights_file(weights: str) -> bool:
    return os.sep in weights or weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or Path(weights).is_file()


@dataclass
class LoadedBackbone:
    model: nn.Module
    """The classifier with its last Linear replaced by Identity: (N, 3, crop, crop) -> (N, dim)."""
    weights: str
    weights_sha256: str | None
    preprocessing: Preprocessing
    dim: int


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
    model_weights_enum(backbone)
    model = torchvision.models.get_model(backbone, weights=None)
    dim = strip_classifier(model)
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
    return LoadedBackbone(model=model, weights=weights, weights_sha256=sha, preprocessing=preprocessing, dim=dim)


def strip_classifier(model: nn.Module) -> int:
    """Replace the model's last nn.Linear (its classifier) by Identity; returns the embedding size."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to remove; choose another --backbone")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dim = getattr(parent, attr).in_features
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
    pre = default_preprocessing(source_weights)
    pre = Preprocessing(
        resize=resize or pre.resize,
        crop=crop or pre.crop,
        mean=tuple(mean or pre.mean),
        std=tuple(std or pre.std),
        interpolation=pre.interpolation,
        antialias=pre.antialias,
    )
    model.eval().requires_grad_(False)
    return LoadedBackbone(model=model, weights=weights_name, weights_sha256=sha, preprocessing=pre, dim=dim)


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
        self.model = loaded.model.to(device, memory_format=torch.channels_last)
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
        """Shapes: (N, 3, C, C) uint8 on the device -> (N, D) float32 on the device."""
        x = self.pre.normalize(frames).contiguous(memory_format=torch.channels_last)
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
        """Shapes: (N, 3, crop, crop) uint8, on the host or the device -> features of the first `rows` frames.

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
        """Shapes: (N, 3, crop, crop) uint8 -> (N, D) float32 on the CPU."""
        return self.start(frames).result()
