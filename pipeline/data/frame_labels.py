"""Per-frame ground truth (temporal action segmentation, event spotting) aligned to the rows of a cache.

Two formats, told apart by the path being a folder or a file:

- a folder of label files, one per video, holding one label per decoded frame, one per line (groundTruth/<video>.txt
  of Breakfast, 50Salads, GTEA). A file's path relative to the folder, without its suffix, names the video;
- a segments CSV `key,start,end,label` with half-open intervals [start, end) in seconds or in 0-based decoded frame
  numbers (--label-units).

Each cached row gets the label of the decoded frame it was made from (its frame index, or its timestamp for a CSV in
seconds), so caches extracted with --stride or --fps are labelled right. Label counts that do not match a video's
decoded frames are errors, never truncated or padded.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.config import LABEL_UNITS
from pipeline.data.cache import FeatureCache, printable
from pipeline.data.splits import KeyMatcher, SplitError

log = logging.getLogger(__name__)

MAX_LISTED = 10  # problems listed in one error message; the rest are counted
EXAMPLES = 3  # unmatched entries named in the warning
# Seconds: a timestamp this close below a segment's boundary counts as at it (decoders and CSV writers round).
TIME_TOLERANCE = 1e-6


class FrameLabelError(SplitError):
    """Frame labels that cannot be aligned to the cache; the message names the file (and line), the video, the
    numbers and the fix."""


@dataclass
class FrameLabels:
    """Per-row class names of the labelled videos of a cache."""

    rows: dict[str, np.ndarray]
    """key -> (num_frames(key),) str array: the class name of each cached row."""
    unmatched: list[str] = field(default_factory=list)
    """Entries of `source` (file paths or CSV keys) that name no video of the cache."""
    source: Path = Path()

    def classes(self) -> list[str]:
        """Every class name that some row has, sorted."""
        names: set[str] = set()
        for labels in self.rows.values():
            names.update(np.unique(labels).tolist())
        return sorted(names)


def read_frame_labels(
    path: str | os.PathLike,
    cache: FeatureCache,
    *,
    units: str | None = None,
    background: str | None = None,
    keys=None,
) -> FrameLabels:
    """The per-row labels of the videos of `cache` that `path` labels (a folder of per-frame label files, or a
    segments CSV; see the module's docstring).

    `units` ("seconds" or "frames"): what a CSV's start and end are; required for a CSV. `background`: the label
    of rows no segment covers (CSV); without it such rows are an error. `keys`: read only these videos of the
    cache. Videos that `path` does not label are absent from `rows`; entries naming no video are in `unmatched`
    (warned). Raises FrameLabelError.
    """
    source = Path(path)
    wanted = set(cache.keys() if keys is None else keys)
    if source.is_dir():
        labels = _read_folder(source, cache, wanted)
        if background is not None and labels.rows and background not in labels.classes():
            log.warning(
                "%s: the background label %r occurs in no label file (labels: %s)",
                source,
                background,
                _names(labels.classes()),
            )
    elif source.is_file():
        labels = _read_segments(source, cache, wanted, units, background)
    else:
        raise FrameLabelError(
            f"{source}: no such file or folder; give a folder of per-video label files (one label per frame) or "
            f"a segments CSV (key,start,end,label)"
        )
    if labels.unmatched:
        log.warning(
            "%s: %d entries name no video of %s (e.g. %s)",
            source,
            len(labels.unmatched),
            cache.path,
            ", ".join(repr(printable(u)) for u in labels.unmatched[:EXAMPLES]),
        )
    return labels


# -------------------------------------------------------------------------------------------------- the videos
@dataclass
class _Video:
    """What aligning labels needs to know of one cached video."""

    frames: np.ndarray  # (T,) decoded frame number of each row
    times: np.ndarray  # (T,) seconds
    decoded: int  # frames the video decoded to
    fps: float | None  # native frame rate, when known

    @property
    def duration(self) -> float:
        """Seconds: decoded frames / native fps when known, else the last timestamp plus one frame's step."""
        if self.fps:
            return self.decoded / self.fps
        if not len(self.times):
            return 0.0
        return float(self.times[-1]) + (self.decoded - int(self.frames[-1])) * self._frame_step()

    def _frame_step(self) -> float:
        """Seconds per decoded frame, measured on the rows (0 when the rows cannot tell)."""
        df, dt = np.diff(self.frames), np.diff(self.times)
        ok = df > 0
        return float(np.median(dt[ok] / df[ok])) if ok.any() else 0.0

    def describe(self) -> str:
        return f"{self.decoded} frames ({self.duration:.1f} s)"


def _video(cache: FeatureCache, key: str) -> _Video:
    frames = np.asarray(cache.frame_indices(key), np.int64)
    times = np.asarray(cache.timestamps(key), np.float64)
    info = cache.info(key)
    decoded = info.get("decoded_frames")
    decoded = int(decoded) if decoded is not None and int(decoded) > 0 else (int(frames[-1]) + 1 if len(frames) else 0)
    fps = info.get("native_fps")
    fps = float(fps) if fps is not None and math.isfinite(float(fps)) and float(fps) > 0 else None
    return _Video(frames, times, decoded, fps)


def _listed(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(map(repr, names[:n])) + (", ..." if len(names) > n else "")


# ------------------------------------------------------------------------------------ a folder of label files
def _label_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder` (hidden folders skipped too), in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return found


def _read_lines(file: Path) -> tuple[list[str], int | None]:
    """The stripped labels of one file, and the number of the first blank line before its last label (or None)."""
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise FrameLabelError(f"{file}: not a UTF-8 text file of labels ({e})") from None
    while lines and not lines[-1]:
        lines.pop()
    blank = next((n for n, line in enumerate(lines, start=1) if not line), None)
    return lines, blank


def _read_folder(folder: Path, cache: FeatureCache, wanted: set[str]) -> FrameLabels:
    files = _label_files(folder)
    if not files:
        raise FrameLabelError(
            f"{folder} holds no label file; give a folder of per-video files with one label per decoded frame "
            f"(e.g. groundTruth/<video>.txt)"
        )
    match = KeyMatcher(cache.keys())
    files_of: dict[str, Path] = {}
    unmatched, duplicates = [], []
    for file in files:
        rel = PurePosixPath(file.relative_to(folder).as_posix())
        entry = rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()
        key = match(entry)
        if key is None and len(rel.parts) > 1:  # subfolders of the labels that the cache's keys do not have
            key = match(PurePosixPath(entry).name)
        if key is None:
            unmatched.append(rel.as_posix())
        elif key in files_of:
            duplicates.append(f"{files_of[key]} and {file} both name {printable(key)!r}")
        else:
            files_of[key] = file
    if duplicates:
        raise FrameLabelError(
            f"{folder}: {_count(len(duplicates), 'video')} with more than one label file:{_listed(duplicates)}"
            f"keep one label file per video (or name them by their path, e.g. <class>/<video>.txt)"
        )
    rows, problems = {}, []
    for key, file in files_of.items():
        if key not in wanted:
            continue
        labels, blank = _read_lines(file)
        if blank is not None:
            problems.append(f"{file}, line {blank}: a blank line among the labels of {printable(key)!r}")
            continue
        video = _video(cache, key)
        if len(labels) != video.decoded:
            problems.append(f"{file}: {len(labels)} labels, but {printable(key)!r} has {video.decoded} decoded frames")
            continue
        rows[key] = np.asarray(labels, dtype=str)[video.frames]
    if problems:
        raise FrameLabelError(
            f"{folder}: {_count(len(problems), 'label file')} that do not fit their videos:{_listed(problems)}"
            f"each file must hold one label per decoded frame of its video, one per line (no blank lines); "
            f"labels are never cut or padded to fit: check that the files belong to these videos"
        )
    return FrameLabels(rows=rows, unmatched=unmatched, source=folder)


# ------------------------------------------------------------------------------------------ a segments CSV
@dataclass
class _Segment:
    line: int
    start: float
    end: float
    label: str


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_segments(
    path: Path, cache: FeatureCache, wanted: set[str], units: str | None, background: str | None
) -> FrameLabels:
    if units is None:
        raise FrameLabelError(
            f"{path}: a segments CSV (key,start,end,label) needs its units: pass --label-units seconds or "
            f"--label-units frames (0-based decoded frame numbers)"
        )
    if units not in LABEL_UNITS:
        raise FrameLabelError(f"{path}: unknown label units {units!r}; pass --label-units seconds or frames")
    seconds = units == "seconds"
    match = KeyMatcher(cache.keys())
    segments: dict[str, list[_Segment]] = {}
    unmatched: list[str] = []
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        first = True
        try:
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                cells = [c.strip() for c in row]
                if first:
                    first = False
                    if len(cells) >= 2 and _number(cells[1]) is None:
                        continue  # a header row
                if len(cells) < 4 or not cells[0] or not cells[3]:
                    problems.append(f"line {line}: expected `key,start,end,label`, got {row}")
                    continue
                start, end = _number(cells[1]), _number(cells[2])
                if start is None or end is None:
                    problems.append(f"line {line}: start and end must be numbers, got {cells[1]!r} and {cells[2]!r}")
                    continue
                if end <= start:
                    problems.append(f"line {line}: the segment ends ({end:g}) at or before its start ({start:g})")
                    continue
                if not seconds and not (start.is_integer() and end.is_integer()):
                    problems.append(
                        f"line {line}: frame numbers must be whole, got {start:g} and {end:g}: if the CSV gives "
                        f"seconds, pass --label-units seconds"
                    )
                    continue
                key = match(cells[0])
                if key is None:
                    if cells[0] not in unmatched:
                        unmatched.append(cells[0])
                elif key in wanted:
                    segments.setdefault(key, []).append(_Segment(line, start, end, cells[3]))
        except (csv.Error, UnicodeDecodeError) as e:
            raise FrameLabelError(f"{path}, line {reader.line_num}: not a readable CSV ({e})") from None
    rows, uncovered = {}, []
    for key, segs in segments.items():
        video = _video(cache, key)
        problems += _check_segments(key, segs, video, seconds)
        at = video.times + TIME_TOLERANCE if seconds else video.frames
        labels = np.full(len(at), None, dtype=object)
        for seg in segs:
            labels[(at >= seg.start) & (at < seg.end)] = seg.label
        missing = np.flatnonzero(labels == None)  # noqa: E711  (elementwise comparison)
        if len(missing):
            if background is None:
                r = missing[0]
                first_at = f"{video.times[r]:.3f} s" if seconds else f"frame {video.frames[r]}"
                uncovered.append(
                    f"{printable(key)!r}: {len(missing)} of {len(at)} rows (the first at {first_at})"
                    + _units_hint(segs, video, seconds)
                )
            labels[missing] = background
        rows[key] = labels.astype(str)
    if problems:
        listed = _listed(problems).rstrip()
        raise FrameLabelError(f"{path}: {_count(len(problems), 'problem')} in the segments:{listed}")
    if uncovered:
        raise FrameLabelError(
            f"{path}: {_count(len(uncovered), 'video')} with rows in no segment:{_listed(uncovered)}"
            f"pass --background NAME to give them a class of their own, or add segments that cover them"
        )
    return FrameLabels(rows=rows, unmatched=unmatched, source=path)


def _check_segments(key: str, segs: list[_Segment], video: _Video, seconds: bool) -> list[str]:
    """Overlaps and segments that start at or after the video's end, as messages naming the lines."""
    problems = []
    name = printable(key)
    for seg in segs:
        if seconds and seg.start > video.duration + TIME_TOLERANCE:
            problems.append(
                f"line {seg.line}: this segment of {name!r} starts at {seg.start:g} s but the video lasts "
                f"{video.duration:.1f} s ({video.decoded} frames): if the CSV gives frame numbers, pass "
                f"--label-units frames"
            )
        elif not seconds and seg.start >= video.decoded:
            problems.append(
                f"line {seg.line}: this segment of {name!r} starts at frame {seg.start:g} but the video has "
                f"{video.describe()}: if the CSV gives seconds, pass --label-units seconds"
            )
    tolerance = TIME_TOLERANCE if seconds else 0.0
    latest: _Segment | None = None  # the segment that ends last among those seen so far
    for seg in sorted(segs, key=lambda s: (s.start, s.end)):
        if latest is not None and seg.start < latest.end - tolerance:
            problems.append(
                f"lines {latest.line} and {seg.line}: segments of {name!r} overlap "
                f"([{latest.start:g}, {latest.end:g}) and [{seg.start:g}, {seg.end:g})); a row can have one "
                f"label only: make them meet (the end is exclusive)"
            )
        if latest is None or seg.end > latest.end:
            latest = seg
    return problems


def _units_hint(segs: list[_Segment], video: _Video, seconds: bool) -> str:
    """A hint for uncovered rows that wrong units would explain: frame numbers that all end within the video's
    first seconds (a CSV in seconds read as frames)."""
    if seconds or video.duration <= 0:
        return ""
    last = max(s.end for s in segs)
    if last <= video.duration + 1 < video.decoded:
        return f"; its segments end by frame {last:g}: if the CSV gives seconds, pass --label-units seconds"
    return ""
