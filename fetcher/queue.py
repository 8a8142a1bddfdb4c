"""The download queue: the archive's wanted file rows, earliest ``ExpireTime`` first.

The queue is the ``files`` table itself, not a structure in memory: a file is
queued by the step that records its task's answer and leaves the queue by the
step that records it done, failed or expired. So queries never wait for
downloads, a file about to expire is taken before any other in the whole
archive (whatever run queued it), and a million queued files cost the process
nothing but their rows on disk.

A download worker *claims* a file in memory, and its task with a lease
(:mod:`fetcher.lease`), in one transaction: on PostgreSQL the head row is read
``FOR UPDATE SKIP LOCKED``, so two runs claiming at once take different files
and never wait for each other, and the row stays ``wanted`` until the lease on
its task is written. A file whose task another live run holds is left to that
run, and a claim that a crash loses costs nothing, since the row is still
``wanted`` for the run that takes the task over once the lease lapses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .lease import SKIP_LOCKED, Leases
from .models import RemoteFile, parse_time
from .state import Records, Step, opt_text, redone

#: The queue's order, written out in each statement: earliest expiry first, files
#: without an ExpireTime last, then the order they came in. It matches the
#: ``files_queue`` index, so taking the head reads a few index entries.


@dataclass(frozen=True, slots=True)
class QueuedFile:
    """A file a download worker took from the queue."""

    rowid: int
    task_id: str
    remote: RemoteFile
    #: The task's folder, relative to the archive root.
    folder: str


@dataclass(frozen=True, slots=True)
class HeadEntry:
    """One file at the head of the queue, as ``status`` shows it."""

    task_id: str
    index: int
    expire_time: str | None


class FileQueue:
    """The queue over one run's state database; claims live as long as the run."""

    def __init__(self, db: Records, leases: Leases | None = None) -> None:
        self._db = db
        self._leases = leases
        #: Rowids of files being downloaded now: at most ``--downloads`` of them.
        self._claimed: set[int] = set()

    @redone
    def claim(self) -> QueuedFile | None:
        """The earliest-expiring wanted file nobody in this run is downloading, and whose
        task no other live run holds (the task's lease is this run's now), or None."""
        passed: set[int] = set()
        while True:
            with self._db.atomic() as step:
                item = self._take(step, passed)
                if item is None:
                    return None
                mine = self._leases is None or bool(self._leases.take(step, [item.task_id]))
            if mine:
                # Noted once the step committed: a step run again after a lost connection
                # must not find its own file taken.
                self._claimed.add(item.rowid)
                return item
            # Its task another run's since the head was read: not this run's to download.
            passed.add(item.rowid)

    def _take(self, step: Step, passed: set[int]) -> QueuedFile | None:
        """The head of the queue for this run, locked on PostgreSQL till the step ends."""
        leases = self._leases
        run_id, now = ("", math.inf) if leases is None else (leases.run_id, leases.now())
        row = step.execute(
            "SELECT rowid, task_id, idx, url, expire_time, md5, size_hint, file_type, "  # noqa: S608
            "(SELECT dir FROM tasks WHERE tasks.task_id = files.task_id) "
            "FROM files WHERE state = 'wanted' "
            "AND rowid NOT IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) "
            "AND NOT EXISTS (SELECT 1 FROM leases WHERE leases.task_id = files.task_id "
            "AND leases.run_id != ? AND leases.expires_at >= ?) "
            "ORDER BY expire_time IS NULL, expire_time, rowid LIMIT 1"
            + SKIP_LOCKED.get(self._db.dialect, ""),
            (json.dumps(sorted(self._claimed | passed)), run_id, now),
        ).fetchone()
        if row is None:
            return None
        rowid, task_id, idx, url, expire, md5, size, file_type, folder = row
        return QueuedFile(
            rowid=int(str(rowid)),
            task_id=str(task_id),
            remote=RemoteFile(
                index=int(str(idx)),
                url=str(url),
                expire_time=parse_time(expire),
                md5=opt_text(md5),
                size=None if size is None else int(str(size)),
                file_type=opt_text(file_type),
            ),
            folder=str(folder),
        )

    def release(self, item: QueuedFile) -> None:
        """The worker is done with ``item``, whatever became of it."""
        self._claimed.discard(item.rowid)


def queue_head(db: Records, limit: int | None) -> list[HeadEntry]:
    """The next files a run would download, in order (``limit`` None: all of them)."""
    rows = db.query(
        "SELECT task_id, idx, expire_time FROM files WHERE state = 'wanted' "
        "ORDER BY expire_time IS NULL, expire_time, rowid LIMIT ?",
        (db.no_limit if limit is None else limit,),
    )
    return [HeadEntry(str(t), int(str(i)), opt_text(e)) for t, i, e in rows]


def queue_length(db: Records) -> int:
    """How many files the queue holds."""
    row = db.query_one("SELECT COUNT(*) FROM files WHERE state = 'wanted'")
    return int(str(row[0])) if row else 0
