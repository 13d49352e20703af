"""The feature cache on disk: the only module that touches h5py.

A cache is what users name (CACHE.h5) plus a folder of parts beside it (CACHE.h5.parts/). Every finished video is one
part file, written under a temporary name and renamed into place, so a process killed at any moment leaves only whole
parts behind. CACHE.h5 is an index of external links to the parts, rebuilt atomically (written aside, then renamed)
during and after each run. Plain h5py reads it: f["videos/<id>/features"]. The layout is documented in docs/cache-format.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.spec import FeatureSpec

log = logging.getLogger(__name__)

FORMAT_NAME = "pipeline-feature-cache"
SCHEMA_VERSION = 1
PART_SUFFIX = ".h5"
FAILED_SUFFIX = ".failed.json"
SPEC_FILE = "spec.json"
# A video of at most this many rows is written as one contiguous dataset; longer ones stream into a chunked one.
CONTIGUOUS_MAX_ROWS = 1024
CHUNK_ROWS = 256  # (256, D) chunks: 1 MiB for D=2048 in float16, the size h5py's docs recommend for hot data


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (wrong spec, not a cache, locked by another run)."""


def parts_dir(cache_path: str | os.PathLike) -> Path:
    return Path(str(cache_path) + ".parts")


def video_id(key: str) -> str:
    """Stable file-system-safe id of a video key (keys are relative paths and may hold any character)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


# --------------------------------------------------------------------------------------------- atomic file helpers
def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Make `final` appear whole or not at all, even across a power cut."""
    _fsync_path(tmp)
    os.replace(tmp, final)
    _fsync_path(final.parent, directory=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _commit(tmp, path)


# ------------------------------------------------------------------------------------------------------- writing
class PartWriter:
    """Streams one video's rows into a temporary part file; `commit` renames it into place.

    Rows are buffered up to CONTIGUOUS_MAX_ROWS so short videos get one exact contiguous dataset; past that the
    buffer moves into a resizable (CHUNK_ROWS, D) dataset and memory stays bounded however long the video is.
    """

    def __init__(self, final: Path, dim: int, dtype: str, tag: str = ""):
        self.final = final
        self.tmp = final.with_name(f".{final.name}{tag}.{os.getpid()}.tmp")
        self.dim, self.dtype = dim, np.dtype(dtype)
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._file: h5py.File | None = None
        self.rows = 0

    def append(self, features: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray) -> None:
        """Shapes: features (n, D) float32; frame_indices (n,); timestamps (n,) seconds."""
        feats = features.astype(self.dtype)
        if not np.isfinite(feats).all():
            hint = " (they overflow float16: use --dtype float32)" if self.dtype == np.float16 else ""
            raise ValueError(f"the backbone produced non-finite features{hint}")
        self._buf.append((feats, np.asarray(frame_indices, np.int64), np.asarray(timestamps, np.float64)))
        self._buffered += len(feats)
        self.rows += len(feats)
        if self._buffered > CONTIGUOUS_MAX_ROWS:
            self._spill()

    def _spill(self) -> None:
        feats, idx, ts = (np.concatenate(c) for c in zip(*self._buf))
        self._buf, self._buffered = [], 0
        if self._file is None:
            self._file = h5py.File(self.tmp, "w")
            self._file.create_dataset("features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
                                      chunks=(CHUNK_ROWS, self.dim))
            self._file.create_dataset("frame_indices", shape=(0,), maxshape=(None,), dtype=np.int64,
                                      chunks=(4096,))
            self._file.create_dataset("timestamps", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
        for name, arr in (("features", feats), ("frame_indices", idx), ("timestamps", ts)):
            ds = self._file[name]
            n = ds.shape[0]
            ds.resize(n + len(arr), axis=0)
            ds[n:] = arr

    def commit(self, attrs: dict) -> None:
        if self._file is None:
            feats, idx, ts = ((np.concatenate(c) for c in zip(*self._buf)) if self._buf else
                              (np.zeros((0, self.dim), self.dtype), np.zeros(0, np.int64), np.zeros(0)))
            self._file = h5py.File(self.tmp, "w")
            self._file.create_dataset("features", data=feats)
            self._file.create_dataset("frame_indices", data=idx)
            self._file.create_dataset("timestamps", data=ts)
        elif self._buf:
            self._spill()
        for k, v in attrs.items():
            self._file.attrs[k] = "" if v is None else v
        self._file.attrs["num_frames"] = self.rows
        self._file.close()
        self._file = None
        _commit(self.tmp, self.final)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


# Columns of the /index table, read in one go by open_cache (no part file opened to list a cache).
_INDEX_COLUMNS = {
    "key": str, "id": str, "label": str, "split": str, "num_frames": np.int64, "source_path": str,
    "source_size": np.int64, "source_mtime_ns": np.int64, "shard": str, "spec_id": str,
    "part_size": np.int64, "part_mtime_ns": np.int64,
}


class CacheWriter:
    """Owns CACHE.h5 and CACHE.h5.parts/ for one extraction run.

    One unsharded writer at a time (an exclusive lock on .lock). Shard writers (`shard=(i, n)`, e.g. torchrun ranks
    or Slurm array tasks) share .lock, hold .lock.shard-i-of-n exclusively, write only their own videos' parts and
    no index: `merge()` (or rank 0 after a barrier) builds it once they are all done.
    """

    def __init__(self, path: str | os.PathLike, spec: FeatureSpec, dtype: str, overwrite: bool = False,
                 shard: tuple[int, int] | None = None):
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.spec, self.dtype, self.shard = spec, dtype, shard
        self.tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
        if self.path.exists() and not (self.parts / SPEC_FILE).exists() and not _is_cache_file(self.path):
            raise CacheError(f"{self.path} exists and is not a pipeline feature cache; choose another -o path")
        self.parts.mkdir(parents=True, exist_ok=True)
        self._lock_fds = [_lock(self.parts / ".lock", self.path, shared=shard is not None)]
        try:
            if shard:
                self._lock_fds.append(_lock(self.parts / f".lock{self.tag}", self.path))
            self._check_spec(overwrite)
            # Temporary files left by a killed run: all of them, or a shard's own (others may be writing theirs).
            for stale in self.parts.glob(f".*{self.tag}.*.tmp" if shard else ".*.tmp"):
                stale.unlink(missing_ok=True)
            spec_text = json.dumps({"spec": json.loads(spec.to_json()), "spec_id": spec.id, "dtype": dtype},
                                   indent=1, sort_keys=True)
            if not (self.parts / SPEC_FILE).exists():
                _write_text_atomic(self.parts / SPEC_FILE, spec_text)
            self._index = _read_index_rows(self.path)
            if not shard:
                self.write_index()
        except BaseException:
            self.close()
            raise

    def _check_spec(self, overwrite: bool) -> None:
        spec_file = self.parts / SPEC_FILE
        if not spec_file.exists():
            return
        stored = json.loads(spec_file.read_text(encoding="utf-8"))
        old = FeatureSpec.from_dict(stored["spec"])
        diffs = old.differences(self.spec)
        if stored.get("dtype") != self.dtype:
            diffs.append(f"dtype: {stored.get('dtype')!r} != {self.dtype!r}")
        if not diffs:
            return
        if overwrite:
            log.warning("--overwrite: discarding %s (built with %s)", self.path, old.describe())
            for entry in self.parts.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self.path.unlink(missing_ok=True)
            return
        raise CacheError(
            f"{self.path} holds features of another spec (existing != requested):\n  " + "\n  ".join(diffs)
            + "\nWrite to a new -o path, or pass --overwrite to discard the existing features.")

    # -- per video
    def part_path(self, key: str) -> Path:
        return self.parts / (video_id(key) + PART_SUFFIX)

    def is_done(self, key: str, source_size: int, source_mtime_ns: int) -> bool:
        """True when the video has a finished part made from a source of this size and mtime."""
        vid = video_id(key)
        part = self.parts / (vid + PART_SUFFIX)
        try:
            st = part.stat()
        except FileNotFoundError:
            return False
        row = self._index.get(vid)
        if row is None or row["part_mtime_ns"] != st.st_mtime_ns or row["part_size"] != st.st_size:
            row = _part_row(part)
            if row is None:
                return False
            self._index[vid] = row
        return row["source_size"] == source_size and row["source_mtime_ns"] == source_mtime_ns

    def begin(self, key: str, dim: int) -> PartWriter:
        return PartWriter(self.part_path(key), dim, self.dtype, self.tag)

    def record_failure(self, key: str, source_path: str, reason: str) -> None:
        record = {"key": key, "source_path": source_path, "reason": reason,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_text_atomic(self.parts / (video_id(key) + FAILED_SUFFIX), json.dumps(record, ensure_ascii=False))

    def clear_failure(self, key: str) -> None:
        (self.parts / (video_id(key) + FAILED_SUFFIX)).unlink(missing_ok=True)

    # -- the index
    def write_index(self) -> None:
        """Rebuild CACHE.h5 from the finished parts, atomically. Cheap: unchanged parts are not reopened."""
        rows = {}
        for part in sorted(self.parts.glob("*" + PART_SUFFIX)):
            vid = part.name[: -len(PART_SUFFIX)]
            st = part.stat()
            row = self._index.get(vid)
            if row is None or row["part_mtime_ns"] != st.st_mtime_ns or row["part_size"] != st.st_size:
                row = _part_row(part)
                if row is None:
                    log.warning("ignoring unreadable part %s (it will be redone)", part)
                    part.unlink(missing_ok=True)
                    continue
            rows[vid] = row
        foreign = sorted(r["key"] for r in rows.values() if r["spec_id"] != self.spec.id)
        if foreign:
            raise CacheError(f"{self.parts} holds {len(foreign)} videos of another feature spec than {self.spec.id} "
                             f"(e.g. {', '.join(foreign[:3])}); shards of different specs cannot be merged: "
                             f"remove those parts or extract them into another cache")
        self._index = rows
        failures = []
        for f in sorted(self.parts.glob("*" + FAILED_SUFFIX)):
            with contextlib.suppress(ValueError, OSError):
                failures.append(json.loads(f.read_text(encoding="utf-8")))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["spec"] = self.spec.to_json()
            f.attrs["spec_id"] = self.spec.id
            f.attrs["dtype"] = self.dtype
            f.attrs["parts_dir"] = self.parts.name
            f.attrs["versions"] = json.dumps(package_versions(), sort_keys=True)
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            videos = f.create_group("videos")
            ordered = sorted(rows.values(), key=lambda r: r["key"])
            for r in ordered:
                videos[r["id"]] = h5py.ExternalLink(f"{self.parts.name}/{r['id']}{PART_SUFFIX}", "/")
            index = f.create_group("index")
            for col, kind in _INDEX_COLUMNS.items():
                values = [r[col] for r in ordered]
                if kind is str:
                    index.create_dataset(col, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
                else:
                    index.create_dataset(col, data=np.array(values, dtype=kind))
            fail = f.create_group("failures")
            for col in ("key", "source_path", "reason", "time"):
                fail.create_dataset(col, data=np.array([str(x.get(col, "")) for x in failures], dtype=object),
                                    dtype=h5py.string_dtype())
        _commit(tmp, self.path)

    def close(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []


def merge(path: str | os.PathLike) -> int:
    """Build CACHE.h5 from every finished part in CACHE.h5.parts/ (after sharded runs); returns the video count.

    Refuses while a writer is running and when parts of another feature spec are present."""
    parts = parts_dir(path)
    spec_file = parts / SPEC_FILE
    if not spec_file.exists():
        raise CacheError(f"nothing to merge: {parts} does not exist or holds no spec.json")
    stored = json.loads(spec_file.read_text(encoding="utf-8"))
    writer = CacheWriter(path, FeatureSpec.from_dict(stored["spec"]), stored["dtype"])  # its start writes the index
    writer.close()
    return len(writer._index)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the features, recorded in every index."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("framecache", "torch", "torchvision", "opencv-python-headless", "opencv-python", "h5py", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _lock(lock_path: Path, cache: Path, shared: bool = False) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise CacheError(f"another extraction is writing to {cache} ({lock_path.name} is held); wait for it, "
                             f"or choose another -o path") from e
        raise
    return fd


def _is_cache_file(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT_NAME
    except OSError:
        return False


def _attr(attrs, name: str, default=None):
    v = attrs.get(name, default)
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _part_row(part: Path) -> dict | None:
    """The index row of a finished part, or None when the file is not a readable part."""
    try:
        st = part.stat()
        with h5py.File(part, "r") as f:
            a = f.attrs
            return {
                "key": _attr(a, "key"), "id": part.name[: -len(PART_SUFFIX)], "label": _attr(a, "label", ""),
                "split": _attr(a, "split", ""), "num_frames": int(f["features"].shape[0]),
                "source_path": _attr(a, "source_path", ""), "source_size": int(_attr(a, "source_size", -1)),
                "source_mtime_ns": int(_attr(a, "source_mtime_ns", -1)), "shard": _attr(a, "shard", ""),
                "spec_id": _attr(a, "spec_id", ""), "part_size": st.st_size, "part_mtime_ns": st.st_mtime_ns,
            }
    except (OSError, KeyError):
        return None


def _read_index_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        with h5py.File(path, "r") as f:
            index = f["index"]
            cols = {c: _column(index[c]) for c in _INDEX_COLUMNS}
    except (OSError, KeyError):
        return {}
    n = len(cols["key"])
    return {cols["id"][i]: {c: cols[c][i] for c in _INDEX_COLUMNS} for i in range(n)}


def _column(ds) -> list:
    if h5py.check_string_dtype(ds.dtype):
        return list(ds.asstr()[()])
    return [int(x) for x in ds[()]]


# ------------------------------------------------------------------------------------------------------- reading
class FeatureCache:
    """Read access to a feature cache. Opens HDF5 lazily, so it can be handed to DataLoader worker processes.

    Shapes: features(key) -> (T, D) in the stored dtype; frame_indices(key) -> (T,) int64;
    timestamps(key) -> (T,) float64 seconds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = (f"sharded runs leave their parts in {parts_dir(self.path)}: build the index with "
                    f"`pipeline merge {path}`" if (parts_dir(self.path) / SPEC_FILE).exists() else
                    f"create it with `pipeline extract ... -o {path}`")
            raise FileNotFoundError(f"no feature cache at {self.path}; {hint}")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT_NAME:
                    raise CacheError(f"{self.path} is an HDF5 file but not a pipeline feature cache")
                version = int(f.attrs["schema_version"])
                if version > SCHEMA_VERSION:
                    raise CacheError(f"{self.path} uses cache schema {version}; this pipeline reads up to "
                                     f"{SCHEMA_VERSION}: upgrade the package")
                self.spec = FeatureSpec.from_json(_attr(f.attrs, "spec"))
                self.dtype = _attr(f.attrs, "dtype")
                self.versions = json.loads(_attr(f.attrs, "versions", "{}"))
                self.schema_version = version
                index = f["index"]
                cols = {c: _column(index[c]) for c in _INDEX_COLUMNS}
                fail = f["failures"]
                self._failures = [dict(zip(fail.keys(), vals)) for vals in
                                  zip(*(_column(fail[c]) for c in fail.keys()))]
        except OSError as e:
            raise CacheError(f"cannot read {self.path} as HDF5 ({e})") from e
        self._rows = {cols["key"][i]: {c: cols[c][i] for c in _INDEX_COLUMNS} for i in range(len(cols["key"]))}
        self._file: h5py.File | None = None
        self._pid = None
        pending = self.unindexed_parts()
        if pending:
            log.warning("%s: %d finished videos are not in the index yet (the run that made them was interrupted); "
                        "rerun the same `pipeline extract` command to resume and include them", self.path, pending)

    # -- listing
    def keys(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __iter__(self):
        return iter(self._rows)

    def num_frames(self, key: str) -> int:
        return self._row(key)["num_frames"]

    def label(self, key: str) -> str | None:
        return self._row(key)["label"] or None

    def labels(self) -> dict[str, str | None]:
        return {k: (r["label"] or None) for k, r in self._rows.items()}

    def splits(self) -> dict[str, str | None]:
        """The split each video was given in a CSV manifest (train, val, test, ...), None where it has none."""
        return {k: (r["split"] or None) for k, r in self._rows.items()}

    def sources(self) -> dict[str, tuple[str, int, int]]:
        """key -> (absolute source path, size in bytes, mtime in ns) of the file or folder each video came from."""
        return {k: (r["source_path"], r["source_size"], r["source_mtime_ns"]) for k, r in self._rows.items()}

    def shards(self) -> dict[str, int]:
        """Videos per shard that extracted them ('i/n'); empty when no sharded run contributed."""
        counts: dict[str, int] = {}
        for r in self._rows.values():
            if r["shard"]:
                counts[r["shard"]] = counts.get(r["shard"], 0) + 1
        return dict(sorted(counts.items()))

    def failures(self) -> list[dict]:
        """Inputs that failed in the last run that met them: key, source_path, reason, time."""
        return list(self._failures)

    def unindexed_parts(self) -> int:
        parts = parts_dir(self.path)
        if not parts.is_dir():
            return 0
        ids = {r["id"] for r in self._rows.values()}
        return sum(1 for p in parts.glob("*" + PART_SUFFIX) if p.name[: -len(PART_SUFFIX)] not in ids)

    # -- reading one video
    def _row(self, key: str) -> dict:
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def _group(self, key: str) -> h5py.Group:
        if self._file is None or self._pid != os.getpid():  # never reuse a handle across fork
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file["videos"][self._row(key)["id"]]

    def features(self, key: str) -> np.ndarray:
        return self._group(key)["features"][()]

    def frame_indices(self, key: str) -> np.ndarray:
        return self._group(key)["frame_indices"][()]

    def timestamps(self, key: str) -> np.ndarray:
        return self._group(key)["timestamps"][()]

    def info(self, key: str) -> dict:
        """Everything recorded about the video: label, source_path, native_fps, width, height, decoded_frames, ..."""
        attrs = self._group(key).attrs
        return {k: _attr(attrs, k) for k in attrs.keys()}

    # -- lifetime
    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, videos={len(self)}, spec={self.spec.describe()})"


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """Open a feature cache for reading (see FeatureCache)."""
    return FeatureCache(path)
