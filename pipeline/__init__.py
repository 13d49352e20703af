"""pipeline: embed every video frame once with a frozen torchvision CNN, then train temporal heads on the cache.

    import pipeline
    report = pipeline.extract_videos(["videos/"], "cache.h5", backbone="resnet18", fps=5)
    cache = pipeline.open_cache("cache.h5")
    x = cache.features(cache.keys()[0])  # (T, D)
    run = pipeline.train_head("cache.h5", "runs/lstm", head="lstm", clip_len=16)
    pipeline.evaluate("runs/lstm/best.pt", "test.h5").metrics["top1"]
    pipeline.predict("runs/lstm/best.pt", ["new_videos/"], "preds.csv")
    pipeline.sweep("cache.h5", "runs/sweep", space={"head": ["lstm", "gru"], "hidden": [128, 256]}, trials=8)
    pipeline.finetune(["videos/"], "runs/lstm/best.pt", "runs/lstm-ft", unfreeze="layer4", epochs=5)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["extract_videos", "open_cache", "train_head", "evaluate", "predict", "ExtractConfig", "Sampling",
           "TrainConfig", "EvalConfig", "PredictConfig", "FeatureSpec", "sweep", "SweepConfig", "finetune",
           "FinetuneConfig", "__version__"]


def __getattr__(name: str):
    # Lazy: `pipeline --help` and `import pipeline` stay instant; torch loads on first real use.
    if name == "extract_videos":
        from pipeline.extract.run import extract_videos

        return extract_videos
    if name in ("open_cache", "FeatureSpec"):
        from pipeline.data import cache

        return getattr(cache, name)
    if name == "train_head":
        from pipeline.heads.train import train_head

        return train_head
    if name == "evaluate":
        from pipeline.heads.infer import evaluate_checkpoint

        return evaluate_checkpoint
    if name == "predict":
        from pipeline.heads.infer import predict

        return predict
    if name == "finetune":
        from pipeline.finetuning.train import finetune

        return finetune
    if name == "FinetuneConfig":
        from pipeline.config import FinetuneConfig

        return FinetuneConfig
    if name == "sweep":
        from pipeline.heads.sweep import sweep

        return sweep
    if name in ("ExtractConfig", "Sampling", "TrainConfig", "EvalConfig", "PredictConfig", "SweepConfig"):
        from pipeline import config

        return getattr(config, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
