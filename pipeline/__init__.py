"""pipeline: embed every video frame once with a frozen torchvision CNN, then train temporal heads on the cache.

import pipeline
report = pipeline.extract_videos(["videos/"], "cache.h5", backbone="resnet18", fps=5)
cache = pipeline.open_cache("cache.h5")
x = cache.features(cache.keys()[0])  # (T, D)
run = pipeline.train_head("cache.h5", "runs/lstm", head="lstm", clip_len=16)
pipeline.train_head("cache.h5", "runs/tcn", head="tcn", frame_labels="groundTruth/")  # a label per frame
pipeline.evaluate("runs/lstm/best.pt", "test.h5").metrics["top1"]
pipeline.predict("runs/lstm/best.pt", ["new_videos/"], "preds.csv")
pipeline.sweep("cache.h5", "runs/sweep", space={"head": ["lstm", "gru"], "hidden": [128, 256]}, trials=8)
pipeline.finetune(["videos/"], "runs/lstm/best.pt", "runs/lstm-ft", unfreeze="layer4", epochs=5)
"""

from __future__ import annotations

import importlib
import sys
import types

from pipeline.runtime import default_threading

default_threading()  # before anything imports torch: OpenMP reads its settings once, when torch loads it

__version__ = "0.4.0"

__all__ = [
    "extract_videos",
    "open_cache",
    "train_head",
    "evaluate",
    "predict",
    "ExtractConfig",
    "Sampling",
    "TrainConfig",
    "EvalConfig",
    "PredictConfig",
    "FeatureSpec",
    "sweep",
    "SweepConfig",
    "finetune",
    "FinetuneConfig",
    "__version__",
]

# name -> (module, attribute). Lazy, so that `pipeline --help` and `import pipeline` stay instant: torch loads on
# first real use.
_API = {
    "extract_videos": ("pipeline.extract.run", "extract_videos"),
    "open_cache": ("pipeline.data.cache", "open_cache"),
    "FeatureSpec": ("pipeline.spec", "FeatureSpec"),
    "Sampling": ("pipeline.spec", "Sampling"),
    "evaluate": ("pipeline.train_head.evaluate", "evaluate_checkpoint"),
    **{
        name: ("pipeline.config", name)
        for name in ("ExtractConfig", "TrainConfig", "EvalConfig", "PredictConfig", "SweepConfig", "FinetuneConfig")
    },
}
# The stages whose package (or module) has the name of its entry function: `pipeline.train_head(...)` calls
# train_head.train.train_head, while `pipeline.train_head.model` stays the stage's module.
_STAGES = {
    "train_head": "pipeline.train_head.train",
    "sweep": "pipeline.sweep.run",
    "finetune": "pipeline.finetune.train",
    "predict": "pipeline.predict",
}


class _Stage(types.ModuleType):
    """A stage's package that can be called as its entry function (the import system binds a subpackage to its
    parent's attribute of the same name, so the function and the package must be one object)."""

    def __call__(self, *args, **kwargs):
        name = self.__name__.rpartition(".")[2]
        return getattr(importlib.import_module(_STAGES[name]), name)(*args, **kwargs)


def _callable_stage(module_name: str) -> None:
    """Make the stage package `module_name` callable as its entry function (called from its __init__)."""
    sys.modules[module_name].__class__ = _Stage


def __getattr__(name: str):
    if name in _STAGES:
        return importlib.import_module(f"pipeline.{name}")
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
