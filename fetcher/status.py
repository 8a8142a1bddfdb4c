"""What an archive holds, read from its state database without taking the lock.

WAL lets this read while a fetch run writes, so ``fetcher status`` works during
a long cron run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import UsageError
from .lease import live_runs
from .lists import bookmarks
from .models import parse_time
from .queue import queue_head, queue_length
from .state import EXPIRED, FAILED, INCOMPLETE, PENDING, STATES, open_state
from .stores import BucketUrl, fetch_state, open_store

#: Tasks can be queried only for about this long after submission.
QUERY_WINDOW = timedelta(days=3)
LIST_LIMIT = 20


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Counts, the tasks that need attention, and the files at risk."""

    archive: str
    counts: dict[str, int]
    files_archived: int
    bytes_archived: int
    pending: list[dict[str, Any]]
    expiring: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    lists: list[dict[str, Any]]
    #: Entries of each list (pending, expiring, failures) left out by the limit.
    more: dict[str, int]
    #: The download queue: ``length``, and ``head``, the next files a run downloads.
    queue: dict[str, Any]
    #: Runs working on the archive now, each with the tasks it holds (fetcher.lease).
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "counts": self.counts,
            "more": self.more,
            "files_archived": self.files_archived,
            "bytes_archived": self.bytes_archived,
            "pending": self.pending,
            "expiring": self.expiring,
            "failures": self.failures,
            "lists": self.lists,
            "queue": self.queue,
            "runs": self.runs,
        }

    def lines(self) -> list[str]:
        out = [f"archive: {self.archive}"]
        out.append(
            "tasks: "
            + ", ".join(f"{self.counts.get(s, 0)} {s}" for s in STATES)
            + f"; {self.files_archived} files, {self.bytes_archived} bytes archived"
        )
        out += _section(
            "pending (oldest first):",
            [
                f"{p['task_id']}  {p['state']}, first seen {p['first_seen']}, "
                f"{_left(p['queryable_for_seconds'], 'queryable')}"
                for p in self.pending
            ],
            self.more["pending"],
        )
        out += _section(
            "files not yet downloaded, nearest expiry first:",
            [
                f"{f['task_id']} file {f['index']}  expires {f['expire_time']}"
                f" ({_left(f['expires_in_seconds'], 'left')})"
                for f in self.expiring
            ],
            self.more["expiring"],
        )
        head = self.queue["head"]
        out += _section(
            f"download queue, {self.queue['length']} files, next first:",
            [
                f"{f['task_id']} file {f['index']}  expires {f['expire_time'] or 'never'}"
                f" ({_left(f['expires_in_seconds'], 'left')})"
                for f in head
            ],
            self.queue["length"] - len(head),
        )
        for run in self.runs:
            out += _section(
                f"run {run['run_id']} on {run['host']} (pid {run['pid']}), since "
                f"{run['started_at']}, holding {run['lease_count']} tasks:",
                [
                    f"{lease['task_id']}  "
                    + (
                        f"lease for {lease['expires_in_seconds']} s"
                        if lease["expires_in_seconds"] > 0
                        else "lease lapsed"
                    )
                    for lease in run["leases"]
                ],
                run["lease_count"] - len(run["leases"]),
            ) or [f"run {run['run_id']} on {run['host']} (pid {run['pid']}), holding no task"]
        out += _section(
            "failures:",
            [f"{f['task_id']}  {f['state']}: {f['reason']}" for f in self.failures],
            self.more["failures"],
        )
        out += _section(
            "list files, read on from their settled beginning next time:",
            [
                f"{item['path']}  first {item['lines']} lines ({item['ids']} IDs) settled,"
                f" as of {item['updated_at']}"
                for item in self.lists
            ],
        )
        return out


def _section(title: str, rows: list[str], more: int = 0) -> list[str]:
    """A titled, indented block of the report; nothing at all when it has no rows.

    Rows the limit left out are counted at the end, with how to see them.
    """
    if more:
        rows = [*rows, f"… and {more} more (--limit N or --all shows them)"]
    return [title, *(f"  {row}" for row in rows)] if rows else []


def archive_status(
    root: Path | BucketUrl,
    now: datetime | None = None,
    limit: int | None = LIST_LIMIT,
    settings: Settings | None = None,
) -> StatusReport:
    """Build the report for the archive at ``root``; a usage error if there is none.

    Each list (pending, expiring, failures) holds at most ``limit`` entries (None:
    all of them); ``more`` counts the rest. The state is opened read-only, so a
    backup or a read-only mount can be inspected.
    """
    archive = open_store(root, settings)
    # A bucket's state may be only in its snapshot on a host that never ran there.
    restorable = isinstance(root, BucketUrl)
    if not archive.exists() and not (restorable and asyncio.run(fetch_state(archive))):
        raise UsageError(f"no fetcher archive at {archive.name!r}")
    now = now or datetime.now(UTC)
    with open_state(archive, readonly=True) as db:
        counts = db.counts()
        files, size = db.totals()
        pending = [
            _pending_entry(row, now) for row in db.tasks_in((PENDING, INCOMPLETE), limit=limit)
        ]
        expiring = [
            {
                "task_id": row.task_id,
                "index": row.index,
                "expire_time": row.expire_time,
                "expires_in_seconds": _seconds_until(parse_time(row.expire_time), now),
            }
            for row in db.files_not_done(limit)
        ]
        failures = [
            {"task_id": str(r[0]), "state": str(r[1]), "reason": r[6]}
            for r in db.tasks_in((FAILED, EXPIRED), order="updated_at DESC", limit=limit)
        ]
        more = {
            "pending": counts[PENDING] + counts[INCOMPLETE] - len(pending),
            "expiring": db.count_files_not_done() - len(expiring),
            "failures": counts[FAILED] + counts[EXPIRED] - len(failures),
        }
        head = [
            {
                "task_id": entry.task_id,
                "index": entry.index,
                "expire_time": entry.expire_time,
                "expires_in_seconds": _seconds_until(parse_time(entry.expire_time), now),
            }
            for entry in queue_head(db, limit)
        ]
        queue = {"length": queue_length(db), "head": head}
        runs = live_runs(db, now.timestamp(), limit) if db.has_table("runs") else []
        lists = [
            {
                "path": mark.source,
                "settled_bytes": mark.offset,
                "lines": mark.lines,
                "ids": mark.ids,
                "updated_at": updated_at,
            }
            for mark, updated_at in bookmarks(db)
        ]
    return StatusReport(
        archive.name, counts, files, size, pending, expiring, failures, lists, more, queue, runs
    )


def _pending_entry(row: tuple[object, ...], now: datetime) -> dict[str, Any]:
    task_id, state, task_type, created_at, first_seen, _updated, reason = row
    since = parse_time(created_at) or parse_time(first_seen)
    return {
        "task_id": str(task_id),
        "state": str(state),
        "task_type": task_type,
        "created_at": created_at,
        "first_seen": first_seen,
        "reason": reason,
        "queryable_for_seconds": _seconds_until(since + QUERY_WINDOW if since else None, now),
    }


def _seconds_until(moment: datetime | None, now: datetime) -> int | None:
    return None if moment is None else int((moment - now).total_seconds())


def _left(seconds: int | None, word: str) -> str:
    if seconds is None:
        return f"{word}: unknown"
    if seconds <= 0:
        return f"{word}: no longer"
    hours, rest = divmod(seconds, 3600)
    return f"{word} for {hours}h{rest // 60:02d}m"
