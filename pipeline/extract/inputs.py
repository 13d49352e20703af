"""Turn command-line inputs (folders, files, CSV manifests) into a list of videos with keys and labels.

A video's key is its path relative to the folder given (videos/<class>/<clip>.mp4 -> "<class>/<clip>.mp4"), the file
name for a file given directly, or the path as written in a manifest. Labels come from the manifest or from the parent
folder under the folder given.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.extract.decode import IMAGE_EXTENSIONS, is_video, list_images, natural_key


@dataclass(frozen=True)
class VideoItem:
    key: str
    path: Path
    label: str | None = None
    split: str | None = None

    @property
    def kind(self) -> str:
        return "frames" if self.path.is_dir() else "video"

    def signature(self) -> tuple[int, int]:
        """(size in bytes, mtime in ns) of the source; for a frame folder, summed/maxed over its images.
        (-1, -1) when it cannot be read, so that it never matches a finished part."""
        try:
            if self.path.is_dir():
                images = list_images(self.path)
                stats = [p.stat() for p in images]
                return (sum(s.st_size for s in stats),
                        max([self.path.stat().st_mtime_ns] + [s.st_mtime_ns for s in stats]))
            st = self.path.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1


class InputError(ValueError):
    """Inputs that cannot be used at all (missing path, bad manifest, duplicate keys)."""


def _has_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
    except OSError:
        return False


def _scan_folder(root: Path) -> list[VideoItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort(key=natural_key)
        here = Path(dirpath)
        for name in sorted(filenames, key=natural_key):
            path = here / name
            if is_video(path) and not name.startswith("."):
                items.append(_item_under(root, path))
        for name in list(dirnames):
            sub = here / name
            if _has_images(sub):
                items.append(_item_under(root, sub))
    if _has_images(root):  # the folder given is itself one sequence of images
        items.append(VideoItem(key=root.name, path=root))
    return items


def _item_under(root: Path, path: Path) -> VideoItem:
    rel = path.relative_to(root)
    label = rel.parts[-2] if len(rel.parts) >= 2 else None
    return VideoItem(key=rel.as_posix(), path=path, label=label)


def read_manifest(manifest: Path) -> list[VideoItem]:
    """CSV rows `path,label[,split]`, with or without a header; paths relative to the manifest's folder."""
    items = []
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:1]] == ["path"]:
        rows = rows[1:]
    for n, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if len(cells) > 3 or not cells[0]:
            raise InputError(f"{manifest}, row {n}: expected `path,label[,split]`, got {row}")
        rel = cells[0]
        path = Path(rel) if os.path.isabs(rel) else manifest.parent / rel
        items.append(VideoItem(key=Path(rel).as_posix(), path=path,
                               label=(cells[1] or None) if len(cells) > 1 else None,
                               split=(cells[2] or None) if len(cells) > 2 else None))
    return items


def discover(inputs: list[str | os.PathLike]) -> list[VideoItem]:
    """All videos and frame folders named by `inputs`, in a stable order; raises InputError on unusable inputs."""
    items: list[VideoItem] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _scan_folder(path)
            if not found:
                raise InputError(f"{path}: no video files or image folders found in it")
            items.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            items.extend(read_manifest(path))
        elif path.is_file() or path.is_symlink() or is_video(path):
            if not path.exists() and not path.is_symlink():
                raise InputError(f"{path}: no such file or folder")
            items.append(VideoItem(key=path.name, path=path))
        else:
            raise InputError(f"{path}: no such file or folder")
    seen: dict[str, Path] = {}
    for item in items:
        if item.key in seen and seen[item.key] != item.path:
            raise InputError(f"two inputs map to the same key {item.key!r}: {seen[item.key]} and {item.path}; "
                             f"pass their common parent folder instead, or list them in a CSV manifest")
        seen[item.key] = item.path
    unique = {item.key: item for item in items}
    return list(unique.values())
