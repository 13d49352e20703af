"""Labels and train/val splits of the videos in a cache.

A split comes from official list files (UCF101 trainlist01.txt / testlist01.txt style), from the `split` column a CSV
manifest recorded in the cache, or from a stable hash of each video's key (or group), so that adding videos never moves
an existing one to the other side.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.config import SplitConfig

log = logging.getLogger(__name__)

TRAIN_NAMES = frozenset({"train", "training", "trainval"})
VAL_NAMES = frozenset({"val", "valid", "validation", "test", "testing", "dev", "eval"})


class SplitError(ValueError):
    """Labels or splits that cannot give a usable training run; the message says which videos or classes."""


# ------------------------------------------------------------------------------------------------- key matching
def _suffixes(key: str) -> list[str]:
    """'a/b/c.avi' -> ['a/b/c.avi', 'b/c.avi', 'c.avi', 'a/b/c', 'b/c', 'c'] (with and without the extension)."""
    parts = PurePosixPath(key).parts
    out = ["/".join(parts[i:]) for i in range(len(parts))]
    stem = PurePosixPath(key).with_suffix("").as_posix() if PurePosixPath(key).suffix else None
    if stem:
        sparts = PurePosixPath(stem).parts
        out += ["/".join(sparts[i:]) for i in range(len(sparts))]
    return out


class KeyMatcher:
    """Finds the cache key an entry of a list or CSV refers to: the exact key, else the only key that ends with the
    entry's path (with or without its extension), e.g. 'Archery/v_Archery_g01_c01.avi' for 'UCF-101/Archery/...'."""

    def __init__(self, keys: list[str]):
        self.exact = set(keys)
        self.by_suffix: dict[str, set[str]] = defaultdict(set)
        for key in keys:
            for s in _suffixes(key):
                self.by_suffix[s].add(key)

    def __call__(self, entry: str) -> str | None:
        entry = entry.strip().replace("\\", "/")
        while entry.startswith("./"):
            entry = entry[2:]
        if entry in self.exact:
            return entry
        for candidate in (
            entry,
            PurePosixPath(entry).with_suffix("").as_posix() if PurePosixPath(entry).suffix else None,
        ):
            if candidate and len(self.by_suffix.get(candidate, ())) == 1:
                return next(iter(self.by_suffix[candidate]))
        return None


def read_list(path: Path) -> list[str]:
    """Entries of a split list: the first field of each line ('ApplyEyeMakeup/v_..._c01.avi 1' -> the path)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(re.split(r"[\s,]+", line, maxsplit=1)[0])
    if not entries:
        raise SplitError(f"{path} lists no videos")
    return entries


def read_labels_csv(path: Path, keys: list[str]) -> dict[str, str]:
    """CSV rows `key,label` (header optional) -> {cache key: label}; rows matching no key are reported."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["key", "label"], ["path", "label"]):
        rows = rows[1:]
    match = KeyMatcher(keys)
    labels, unmatched = {}, []
    for n, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[1].strip():
            raise SplitError(f"{path}, row {n}: expected `key,label`, got {row}")
        key = match(row[0])
        if key is None:
            unmatched.append(row[0])
        else:
            labels[key] = row[1].strip()
    if unmatched:
        log.warning("%s: %d rows name no video of the cache (e.g. %s)", path, len(unmatched), unmatched[0])
    if not labels:
        raise SplitError(
            f"{path}: no row names a video of the cache (keys look like {keys[0]!r})"
            if keys
            else f"{path}: the cache holds no videos"
        )
    return labels


# ------------------------------------------------------------------------------------------------------ splits
@dataclass
class Split:
    """Video keys on each side, in cache order, and how the split was made."""

    train: list[str]
    val: list[str]
    method: str
    excluded: dict[str, str] = field(default_factory=dict)
    """key -> why it is in neither side (no label, not in a list, unknown split name)."""

    def sizes(self) -> str:
        return f"{len(self.train)} train / {len(self.val)} val ({self.method})"


def stable_unit(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on (seed, key): the same on every machine and every run."""
    # surrogateescape: keys of file names that are not UTF-8 hash as their raw bytes (valid keys hash as
    # before)
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def group_of(key: str, pattern: re.Pattern | None) -> str:
    """The group a key belongs to: the regex's first group (or whole match); the key itself when it does not match."""
    if pattern is None:
        return key
    m = pattern.search(key)
    if m is None:
        return key
    return m.group(1) if m.groups() else m.group(0)


def random_split(labels: dict[str, str], fraction: float, seed: int, group_regex: str | None = None) -> Split:
    """Per-video hash split: a video (or its whole group) goes to val when hash(seed, group) < fraction.

    Each video's side depends on its own key only, so adding videos never moves existing ones; a class keeps about
    `fraction` of its videos in val on average (a hash split, not an exact per-class count). Small classes are
    fixed up: a class of one group always trains (a class with no train video could never be predicted), and a
    class of >= 2 groups whose hashes all fall on one side gets its lowest (highest) group moved across, so that
    both sides see it.
    """
    pattern = re.compile(group_regex) if group_regex else None
    group = {k: group_of(k, pattern) for k in labels}
    h = {g: stable_unit(g, seed) for g in set(group.values())}
    to_val = {g: u < fraction for g, u in h.items()}
    groups_of_class: dict[str, set[str]] = defaultdict(set)
    for k, c in labels.items():
        groups_of_class[c].add(group[k])
    for c in sorted(groups_of_class):
        gs = sorted(groups_of_class[c], key=lambda g: h[g])
        if len(gs) < 2:
            to_val[gs[0]] = False
            continue
        if not any(to_val[g] for g in gs):
            to_val[gs[0]] = True
        if all(to_val[g] for g in gs):
            to_val[gs[-1]] = False
    train = [k for k in labels if not to_val[group[k]]]
    val = [k for k in labels if to_val[group[k]]]
    method = f"random {fraction:g} per class, split seed {seed}" + (f", groups {group_regex!r}" if pattern else "")
    return Split(train, val, method)


def list_split(keys: list[str], labels: dict[str, str], train_list: Path | None, val_list: Path | None) -> Split:
    """Official lists: videos in the train list train, those in the val list validate; a missing list means 'all
    the other labelled videos'."""
    match = KeyMatcher(keys)
    sides: dict[str, set[str]] = {}
    for name, path in (("train", train_list), ("val", val_list)):
        if path is None:
            continue
        entries = read_list(path)
        found = {match(e) for e in entries}
        found.discard(None)
        missing = len(entries) - len(found)
        if missing:
            log.warning("%s: %d of %d entries name no video of the cache", path, missing, len(entries))
        sides[name] = found
    if "train" in sides and "val" in sides:
        both = sides["train"] & sides["val"]
        if both:
            raise SplitError(f"{len(both)} videos are in both --train-list and --val-list (e.g. {sorted(both)[0]!r})")
    excluded = {}
    train, val = [], []
    for k in labels:
        in_train = k in sides["train"] if "train" in sides else k not in sides["val"]
        in_val = k in sides["val"] if "val" in sides else k not in sides["train"]
        if in_train:
            train.append(k)
        elif in_val:
            val.append(k)
        else:
            excluded[k] = "in neither split list"
    names = " + ".join(str(p.name) for p in (train_list, val_list) if p is not None)
    return Split(train, val, f"lists {names}", excluded)


def column_split(labels: dict[str, str], splits: dict[str, str]) -> Split:
    """The split column recorded in the cache (from a CSV manifest's third column)."""
    train, val, excluded = [], [], {}
    for k in labels:
        s = (splits.get(k) or "").strip().lower()
        if s in TRAIN_NAMES:
            train.append(k)
        elif s in VAL_NAMES:
            val.append(k)
        else:
            excluded[k] = f"split {s!r} is neither train nor val" if s else "no split recorded"
    return Split(train, val, "split column of the cache", excluded)


def make_split(
    labels: dict[str, str],
    settings: SplitConfig | None = None,
    *,
    cache_splits: dict[str, str] | None = None,
    all_keys: list[str] | None = None,
) -> Split:
    """Split the labelled videos (`labels`: key -> class name) as `settings` say (default: SplitConfig()'s) and
    check that the result can be trained on. `cache_splits`: the split column of the cache or manifest.

    Raises SplitError for an empty side or a class that has no train video.
    """
    settings = settings or SplitConfig()
    mode, train_list, val_list = settings.split, settings.train_list, settings.val_list
    val_fraction, split_seed, group_regex = settings.val_fraction, settings.split_seed, settings.group_regex
    cache_splits = cache_splits or {}
    if train_list is not None or val_list is not None:
        split = list_split(all_keys or list(labels), labels, train_list, val_list)
    elif mode == "cache" or (mode == "auto" and any(cache_splits.get(k) for k in labels)):
        if not any(cache_splits.get(k) for k in labels):
            raise SplitError(
                "--split cache: the cache records no split for any video (give a CSV manifest with a "
                "split column to `pipeline extract`, or use --split random)"
            )
        split = column_split(labels, cache_splits)
    else:
        split = random_split(labels, val_fraction, split_seed, group_regex)
    if split.excluded:
        reasons = Counter(split.excluded.values())
        log.warning(
            "%d labelled videos are in neither split: %s",
            len(split.excluded),
            "; ".join(f"{n} {r}" for r, n in reasons.most_common()),
        )
    check_split(split, labels)
    return split


def check_split(split: Split, labels: dict[str, str]) -> None:
    for side in ("train", "val"):
        if not getattr(split, side):
            raise SplitError(
                f"the {side} split is empty ({split.sizes()}); check the split lists, the cache's "
                f"split column or --val-fraction"
            )
    train_classes = {labels[k] for k in split.train}
    missing = sorted({labels[k] for k in split.val} - train_classes)
    if missing:
        raise SplitError(
            f"classes missing from the train split: {', '.join(missing[:10])}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            + "; their val videos could never be classified right"
        )


# ---------------------------------------------------------------------------------------------- recorded splits
SPLIT_FILE = "split.csv"  # in a run folder: every video the run trained or validated on, and its side


def write_split(path: Path, split: Split, labels: dict[str, str]) -> None:
    """CSV `key,label,split` (train or val) of every video of `split`, so later stages can reuse it exactly."""
    # surrogateescape: keys of non-UTF-8 file names are written as their raw bytes, as the cache keeps them
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "split"])
        for side in ("train", "val"):
            for key in getattr(split, side):
                writer.writerow([key, labels[key], side])


def read_split(path: Path) -> dict[str, str]:
    """key -> 'train' or 'val' from a file written by `write_split`."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"key", "split"} <= set(rows[0]):
        raise SplitError(f"{path} is not a split file (a CSV with columns key,label,split)")
    return {r["key"]: r["split"] for r in rows}
