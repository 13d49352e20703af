"""Turn command-line inputs (folders, files, CSV manifests) into a list of videos with keys and labels.

A video's key is its path relative to the folder given (videos/<class>/<clip>.mp4 -> "<class>/<clip>.mp4"), the file
name for a file given directly, or the path as written in a manifest. Labels come from the manifest or from the parent
folder under the folder given.

Folders are searched following symbolic links, but no directory is searched twice (directories are told apart
by device and inode), so a link loop (`ln -s . loop`) is skipped with a warning, and a file or folder reached
through two paths is one video. A file name that is not valid UTF-8 gives a key holding surrogate escapes
(os.fsdecode); the cache stores it reversibly (docs/cache-format.md)."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.cache import printable
from pipeline.extract.decode import IMAGE_EXTENSIONS, is_video, list_images, natural_key

log = logging.getLogger(__name__)


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
                return (
                    sum(s.st_size for s in stats),
                    max([self.path.stat().st_mtime_ns] + [s.st_mtime_ns for s in stats]),
                )
            st = self.path.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1


class InputError(ValueError):
    """Inputs that cannot be used at all (missing path, bad manifest, duplicate keys)."""


@dataclass
class _Search:
    """What one discovery has seen: directories and files by (device, inode), and folders it could not
    list."""

    dirs: dict[tuple[int, int], Path] = field(default_factory=dict)
    files: dict[tuple[int, int], Path] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def first_visit(self, path: Path, table: dict) -> bool:
        """Record `path`; False (with a warning) when it is a directory or file already met under another
        path."""
        try:
            st = path.stat()
        except OSError:
            return True  # a broken link: kept, so that it is reported as a failed input
        ident = (st.st_dev, st.st_ino)
        if ident in table:
            what = "a symlink loop or a second path to" if table is self.dirs else "the same file as"
            log.warning("skipping %s: %s %s, already found", printable(str(path)), what, printable(str(table[ident])))
            return False
        table[ident] = path
        return True


def _entries(folder: Path, search: _Search) -> list[os.DirEntry] | None:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        reason = f"cannot list the folder ({e.strerror or e}); its videos were not searched"
        search.unreadable[str(folder)] = reason
        log.warning(
            "%s: cannot list the folder (%s); its videos were not searched", printable(str(folder)), e.strerror or e
        )
        return None


def _has_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in it)
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _scan_folder(root: Path, search: _Search | None = None) -> list[VideoItem]:
    """Videos and image folders under `root`, depth first in natural order (a folder's files, then its image
    folders, then its subfolders' contents), following links but never entering a directory twice.

    Symbolic links are followed only after the real tree is searched, so a video reached both directly and
    through a link keeps its direct path (key and label)."""
    search = search or _Search()
    items: list[VideoItem] = []
    if not search.first_visit(root, search.dirs):  # given twice, or inside a folder given before
        return items
    stack = [root]
    links: list[tuple[Path, bool]] = []  # (path, is a directory), in the order met
    while stack or links:
        if not stack:
            path, is_dir = links.pop(0)
            if is_dir:
                if search.first_visit(path, search.dirs):
                    if _has_images(path):
                        items.append(_item_under(root, path))
                    stack.append(path)
            elif _wanted_video(path) and search.first_visit(path, search.files):
                items.append(_item_under(root, path))
            continue
        here = stack.pop()
        entries = _entries(here, search)
        if entries is None:
            continue
        entries.sort(key=lambda e: natural_key(e.name))
        subdirs = []
        for entry in entries:
            path = here / entry.name
            if entry.is_symlink():
                links.append((path, _is_dir(entry)))
            elif _is_dir(entry):
                if search.first_visit(path, search.dirs):
                    subdirs.append(path)
            elif _wanted_video(path) and search.first_visit(path, search.files):
                items.append(_item_under(root, path))
        items.extend(_item_under(root, sub) for sub in subdirs if _has_images(sub))
        stack.extend(reversed(subdirs))
    if _has_images(root):  # the folder given is itself one sequence of images
        items.append(VideoItem(key=root.name, path=root))
    return items


def _wanted_video(path: Path) -> bool:
    return is_video(path) and not path.name.startswith(".")


def _item_under(root: Path, path: Path) -> VideoItem:
    rel = path.relative_to(root)
    label = rel.parts[-2] if len(rel.parts) >= 2 else None
    return VideoItem(key=rel.as_posix(), path=path, label=label)


def read_manifest(manifest: Path) -> list[VideoItem]:
    """CSV rows `path,label[,split]`, with or without a header; paths relative to the manifest's folder.

    Refused, naming the rows: text that is not UTF-8, a manifest without rows, and one path given two labels
    or splits (a path listed twice alike is one video). The one exception to UTF-8: a path cell holding the
    raw bytes of an existing file's name that is not UTF-8 (as `ls > list.csv` writes it) names that file."""
    data = manifest.read_bytes()
    text = data.decode("utf-8-sig", "surrogateescape")  # strict below, row by row, so the error names the row
    rows = [
        (n, r)
        for n, r in enumerate(csv.reader(io.StringIO(text, newline="")), start=1)
        if r and any(c.strip() for c in r)
    ]
    for line, row in rows:
        _check_utf8_row(manifest, line, row)
    if rows and [c.strip().lower() for c in rows[0][1][:1]] == ["path"]:
        rows = rows[1:]
    if not rows:
        raise InputError(f"{manifest}: no rows; expected one `path,label[,split]` line per video")
    items: dict[str, tuple[int, VideoItem]] = {}
    for line, row in rows:
        cells = [c.strip() for c in row]
        if len(cells) > 3 or not cells[0]:
            raise InputError(f"{manifest}, row {line}: expected `path,label[,split]`, got {row}")
        rel = cells[0]
        path = Path(rel) if os.path.isabs(rel) else manifest.parent / rel
        item = VideoItem(
            key=Path(rel).as_posix(),
            path=path,
            label=(cells[1] or None) if len(cells) > 1 else None,
            split=(cells[2] or None) if len(cells) > 2 else None,
        )
        if item.key in items:
            first, other = items[item.key]
            if (other.label, other.split) != (item.label, item.split):
                raise InputError(
                    f"{manifest}, rows {first} and {line}: {item.key!r} is listed twice with "
                    f"different labels or splits ({other.label!r}/{other.split!r} and "
                    f"{item.label!r}/{item.split!r}); keep one"
                )
            continue
        items[item.key] = (line, item)
    return [item for _, item in items.values()]


def _check_utf8_row(manifest: Path, line: int, row: list[str]) -> None:
    for n, cell in enumerate(row):
        try:
            cell.encode("utf-8")
            continue
        except UnicodeEncodeError as e:
            bad = ord(cell[e.start]) - 0xDC00
        path = Path(cell.strip())
        if n == 0 and (path if path.is_absolute() else manifest.parent / path).exists():
            continue  # the raw name of a file that exists: a key like those found in folders
        raise InputError(f"{manifest}, row {line}: not UTF-8 text (byte 0x{bad:02x}); save the manifest as UTF-8")


def discover(inputs: list[str | os.PathLike], unreadable: dict[str, str] | None = None) -> list[VideoItem]:
    """All videos and frame folders named by `inputs`, in a stable order; raises InputError on unusable
    inputs.

    Folders under the inputs that cannot be listed are skipped with a warning and added to `unreadable`
    (path -> reason) when given, so that the caller can report them."""
    items: list[VideoItem] = []
    search = _Search()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            known = len(search.dirs)
            found = _scan_folder(path, search)
            # a folder met before (given twice, or inside one given before) adds no directory and is no error
            if not found and len(search.dirs) > known:
                if str(path) in search.unreadable:
                    raise InputError(f"{printable(str(path))}: {search.unreadable[str(path)]}")
                raise InputError(f"{printable(str(path))}: no video files or image folders found in it")
            items.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            items.extend(read_manifest(path))
        elif path.is_file() or path.is_symlink() or is_video(path):
            if not path.exists() and not path.is_symlink():
                raise InputError(f"{printable(str(path))}: no such file or folder")
            items.append(VideoItem(key=path.name, path=path))
        else:
            raise InputError(f"{printable(str(path))}: no such file or folder")
    seen: dict[str, Path] = {}
    for item in items:
        if item.key in seen and seen[item.key] != item.path:
            first, second = printable(str(seen[item.key])), printable(str(item.path))
            raise InputError(
                f"two inputs map to the same key {printable(item.key)!r}: {first} and {second}; "
                f"pass their common parent folder instead, or list them in a CSV manifest"
            )
        seen[item.key] = item.path
    if unreadable is not None:
        unreadable.update(search.unreadable)
    unique = {item.key: item for item in items}
    return list(unique.values())
