"""The archive on disk: its folders, its lock, and how files get into it.

Everything fetcher keeps for itself lives under ``<root>/.fetcher/`` (state
database, lock, work folder), so an archive is self-contained and can be moved
or copied whole. Files reach their visible place only by ``os.replace`` from the
work folder, which is on the same filesystem: a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..durable import fsync_dir, make_folders
from ..errors import ArchiveError, LockedError
from ..state.address import DatabaseUrl
from . import Placed

if TYPE_CHECKING:
    from .rooms import RunRoom

META_DIR = ".fetcher"
SIDECAR_NAME = "task.json"
#: Partial downloads older than this are dropped: no file URL lives longer (7 days).
RESUME_WINDOW = 8 * 24 * 3600.0
LOCK_POLL = 0.2


class Archive:
    """One archive root and the paths fetcher uses inside it."""

    def __init__(self, root: Path, state_url: DatabaseUrl | None = None) -> None:
        self.root = root.expanduser().absolute()
        #: A PostgreSQL state, several hosts' (None: the SQLite file inside the archive).
        self.state_url = state_url
        self.name = str(self.root)
        self.meta_dir = self.root / META_DIR
        self.work_dir = self.meta_dir / "work"
        #: Damaged copies a repair replaced, at their archive-relative paths.
        self.quarantine_dir = self.meta_dir / "quarantine"
        self.db_path = self.meta_dir / "state.sqlite"
        self.lock_path = self.meta_dir / "lock"
        self._root_real: Path | None = None
        #: Archive-relative folders (``/a/b``) known to be real folders, not links.
        self._checked: set[str] = set()
        #: On a shared state, the run's own work folder (:meth:`work_in_room`).
        self._room: RunRoom | None = None

    def exists(self) -> bool:
        return self.state_url is not None or self.db_path.is_file()

    def prepare(self) -> None:
        """Create the archive's folders and clear work files a killed run left behind."""
        try:
            make_folders(self.work_dir)
        except OSError as exc:
            raise ArchiveError(f"cannot create archive {str(self.root)!r}: {exc.strerror}") from exc

    # -- the store protocol (fetcher.stores.ArchiveStore): the folder's own calls, awaited --

    async def open(self) -> None:
        self.prepare()

    async def close(self) -> None:
        """Nothing is held between calls."""

    async def clean(self) -> None:
        self.clean_work()

    async def stored(self, task_id: str, index: int) -> Placed | None:
        """On disk a placed file's row follows in the same turn: nothing to pick up."""
        return None

    async def put_file(self, work_file: Path, placed: Placed) -> None:
        self.place(work_file, PurePosixPath(placed.path))

    async def put_sidecar(self, folder: PurePosixPath, document: Mapping[str, Any]) -> None:
        self.write_sidecar(folder, document)

    def has_file(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    async def committed(self) -> None:
        """The state database is inside the archive already."""

    async def restore_state(self) -> bool:
        return self.exists()

    # -- the folder ----------------------------------------------------------------------

    def clean_work(self, now: float | None = None) -> None:
        """Remove what a killed run left and cannot be resumed; only safe under the lock.

        A partial download stays while its ``.json`` record does (the next attempt
        resumes it) unless it is older than any file URL lives; everything else
        (sidecar temp files, partials without a record, records without a partial)
        goes.
        """
        try:
            clean_work_folder(self.work_dir, now)
        except OSError as exc:
            raise archive_error(exc, self.work_dir) from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the archive's lock for the duration; another holder means LockedError at once."""
        with self._lock_file() as fd:
            if not _try_lock(fd):
                raise self._locked("")
            yield

    @contextlib.asynccontextmanager
    async def wait_lock(
        self,
        wait: float | None,
        stop: asyncio.Event | None = None,
        waiting: Callable[[], None] | None = None,
    ) -> AsyncIterator[bool]:
        """Like :meth:`lock`, trying for up to ``wait`` seconds (``math.inf``: until free).

        Yields True with the lock held, or False, holding nothing, when ``stop`` was
        set while waiting (a signal): the wait ends at once, not at the next try.
        ``waiting`` is called once, when the wait begins.
        """
        deadline = time.monotonic() + (wait or 0.0)
        stop = stop or asyncio.Event()
        with self._lock_file() as fd:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise self._locked(f" (waited {wait:g} s)" if wait else "")
                if stop.is_set():
                    break
                if waiting is not None:
                    waiting()
                    waiting = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LOCK_POLL)
            else:
                yield True
                return
            yield False

    @contextlib.contextmanager
    def _lock_file(self) -> Iterator[int]:
        try:
            handle = self.lock_path.open("a+")
        except OSError as exc:
            raise archive_error(exc, self.lock_path) from exc
        with handle:
            try:
                yield handle.fileno()
            finally:
                # Closing the file releases the lock too; unlocking first is explicit.
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _locked(self, detail: str) -> LockedError:
        return LockedError(f"another fetcher run holds the lock on {str(self.root)!r}{detail}")

    def work_path(self, task_id: str, index: int) -> Path:
        if self._room is not None:
            return self._room.file(task_id, index)
        return work_file(self.work_dir, task_id, index)

    def work_in_room(self, run_id: str, live: Callable[[], Collection[str]]) -> None:
        from .rooms import open_room

        self._room = open_room(self.work_dir, run_id, live)

    def leave_room(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.close()

    def resolve(self, relative: PurePosixPath | str) -> Path:
        """An archive-relative path as an absolute one, refusing anything that escapes.

        ``..``, absolute paths and the root itself are refused as text; a symlink on
        the way that leads outside is refused too. Folders already checked in this
        run are not checked again: a profile of 2,000 small tasks spent a tenth of
        the event loop's time in ``realpath`` before that.
        """
        path = PurePosixPath(relative)
        if path.is_absolute() or not path.parts or ".." in path.parts:
            raise self._outside(relative)
        root = self._real_root()
        top = str(root)
        checked = ""
        for part in path.parts:
            checked = f"{checked}/{part}"
            if checked in self._checked:
                continue
            try:
                mode = os.lstat(top + checked).st_mode
            except FileNotFoundError:
                break  # not there yet: nothing below it can be a link
            if stat.S_ISLNK(mode):
                if root not in Path(top + checked).resolve().parents:
                    raise self._outside(relative)
            elif not stat.S_ISDIR(mode):
                break
            self._checked.add(checked)
        return root.joinpath(*path.parts)

    def _move_into(self, source: Path, target: Path, relative: PurePosixPath) -> None:
        """``os.replace`` into ``target``, creating its folder unless this run knows it is there.

        A folder removed behind the run's back is made again, once.
        """
        folder = relative.parent
        key = "/" + str(folder) if folder.parts else ""
        if key and key not in self._checked:
            make_folders(target.parent)
            for depth in range(1, len(folder.parts) + 1):
                self._checked.add("/" + "/".join(folder.parts[:depth]))
        try:
            source.replace(target)
        except FileNotFoundError:
            if not source.exists():
                raise
            make_folders(target.parent)
            source.replace(target)

    def _real_root(self) -> Path:
        if self._root_real is None:
            self._root_real = self.root.resolve()
        return self._root_real

    @staticmethod
    def _outside(relative: PurePosixPath | str) -> ArchiveError:
        return ArchiveError(f"refusing path {str(relative)!r}: outside the archive")

    def place(self, work_file: Path, relative: PurePosixPath) -> Path:
        """Move a finished work file to its place in the archive, atomically."""
        target = self.resolve(relative)
        try:
            self._move_into(work_file, target, relative)
            fsync_dir(target.parent)
        except OSError as exc:
            raise archive_error(exc, target) from exc
        return target

    def quarantine(self, relative: PurePosixPath) -> PurePosixPath | None:
        """Move the file at ``relative`` into ``.fetcher/quarantine/`` before it is replaced.

        It keeps its relative path there; a name already taken gets ``.1``, ``.2``, ...
        Returns where it went (archive-relative), or None when there was no file.
        """
        source = self.resolve(relative)
        if not source.is_file():
            return None
        target = self.quarantine_dir.joinpath(*relative.parts)
        try:
            make_folders(target.parent)
            stem, n = target.name, 0
            while target.exists():
                n += 1
                target = target.with_name(f"{stem}.{n}")
            source.replace(target)
            fsync_dir(target.parent)
            fsync_dir(source.parent)
        except OSError as exc:
            raise archive_error(exc, target) from exc
        return PurePosixPath(target.relative_to(self.root).as_posix())

    def write_sidecar(self, folder: PurePosixPath, document: Mapping[str, Any]) -> Path:
        """Write the task's JSON sidecar through a temp file, so it is whole or absent."""
        relative = folder / SIDECAR_NAME
        target = self.resolve(relative)
        staging = self.work_dir if self._room is None else self._room.ready()
        temp = staging / (hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json.tmp")
        data = json.dumps(document, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
        try:
            with temp.open("w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self._move_into(temp, target, relative)
            fsync_dir(target.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise archive_error(exc, target) from exc
        return target


def work_file(folder: Path, task_id: str, index: int) -> Path:
    """A work file name that is stable per file (for resume) and always short."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    return folder / f"{digest}-{index}.part"


def clean_work_folder(folder: Path, now: float | None = None, keep: tuple[str, ...] = ()) -> None:
    """Drop a work folder's leftovers: all but resumable partials and files ending in ``keep``.

    A partial download stays while its ``.json`` record does (the next attempt
    resumes it) unless it is older than any file URL lives; so do ``keep``'s files
    within that age. Everything else (sidecar temp files, partials without a
    record, records without a partial) goes.
    """
    cutoff = (now or time.time()) - RESUME_WINDOW
    entries = {entry.name: entry for entry in folder.iterdir()}
    for name, entry in entries.items():
        if entry.is_dir():
            continue
        partner = name[: -len(".json")] if name.endswith(".part.json") else name + ".json"
        resumable = name.endswith((".part", ".part.json")) and partner in entries
        wanted = resumable or (bool(keep) and name.endswith(keep))
        # Gone since the listing: on a shared state another run cleaned it, or took it over.
        with contextlib.suppress(FileNotFoundError):
            if not (wanted and entry.stat().st_mtime >= cutoff):
                entry.unlink()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def archive_error(exc: OSError, path: Path) -> ArchiveError:
    """One clear line for a write that failed; a full disk is named as such."""
    if exc.errno == errno.ENOSPC:
        return ArchiveError(f"disk full while writing {str(path)!r}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ArchiveError(f"archive not writable: {str(path)!r} ({exc.strerror})")
    return ArchiveError(f"cannot write {str(path)!r}: {exc.strerror or exc}")
