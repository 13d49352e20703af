"""The feature cache on disk: the only module that touches h5py.

A cache is what users name (CACHE.h5) plus a folder of parts beside it (CACHE.h5.parts/). Every finished video is one
part file, written under a temporary name and renamed into place, so a process killed at any moment leaves only whole
parts behind. CACHE.h5 is an index of external links to the parts, rebuilt atomically (written aside, then renamed)
during and after each run. Plain h5py reads it: f["videos/<id>/features"]. The layout is documented in
docs/cache-format.md.
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
from dataclasses import dataclass
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
# `layout` attribute of CACHE.h5: an index beside a parts folder (caches without the attribute are of this
# kind), or one self-contained file made by `pack` whose /videos/<id> are groups holding the data.
LAYOUT_PARTS, LAYOUT_PACKED = "parts", "packed"
# A video of at most this many rows is written in one go, sized exactly; longer ones stream into a resizable dataset.
CONTIGUOUS_MAX_ROWS = 1024
SHARD_TABLE_EVERY_S = 30.0  # a shard writer saves the index rows of its parts this often (and when it closes)
CHUNK_ROWS = 256  # (256, D) chunks: 1 MiB for D=2048 in float16, the size h5py's docs recommend for hot data
# Part files live in subfolders named by the first SUBFOLDER_CHARS hex digits of their id: 256 folders, about 2,000
# parts each at 500,000 videos (file systems slow down on folders of hundreds of thousands of entries). Caches
# written before kept every part directly in CACHE.h5.parts/; they are still read, and a writer moves their parts
# into subfolders (`parts_layout` attribute of the index: absent for the flat layout).
SUBFOLDER_CHARS = 2
LAYOUT_NESTED = "nested"
# Every chunk carries a Fletcher-32 checksum: a damaged byte fails the read of its chunk instead of reaching training.
# Caches written before it (no filter) read as before.
CHECKSUM = {"fletcher32": True}
CHECK_ROWS = 16 * CHUNK_ROWS  # `info --check` reads this many rows at a time
DAMAGED_SUFFIX = ".h5.damaged"  # a part whose checksum failed, set aside: the next extraction redoes the video
DAMAGED_CHUNK = "filter returned failure"  # HDF5's words when a chunk's checksum (our only filter) fails


def _create(group, name: str, data=None, **options):
    """A dataset with checksummed chunks of at most CHUNK_ROWS rows (4096 for 1-d columns), unless given."""
    shape = data.shape if data is not None else options["shape"]
    if "chunks" not in options:
        if shape[0] == 0:  # nothing to checksum (and HDF5 has no empty chunks)
            return group.create_dataset(name, data=data, **options)
        options["chunks"] = (min(shape[0], CHUNK_ROWS if len(shape) > 1 else 4096), *shape[1:])
    return group.create_dataset(name, data=data, **options, **CHECKSUM)


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (wrong spec, not a cache, locked by another run)."""


def parts_dir(cache_path: str | os.PathLike) -> Path:
    return Path(str(cache_path) + ".parts")


def part_file(parts: Path, vid: str, nested: bool = True) -> Path:
    """The part file of the video with id `vid` in the parts folder `parts` (nested: in its subfolder)."""
    name = vid + PART_SUFFIX
    return parts / vid[:SUBFOLDER_CHARS] / name if nested else parts / name


def _is_subfolder(name: str) -> bool:
    return len(name) == SUBFOLDER_CHARS and all(c in "0123456789abcdef" for c in name)


def scan_parts(parts: Path) -> dict[str, os.DirEntry]:
    """id -> directory entry of every finished part file, in subfolders or (an old cache) directly in `parts`;
    temporary files are left out. One scandir per folder: fast on hundreds of thousands of parts."""
    found: dict[str, os.DirEntry] = {}
    try:
        top = list(os.scandir(parts))
    except FileNotFoundError:
        return found
    folders = []
    for entry in top:
        if entry.name.endswith(PART_SUFFIX) and not entry.name.startswith("."):
            found[entry.name[: -len(PART_SUFFIX)]] = entry
        elif _is_subfolder(entry.name) and entry.is_dir():
            folders.append(entry.path)
    for folder in sorted(folders):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(PART_SUFFIX) and not entry.name.startswith("."):
                    found[entry.name[: -len(PART_SUFFIX)]] = entry
    return found


def _nest_flat_parts(parts: Path) -> int:
    """Move the parts of an old flat cache into their subfolders (renames keep their size and mtime, so the index
    still matches them). Returns how many moved."""
    moved = 0
    for entry in list(os.scandir(parts)):
        if entry.name.endswith(PART_SUFFIX) and not entry.name.startswith("."):
            target = part_file(parts, entry.name[: -len(PART_SUFFIX)])
            target.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # another shard of this run moved it first
                os.replace(entry.path, target)
                moved += 1
    if moved:
        _fsync_path(parts, directory=True)
        log.info("moved %d part files of %s into subfolders", moved, parts)
    return moved


def video_id(key: str) -> str:
    """Stable file-system-safe id of a video key (keys are relative paths and may hold any character).

    Keys made from file names that are not UTF-8 hold surrogate escapes (os.fsdecode); they hash as their raw
    bytes."""
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]


# ------------------------------------------------------------------------------------------- strings in HDF5
# HDF5 strings here are UTF-8. A key or path made from a file name that is not valid UTF-8 (os.fsdecode gives
# it surrogate escapes, e.g. b'caf\xe9.mp4' -> 'caf\udce9.mp4') cannot be encoded strictly; it is stored as
# its raw file-name bytes in the same UTF-8 string type and read back with errors="surrogateescape", so it
# round-trips exactly. Names that are valid UTF-8 are stored exactly as before.
def _h5_text(value: str) -> str | bytes:
    """`value` as HDF5 can store it: itself, or its raw bytes when it holds surrogate escapes."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def _set_attr(attrs, name: str, value) -> None:
    """attrs[name] = value, also for strings that carry surrogate escapes (see _h5_text)."""
    if value is None:
        value = ""
    if isinstance(value, str):
        text = _h5_text(value)
        if isinstance(text, bytes):
            attrs.create(name, text, dtype=h5py.string_dtype("utf-8"))
            return
    attrs[name] = value


def _text_column(values: list[str]) -> np.ndarray:
    return np.array([_h5_text(str(v)) for v in values], dtype=object)


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

    Rows are buffered up to CONTIGUOUS_MAX_ROWS so short videos get one exact dataset, written at once; past that the
    buffer moves into a resizable (CHUNK_ROWS, D) dataset and memory stays bounded however long the video is.
    `windows`: the rows are windows of frames (a video backbone) and each has a frame span (`frame_spans`).
    """

    def __init__(self, final: Path, dim: int, dtype: str, tag: str = "", windows: bool = False, on_commit=None):
        self.final = final
        self.windows = windows
        self._spans: list[np.ndarray] = []
        self.on_commit = on_commit  # called with the part's index row once it is in place
        self.tmp = final.with_name(f".{final.name}{tag}.{os.getpid()}.tmp")
        self.dim, self.dtype = dim, np.dtype(dtype)
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._file: h5py.File | None = None
        self.rows = 0

    def append(
        self, features: np.ndarray, frame_indices: np.ndarray, timestamps: np.ndarray, spans: np.ndarray | None = None
    ) -> None:
        """Shapes: features (n, D) float32; frame_indices (n,); timestamps (n,) seconds; spans (n, 2) (window rows:
        first and last decoded frame of each window)."""
        if self.windows != (spans is not None):
            raise ValueError("window rows need their frame spans, and only window rows have them")
        feats = features.astype(self.dtype)
        if not np.isfinite(feats).all():
            hint = " (they overflow float16: use --dtype float32)" if self.dtype == np.float16 else ""
            raise ValueError(f"the backbone produced non-finite features{hint}")
        self._buf.append((feats, np.asarray(frame_indices, np.int64), np.asarray(timestamps, np.float64)))
        if spans is not None:
            self._spans.append(np.asarray(spans, np.int64).reshape(len(feats), 2))
        self._buffered += len(feats)
        self.rows += len(feats)
        if self._buffered > CONTIGUOUS_MAX_ROWS:
            self._spill()

    def _spill(self) -> None:
        feats, idx, ts = (np.concatenate(c) for c in zip(*self._buf))
        spans = np.concatenate(self._spans) if self.windows else None
        self._buf, self._buffered, self._spans = [], 0, []
        if self._file is None:
            self._file = h5py.File(self.tmp, "w")
            f, dim = self._file, self.dim
            _create(f, "features", shape=(0, dim), maxshape=(None, dim), dtype=self.dtype, chunks=(CHUNK_ROWS, dim))
            _create(f, "frame_indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            _create(f, "timestamps", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
            if self.windows:
                _create(f, "frame_spans", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(4096, 2))
        columns = [("features", feats), ("frame_indices", idx), ("timestamps", ts)]
        for name, arr in columns + ([("frame_spans", spans)] if self.windows else []):
            ds = self._file[name]
            n = ds.shape[0]
            ds.resize(n + len(arr), axis=0)
            ds[n:] = arr

    def commit(self, attrs: dict) -> None:
        if self._file is None:
            feats, idx, ts = (
                (np.concatenate(c) for c in zip(*self._buf))
                if self._buf
                else (np.zeros((0, self.dim), self.dtype), np.zeros(0, np.int64), np.zeros(0))
            )
            self._file = h5py.File(self.tmp, "w")
            columns = [("features", feats), ("frame_indices", idx), ("timestamps", ts)]
            if self.windows:
                columns.append(
                    ("frame_spans", np.concatenate(self._spans) if self._spans else np.zeros((0, 2), np.int64))
                )
            for name, data in columns:
                _create(self._file, name, data)
        elif self._buf:
            self._spill()
        for k, v in attrs.items():
            _set_attr(self._file.attrs, k, v)
        self._file.attrs["num_frames"] = self.rows
        self._file.close()
        self._file = None
        _commit(self.tmp, self.final)
        self.final.with_name(self.final.name[: -len(PART_SUFFIX)] + DAMAGED_SUFFIX).unlink(missing_ok=True)
        if self.on_commit is not None:
            self.on_commit(_row_of(self.final, attrs, self.rows))

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


# Columns of the /index table, read in one go by open_cache (no part file opened to list a cache).
_INDEX_COLUMNS = {
    "key": str,
    "id": str,
    "label": str,
    "split": str,
    "num_frames": np.int64,
    "source_path": str,
    "source_size": np.int64,
    "source_mtime_ns": np.int64,
    "shard": str,
    "spec_id": str,
    "part_size": np.int64,
    "part_mtime_ns": np.int64,
}


class CacheWriter:
    """Owns CACHE.h5 and CACHE.h5.parts/ for one extraction run.

    One unsharded writer at a time (an exclusive lock on .lock). Shard writers (`shard=(i, n)`, e.g. torchrun ranks
    or Slurm array tasks) share .lock, hold .lock.shard-i-of-n exclusively, write only their own videos' parts and
    no index: `merge()` (or rank 0 after a barrier) builds it once they are all done.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        spec: FeatureSpec,
        dtype: str,
        overwrite: bool = False,
        shard: tuple[int, int] | None = None,
    ):
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.spec, self.dtype, self.shard = spec, dtype, shard
        self._own: dict[str, dict] = {}
        self._table_written, self._table_seconds = time.monotonic(), 0.0
        self.tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
        if self.path.exists() and not (self.parts / SPEC_FILE).exists() and not _is_cache_file(self.path):
            raise CacheError(f"{self.path} exists and is not a pipeline feature cache; choose another -o path")
        self.parts.mkdir(parents=True, exist_ok=True)
        self._lock_fds = [_lock(self.parts / ".lock", self.path, shared=shard is not None)]
        try:
            if shard:
                self._lock_fds.append(_lock(self.parts / f".lock{self.tag}", self.path))
            packed = _layout(self.path) == LAYOUT_PACKED
            if packed and not (self.parts / SPEC_FILE).exists():
                _write_spec_from_index(self.path, self.parts / SPEC_FILE)
            self._check_spec(overwrite)
            # Temporary files left by a killed run: all of them, or a shard's own (others may be writing theirs).
            pattern = f".*{self.tag}.*.tmp" if shard else ".*.tmp"
            for stale in [*self.parts.glob(pattern), *self.parts.glob("*/" + pattern)]:
                stale.unlink(missing_ok=True)
            remove_dead_temp_files(self.path)
            _nest_flat_parts(self.parts)
            if packed and self.path.exists():
                _unpack(self.path, self.parts, self.tag)
            spec_text = json.dumps(
                {"spec": json.loads(spec.to_json()), "spec_id": spec.id, "dtype": dtype}, indent=1, sort_keys=True
            )
            if not (self.parts / SPEC_FILE).exists():
                _write_text_atomic(self.parts / SPEC_FILE, spec_text)
            self._index = _read_index_rows(self.path)
            for table in sorted(self.parts.glob(".index.shard-*")):  # rows of shard writers (validated by stat)
                for vid, row in _read_index_rows(table).items():
                    self._index.setdefault(vid, row)
            self._own = _read_index_rows(self.parts / f".index{self.tag}") if shard else {}
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
            f"{self.path} holds features of another spec (existing != requested):\n  "
            + "\n  ".join(diffs)
            + "\nWrite to a new -o path, or pass --overwrite to discard the existing features."
        )

    # -- per video
    def part_path(self, key: str) -> Path:
        return part_file(self.parts, video_id(key))

    def is_done(self, key: str, source_size: int, source_mtime_ns: int) -> bool:
        """True when the video has a finished part made from a source of this size and mtime."""
        vid = video_id(key)
        part = part_file(self.parts, vid)
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
        final = self.part_path(key)
        final.parent.mkdir(exist_ok=True)
        return PartWriter(
            final, dim, self.dtype, self.tag, windows=self.spec.window is not None, on_commit=self._committed
        )

    def _committed(self, row: dict) -> None:
        """A part is in place: its index row is known without reopening it. A shard writer keeps its rows in a
        table of its own (written every SHARD_TABLE_EVERY_S and at close), so that the merge need not open its
        parts."""
        self._index[row["id"]] = row
        if self.shard:
            self._own[row["id"]] = row
            # every SHARD_TABLE_EVERY_S, and never more than 1/20 of the time (the table grows with the shard)
            if time.monotonic() - self._table_written > max(SHARD_TABLE_EVERY_S, 20 * self._table_seconds):
                self.write_shard_table()

    def write_shard_table(self) -> None:
        """The index rows of this shard's parts, as `.index<tag>` in the parts folder (read by the merge)."""
        started = time.monotonic()
        tmp = self.parts / f".index{self.tag}.{os.getpid()}.tmp"
        with h5py.File(tmp, "w") as f:
            _write_rows(f.create_group("index"), sorted(self._own.values(), key=lambda r: r["key"]))
        _commit(tmp, self.parts / f".index{self.tag}")
        self._table_written = time.monotonic()
        self._table_seconds = self._table_written - started

    def record_failure(self, key: str, source_path: str, reason: str) -> None:
        """Record why `key` failed. When its source still exists (it changed and can no longer be extracted),
        the features of its previous version are dropped: they no longer describe the file. A source that is
        gone (an unmounted disk, a broken link) keeps them; `prune_missing_sources` removes those on
        request."""
        part = self.part_path(key)
        if part.exists() and os.path.exists(source_path):
            log.warning(
                "%s: dropping the features of its previous version (the file changed and now fails)", printable(key)
            )
            part.unlink(missing_ok=True)
            self._index.pop(video_id(key), None)
        record = {"key": key, "source_path": source_path, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # ensure_ascii (the default): \u escapes carry surrogate-escaped names through JSON and back exactly
        _write_text_atomic(self.parts / (video_id(key) + FAILED_SUFFIX), json.dumps(record))

    def clear_failure(self, key: str) -> None:
        (self.parts / (video_id(key) + FAILED_SUFFIX)).unlink(missing_ok=True)

    def prune_missing_sources(self) -> list[str]:
        """Remove the videos and failure records whose recorded source no longer exists; returns their keys.

        Only absolute source paths are checked (caches written from arrays record none). Called only on an
        explicit request (`extract --prune`): a source can be missing just because its disk is not mounted."""
        pruned = []
        for vid, entry in sorted(scan_parts(self.parts).items()):
            part = Path(entry.path)
            row = self._index.get(vid) or _part_row(part)
            if row is not None and source_missing(row["source_path"]):
                part.unlink(missing_ok=True)
                self._index.pop(row["id"], None)
                pruned.append(row["key"])
        for record_file in sorted(self.parts.glob("*" + FAILED_SUFFIX)):
            with contextlib.suppress(ValueError, OSError):
                record = json.loads(record_file.read_text(encoding="utf-8"))
                if source_missing(record.get("source_path", "")):
                    record_file.unlink(missing_ok=True)
                    if record.get("key") not in pruned:
                        pruned.append(record.get("key", record_file.name))
        return pruned

    # -- the index
    def write_index(self) -> None:
        """Rebuild CACHE.h5 from the finished parts, atomically. Cheap: unchanged parts are not reopened."""
        rows = {}
        for vid, entry in scan_parts(self.parts).items():
            part = Path(entry.path)
            try:
                st = entry.stat()
            except FileNotFoundError:  # pruned or redone meanwhile
                continue
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
            raise CacheError(
                f"{self.parts} holds {len(foreign)} videos of another feature spec than {self.spec.id} "
                f"(e.g. {', '.join(foreign[:3])}); shards of different specs cannot be merged: "
                f"remove those parts or extract them into another cache"
            )
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
            f.attrs["layout"] = LAYOUT_PARTS
            f.attrs["parts_layout"] = LAYOUT_NESTED
            f.attrs["versions"] = json.dumps(package_versions(), sort_keys=True)
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            videos = f.create_group("videos")
            ordered = sorted(rows.values(), key=lambda r: r["key"])
            links = videos.id.links  # the low-level call: 3x faster than h5py.ExternalLink at 500,000 videos
            for r in ordered:
                target = part_file(Path(self.parts.name), r["id"]).as_posix()
                links.create_external(r["id"].encode(), target.encode(), b"/")
            _write_rows(f.create_group("index"), ordered)
            fail = f.create_group("failures")
            for col in ("key", "source_path", "reason", "time"):
                fail.create_dataset(
                    col, data=_text_column([str(x.get(col, "")) for x in failures]), dtype=h5py.string_dtype()
                )
        _commit(tmp, self.path)
        if not self.shard:  # no shard writer runs (this one holds the lock alone): their rows are in the index now
            for table in self.parts.glob(".index.shard-*"):
                table.unlink(missing_ok=True)

    def close(self) -> None:
        if self.shard and self._own and self._lock_fds:
            try:
                self.write_shard_table()
            except OSError as e:  # the merge then opens this shard's new parts instead
                log.warning("could not write %s's table of its parts: %s", self.tag.lstrip("."), e)
        for fd in self._lock_fds:
            _unlock(fd)
        self._lock_fds = []


def merge(path: str | os.PathLike, prune: bool = False) -> int:
    """Build CACHE.h5 from every finished part in CACHE.h5.parts/ (after sharded runs); returns the video count.

    Refuses while a writer is running and when parts of another feature spec are present. `prune`: first
    remove the videos whose source no longer exists (see CacheWriter.prune_missing_sources)."""
    parts = parts_dir(path)
    spec_file = parts / SPEC_FILE
    if not spec_file.exists():
        raise CacheError(f"nothing to merge: {parts} does not exist or holds no spec.json")
    stored = json.loads(spec_file.read_text(encoding="utf-8"))
    writer = CacheWriter(path, FeatureSpec.from_dict(stored["spec"]), stored["dtype"])  # its start writes the index
    try:
        if prune and writer.prune_missing_sources():
            writer.write_index()
    finally:
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


# Readers probe the lock for an instant (writer_active): a writer starting meanwhile waits this long for them.
LOCK_WAIT_S = 1.0


def _lock(lock_path: Path, cache: Path, shared: bool = False) -> int:
    """Take `lock_path` (exclusive, or shared between shard writers) and return its descriptor.

    An exclusive holder writes who it is into the file (pid, command line, start time). Held by a live
    process: a CacheError that names it. Held although the process that took it is gone (a descriptor
    inherited by a leftover child of a killed run): the stale lock is replaced, never a reason to refuse."""
    from pipeline.runtime import parent_only

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _lock_holder(fd)
            if holder is not None and not holder["alive"]:
                os.close(fd)
                fd = _replace_stale_lock(lock_path, holder)
                if fd is not None:
                    break
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # someone else replaced it: try theirs
            elif time.monotonic() > deadline:
                os.close(fd)
                holder_text = _describe_holder(lock_path, holder)
                raise CacheError(f"another extraction is writing to {cache}: {holder_text}") from e
            time.sleep(0.02)
    if shared:
        # No exclusive holder exists while a shared lock is held: a record left by one that was killed goes.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    else:
        _write_holder(fd)
    parent_only(fd, token=fd)  # forked children (decode workers, loaders) close it: the lock dies with this process
    return fd


def _unlock(fd: int) -> None:
    from pipeline.runtime import forget

    forget(fd)
    os.close(fd)


def _process_started(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat), None when it does not exist.
    With the pid, it names a process for good: a pid can be reused, the pair cannot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None if not _pid_alive(pid) else -1  # -1: alive, start time unknown (not Linux)
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


def _write_holder(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "started": _process_started(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": os.uname().nodename,
        "command": _command_line(os.getpid()),
    }
    data = json.dumps(record).encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
        return " ".join(w.decode("utf-8", "surrogateescape") for w in words)
    except OSError:
        return "?"


def _lock_holder(fd: int) -> dict | None:
    """The record of the exclusive holder of a held lock, with `alive`: whether that very process still runs
    (on this host). None when there is no record (shard writers share the lock and write none)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "pid" not in record:
        return None
    if record.get("host") != os.uname().nodename:
        record["alive"] = True  # another machine's process (a shared file system): it cannot be checked here
    else:
        started = _process_started(int(record["pid"]))
        record["alive"] = started is not None and started in (record.get("started"), -1)
    return record


def _open_by(path: Path) -> list[int]:
    """Processes that have `path` open (Linux /proc; empty elsewhere)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{entry}/fd/{fd}")
                    if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                        pids.append(int(entry))
                        break
    return pids


def _describe_holder(lock_path: Path, holder: dict | None) -> str:
    if holder is not None:
        return (
            f"process {holder['pid']} ({printable(holder.get('command', '?'))}), running since "
            f"{holder.get('since', '?')}, holds {lock_path}; wait for it to finish, stop it (kill "
            f"{holder['pid']}), or choose another -o path"
        )
    pids = _open_by(lock_path)
    who = ", ".join(f"{pid} ({printable(_command_line(pid))})" for pid in pids[:4]) or "a process not visible here"
    return f"{lock_path} is held by {who}; wait for it to finish, stop it, or choose another -o path"


def _replace_stale_lock(lock_path: Path, holder: dict) -> int | None:
    """Put a fresh lock file, taken by this process, in place of one whose holder died; None when another
    process replaced it first."""
    leftovers = _open_by(lock_path)
    log.warning(
        "%s was held by process %s (%s), which is gone%s; taking the lock over",
        lock_path,
        holder["pid"],
        printable(holder.get("command", "?")),
        f" (processes it left behind still hold the old lock: {', '.join(map(str, leftovers))})" if leftovers else "",
    )
    try:
        old = os.stat(lock_path)
    except FileNotFoundError:
        old = None
    tmp = lock_path.with_name(f"{lock_path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        now = os.stat(lock_path)
    except FileNotFoundError:
        now = None
    if (old and (old.st_ino, old.st_dev)) != (now and (now.st_ino, now.st_dev)):
        os.close(fd)
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, lock_path)
    return fd


def writer_active(cache: str | os.PathLike) -> bool:
    """Whether an extraction (or a shard of one) is writing to `cache` now: its lock files are held.

    Probes with a shared, non-blocking lock held for an instant, so it never blocks a writer (whose _lock
    retries)."""
    folder = parts_dir(cache)
    if not folder.is_dir():
        return False
    for lock_file in [folder / ".lock", *sorted(folder.glob(".lock.shard-*"))]:
        try:
            fd = os.open(lock_file, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing also releases the probe's lock
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def remove_dead_temp_files(cache: Path) -> list[Path]:
    """Delete `.CACHE.h5.<pid>.tmp` files (an index or packed file being written) whose writer is no longer
    alive.

    A run killed while rebuilding the index leaves one beside CACHE.h5; a live process's file is left
    alone."""
    removed = []
    prefix, folder = f".{cache.name}.", cache.parent
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
                removed.append(folder / name)
                log.info("removed %s, left by an interrupted run", folder / name)
    return removed


def printable(text: str) -> str:
    """`text` safe to show on a terminal: control characters, other unprintable ones and the raw bytes of
    names that are not UTF-8 (surrogate escapes) are shown as backslash escapes (\\x1b, \\xe9, \\u200b); the
    rest unchanged."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a raw byte of a non-UTF-8 file name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1] if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def source_missing(source_path: str) -> bool:
    """True when a recorded absolute source path no longer exists (relative ones, e.g. synthetic, are not
    checked)."""
    return bool(source_path) and os.path.isabs(source_path) and not os.path.exists(source_path)


def _layout(path: Path) -> str | None:
    """The layout attribute of a cache index (LAYOUT_PARTS for caches written before it existed), None if
    unreadable."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return None
            return _attr(f.attrs, "layout", LAYOUT_PARTS)
    except OSError:
        return None


def _write_spec_from_index(index: Path, spec_file: Path) -> None:
    with h5py.File(index, "r") as f:
        spec, dtype = json.loads(_attr(f.attrs, "spec")), _attr(f.attrs, "dtype")
    text = json.dumps(
        {"spec": spec, "spec_id": FeatureSpec.from_dict(spec).id, "dtype": dtype}, indent=1, sort_keys=True
    )
    _write_text_atomic(spec_file, text)


def _copy_attrs(src, dst) -> None:
    for name in src:
        _set_attr(dst, name, _attr(src, name))


def _unpack(packed: Path, parts: Path, tag: str = "") -> int:
    """Write the videos and failure records of a packed cache back as parts, so that extraction can add to it.

    Each part is committed whole (temporary name, then rename), so an interrupted unpack is resumed by the
    next run; the packed file itself is replaced only later, by the new index. Returns the number of parts
    written."""
    written = 0
    with h5py.File(packed, "r") as f:
        ids = _column(f["index/id"])
        log.warning(
            "%s is a packed one-file cache: unpacking its %d videos into %s to add to it (run "
            "`pipeline pack %s` afterwards, or extract with --pack, to make one file again)",
            packed,
            len(ids),
            parts,
            packed,
        )
        for vid in ids:
            final = part_file(parts, vid)
            if final.exists():
                continue
            final.parent.mkdir(exist_ok=True)
            src = f["videos"][vid]
            try:
                names = ("features", "frame_indices", "timestamps", "frame_spans")  # frame_spans: window rows only
                columns = {name: src[name][()] for name in names if name in src}
            except OSError as e:  # a damaged chunk: leave the video out, so that this run redoes it
                log.warning("%s: video %s is damaged (%s); it will be extracted again", packed, vid, _short(e))
                continue
            tmp = final.with_name(f".{final.name}{tag}.{os.getpid()}.tmp")
            with h5py.File(tmp, "w") as out:
                for name, data in columns.items():
                    if len(data) > CONTIGUOUS_MAX_ROWS:  # as PartWriter writes a long video: resizable
                        _create(out, name, data, maxshape=(None, *data.shape[1:]))
                    else:
                        _create(out, name, data)
                _copy_attrs(src.attrs, out.attrs)
            _commit(tmp, final)
            written += 1
        fail = f["failures"]
        columns = {c: _column(fail[c]) for c in fail}
        for i in range(len(columns.get("key", []))):
            record = {c: columns[c][i] for c in columns}
            record_file = parts / (video_id(record["key"]) + FAILED_SUFFIX)
            if not record_file.exists():
                _write_text_atomic(record_file, json.dumps(record))
    return written


def _is_cache_file(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT_NAME
    except OSError:
        return False


def _attr(attrs, name: str, default=None):
    v = attrs.get(name, default)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "surrogateescape")
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
                "key": _attr(a, "key"),
                "id": part.name[: -len(PART_SUFFIX)],
                "label": _attr(a, "label", ""),
                "split": _attr(a, "split", ""),
                "num_frames": int(f["features"].shape[0]),
                "source_path": _attr(a, "source_path", ""),
                "source_size": int(_attr(a, "source_size", -1)),
                "source_mtime_ns": int(_attr(a, "source_mtime_ns", -1)),
                "shard": _attr(a, "shard", ""),
                "spec_id": _attr(a, "spec_id", ""),
                "part_size": st.st_size,
                "part_mtime_ns": st.st_mtime_ns,
            }
    except (OSError, KeyError):
        return None


def _row_of(part: Path, attrs: dict, rows: int) -> dict:
    """The index row of a part just committed with these attributes (what _part_row reads back from it)."""
    st = part.stat()
    return {
        "key": attrs["key"],
        "id": part.name[: -len(PART_SUFFIX)],
        "label": attrs.get("label") or "",
        "split": attrs.get("split") or "",
        "num_frames": rows,
        "source_path": attrs.get("source_path") or "",
        "source_size": int(attrs.get("source_size", -1)),
        "source_mtime_ns": int(attrs.get("source_mtime_ns", -1)),
        "shard": attrs.get("shard") or "",
        "spec_id": attrs.get("spec_id") or "",
        "part_size": st.st_size,
        "part_mtime_ns": st.st_mtime_ns,
    }


def _write_rows(group, rows: list[dict]) -> None:
    """The index table: one dataset per column of _INDEX_COLUMNS."""
    for col, kind in _INDEX_COLUMNS.items():
        values = [r[col] for r in rows]
        if kind is str:
            group.create_dataset(col, data=_text_column(values), dtype=h5py.string_dtype())
        else:
            group.create_dataset(col, data=np.array(values, dtype=kind))


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
        return list(ds.asstr(errors="surrogateescape")[()])
    return [int(x) for x in ds[()]]


# ------------------------------------------------------------------------------------------------------- reading
class FeatureCache:
    """Read access to a feature cache. Opens HDF5 lazily, so it can be handed to DataLoader worker processes.

    Shapes: features(key) -> (T, D) in the stored dtype; frame_indices(key) -> (T,) int64;
    timestamps(key) -> (T,) float64 seconds; frame_spans(key) -> (T, 2) int64 (caches of window rows).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = (
                f"sharded runs leave their parts in {parts_dir(self.path)}: build the index with "
                f"`pipeline merge {path}`"
                if (parts_dir(self.path) / SPEC_FILE).exists()
                else f"create it with `pipeline extract ... -o {path}`"
            )
            raise FileNotFoundError(f"no feature cache at {self.path}; {hint}")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT_NAME:
                    raise CacheError(f"{self.path} is an HDF5 file but not a pipeline feature cache")
                version = int(f.attrs["schema_version"])
                if version > SCHEMA_VERSION:
                    raise CacheError(
                        f"{self.path} uses cache schema {version}; this pipeline reads up to "
                        f"{SCHEMA_VERSION}: upgrade the package"
                    )
                self.spec = FeatureSpec.from_json(_attr(f.attrs, "spec"))
                self.dtype = _attr(f.attrs, "dtype")
                self.versions = json.loads(_attr(f.attrs, "versions", "{}"))
                self.schema_version = version
                self.layout = _attr(f.attrs, "layout", LAYOUT_PARTS)
                nested = _attr(f.attrs, "parts_layout", "") == LAYOUT_NESTED
                index = f["index"]
                cols = {c: _column(index[c]) for c in _INDEX_COLUMNS}
                fail = f["failures"]
                self._failures = [
                    dict(zip(fail.keys(), vals)) for vals in zip(*(_column(fail[c]) for c in fail.keys()))
                ]
        except OSError as e:
            raise CacheError(f"cannot read {self.path} as HDF5 ({e})") from e
        self._rows = {cols["key"][i]: {c: cols[c][i] for c in _INDEX_COLUMNS} for i in range(len(cols["key"]))}
        self._file: h5py.File | None = None
        self._pid = None
        self.packed = self.layout == LAYOUT_PACKED
        # Parts are found beside the index under its present name (never through the names recorded in its
        # links), so a cache renamed or moved together with its folder reads as before.
        self.parts = None if self.packed else parts_dir(self.path)
        self.nested = nested  # parts in subfolders; else an old flat cache
        if self.parts is not None and self._rows and not self.parts.is_dir():
            raise CacheError(
                f"{self.path} needs its parts folder {self.parts.name}/ (not found beside it): "
                f"copy it along, or make one self-contained file with `pipeline pack`"
            )
        pending = self.unindexed_parts()
        if pending:
            _warn_unindexed(self.path, pending)

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

    def missing_parts(self) -> list[str]:
        """Keys whose part file is absent from the parts folder (a partial copy); empty for a packed cache."""
        if self.parts is None:
            return []
        if not self.parts.is_dir():
            return list(self._rows)
        present = scan_parts(self.parts)
        return [k for k, r in self._rows.items() if r["id"] not in present]

    def missing_sources(self) -> list[str]:
        """Keys whose recorded source file or folder no longer exists (deleted, renamed, or its disk not
        mounted); `pipeline extract ... --prune` removes them."""
        return [k for k, r in self._rows.items() if source_missing(r["source_path"])]

    def check(self) -> dict[str, str]:
        """Read every video's data and check it against the index; returns key -> problem for the bad ones.

        Checks: the part (or packed group) opens, features are (num_frames, dim) of the cache's dtype,
        frame_indices and timestamps have num_frames rows, and every row reads (each chunk's checksum matches,
        in caches that have them; a truncated file fails too). A part with a damaged chunk is set aside, so that
        rerunning the extraction redoes it."""
        bad = {}
        for key, row in self._rows.items():
            try:
                problem = self._read(key, lambda group, n=row["num_frames"]: self._check_video(group, n))
            except CacheError as e:
                problem = str(e)
            if problem:
                bad[key] = problem
        return bad

    def _check_video(self, group, n: int) -> str | None:
        feats = group["features"]
        if feats.shape != (n, self.spec.dim):
            return f"features of shape {feats.shape}, the index says ({n}, {self.spec.dim})"
        if feats.dtype != np.dtype(self.dtype):
            return f"features of dtype {feats.dtype}, the cache stores {self.dtype}"
        if any(group[c].shape != (n,) for c in ("frame_indices", "timestamps")):
            return "frame_indices or timestamps do not have one entry per row"
        windows = self.spec.window is not None
        if windows and ("frame_spans" not in group or group["frame_spans"].shape != (n, 2)):
            return f"frame_spans missing or not of shape ({n}, 2): window rows record their frame spans"
        for c in ("features", "frame_indices", "timestamps") + (("frame_spans",) if windows else ()):
            for start in range(0, n, CHECK_ROWS):  # bounded memory for any video length
                group[c][start : start + CHECK_ROWS]
        return None

    def unindexed_parts(self) -> int:
        parts = self.parts
        if parts is None or not parts.is_dir():
            return 0
        ids = {r["id"] for r in self._rows.values()}
        return sum(1 for vid in scan_parts(parts) if vid not in ids)

    # -- reading one video
    def _row(self, key: str) -> dict:
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def part_path(self, key: str) -> Path | None:
        """The part file holding `key` (None in a packed cache, where the index file holds it)."""
        if self.parts is None:
            return None
        vid = self._row(key)["id"]
        part = part_file(self.parts, vid, self.nested)
        if not part.exists():  # a writer moved an old cache's parts into subfolders, or another index is older
            other = part_file(self.parts, vid, not self.nested)
            if other.exists():
                return other
        return part

    @contextlib.contextmanager
    def _open_video(self, key: str):
        """The HDF5 group of one video: a group of the packed file, or the root of its part file (opened for
        the call: parts are found by path, never through the index's external links)."""
        vid = self._row(key)["id"]
        if self.parts is None:
            if self._file is None or self._pid != os.getpid():  # never reuse a handle across fork
                self._file = h5py.File(self.path, "r")
                self._pid = os.getpid()
            yield self._file["videos"][vid]
            return
        part = self.part_path(key)
        try:
            f = h5py.File(part, "r")
        except FileNotFoundError:
            raise CacheError(
                f"{self.path}: the part of {printable(key)!r} ({part}) is missing; rerun the "
                f"`pipeline extract` command that made the cache to redo it"
            ) from None
        with f:
            yield f

    def _read(self, key: str, what) -> object:
        """what(group) for the video `key`; a damaged or missing file becomes one CacheError naming the
        video."""
        try:
            with self._open_video(key) as group:
                return what(group)
        except (CacheError, KeyError) as e:
            if isinstance(e, KeyError) and key not in self._rows:
                raise
            if isinstance(e, CacheError):
                raise
            problem = _short(e)
        except (OSError, ValueError, RuntimeError) as e:
            problem = _short(e)
            if DAMAGED_CHUNK in problem:
                raise self._damaged(key) from None
        where = self.part_path(key) or self.path
        raise CacheError(
            f"{self.path}: the features of {printable(key)!r} cannot be read from {where} "
            f"({problem}); the file is damaged: rerun the `pipeline extract` command that made "
            f"the cache to redo it (`pipeline info --check {self.path}` lists every damaged "
            f"video)"
        ) from None

    def _damaged(self, key: str) -> CacheError:
        """The error of a chunk whose checksum failed; a part is set aside (renamed *.h5.damaged) so that
        the next extraction sees the video as not done and redoes it."""
        part = self.part_path(key)
        where = part or self.path
        fix = "rerun the `pipeline extract` command that made the cache: it redoes this video"
        if part is not None:
            try:
                os.replace(part, part.with_name(part.name[: -len(PART_SUFFIX)] + DAMAGED_SUFFIX))
            except OSError as e:  # a read-only cache: nothing can be set aside
                fix = f"delete {part} (it could not be set aside: {e.strerror}), then rerun the extraction"
        return CacheError(
            f"{self.path}: the features of {printable(key)!r} in {where} are damaged (a checksum does not "
            f"match: the disk or a copy altered the file); {fix} (`pipeline info --check {self.path}` lists "
            f"every damaged video)"
        )

    def features(self, key: str) -> np.ndarray:
        return self._read(key, lambda g: g["features"][()])

    def frame_indices(self, key: str) -> np.ndarray:
        return self._read(key, lambda g: g["frame_indices"][()])

    def timestamps(self, key: str) -> np.ndarray:
        return self._read(key, lambda g: g["timestamps"][()])

    def frame_spans(self, key: str) -> np.ndarray | None:
        """Window rows (a video backbone): (T, 2) first and last decoded frame of each row's window, inclusive;
        None for a cache of per-frame rows."""
        if self.spec.window is None:
            return None
        return self._read(key, lambda g: g["frame_spans"][()])

    def info(self, key: str) -> dict:
        """Everything recorded about the video: label, source_path, native_fps, width, height, decoded_frames, ..."""
        return self._read(key, lambda g: {k: _attr(g.attrs, k) for k in g.attrs})

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


_WARNED_UNINDEXED: set[str] = set()


def _warn_unindexed(path: Path, pending: int) -> None:
    """Say once per process that a cache's index is behind its parts, and only when no run is writing to it (a
    running extraction is behind by design: it rebuilds the index every 30 s and at its end)."""
    name = str(path.resolve())
    if name in _WARNED_UNINDEXED or writer_active(path):
        return
    _WARNED_UNINDEXED.add(name)
    log.warning(
        "%s: %d finished videos are not in the index yet (the run that made them was interrupted); "
        "rerun the same `pipeline extract` command to resume and include them",
        path,
        pending,
    )


def _short(e: BaseException) -> str:
    """The first line of an exception's message (h5py's can run over many lines)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@dataclass
class PackResult:
    output: Path
    videos: int
    bytes: int
    seconds: float


def pack(path: str | os.PathLike, output: str | os.PathLike | None = None) -> PackResult:
    """Write the cache `path` as one self-contained HDF5 file (the same index, with each /videos/<id> a group
    that holds the data instead of a link to a part). Features are copied uncompressed, chunked (256, D).

    The file is written under a temporary name and renamed into place. Without `output` (or with output ==
    path) the cache is packed in place: CACHE.h5 is replaced and CACHE.h5.parts/ removed once the packed file
    is committed. Holds the cache's lock meanwhile, so no extraction writes to it."""
    started = time.perf_counter()
    src = Path(path)
    out = Path(output) if output is not None else src
    in_place = out.resolve() == src.resolve() if out.exists() else out == src
    cache = FeatureCache(src)
    if cache.unindexed_parts():  # finished videos of an interrupted or sharded run: index them, lose none
        merge(src)
        cache = FeatureCache(src)
    if cache.packed and in_place:
        return PackResult(src, len(cache), src.stat().st_size, 0.0)
    if not in_place and out.exists() and not _is_cache_file(out):
        raise CacheError(f"{out} exists and is not a pipeline feature cache; choose another -o path")
    lock_fd = _lock(cache.parts / ".lock", src) if cache.parts is not None and cache.parts.is_dir() else None
    try:
        if cache.unindexed_parts():
            raise CacheError(f"{src}: a run added videos while packing started; pack again when it is done")
        missing = cache.missing_parts()
        if missing:
            example = printable(missing[0])
            raise CacheError(
                f"{src}: {len(missing)} parts are missing (e.g. {example!r}); rerun the extract "
                f"command to redo them, then pack"
            )
        remove_dead_temp_files(out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(src, "r") as index, h5py.File(tmp, "w") as dst:
                _copy_attrs(index.attrs, dst.attrs)
                _set_attr(dst.attrs, "layout", LAYOUT_PACKED)
                _set_attr(dst.attrs, "parts_dir", "")
                _set_attr(dst.attrs, "updated", time.strftime("%Y-%m-%dT%H:%M:%S"))
                index.copy(index["index"], dst, "index")
                index.copy(index["failures"], dst, "failures")
                videos = dst.create_group("videos")
                for key in cache:
                    group = videos.create_group(cache._row(key)["id"])
                    cache._read(key, lambda src, group=group: _copy_video(src, group))
            _commit(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if in_place and cache.parts is not None:
            shutil.rmtree(cache.parts, ignore_errors=True)
    finally:
        if lock_fd is not None:
            _unlock(lock_fd)
        cache.close()
    return PackResult(out, len(cache), out.stat().st_size, time.perf_counter() - started)


def _copy_video(src, dst) -> None:
    for name in ("features", "frame_indices", "timestamps", "frame_spans"):
        if name in src:  # frame_spans: window rows only
            _create(dst, name, src[name][()])
    _copy_attrs(src.attrs, dst.attrs)
