"""The archive on disk: its folders, its lock, and how files get into it.

Everything fetcher keeps for itself lives under ``<root>/.fetcher/`` (state
database, lock, work folder), so an archive is self-contained and can be moved
or copied whole. Files reach their visible place only by ``os.replace`` from the
work folder, which is on the same filesystem: a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArchiveError, LockedError

META_DIR = ".fetcher"
SIDECAR_NAME = "task.json"


class Archive:
    """One archive root and the paths fetcher uses inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.meta_dir = self.root / META_DIR
        self.work_dir = self.meta_dir / "work"
        self.db_path = self.meta_dir / "state.sqlite"
        self.lock_path = self.meta_dir / "lock"

    def exists(self) -> bool:
        return self.db_path.is_file()

    def prepare(self) -> None:
        """Create the archive's folders and clear work files a killed run left behind."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create archive {str(self.root)!r}: {exc.strerror}") from exc

    def clean_work(self) -> None:
        """Remove stale work files; only safe while holding the lock."""
        try:
            for leftover in self.work_dir.iterdir():
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise archive_error(exc, self.work_dir) from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the archive's lock for the duration; a second holder gets LockedError at once."""
        try:
            handle = self.lock_path.open("a+")
        except OSError as exc:
            raise archive_error(exc, self.lock_path) from exc
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(
                    f"another fetcher run holds the lock on {str(self.root)!r}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def work_path(self, task_id: str, index: int) -> Path:
        """A work file name that is stable per file (for resume) and always short."""
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
        return self.work_dir / f"{digest}-{index}.part"

    def resolve(self, relative: PurePosixPath | str) -> Path:
        """An archive-relative path as an absolute one, refusing anything that escapes."""
        candidate = (self.root / relative).resolve()
        root = self.root.resolve()
        if candidate == root or root not in candidate.parents:
            raise ArchiveError(f"refusing path {str(relative)!r}: outside the archive")
        return candidate

    def place(self, work_file: Path, relative: PurePosixPath) -> Path:
        """Move a finished work file to its place in the archive, atomically."""
        target = self.resolve(relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            work_file.replace(target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise archive_error(exc, target) from exc
        return target

    def write_sidecar(self, folder: PurePosixPath, document: Mapping[str, Any]) -> Path:
        """Write the task's JSON sidecar through a temp file, so it is whole or absent."""
        target = self.resolve(folder / SIDECAR_NAME)
        temp = self.work_dir / (hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json.tmp")
        data = json.dumps(document, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
        try:
            with temp.open("w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            temp.replace(target)
            _fsync_dir(target.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise archive_error(exc, target) from exc
        return target


def archive_error(exc: OSError, path: Path) -> ArchiveError:
    """One clear line for a write that failed; a full disk is named as such."""
    if exc.errno == errno.ENOSPC:
        return ArchiveError(f"disk full while writing {str(path)!r}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ArchiveError(f"archive not writable: {str(path)!r} ({exc.strerror})")
    return ArchiveError(f"cannot write {str(path)!r}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry is data too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
