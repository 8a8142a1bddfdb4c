"""The archive's memory: an SQLite database (WAL) inside the archive root.

A task row says where a task stands; a file row says whether one output file is
in place. A row that says ``archived`` is the commit point of the whole
pipeline: it is written only after every file is renamed into place and the
sidecar is written, so anything a crash interrupts before it is simply redone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self, cast

from .errors import ArchiveError
from .ids import Mark
from .layout import safe_segment
from .models import RemoteFile, Task, format_time

SCHEMA_VERSION = 1
#: IDs looked up per statement (passed as one JSON array, so no variable limit).
BATCH = 2000
#: Page cache. Random lookups over a million tasks thrash SQLite's default 2 MB: the
#: first run over a million-line list of archived IDs took 10.5 s with 16 MiB and
#: 9.2 s with 48 MiB (hyperfine, 5 runs each), peak RSS 81 MiB. The cache only
#: fills that far on archives that large.
CACHE_KIB = 49152

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    state       TEXT NOT NULL,      -- pending | incomplete | archived | failed | expired
    final       INTEGER NOT NULL DEFAULT 0,  -- 1: the API's answer will not change
    task_type   TEXT,
    created_at  TEXT,
    finished_at TEXT,
    dir         TEXT,               -- the task's folder, relative to the archive root
    reason      TEXT,
    first_seen  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state);
CREATE INDEX IF NOT EXISTS tasks_by_dir ON tasks (dir COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS files (
    task_id      TEXT NOT NULL REFERENCES tasks (task_id),
    idx          INTEGER NOT NULL,
    url          TEXT NOT NULL,
    expire_time  TEXT,
    md5          TEXT,
    state        TEXT NOT NULL,     -- wanted | done | failed | expired
    path         TEXT,              -- relative to the archive root, once done
    size         INTEGER,
    sha256       TEXT,
    content_type TEXT,
    reason       TEXT,
    PRIMARY KEY (task_id, idx)
);
CREATE TABLE IF NOT EXISTS lists (      -- see fetcher/bookmarks.py
    source        TEXT PRIMARY KEY,     -- a list file's absolute path
    settled_bytes INTEGER NOT NULL,     -- its beginning whose every task is settled
    lines         INTEGER NOT NULL,
    ids           INTEGER NOT NULL,
    digest        TEXT NOT NULL,        -- SHA-256 of those bytes
    updated_at    TEXT NOT NULL
);
"""

#: Task states.
PENDING = "pending"
INCOMPLETE = "incomplete"
ARCHIVED = "archived"
FAILED = "failed"
EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Known:
    """What the database already knows of a task named in the input."""

    state: str
    final: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class FileRow:
    """A file row, as the pipeline and ``status``/``verify`` read it."""

    task_id: str
    index: int
    url: str
    expire_time: str | None
    md5: str | None
    state: str
    path: str | None
    size: int | None
    sha256: str | None
    content_type: str | None
    reason: str | None


_last_stamp: list[tuple[int, str]] = [(-1, "")]


def now_text() -> str:
    """The current time in :func:`format_time`'s form; one ``strftime`` per second."""
    second = int(time.time())
    cached_second, text = _last_stamp[0]
    if second != cached_second:
        text = format_time(datetime.fromtimestamp(second, UTC)) or ""
        _last_stamp[0] = (second, text)
    return text


class StateDB:
    """The state database; a context manager that owns one connection."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        self._conn: sqlite3.Connection | None = None
        #: Tasks with a rowid up to this were in the database when the run began.
        self._rowid_limit = 0
        self._marks = bytearray(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: ArchiveError | None = None

    def __enter__(self) -> Self:
        try:
            if self._readonly:
                conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
            # Temporary, so a read-only look (``fetch --dry-run``) can sort out duplicates too.
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("CREATE TEMP TABLE seen (task_id TEXT PRIMARY KEY) WITHOUT ROWID")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot open state database {str(self.path)!r}: {exc}") from exc
        self._conn = conn
        self._check_schema()
        row = self._query_one("SELECT COALESCE(MAX(rowid), 0) FROM tasks")
        self._rowid_limit = int(str(row[0])) if row else 0
        self._marks = bytearray(self._rowid_limit // 8 + 1)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "StateDB used outside 'with'"
        return self._conn

    def _check_schema(self) -> None:
        row = self._query_one("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(str(row[0])) if row else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise ArchiveError(
                f"state database {str(self.path)!r} has schema {version}; "
                f"this fetcher knows up to {SCHEMA_VERSION}: upgrade fetcher"
            )

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One step: all of it lands, or none of it does.

        Inside :meth:`grouped`, steps taken in the same turn of the event loop share
        one transaction, committed as soon as the loop gets control back.
        """
        conn = self.conn
        if self._failed is not None:
            raise self._failed
        try:
            if self._loop is None:
                conn.execute("BEGIN IMMEDIATE")
            elif not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
                self._loop.call_soon(self._commit_group)
            conn.execute("SAVEPOINT step")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO step")
                conn.execute("RELEASE step")
                if self._loop is None:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("RELEASE step")
            if self._loop is None:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc

    @contextmanager
    def grouped(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Group the steps of each event-loop turn into one transaction (a fetch run).

        A profile of 2,000 small tasks spent a tenth of the loop's time in BEGIN and
        COMMIT, three of each per task; on a disk, each COMMIT is also an fsync. A step
        still lands whole or not at all (a savepoint each), and the order of commits
        is the order of steps; a kill can lose only the steps of the turn it hit,
        which the next run does again.
        """
        self._loop = loop
        try:
            yield
        finally:
            self._loop = None
            self._commit_group()
        if self._failed is not None:
            raise self._failed

    def _commit_group(self) -> None:
        """Commit the turn's steps; a failure is raised by the next step (a loop callback
        has no caller to raise to)."""
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._failed = ArchiveError(f"state database {str(self.path)!r}: {exc}")

    def _query_one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        try:
            row: tuple[object, ...] | None = self.conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc
        return row

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc

    # -- input ------------------------------------------------------------------------

    def first_sight(self, ids: Sequence[str]) -> tuple[list[str], dict[str, Known]]:
        """Of ``ids``, those not seen before in this run, and what is known of them.

        A cron list of a million archived IDs must not grow the process or crawl,
        so no set of strings: a task the database held when the run began is
        recognised again by one bit for its rowid (a million tasks: 125 KB), and
        only IDs it did not hold go into a temporary table.
        """
        fresh: list[str] = []
        known: dict[str, Known] = {}
        for start in range(0, len(ids), BATCH):
            chunk = list(dict.fromkeys(ids[start : start + BATCH]))
            # The cron case is a million archived rows: they share one Known, and the
            # columns come back as the types SQLite stores (TEXT, INTEGER) unconverted.
            found = cast(
                list[tuple[int, str, str, int, str | None]],
                self._query(
                    "SELECT rowid, task_id, state, final, reason FROM tasks "
                    "WHERE task_id IN (SELECT value FROM json_each(?))",
                    (json.dumps(chunk),),
                ),
            )
            rows = {
                task_id: (
                    rowid,
                    _ARCHIVED
                    if state == ARCHIVED and final and reason is None
                    else Known(str(state), bool(final), _opt(reason)),
                )
                for rowid, task_id, state, final, reason in found
            }
            limit, marks = self._rowid_limit, self._marks
            newcomers = [i for i in chunk if i not in rows or rows[i][0] > limit]
            first_time = self._first_time(newcomers)
            for task_id in chunk:
                row = rows.get(task_id)
                if row is not None and row[0] <= limit:
                    # One bit per rowid: set means this run met the task already.
                    byte, bit = row[0] >> 3, 1 << (row[0] & 7)
                    if marks[byte] & bit:
                        continue
                    marks[byte] |= bit
                elif task_id not in first_time:
                    continue
                fresh.append(task_id)
                if row is not None:
                    known[task_id] = row[1]
        return fresh, known

    def _first_time(self, task_ids: list[str]) -> set[str]:
        """Of IDs the database did not hold at the start, those this run has not met yet."""
        if not task_ids:
            return set()
        rows = self._query(
            "INSERT OR IGNORE INTO seen SELECT value FROM json_each(?) RETURNING task_id",
            (json.dumps(task_ids),),
        )
        return {str(r[0]) for r in rows}

    def unfinished_ids(self) -> list[str]:
        """Tasks a ``--pending`` run re-queries: still running, or interrupted mid-download."""
        rows = self._query(
            "SELECT task_id FROM tasks WHERE state IN (?, ?) ORDER BY first_seen",
            (PENDING, INCOMPLETE),
        )
        return [str(r[0]) for r in rows]

    # -- outcomes ---------------------------------------------------------------------

    def _upsert_task(self, conn: sqlite3.Connection, task_id: str, **cols: object) -> None:
        stamp = now_text()
        names = list(cols)
        conn.execute(
            f"INSERT INTO tasks (task_id, first_seen, updated_at, {', '.join(names)}) "  # noqa: S608
            f"VALUES (?, ?, ?, {', '.join('?' * len(names))}) "
            f"ON CONFLICT (task_id) DO UPDATE SET updated_at = excluded.updated_at, "
            + ", ".join(f"{n} = excluded.{n}" for n in names),
            (task_id, stamp, stamp, *cols.values()),
        )

    def record_pending(self, task: Task) -> None:
        with self.atomic() as conn:
            self._upsert_task(
                conn,
                task.task_id,
                state=PENDING,
                final=0,
                task_type=task.task_type,
                created_at=format_time(task.created),
                reason=f"status {task.status or 'unknown'}",
            )

    def record_failure(
        self, task_id: str, reason: str, *, final: bool, state: str = FAILED
    ) -> None:
        with self.atomic() as conn:
            self._upsert_task(conn, task_id, state=state, final=int(final), reason=reason)

    def start_task(self, task: Task, folder: str) -> tuple[str, dict[int, FileRow]]:
        """Record a finished task's files.

        Returns the task's folder (the one recorded first wins, so files placed by
        an earlier run never move) and the file rows already done.
        """
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT dir FROM tasks WHERE task_id = ?", (task.task_id,)
            ).fetchone()
            folder = row[0] if row and row[0] else _unclaimed(conn, task.task_id, folder)
            self._upsert_task(
                conn,
                task.task_id,
                state=INCOMPLETE,
                final=0,
                task_type=task.task_type,
                created_at=format_time(task.created),
                finished_at=format_time(task.finished),
                dir=folder,
                reason=None,
            )
            for remote in task.files:
                self._upsert_file(conn, task.task_id, remote)
        if row is None:  # new to the database: nothing of it can be done yet
            return folder, {}
        return folder, {r.index: r for r in self.files_of(task.task_id) if r.state == "done"}

    def _upsert_file(self, conn: sqlite3.Connection, task_id: str, remote: RemoteFile) -> None:
        conn.execute(
            "INSERT INTO files (task_id, idx, url, expire_time, md5, state) "
            "VALUES (?, ?, ?, ?, ?, 'wanted') "
            "ON CONFLICT (task_id, idx) DO UPDATE SET url = excluded.url, "
            "expire_time = excluded.expire_time, md5 = excluded.md5, "
            "state = CASE WHEN state = 'done' THEN 'done' ELSE 'wanted' END",
            (task_id, remote.index, remote.url, format_time(remote.expire_time), remote.md5),
        )

    def refresh_file(self, task_id: str, remote: RemoteFile) -> None:
        """A second query gave the file a fresh URL (and maybe ExpireTime)."""
        with self.atomic() as conn:
            self._upsert_file(conn, task_id, remote)

    def file_done(
        self,
        task_id: str,
        index: int,
        *,
        path: str,
        size: int,
        sha256: str,
        content_type: str | None,
    ) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE files SET state = 'done', path = ?, size = ?, sha256 = ?, "
                "content_type = ?, reason = NULL WHERE task_id = ? AND idx = ?",
                (path, size, sha256, content_type, task_id, index),
            )

    def file_failed(self, task_id: str, index: int, *, state: str, reason: str) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE files SET state = ?, reason = ? WHERE task_id = ? AND idx = ?",
                (state, reason, task_id, index),
            )

    def mark_archived(self, task_id: str) -> None:
        """The commit point: only after every file is in place and the sidecar written."""
        with self.atomic() as conn:
            self._upsert_task(conn, task_id, state=ARCHIVED, final=1, reason=None)

    def save_bookmark(self, mark: Mark) -> None:
        """Remember how far ``mark.source`` is settled, for the next run to start there."""
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO lists VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
                "settled_bytes = excluded.settled_bytes, lines = excluded.lines, "
                "ids = excluded.ids, digest = excluded.digest, updated_at = excluded.updated_at",
                (mark.source, mark.offset, mark.lines, mark.ids, mark.digest, now_text()),
            )

    # -- reading ----------------------------------------------------------------------

    def bookmarks(self) -> list[tuple[Mark, str]]:
        """Every remembered list file, with when it was last settled (a row per list file).

        None in an archive made before lists were remembered (read-only, so no table).
        """
        has_table = self._query_one("SELECT 1 FROM sqlite_master WHERE name = 'lists'")
        if has_table is None:
            return []
        rows = self._query(
            "SELECT source, settled_bytes, lines, ids, digest, updated_at FROM lists "
            "ORDER BY source"
        )
        return [
            (Mark(str(source), int(str(size)), int(str(lines)), int(str(ids)), str(d)), str(at))
            for source, size, lines, ids, d, at in rows
        ]

    def files_of(self, task_id: str) -> list[FileRow]:
        return [
            _file_row(r)
            for r in self._query(_FILE_SELECT + " WHERE task_id = ? ORDER BY idx", (task_id,))
        ]

    def totals(self) -> tuple[int, int]:
        """Files in place and their bytes."""
        row = self._query_one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE state = 'done'"
        )
        assert row is not None
        return int(str(row[0])), int(str(row[1]))

    def done_file_pages(self) -> Iterator[list[FileRow]]:
        """Done file rows in (task, index) order, a page at a time: a huge archive stays small."""
        after: tuple[str, int] = ("", -1)
        while True:
            rows = self._query(
                _FILE_SELECT + " WHERE state = 'done' AND (task_id, idx) > (?, ?) "
                "ORDER BY task_id, idx LIMIT ?",
                (*after, BATCH),
            )
            if not rows:
                return
            page = [_file_row(r) for r in rows]
            yield page
            after = (page[-1].task_id, page[-1].index)

    def counts(self) -> dict[str, int]:
        return {
            str(s): int(str(n))
            for s, n in self._query("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        }

    def tasks_in(
        self, states: Sequence[str], order: str = "first_seen"
    ) -> list[tuple[object, ...]]:
        marks = ",".join("?" * len(states))
        return self._query(
            "SELECT task_id, state, task_type, created_at, first_seen, updated_at, reason "  # noqa: S608
            f"FROM tasks WHERE state IN ({marks}) ORDER BY {order}",
            tuple(states),
        )

    def files_not_done(self, limit: int) -> list[FileRow]:
        return [
            _file_row(r)
            for r in self._query(
                _FILE_SELECT + " WHERE state != 'done' AND expire_time IS NOT NULL "
                "ORDER BY expire_time LIMIT ?",
                (limit,),
            )
        ]


def _unclaimed(conn: sqlite3.Connection, task_id: str, folder: str) -> str:
    """``folder``, or a variant no other task holds, so two tasks never share files.

    A layout may map two IDs to one folder (a width spec, or IDs that differ only
    in case on a case-insensitive filesystem); the compare ignores case for that.
    """
    taken = conn.execute(
        "SELECT 1 FROM tasks WHERE dir = ? COLLATE NOCASE AND task_id != ? LIMIT 1",
        (folder, task_id),
    ).fetchone()
    if taken is None:
        return folder
    head, _, last = folder.rpartition("/")
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:12]
    variant = safe_segment(f"{last}~{digest}")
    return f"{head}/{variant}" if head else variant


_FILE_SELECT = (
    "SELECT task_id, idx, url, expire_time, md5, state, path, size, sha256, content_type, reason "
    "FROM files"
)


def _file_row(row: tuple[object, ...]) -> FileRow:
    task_id, idx, url, expire, md5, state, path, size, sha256, ctype, reason = row
    return FileRow(
        task_id=str(task_id),
        index=int(str(idx)),
        url=str(url),
        expire_time=_opt(expire),
        md5=_opt(md5),
        state=str(state),
        path=_opt(path),
        size=None if size is None else int(str(size)),
        sha256=_opt(sha256),
        content_type=_opt(ctype),
        reason=_opt(reason),
    )


_ARCHIVED = Known(ARCHIVED, True, None)


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
