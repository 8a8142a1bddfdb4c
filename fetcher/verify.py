"""Checking the archive against its state database, and repairing what can be repaired.

Every file the database records as done is read again, in blocks of
:data:`HASH_BLOCK` bytes so memory stays flat, and its size and SHA-256 are
compared with the row. The check only reads: the database is opened
read-only (WAL lets it run beside a fetch; a read-only mount works too) and no
lock is taken.

A repair takes the archive's lock only after the check, and only when something
needs repairing. Under it each problem file is checked again, then downloaded
again with the :class:`~fetcher.download.Downloader` a fetch uses (file host
only: it never holds the API key), in the order a fetch commits a file: work
file, verify, move the damaged copy to ``.fetcher/quarantine/``, rename into the
file's old place, sidecar, database row. A file whose URL has expired cannot be
repaired; it is reported as such and left as it is. Bytes that differ from the
archived ones are a change at the host: they replace the archived copy only when
the caller accepts changes, and the sidecar then keeps the first ``sha256`` as
``original_sha256``.

A stop event (the CLI sets it on SIGINT/SIGTERM) winds the run down between
files: a download in flight keeps its bytes in the work folder, and the report
says ``interrupted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import os
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from .archive import SIDECAR_NAME, Archive, archive_error
from .config import Settings
from .download import Downloaded, Downloader
from .errors import EXIT_FAILED, EXIT_OK, ArchiveError, TaskError, UsageError
from .models import RemoteFile, parse_time
from .progress import NullProgress
from .retry import RetryPolicy
from .state import FileRow, Records, open_state
from .stores import database_url
from .url import Url

#: Files are read and hashed in blocks this size.
HASH_BLOCK = 1024 * 1024


class Problem(enum.StrEnum):
    """What is wrong with a file, or what became of it under ``--repair``."""

    MISSING = "missing"
    CORRUPT = "corrupt"
    REPAIRED = "repaired"
    #: Downloaded again, but the host's bytes differ from the ones first archived;
    #: they replaced them (``--accept-changed``).
    REPLACED_DIFFERENT = "replaced-different"
    #: The host now serves other bytes; without ``--accept-changed`` they are dropped
    #: and the archived copy is left as it was.
    CHANGED_AT_HOST = "changed-at-host"
    UNREPAIRABLE = "unrepairable"


#: Outcomes that leave a file missing or corrupt after the run.
_STILL_BROKEN = frozenset(
    {Problem.MISSING, Problem.CORRUPT, Problem.UNREPAIRABLE, Problem.CHANGED_AT_HOST}
)


class VerifyProgress(Protocol):
    """The part of :class:`~fetcher.progress.Progress` a verify run reports to."""

    def file_queued(self, size: int | None) -> None:
        """A file is about to be checked (or downloaded again)."""

    def file_done(self) -> None:
        """A file was checked (or its repair settled)."""

    def bytes_received(self, count: int) -> None:
        """Bytes were hashed or downloaded."""


@dataclass(frozen=True, slots=True)
class FileProblem:
    """One file that did not match its row: what was found, and where it ended up."""

    row: FileRow
    #: What the check found: :attr:`Problem.MISSING` or :attr:`Problem.CORRUPT`.
    found: Problem
    #: ``found`` without ``--repair``; the repair's outcome with it.
    problem: Problem
    detail: str
    #: Where the damaged copy went (archive-relative), when a repair replaced it.
    quarantined: str | None = None

    def settled(self, problem: Problem, note: str, quarantined: str | None = None) -> FileProblem:
        return replace(
            self, problem=problem, detail=f"{self.detail}; {note}", quarantined=quarantined
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.row.task_id,
            "index": self.row.index,
            "path": self.row.path,
            "problem": self.problem.value,
            "found": self.found.value,
            "detail": self.detail,
            "quarantined": self.quarantined,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """How many files were checked, and every one that did not match."""

    archive: str
    repair: bool
    checked: int
    problems: list[FileProblem]
    accept_changed: bool = False
    #: A stop request ended the run before every file was checked or repaired.
    interrupted: bool = False

    @property
    def ok(self) -> int:
        return self.checked - len(self.problems)

    @property
    def missing(self) -> int:
        return sum(1 for p in self.problems if p.found is Problem.MISSING)

    @property
    def corrupt(self) -> int:
        return sum(1 for p in self.problems if p.found is Problem.CORRUPT)

    @property
    def repaired(self) -> int:
        fixed = (Problem.REPAIRED, Problem.REPLACED_DIFFERENT)
        return sum(1 for p in self.problems if p.problem in fixed)

    @property
    def unrepairable(self) -> int:
        return sum(1 for p in self.problems if p.problem is Problem.UNREPAIRABLE)

    @property
    def still_broken(self) -> int:
        return sum(1 for p in self.problems if p.problem in _STILL_BROKEN)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.still_broken else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "repair": self.repair,
            "accept_changed": self.accept_changed,
            "interrupted": self.interrupted,
            "checked": self.checked,
            "ok": self.ok,
            "missing": self.missing,
            "corrupt": self.corrupt,
            "repaired": self.repaired,
            "unrepairable": self.unrepairable,
            "exit_code": self.exit_code,
            "problems": [p.to_json() for p in self.problems],
        }

    def lines(self) -> list[str]:
        counts = (
            f"{self.checked} files checked: {self.ok} ok, "
            f"{self.missing} missing, {self.corrupt} corrupt"
        )
        if self.repair:
            counts += f"; {self.repaired} repaired, {self.unrepairable} unrepairable"
        if self.interrupted:
            counts += " (interrupted: the rest was not looked at)"
        out = [f"archive: {self.archive}", counts]
        if self.problems:
            out.append("problems:")
            out += [
                f"  {p.row.task_id} file {p.row.index}  {p.problem.value}: {p.row.path}: {p.detail}"
                for p in self.problems
            ]
        if self.still_broken and not self.repair:
            out.append(
                "'fetcher verify --repair' downloads again the files whose URL has not expired"
            )
        if any(p.problem is Problem.CHANGED_AT_HOST for p in self.problems):
            out.append(
                "'fetcher verify --repair --accept-changed' takes the host's new bytes instead"
            )
        return out


def verify_archive(
    root: Path,
    *,
    repair: bool,
    settings: Settings,
    progress: VerifyProgress | None = None,
    accept_changed: bool = False,
) -> VerifyReport:
    """:func:`verify` from synchronous code."""
    return asyncio.run(
        verify(
            root,
            repair=repair,
            settings=settings,
            progress=progress,
            accept_changed=accept_changed,
        )
    )


async def verify(
    root: Path,
    *,
    repair: bool,
    settings: Settings,
    progress: VerifyProgress | None = None,
    accept_changed: bool = False,
    stop: asyncio.Event | None = None,
) -> VerifyReport:
    """Check every archived file at ``root`` against the database; with ``repair``, fix them.

    ``settings`` gives the download limits (timeout, retries, file size) and the
    API's origin, whose URLs a file row may not point at; no key is needed.
    ``accept_changed`` lets bytes the host now serves differently replace the
    archived ones. Setting ``stop`` winds the run down between files.
    Raises :class:`UsageError` when there is no archive at ``root``,
    :class:`LockedError` when a repair is needed while another run holds the lock,
    and :class:`ArchiveError` when the archive cannot be read or written.
    """
    archive = Archive(root, database_url(settings))
    if not archive.exists():
        raise UsageError(f"no fetcher archive at {str(archive.root)!r}")
    listener = progress or NullProgress()
    halt = stop or asyncio.Event()

    def report(checked: int, problems: list[FileProblem]) -> VerifyReport:
        return VerifyReport(
            str(archive.root), repair, checked, problems, accept_changed, halt.is_set()
        )

    with open_state(archive, readonly=True) as db:
        checked, problems = await _check_all(archive, db, listener, halt)
    if not repair or not problems or halt.is_set():
        return report(checked, problems)
    archive.prepare()
    with archive.lock(), open_state(archive) as db:
        repairer = _Repairer(archive, db, settings, listener, accept_changed=accept_changed)
        problems = await repairer.repair_all(problems, halt)
    return report(checked, problems)


# -- checking ---------------------------------------------------------------------------


async def _check_all(
    archive: Archive, db: Records, progress: VerifyProgress, stop: asyncio.Event
) -> tuple[int, list[FileProblem]]:
    checked = 0
    problems: list[FileProblem] = []
    for page in db.done_file_pages():
        for row in page:
            progress.file_queued(row.size)
        for row in page:
            # One loop turn a file: a signal's handler runs, and the check stops there.
            await asyncio.sleep(0)
            if stop.is_set():
                return checked, problems
            checked += 1
            problem = _check_file(archive, row, progress)
            if problem is not None:
                problems.append(problem)
            progress.file_done()
    return checked, problems


def _check_file(archive: Archive, row: FileRow, progress: VerifyProgress) -> FileProblem | None:
    """None when the file on disk has the size and SHA-256 its row recorded."""

    def found(problem: Problem, detail: str) -> FileProblem:
        return FileProblem(row, problem, problem, detail)

    if row.path is None:
        return found(Problem.MISSING, "the database records no path")
    try:
        target = archive.resolve(row.path)
    except ArchiveError as exc:
        return found(Problem.MISSING, str(exc))
    try:
        with target.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if row.size is not None and size != row.size:
                return found(Problem.CORRUPT, f"{size} bytes, recorded {row.size}")
            digest = _sha256(handle, progress)
    except (FileNotFoundError, NotADirectoryError):
        return found(Problem.MISSING, "not on disk")
    except OSError as exc:
        return found(Problem.CORRUPT, f"cannot be read: {exc.strerror or exc}")
    if row.sha256 is not None and digest != row.sha256:
        return found(Problem.CORRUPT, f"sha256 {digest}, recorded {row.sha256}")
    return None


def _sha256(handle: BufferedReader, progress: VerifyProgress) -> str:
    digest = hashlib.sha256()
    block = memoryview(bytearray(HASH_BLOCK))
    while count := handle.readinto(block):
        digest.update(block[:count])
        progress.bytes_received(count)
    return digest.hexdigest()


# -- repairing --------------------------------------------------------------------------


class Repairer:
    """Settles each problem as repaired, replaced-different, changed-at-host or unrepairable.

    What putting one file back means is the store's: :meth:`repair`, in a subclass.
    """

    def __init__(
        self,
        db: Records,
        settings: Settings,
        progress: VerifyProgress,
        *,
        accept_changed: bool,
    ) -> None:
        self.db = db
        self.progress = progress
        self.accept_changed = accept_changed
        self.downloader = repair_downloader(settings, progress)

    async def repair_all(
        self, problems: list[FileProblem], stop: asyncio.Event
    ) -> list[FileProblem]:
        """Each problem settled, one at a time; on ``stop``, the rest stay as found."""
        settled: list[FileProblem] = []
        async with self.downloader:
            for problem in problems:
                self.progress.file_queued(problem.row.size)
                done = None if stop.is_set() else await until_stopped(stop, self.repair(problem))
                self.progress.file_done()
                if done is None:
                    return settled + problems[len(settled) :]
                settled.append(done)
        return settled

    async def repair(self, problem: FileProblem) -> FileProblem:
        """One file put back, or why it was not."""
        raise NotImplementedError

    def record(self, row: FileRow, got: Downloaded) -> None:
        """The file's row takes what was put back."""
        assert row.path is not None
        self.db.file_done(
            row.task_id,
            row.index,
            path=row.path,
            size=got.size,
            sha256=got.sha256,
            content_type=got.content_type,
        )


class _Repairer(Repairer):
    """A folder's repair: the damaged copy quarantined, the file renamed into its place."""

    def __init__(
        self,
        archive: Archive,
        db: Records,
        settings: Settings,
        progress: VerifyProgress,
        *,
        accept_changed: bool,
    ) -> None:
        super().__init__(db, settings, progress, accept_changed=accept_changed)
        self.archive = archive

    async def repair(self, problem: FileProblem) -> FileProblem:
        row = self._current(problem.row)
        if row is None:
            return problem.settled(Problem.UNREPAIRABLE, "its row changed under the repair")
        if _check_file(self.archive, row, self.progress) is None:
            return problem.settled(Problem.REPAIRED, "matches its row again (repaired meanwhile)")
        if row.path is None:
            return problem.settled(Problem.UNREPAIRABLE, "no path to put it back at")
        relative = PurePosixPath(row.path)
        try:
            self.archive.resolve(relative)
        except ArchiveError as exc:
            return problem.settled(Problem.UNREPAIRABLE, str(exc))
        work = self.archive.work_path(row.task_id, row.index)
        got = await download_again(self.downloader, row, work, problem, self.accept_changed)
        if isinstance(got, FileProblem):
            return got
        changed = row.sha256 is not None and got.sha256 != row.sha256
        moved = self.archive.quarantine(relative)
        self.archive.place(got.path, relative)
        if changed:
            outcome = Problem.REPLACED_DIFFERENT
            note = f"downloaded again, but the host's bytes differ: sha256 {got.sha256}"
            note += _update_sidecar(self.archive, relative, got, row.sha256)
        else:
            outcome, note = Problem.REPAIRED, f"downloaded again ({got.size} bytes, same sha256)"
        if moved is not None:
            note += f"; the damaged copy is in {moved}"
        self.record(row, got)
        return problem.settled(outcome, note, None if moved is None else str(moved))

    def _current(self, row: FileRow) -> FileRow | None:
        """The row as the database holds it now, under the lock (None: no longer done)."""
        return next(
            (
                r
                for r in self.db.files_of(row.task_id)
                if r.index == row.index and r.state == "done"
            ),
            None,
        )


async def download_again(
    downloader: Downloader, row: FileRow, work: Path, problem: FileProblem, accept_changed: bool
) -> Downloaded | FileProblem:
    """The file downloaded again into ``work``, or the problem settled as why not.

    Shared by the folder's and the bucket's repair: an expired URL or a failed
    download is unrepairable; other bytes than the archived ones are a change at
    the host, taken only when ``accept_changed``.
    """
    expires = parse_time(row.expire_time)
    if expires is not None and expires <= datetime.now(UTC):
        return problem.settled(Problem.UNREPAIRABLE, f"its URL expired at {row.expire_time}")
    remote = RemoteFile(index=row.index, url=row.url, expire_time=expires, md5=row.md5)
    try:
        got = await downloader.download(row.task_id, remote, work)
    except TaskError as exc:
        # A partial download stays in the work folder, as after a fetch: the next
        # repair resumes it, and a fetch's clean-up drops it once it is stale.
        return problem.settled(Problem.UNREPAIRABLE, f"download failed: {exc}")
    except OSError as exc:
        raise archive_error(exc, work) from exc
    changed = row.sha256 is not None and got.sha256 != row.sha256
    if changed and not accept_changed:
        got.path.unlink(missing_ok=True)
        return problem.settled(
            Problem.CHANGED_AT_HOST,
            f"the host now serves other bytes (sha256 {got.sha256}); "
            "the archived copy is left as it was",
        )
    return got


def repair_downloader(settings: Settings, progress: VerifyProgress) -> Downloader:
    """A downloader for repairs: the file host only, one file at a time."""
    return Downloader(
        timeout=settings.timeout,
        policy=RetryPolicy(retries=settings.retries, base=settings.retry_wait),
        max_file_size=settings.max_file_size,
        api_origin=Url.parse(settings.base_url).origin if settings.base_url else None,
        connections=1,
        proxies=settings.proxies,
        on_bytes=progress.bytes_received,
    )


async def until_stopped(
    stop: asyncio.Event, work: Coroutine[Any, Any, FileProblem]
) -> FileProblem | None:
    """``work``'s result, or None when ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _update_sidecar(
    archive: Archive, relative: PurePosixPath, got: Downloaded, original: str | None
) -> str:
    """Record the new size and checksum in the task's sidecar; a note when it cannot."""
    folder = relative.parent
    try:
        document = json.loads(archive.resolve(folder / SIDECAR_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, ArchiveError):
        return SIDECAR_UNREADABLE
    if not revise_sidecar(document, relative.name, got, original):
        return SIDECAR_NO_ENTRY
    archive.write_sidecar(folder, document)
    return SIDECAR_UPDATED


#: What a repair that accepted changed bytes says of the task's sidecar.
SIDECAR_UPDATED = "; sidecar updated"
SIDECAR_UNREADABLE = "; sidecar left as it was: it cannot be read"
SIDECAR_NO_ENTRY = "; sidecar left as it was (no entry for the file)"


def revise_sidecar(document: Any, name: str, got: Downloaded, original: str | None) -> bool:
    """The entry of file ``name`` in a sidecar ``document`` takes the new bytes' size and
    checksum; False, and nothing changed, when there is no single such entry.

    ``original_sha256`` keeps the checksum of the bytes first archived, across any
    number of accepted changes. Shared by the folder's and the bucket's repair.
    """
    files = document.get("files") if isinstance(document, dict) else None
    files = files if isinstance(files, list) else []
    entries = [e for e in files if isinstance(e, dict) and e.get("path") == name]
    if len(entries) != 1:
        return False
    entry = entries[0]
    entry.setdefault("original_sha256", entry.get("sha256") or original)
    entry.update(size=got.size, sha256=got.sha256, content_type=got.content_type)
    return True
