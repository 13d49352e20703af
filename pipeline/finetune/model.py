"""The backbone of a head's features and the head itself as one trainable model, with parts of the backbone unfrozen.

Frozen parts (and, by default, every BatchNorm's running statistics) stay exactly as stage one used them: they run in
eval mode and receive no gradient, so with nothing unfrozen the model computes what the cached path computes.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.spec import Preprocessing
from pipeline.train_head.model import Head, length_mask

EVAL_CHUNK = 256  # frames per backbone call when no gradient is needed (whole validation sequences)


class UnfreezeError(ValueError):
    """An --unfreeze / --unfreeze-last that names no part of the backbone; the message lists the valid names."""


def backbone_stages(model: nn.Module) -> list[str]:
    """Names of the backbone's stages, in forward order: its top-level modules that hold parameters, descending into
    a lone container (torchvision's `features`). ResNet: conv1, bn1, layer1 ... layer4; MobileNet: features.0 ..."""
    prefix, module = "", model
    while True:
        children = [(name, child) for name, child in module.named_children() if any(True for _ in child.parameters())]
        if len(children) == 1 and any(True for _ in children[0][1].children()):
            prefix, module = f"{prefix}{children[0][0]}.", children[0][1]
            continue
        return [prefix + name for name, _ in children]


def resolve_unfreeze(model: nn.Module, backbone: str, unfreeze: str | None, unfreeze_last: int | None) -> list[str]:
    """Module names to train: 'all' -> [''] (the whole backbone), 'none' -> [], a comma list of module names, or the
    last `unfreeze_last` stages. Raises UnfreezeError naming the valid names."""
    stages = backbone_stages(model)
    if unfreeze_last is not None:
        if unfreeze_last > len(stages):
            raise UnfreezeError(
                f"--unfreeze-last {unfreeze_last}: {backbone} has {len(stages)} stages ({', '.join(stages)})"
            )
        return stages[len(stages) - unfreeze_last :] if unfreeze_last else []
    names = [n.strip() for n in (unfreeze or "").split(",") if n.strip()]
    if names == ["all"]:
        return [""]
    if names in ([], ["none"]):
        return []
    modules = dict(model.named_modules())
    for name in names:
        if name in ("all", "none") or name not in modules:
            example = next((n for n in modules if n.startswith(stages[-1] + ".")), stages[-1])
            raise UnfreezeError(
                f"--unfreeze {name!r} is not a module of {backbone}; valid names: "
                f"{', '.join(stages)}, a dotted sub-module such as {example!r}, 'all' or 'none' "
                f"(alone)"
            )
    return names


def _checkpointed(forward):
    """`forward`, recomputed in the backward pass instead of keeping its activations (when a gradient is wanted)."""

    @functools.wraps(forward)
    def run(*args):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


class FinetuneModel(nn.Module):
    """Backbone (classifier removed) + temporal head over clips of frames.

    Shapes: forward(x (N, 3, crop, crop) uint8, the real frames of B clips in order; lengths (B,)) -> (B, classes).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Head,
        pre: Preprocessing,
        *,
        unfreeze: list[str],
        train_bn: bool = False,
        grad_checkpointing: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.backbone, self.head, self.pre = backbone, head, pre
        self.dims = head.dims
        self.train_bn = train_bn
        self.autocast_dtype = autocast_dtype
        backbone.requires_grad_(False)
        self.unfrozen = unfreeze
        for name in unfreeze:
            backbone.get_submodule(name).requires_grad_(True)
        head.requires_grad_(True)
        if grad_checkpointing:
            for name in unfreeze:
                module = backbone.get_submodule(name)
                blocks = list(module.children()) if name == "" or isinstance(module, nn.Sequential) else [module]
                for block in blocks or [module]:
                    block.forward = _checkpointed(block.forward)

    def train(self, mode: bool = True) -> FinetuneModel:
        """Train mode for the head and the unfrozen parts only: frozen modules (and BatchNorm statistics, unless
        train_bn) stay in eval mode, so dropout, stochastic depth and running statistics act as in stage one."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=True))
                frozen = params and not any(p.requires_grad for p in params)
                if frozen or (not self.train_bn and isinstance(module, nn.modules.batchnorm._BatchNorm)):
                    module.eval()
        return self

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(head parameters, trainable backbone parameters)."""
        return list(self.head.parameters()), [p for p in self.backbone.parameters() if p.requires_grad]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: (N, 3, crop, crop) uint8 -> (N, D) float32, the operations of stage one's FrameEmbedder."""
        x = self.pre.normalize(x).contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            if torch.is_grad_enabled():
                y = self.backbone(x)
            else:
                y = torch.cat([self.backbone(x[i : i + EVAL_CHUNK]) for i in range(0, len(x), EVAL_CHUNK)])
        return y.float().flatten(1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats = self.embed(x)  # (N, D)
        steps = int(lengths.max())
        mask = length_mask(lengths, steps, feats.device)  # (B, T), row-major order = the order of the frames
        seq = feats.new_zeros(len(lengths), steps, feats.shape[1])  # (B, T, D)
        seq[mask] = feats
        return self.head(seq, lengths)
