"""Feature caches written straight from arrays (no video, no CNN), in the normal cache format: for tests, benchmarks
and experiments with heads. `open_cache` reads them like any other cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.data.cache import CacheWriter
from pipeline.spec import FeatureSpec, Preprocessing, Sampling

SYNTHETIC_FPS = 25.0  # timestamps of synthetic rows: row i is at i / 25 s


def synthetic_spec(
    dim: int, backbone: str = "synthetic", weights: str = "none(seed=0)", **preprocessing
) -> FeatureSpec:
    """A FeatureSpec for features that came from no real backbone (fields can be varied to build mismatches)."""
    pre = Preprocessing(
        **{"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **preprocessing}
    )
    return FeatureSpec(
        backbone=backbone, weights=weights, weights_sha256=None, preprocessing=pre, sampling=Sampling(), dim=dim
    )


def write_feature_cache(
    path: str | os.PathLike,
    videos: Iterable[tuple[str, np.ndarray, str | None, str | None]],
    spec: FeatureSpec,
    dtype: str = "float16",
) -> Path:
    """Write (key, features (T, D), label, split) tuples as a feature cache at `path`; returns the path.

    Features are streamed one video at a time, so `videos` may be a generator of any total size.
    """
    writer = CacheWriter(path, spec, dtype)
    # A source name per cache file (relative: no file to look for), so that two synthetic caches that use the same
    # keys do not claim each other's videos (evaluate keeps a head's training videos apart by source).
    origin = "synthetic/" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    try:
        for n, (key, features, label, split) in enumerate(videos):
            if features.ndim != 2 or features.shape[1] != spec.dim:
                raise ValueError(f"{key}: features of shape {features.shape}, expected (T, {spec.dim})")
            rows = len(features)
            part = writer.begin(key, spec.dim)
            try:
                part.append(features, np.arange(rows), np.arange(rows) / SYNTHETIC_FPS)
                part.commit(
                    {
                        "key": key,
                        "label": label or "",
                        "split": split or "",
                        "source_path": f"{origin}/{key}",
                        "source_size": rows,
                        "source_mtime_ns": n,
                        "kind": "synthetic",
                        "spec_id": spec.id,
                    }
                )
            except BaseException:
                part.abort()
                raise
    finally:
        writer.write_index()
        writer.close()
    return Path(path)
