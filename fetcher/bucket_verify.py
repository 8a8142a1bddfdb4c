"""Checking a bucket archive against its state, and repairing what can be repaired.

Each object the state records as done is looked at with a HEAD: its size and
the SHA-256 stored with it (``x-amz-meta-sha256``) against the row, no body
read. ``deep`` reads every object and hashes its bytes instead. The state is
opened read-only and no lock is taken for the check.

A repair takes the bucket's lock only when something needs repairing. Each
problem file is downloaded again from its host, exactly as a folder's repair
does (:func:`fetcher.verify.download_again`); the damaged object is copied (by
the store, no byte through this host) under ``PREFIX/.fetcher/quarantine/`` at
its own path, as a folder quarantines a file, then the file is uploaded over it
and recorded. With changed bytes accepted, the sidecar's entry for the file takes
them and keeps the first checksum as ``original_sha256``, as a folder's does.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from .archive import SIDECAR_NAME
from .config import Settings
from .download import Downloaded
from .errors import UsageError
from .progress import NullProgress
from .state import FileRow, Records, open_state
from .stores import BucketUrl, Placed
from .verify import (
    SIDECAR_NO_ENTRY,
    SIDECAR_UNREADABLE,
    SIDECAR_UPDATED,
    FileProblem,
    Problem,
    Repairer,
    VerifyProgress,
    VerifyReport,
    download_again,
    revise_sidecar,
)

if TYPE_CHECKING:
    from .stores.s3 import S3Store

#: Objects looked at concurrently during a check.
CHECKS_IN_FLIGHT = 8


async def verify_bucket(
    url: BucketUrl,
    *,
    repair: bool,
    settings: Settings,
    deep: bool = False,
    progress: VerifyProgress | None = None,
    accept_changed: bool = False,
    stop: asyncio.Event | None = None,
) -> VerifyReport:
    """Check every archived object in the bucket against the state; with ``repair``, fix them."""
    from .stores.s3 import S3Store

    store = S3Store(url, settings)
    listener = progress or NullProgress()
    halt = stop or asyncio.Event()

    def report(checked: int, problems: list[FileProblem]) -> VerifyReport:
        return VerifyReport(store.name, repair, checked, problems, accept_changed, halt.is_set())

    await store.open()
    try:
        if not await store.restore_state():
            raise UsageError(f"no fetcher archive in {store.name!r}")
        with open_state(store, readonly=True) as db:
            checked, problems = await _check_all(store, db, deep, listener, halt)
        if not repair or not problems or halt.is_set():
            return report(checked, problems)
        async with store.wait_lock(None, halt) as held:
            if not held:
                return report(checked, problems)
            with open_state(store) as db:
                repairer = _Repairer(store, db, settings, listener, accept_changed, deep)
                problems = await repairer.repair_all(problems, halt)
            await store.committed()
        return report(checked, problems)
    finally:
        await store.close()


async def _check_all(
    store: S3Store, db: Records, deep: bool, progress: VerifyProgress, stop: asyncio.Event
) -> tuple[int, list[FileProblem]]:
    checked = 0
    problems: list[FileProblem] = []
    slots = asyncio.Semaphore(CHECKS_IN_FLIGHT)

    async def one(row: FileRow) -> FileProblem | None:
        async with slots:
            if stop.is_set():
                return None
            found = await check_object(store, row, deep, progress)
            progress.file_done()
            return found

    for page in db.done_file_pages():
        if stop.is_set():
            break
        for row in page:
            progress.file_queued(row.size)
        found = await asyncio.gather(*(one(row) for row in page))
        checked += len(page) if not stop.is_set() else 0
        problems += [p for p in found if p is not None]
    return checked, problems


async def check_object(
    store: S3Store, row: FileRow, deep: bool, progress: VerifyProgress
) -> FileProblem | None:
    """None when the object has the size and SHA-256 its row recorded."""

    def found(problem: Problem, detail: str) -> FileProblem:
        return FileProblem(row, problem, problem, detail)

    if row.path is None:
        return found(Problem.MISSING, "the state records no path")
    key = store.url.key(row.path)
    head = await store.bucket.head(key)
    if head is None:
        return found(Problem.MISSING, "no such object")
    size = head.get("ContentLength")
    if row.size is not None and size != row.size:
        return found(Problem.CORRUPT, f"{size} bytes, recorded {row.size}")
    if deep:
        digest = await store.bucket.read(key, lambda block: progress.bytes_received(len(block)))
        if digest is None:
            return found(Problem.MISSING, "no such object")
    else:
        digest = head.get("Metadata", {}).get("sha256")
        if digest is None:
            return found(Problem.CORRUPT, "no sha256 stored with the object")
    if row.sha256 is not None and digest != row.sha256:
        return found(Problem.CORRUPT, f"sha256 {digest}, recorded {row.sha256}")
    return None


class _Repairer(Repairer):
    """A bucket's repair: the file uploaded again over its object."""

    def __init__(
        self,
        store: S3Store,
        db: Records,
        settings: Settings,
        progress: VerifyProgress,
        accept_changed: bool,
        deep: bool,
    ) -> None:
        super().__init__(db, settings, progress, accept_changed=accept_changed)
        self.store = store
        #: Checked again as it was found: a change only --deep sees must not pass a HEAD.
        self.deep = deep

    async def repair(self, problem: FileProblem) -> FileProblem:
        row = problem.row
        if await check_object(self.store, row, self.deep, self.progress) is None:
            return problem.settled(Problem.REPAIRED, "matches its row again (repaired meanwhile)")
        if row.path is None:
            return problem.settled(Problem.UNREPAIRABLE, "no path to put it back at")
        work = self.store.work_path(row.task_id, row.index)
        got = await download_again(self.downloader, row, work, problem, self.accept_changed)
        if isinstance(got, FileProblem):
            return got
        changed = row.sha256 is not None and got.sha256 != row.sha256
        moved = await self.store.quarantine(row.path)
        placed = Placed(row.path, got.size, got.sha256, got.content_type)
        await self.store.put_file(got.path, placed)
        if changed:
            outcome = Problem.REPLACED_DIFFERENT
            note = f"downloaded again, but the host's bytes differ: sha256 {got.sha256}"
            note += await self._update_sidecar(PurePosixPath(row.path), got, row.sha256)
        else:
            outcome, note = Problem.REPAIRED, f"uploaded again ({got.size} bytes, same sha256)"
        if moved is not None:
            note += f"; the damaged copy is in {moved}"
        self.record(row, got)
        return problem.settled(outcome, note, moved)

    async def _update_sidecar(
        self, relative: PurePosixPath, got: Downloaded, original: str | None
    ) -> str:
        """The task's sidecar object read, its file's entry revised, and put back."""
        folder = relative.parent
        raw = bytearray()
        found = await self.store.bucket.read(self.store.url.key(folder / SIDECAR_NAME), raw.extend)
        try:
            document = json.loads(raw) if found is not None else None
        except ValueError:
            document = None
        if document is None:
            return SIDECAR_UNREADABLE
        if not revise_sidecar(document, relative.name, got, original):
            return SIDECAR_NO_ENTRY
        await self.store.put_sidecar(folder, document)
        return SIDECAR_UPDATED
