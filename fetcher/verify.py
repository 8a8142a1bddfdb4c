"""Checking the archive against its state database, and repairing what can be repaired.

Every file the database records as done is read again, in blocks of
:data:`HASH_BLOCK` bytes so memory stays flat, and its size and SHA-256 are
compared with the row. A plain check only reads: the database is opened
read-only (WAL lets it run beside a fetch) and no lock is taken.

A repair runs the whole check under the archive's lock, then downloads each
missing or corrupt file again with the :class:`~fetcher.download.Downloader` a
fetch uses (file host only: it never holds the API key), in the order a fetch
commits a file: work file, verify, rename into the file's old place, sidecar,
database row. A file whose URL has expired cannot be repaired; it is reported
as such and left as it is.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
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
from .state import FileRow, StateDB
from .url import Url

#: Files are read and hashed in blocks this size.
HASH_BLOCK = 1024 * 1024


class Problem(enum.StrEnum):
    """What is wrong with a file, or what became of it under ``--repair``."""

    MISSING = "missing"
    CORRUPT = "corrupt"
    REPAIRED = "repaired"
    #: Downloaded again, but the host's bytes differ from the ones first archived.
    REPLACED_DIFFERENT = "replaced-different"
    UNREPAIRABLE = "unrepairable"


#: Outcomes that leave a file missing or corrupt after the run.
_STILL_BROKEN = frozenset({Problem.MISSING, Problem.CORRUPT, Problem.UNREPAIRABLE})


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

    def settled(self, problem: Problem, note: str) -> FileProblem:
        return replace(self, problem=problem, detail=f"{self.detail}; {note}")

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.row.task_id,
            "index": self.row.index,
            "path": self.row.path,
            "problem": self.problem.value,
            "found": self.found.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """How many files were checked, and every one that did not match."""

    archive: str
    repair: bool
    checked: int
    problems: list[FileProblem]

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
        return out


def verify_archive(
    root: Path,
    *,
    repair: bool,
    settings: Settings,
    progress: VerifyProgress | None = None,
) -> VerifyReport:
    """Check every archived file at ``root`` against the database; with ``repair``, fix them.

    ``settings`` gives the download limits (timeout, retries, file size) and the
    API's origin, whose URLs a file row may not point at; no key is needed.
    Raises :class:`UsageError` when there is no archive at ``root``,
    :class:`LockedError` when repairing while another run holds the lock, and
    :class:`ArchiveError` when the archive cannot be read or written.
    """
    archive = Archive(root)
    if not archive.exists():
        raise UsageError(f"no fetcher archive at {str(archive.root)!r}")
    listener = progress or NullProgress()
    if not repair:
        with StateDB(archive.db_path, readonly=True) as db:
            checked, problems = _check_all(archive, db, listener)
        return VerifyReport(str(archive.root), repair, checked, problems)
    archive.prepare()
    with archive.lock(), StateDB(archive.db_path) as db:
        checked, problems = _check_all(archive, db, listener)
        if problems:
            problems = asyncio.run(_repair_all(archive, db, settings, listener, problems))
    return VerifyReport(str(archive.root), repair, checked, problems)


# -- checking ---------------------------------------------------------------------------


def _check_all(
    archive: Archive, db: StateDB, progress: VerifyProgress
) -> tuple[int, list[FileProblem]]:
    checked = 0
    problems: list[FileProblem] = []
    for page in db.done_file_pages():
        for row in page:
            progress.file_queued(row.size)
        for row in page:
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


async def _repair_all(
    archive: Archive,
    db: StateDB,
    settings: Settings,
    progress: VerifyProgress,
    problems: list[FileProblem],
) -> list[FileProblem]:
    """Each problem settled as repaired, replaced-different or unrepairable, one at a time."""
    downloader = Downloader(
        timeout=settings.timeout,
        policy=RetryPolicy(retries=settings.retries, base=settings.retry_wait),
        max_file_size=settings.max_file_size,
        api_origin=Url.parse(settings.base_url).origin if settings.base_url else None,
        connections=1,
        proxies=settings.proxies,
        on_bytes=progress.bytes_received,
    )
    settled: list[FileProblem] = []
    async with downloader:
        for problem in problems:
            progress.file_queued(problem.row.size)
            settled.append(await _repair(archive, db, downloader, problem))
            progress.file_done()
    return settled


async def _repair(
    archive: Archive, db: StateDB, downloader: Downloader, problem: FileProblem
) -> FileProblem:
    row = problem.row
    expires = parse_time(row.expire_time)
    if expires is not None and expires <= datetime.now(UTC):
        return problem.settled(Problem.UNREPAIRABLE, f"its URL expired at {row.expire_time}")
    if row.path is None:
        return problem.settled(Problem.UNREPAIRABLE, "no path to put it back at")
    relative = PurePosixPath(row.path)
    try:
        archive.resolve(relative)
    except ArchiveError as exc:
        return problem.settled(Problem.UNREPAIRABLE, str(exc))
    remote = RemoteFile(index=row.index, url=row.url, expire_time=expires, md5=row.md5)
    work = archive.work_path(row.task_id, row.index)
    try:
        got = await downloader.download(row.task_id, remote, work)
    except TaskError as exc:
        # A partial download stays in the work folder, as after a fetch: the next
        # repair resumes it, and a fetch's clean-up drops it once it is stale.
        return problem.settled(Problem.UNREPAIRABLE, f"download failed: {exc}")
    except OSError as exc:
        raise archive_error(exc, work) from exc
    archive.place(got.path, relative)
    if got.sha256 == row.sha256:
        outcome, note = Problem.REPAIRED, f"downloaded again ({got.size} bytes, same sha256)"
    else:
        outcome = Problem.REPLACED_DIFFERENT
        note = f"downloaded again, but the host's bytes differ: sha256 {got.sha256}"
        note += _update_sidecar(archive, relative, got)
    db.file_done(
        row.task_id,
        row.index,
        path=row.path,
        size=got.size,
        sha256=got.sha256,
        content_type=got.content_type,
    )
    return problem.settled(outcome, note)


def _update_sidecar(archive: Archive, relative: PurePosixPath, got: Downloaded) -> str:
    """Record the new size and checksum in the task's sidecar; a note when it cannot."""
    folder = relative.parent
    try:
        document = json.loads(archive.resolve(folder / SIDECAR_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, ArchiveError):
        return "; sidecar left as it was: it cannot be read"
    files = document.get("files") if isinstance(document, dict) else None
    files = files if isinstance(files, list) else []
    entries = [e for e in files if isinstance(e, dict) and e.get("path") == relative.name]
    if len(entries) != 1:
        return "; sidecar left as it was (no entry for the file)"
    entries[0].update(size=got.size, sha256=got.sha256, content_type=got.content_type)
    archive.write_sidecar(folder, document)
    return "; sidecar updated"
