"""Image sources: the list of (path, label) that every backend reads, and the bad-file report.

Three kinds of source, all giving absolute paths and integer labels:

- ``file_list_source(root, list_file)``: one path per line, relative to ``root``, optionally
  followed by whitespace and an integer label (the seed's and EasyCV's format); UTF-8, with or
  without a byte-order mark. Blank lines and lines starting with ``#`` are ignored. Paths may
  contain spaces; see :func:`_parse_line` for how a line splits into path and label. Labels are
  ``0 <= label < 2**63`` (int64, what the loaders deliver); lines without a label get label
  ``-1``. Absolute paths are accepted only when
  they lie inside ``root``; a path that escapes ``root`` (``../``) is an error. Containment is
  checked on the normalised path, not the resolved one, so symlinks inside the root may point
  anywhere (datasets are often assembled from links).
- ``image_folder_source(root)``: torchvision's ImageFolder: each sorted subfolder of ``root`` is
  a class (label = its index), images are found recursively inside it.
- ``folder_scan_source(root)``: every image file under ``root``, recursively, label ``-1``
  (MAE pretraining needs no labels; -1 says "unlabelled" rather than pretending class 0).

Files listed but missing on disk are skipped, not fatal: on a 1M-line list one stale entry must
not stop a run. They are kept in ``Source.missing`` and go into the run's bad-file report with
the reason ``missing``. Errors that make the run meaningless (missing root, empty source, a path
escaping the root, a bad label) raise :class:`DataError` with a one-line message, before training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger("fastmae.data")

# Formats both PIL and DALI (nvImageCodec) decode.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)

UNLABELLED = -1


class DataError(ValueError):
    """A data problem that stops the run before training; ``str(err)`` is one line fit for a CLI."""


class ShardDataError(DataError):
    """A data problem met while reading one process's shard (a slot none of whose stand-ins can be
    read, a DALI failure no file explains): under torchrun the other ranks may never meet it, so
    the rank that does reports it."""


@dataclass
class Source:
    """The samples of a data set.

    Attributes:
        root: the data root (absolute).
        samples: ``[(absolute_path, label), ...]`` in a fixed order; label -1 when unlabelled.
        kind: ``"list"``, ``"imagefolder"`` or ``"scan"``.
        classes: class folder names for ``"imagefolder"``, else ``None``.
        missing: listed files that do not exist (already removed from ``samples``).
    """

    root: str
    samples: list[tuple[str, int]]
    kind: str
    classes: list[str] | None = None
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]


class PackedSamples:
    """``samples[j] -> (path, label)`` over three flat buffers instead of a list of tuples.

    For DataLoader workers: a forked worker that reads a list's items writes their reference counts,
    and so copies every page of them it touches; at 1.28M samples that was ~250 MiB per worker
    (8 workers x 8 GPUs: ~15 GiB a node). Reading from these buffers writes nothing (0.3 MiB for
    200k samples). Paths keep their bytes (``os.fsencode``), so a name that is not UTF-8 comes back
    as the ``os`` module gave it.
    """

    def __init__(self, samples: Iterable[tuple[str, int]]):
        encoded, labels = [], []
        for path, label in samples:
            encoded.append(os.fsencode(path))
            labels.append(label)
        self._paths = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, j: int) -> tuple[str, int]:
        j = range(len(self))[j]  # bounds and negative indices as a list's
        start = int(self._ends[j - 1]) if j else 0
        return os.fsdecode(self._paths[start : int(self._ends[j])]), int(self._labels[j])


def samples_digest(source: Source) -> str:
    """A short fingerprint of the samples (paths relative to the root, labels, order): equal for the
    same data set wherever it is mounted; another when a file is renamed, replaced or relabelled.
    Computed once per source (every checkpoint records it: ImageNet's took 3.6 s with relpath)."""
    cached = source.__dict__.get("_digest")
    if cached is not None and cached[0] == len(source.samples):
        return cached[1]
    h = hashlib.sha256()
    prefix = os.path.join(source.root, "")
    for path, label in source.samples:
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, source.root)
        h.update(f"{rel}\t{label}\n".encode(errors="surrogateescape"))
    source.__dict__["_digest"] = (len(source.samples), h.hexdigest()[:16])
    return source.__dict__["_digest"][1]


def _check_root(root: str | os.PathLike) -> str:
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root_s):
        raise DataError(f"data root {root_s} does not exist or is not a folder")
    return root_s


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in ``os.walk``'s sorted top-down order (follows
    symlinked folders).

    Each folder is entered once, by the first path that reaches it in sorted walk order: a link
    back up the tree (``imgs/up -> ..``) or to itself would otherwise repeat files without end,
    and two links to one folder would list its files twice. Folders are told apart by
    ``(st_dev, st_ino)``. Only regular files are taken (a broken link too: it is reported as
    unreadable): a FIFO named ``x.jpg`` hung every loader that opened it. The directory entries'
    types come with the listing, so this costs no ``stat`` per file.
    """
    found: list[str] = []
    try:
        st = os.stat(folder)
    except OSError:
        return found
    visited = {(st.st_dev, st.st_ino)}
    stack = [folder]
    while stack:  # depth first, each folder's files before its subfolders, as os.walk(topdown=True)
        dirpath = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as os.walk does
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    st = os.stat(entry.path)
                except OSError:  # vanished, or a link loop the OS refuses: nothing to read there
                    continue
                if (st.st_dev, st.st_ino) not in visited:
                    visited.add((st.st_dev, st.st_ino))
                    subdirs.append(entry.path)
            elif _is_image(entry.name) and _regular_or_broken_link(entry):
                found.append(entry.path)
        stack.extend(reversed(subdirs))
    return found


def _regular_or_broken_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:  # a link loop (ELOOP): broken too
        return entry.is_symlink()


_INTEGER = re.compile(r"[+-]?[0-9]+")
MAX_LABEL = 2**63 - 1  # labels travel as int64


def _parse_line(line: str, where: str) -> tuple[str, int]:
    """``(relative path, label)`` of a stripped, non-empty list line.

    The line splits at its last run of whitespace:

    - the last field is an integer (ASCII digits, optional sign): the rest is the path and the
      field its label, which must be ``0 <= label < 2**63`` (else an error);
    - otherwise, when the rest ends in an image extension and the whole line does not
      (``a.jpg cat``, ``a.jpg 1.5``), the last field is a bad label: an error;
    - otherwise the whole line is the path, unlabelled (``my photo.jpg``).

    A path whose last space-separated part is an integer (``scan 001``) therefore reads as a
    labelled path; give it a label (``scan 001 0``) to keep the whole name.
    """
    fields = line.rsplit(maxsplit=1)
    if len(fields) == 1:
        return fields[0], UNLABELLED
    rel, label_s = fields
    if _INTEGER.fullmatch(label_s) is None:
        if _is_image(rel) and not _is_image(line):
            raise DataError(f"{where}: bad label {label_s!r} (expected 'path [integer label]')")
        return line, UNLABELLED
    label = int(label_s)
    if label < 0:
        raise DataError(f"{where}: bad label {label} (labels must be >= 0)")
    if label > MAX_LABEL:
        raise DataError(f"{where}: bad label {label} (labels must be < 2**63, they are int64)")
    return rel, label


def file_list_source(root: str | os.PathLike, list_file: str | os.PathLike, check_files: bool = True) -> Source:
    """A root folder plus a file list (``path [label]`` per line, paths relative to ``root``).

    Args:
        root: folder the listed paths are relative to.
        list_file: the list (UTF-8 text; a leading byte-order mark is dropped; a path that is not
            UTF-8 is kept as its bytes, as the file system names it).
        check_files: stat every listed file and move the missing ones to ``Source.missing``.
            With ``False`` a missing file is found when it is read and reported as a bad file.
    """
    root_s = _check_root(root)
    list_s = os.path.abspath(os.fspath(list_file))
    if not os.path.isfile(list_s):
        raise DataError(f"file list {list_s} does not exist")
    inside = os.path.join(root_s, "")  # root_s is normalised: a normalised path under it starts so
    samples: list[tuple[str, int]] = []
    missing: list[str] = []
    # -sig: a BOM would join the first path; surrogateescape: a name that is not UTF-8 (a Latin-1
    # file name) keeps its bytes, which the os module gives back when opening it, as os.walk does
    with open(list_s, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_s}:{lineno}"
            rel, label = _parse_line(line, where)
            path = os.path.normpath(os.path.join(root_s, rel))
            if path != root_s and not path.startswith(inside):  # commonpath took 3.4 s for 1.28M lines
                raise DataError(f"{where}: path {rel!r} escapes the data root {root_s}")
            if check_files and not os.path.isfile(path):
                missing.append(path)
                continue
            samples.append((path, label))
    if not samples:
        extra = f" ({len(missing)} listed files are missing)" if missing else ""
        raise DataError(f"file list {list_s} gives no images{extra}")
    if missing:  # one line: a line per file was 20k lines per process for 20k missing files
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        logger.warning(
            "%d files listed in %s are missing: left out of the data set (%s; the bad-file report lists them all)",
            len(missing), list_s, shown,
        )  # fmt: skip
    return Source(root=root_s, samples=samples, kind="list", missing=missing)


def image_folder_source(root: str | os.PathLike) -> Source:
    """An ImageFolder tree: ``root/<class>/**/<image>``; label = index of the class in sorted order."""
    root_s = _check_root(root)
    classes = sorted(e.name for e in os.scandir(root_s) if e.is_dir())
    if not classes:
        raise DataError(f"data root {root_s} has no class subfolders (expected root/<class>/<image>)")
    samples = [(p, label) for label, c in enumerate(classes) for p in _scan(os.path.join(root_s, c))]
    if not samples:
        raise DataError(f"no images found in the class folders of {root_s} ({', '.join(IMAGE_EXTENSIONS)})")
    return Source(root=root_s, samples=samples, kind="imagefolder", classes=classes)


def folder_scan_source(root: str | os.PathLike) -> Source:
    """Every image file under ``root``, recursively, sorted by path; label -1."""
    root_s = _check_root(root)
    samples = [(p, UNLABELLED) for p in _scan(root_s)]
    if not samples:
        raise DataError(f"no images found under {root_s} ({', '.join(IMAGE_EXTENSIONS)})")
    return Source(root=root_s, samples=samples, kind="scan")


def open_source(
    root: str | os.PathLike,
    list_file: str | os.PathLike | None = None,
    kind: str = "auto",
    check_files: bool = True,
) -> Source:
    """Open a source by kind: ``"list"`` (needs ``list_file``), ``"imagefolder"``, ``"scan"`` or ``"auto"``.

    ``"auto"``: a file list when ``list_file`` is given; else ImageFolder when ``root`` holds
    subfolders and no images of its own; else a recursive scan. ``check_files``: see
    :func:`file_list_source`.
    """
    if kind == "auto":
        if list_file is not None:
            kind = "list"
        else:
            root_s = _check_root(root)
            entries = list(os.scandir(root_s))
            has_dirs = any(e.is_dir() for e in entries)
            has_images = any(e.is_file() and _is_image(e.name) for e in entries)
            kind = "imagefolder" if has_dirs and not has_images else "scan"
    if kind == "list":
        if list_file is None:
            raise DataError("source kind 'list' needs a file list")
        return file_list_source(root, list_file, check_files)
    if kind == "imagefolder":
        return image_folder_source(root)
    if kind == "scan":
        return folder_scan_source(root)
    raise DataError(f"unknown source kind {kind!r} (expected auto, list, imagefolder or scan)")


class BadFileReport:
    """Files skipped because they could not be read: counted, written to a file, the first
    :attr:`LOG_EACH` logged one by one.

    Each line of ``report_dir/bad_files.txt`` (``bad_files.rank<r>.txt`` when ``world_size > 1``)
    is ``<path>\\t<reason>``; the file is appended to as files are found, so it survives a crash.
    It is UTF-8 with ``surrogateescape``: a path whose name is not valid UTF-8 (a str with
    surrogates, as ``os`` gives it) is written as its original bytes and read back unchanged.
    An existing file is read back (a resumed run's); :meth:`discard` clears a folder for a fresh
    run, :meth:`merge` joins the ranks' files at a run's end.
    """

    PATTERN = "bad_files*.txt"
    LOG_EACH = 20  # unreadable files logged one by one; the report lists every one

    def __init__(
        self,
        report_dir: str | os.PathLike | None = None,
        rank: int = 0,
        world_size: int = 1,
        outcome: str = "a stand-in takes its place",
    ):
        self.outcome = outcome  # what the log says becomes of an unreadable file
        self.report_path: Path | None = None
        if report_dir is not None:
            name = "bad_files.txt" if world_size == 1 else f"bad_files.rank{rank}.txt"
            self.report_path = Path(report_dir) / name
        self._reasons: dict[str, str] = {}
        self._logged = 0  # unreadable files logged one by one, up to LOG_EACH
        self._lock = threading.Lock()
        if self.report_path is not None:  # a resumed run's
            self._reasons.update(_read_report(self.report_path))

    def add(self, path: str, reason: str) -> bool:
        """Record a bad file; returns False when it was already recorded."""
        reason = " ".join(reason.split())  # one line per file
        with self._lock:
            if path in self._reasons:
                return False
            self._reasons[path] = reason
            # a missing listed file was dropped from the list before anything was drawn, and the
            # source said so in one line when it was opened: it is only written to the report here
            if reason != "missing" and self._logged < self.LOG_EACH:
                self._logged += 1
                logger.warning("unreadable image %s (%s): %s", path, reason, self.outcome)
                if self._logged == self.LOG_EACH:  # a broken data set: thousands of lines otherwise
                    where = f"{self.report_path} lists them all" if self.report_path else "they are counted"
                    logger.warning("further unreadable images are not logged one by one: %s", where)
            if self.report_path is not None:
                self.report_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.report_path, "a", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(f"{path}\t{reason}\n")
        return True

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        for path, reason in items:
            self.add(path, reason)

    def __contains__(self, path: str) -> bool:
        return path in self._reasons

    @property
    def count(self) -> int:
        return len(self._reasons)

    @property
    def paths(self) -> list[str]:
        return list(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    @classmethod
    def discard(cls, report_dir: str | os.PathLike) -> None:
        """Remove the reports in ``report_dir`` before a fresh run: a run killed there before its
        first checkpoint leaves one, and its files are not the new run's (with another data set,
        none of them may be)."""
        for path in Path(report_dir).glob(cls.PATTERN):
            path.unlink(missing_ok=True)

    @classmethod
    def merge(cls, report_dir: str | os.PathLike) -> tuple[int, Path | None]:
        """(distinct bad files, the report listing them all) over every report in ``report_dir``.

        Under torchrun each rank writes its own (``bad_files.rank<r>.txt``), and a resumed run's
        world size may differ from its first's: they are joined into ``bad_files.txt`` (each path
        once, with its first reason; also where one rank alone met bad files, so that the list is always
        there), written atomically. Call it once every rank has finished writing (after a barrier).
        """
        files = sorted(Path(report_dir).glob(cls.PATTERN))
        merged: dict[str, str] = {}
        for path in files:
            for bad, reason in _read_report(path).items():
                merged.setdefault(bad, reason)
        if not merged:
            return 0, None
        out = Path(report_dir) / "bad_files.txt"
        if files == [out]:  # a single process: its own report is the list
            return len(merged), out
        tmp = out.with_name(out.name + ".tmp")
        lines = "".join(f"{bad}\t{reason}\n" for bad, reason in merged.items())
        tmp.write_text(lines, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, out)
        return len(merged), out


def _read_report(path: Path) -> dict[str, str]:
    """A report's ``{path: reason}``: empty for a missing file, without a torn last line (a kill
    mid-write)."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return {}
    reasons: dict[str, str] = {}
    for line in text.split("\n")[:-1]:  # the last piece is "" or a torn line
        bad, tab, reason = line.partition("\t")
        if tab:
            reasons.setdefault(bad, reason)
    return reasons
