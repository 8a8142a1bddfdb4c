"""The archive's memory: an SQLite database (WAL) inside the archive root.

A task row says where a task stands; a file row says whether one output file is
in place. A row that says ``archived`` is the commit point of the whole
pipeline: it is written only after every file is renamed into place and the
sidecar is written, so anything a crash interrupts before it is simply redone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import ArchiveError, StepSpansAwait
from .layout import safe_segment
from .models import RemoteFile, Task, TaskState, format_time, parse_time

#: IDs looked up per statement (passed as one JSON array, so no variable limit).
BATCH = 2000
#: Page cache. Random lookups over a million tasks thrash SQLite's default 2 MB: the
#: first run over a million-line list of archived IDs took 10.5 s with 16 MiB and
#: 9.2 s with 48 MiB (hyperfine, 5 runs each), peak RSS 81 MiB. The cache only
#: fills that far on archives that large.
CACHE_KIB = 49152
#: The oldest SQLite fetcher runs on: ``INSERT ... RETURNING`` (the de-duplication)
#: came in 3.35.0; UPSERT (3.24), row values (3.15) and the JSON functions are older.
MIN_SQLITE = (3, 35, 0)

#: The schema, as ordered migrations: entry ``n`` brings a database from
#: ``PRAGMA user_version`` ``n`` to ``n + 1``, in one transaction, never dropping
#: data. A change to the schema is a new entry at the end, never an edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tasks and their files, as the first releases made them.
    (
        """CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        # Fetchers before user_version read this row and refuse a value over 1; it stays
        # 1 for as long as they can still use the database.
        "INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')",
        """CREATE TABLE IF NOT EXISTS tasks (
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
        )""",
        "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state)",
        "CREATE INDEX IF NOT EXISTS tasks_by_dir ON tasks (dir COLLATE NOCASE)",
        """CREATE TABLE IF NOT EXISTS files (
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
        )""",
    ),
    # 2: each list file's settled beginning (see fetcher/lists.py).
    (
        """CREATE TABLE IF NOT EXISTS lists (
            source        TEXT PRIMARY KEY,     -- a list file's absolute path
            settled_bytes INTEGER NOT NULL,     -- its beginning whose every task is settled
            lines         INTEGER NOT NULL,
            ids           INTEGER NOT NULL,
            digest        TEXT NOT NULL,        -- SHA-256 of those bytes
            updated_at    TEXT NOT NULL
        )""",
    ),
    # 3: the download queue (fetcher/queue.py). A file row carries what a download
    # needs without its task's answer in memory, and a task row what its sidecar
    # needs; the index hands out the earliest-expiring wanted file, none-expiry last.
    (
        "ALTER TABLE files ADD COLUMN size_hint INTEGER",  # MetaData.Size, to check against
        "ALTER TABLE files ADD COLUMN file_type TEXT",
        "ALTER TABLE tasks ADD COLUMN detail TEXT",  # JSON: the answer's status and Input
        "CREATE INDEX IF NOT EXISTS files_queue ON files (state, expire_time IS NULL, expire_time)",
    ),
    # 4: what the catalog (fetcher/catalog.py) searches and lists. A task's words sit in
    # task_text, written in the step that records the task's answer; task_search is an
    # FTS5 index over them kept by triggers (external content: the words are stored
    # once). Its id is an INTEGER PRIMARY KEY because VACUUM may renumber a plain rowid,
    # which would leave the index pointing at the wrong rows. The trigram tokenizer
    # finds any run of three or more characters: prompts in Chinese have no spaces to
    # split words at, and a piece of a task ID is found too. Tasks are listed newest
    # first by their creation time (the first sighting for a task never answered), by
    # those indexes, so a page deep in the list costs what the first one does.
    (
        """CREATE TABLE IF NOT EXISTS task_text (
            id              INTEGER PRIMARY KEY,
            task_id         TEXT NOT NULL UNIQUE REFERENCES tasks (task_id),
            prompt          TEXT,
            negative_prompt TEXT,
            model           TEXT,
            model_version   TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS task_text_by_model ON task_text (model)",
        """CREATE VIRTUAL TABLE IF NOT EXISTS task_search USING fts5 (
            task_id, prompt, negative_prompt, model, model_version,
            content = 'task_text', content_rowid = 'id', tokenize = 'trigram'
        )""",
        """CREATE TRIGGER IF NOT EXISTS task_text_added AFTER INSERT ON task_text BEGIN
            INSERT INTO task_search (rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES (new.id, new.task_id, new.prompt, new.negative_prompt, new.model,
                    new.model_version);
        END""",
        """CREATE TRIGGER IF NOT EXISTS task_text_removed AFTER DELETE ON task_text BEGIN
            INSERT INTO task_search
                (task_search, rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES ('delete', old.id, old.task_id, old.prompt, old.negative_prompt, old.model,
                    old.model_version);
        END""",
        """CREATE TRIGGER IF NOT EXISTS task_text_changed AFTER UPDATE ON task_text BEGIN
            INSERT INTO task_search
                (task_search, rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES ('delete', old.id, old.task_id, old.prompt, old.negative_prompt, old.model,
                    old.model_version);
            INSERT INTO task_search (rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES (new.id, new.task_id, new.prompt, new.negative_prompt, new.model,
                    new.model_version);
        END""",
        "CREATE INDEX IF NOT EXISTS tasks_newest "
        "ON tasks (COALESCE(created_at, first_seen), task_id)",
        "CREATE INDEX IF NOT EXISTS tasks_by_type_newest "
        "ON tasks (task_type, COALESCE(created_at, first_seen), task_id)",
        "CREATE INDEX IF NOT EXISTS tasks_by_state_newest "
        "ON tasks (state, COALESCE(created_at, first_seen), task_id)",
        # Answers recorded before this migration are indexed by fetcher/index.py, under
        # the lock, with a progress bar: not here, where a big archive would sit silent.
        "INSERT OR REPLACE INTO meta VALUES ('text_index', CASE WHEN EXISTS "
        "(SELECT 1 FROM tasks WHERE detail IS NOT NULL) THEN 'partial' ELSE 'whole' END)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
#: The first schema with the search index (task_text, task_search).
TEXT_SCHEMA = 4

#: Task states.
#: Named by ``fetcher enqueue`` and not asked about yet (fetcher/intake.py).
QUEUED = "queued"
PENDING = "pending"
INCOMPLETE = "incomplete"
ARCHIVED = "archived"
FAILED = "failed"
EXPIRED = "expired"
#: Every task state, in the order reports list them.
STATES = (ARCHIVED, PENDING, INCOMPLETE, FAILED, EXPIRED, QUEUED)


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
    """The state database; a context manager that owns one connection.

    Its rules are enforced, not hoped for: a step (:meth:`atomic`) cannot span an
    ``await`` (:class:`~fetcher.errors.StepSpansAwait`); a group commit that fails
    is raised by the next step, by the end of :meth:`grouped`, or at close; the
    schema moves only through :data:`MIGRATIONS`; an SQLite older than
    :data:`MIN_SQLITE` is refused at open. ``readonly`` opens without writing
    anything, even on a read-only mount (``immutable`` when the folder cannot be
    written), and without migrating: readers cope with older schemas.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: ArchiveError | None = None
        self._failure_raised = False
        #: Set while a step runs; a second step entering sees it.
        self._in_step = False
        #: Bumped once per loop turn that had steps (by the group commit or a sentinel).
        self._turns = 0
        #: The schema version found at open (after migrating, when writable).
        self.version = 0

    def __enter__(self) -> Self:
        require_sqlite(sqlite3.sqlite_version_info)
        if not self._readonly:
            require_fts5()
        try:
            conn = self._connect()
            if not self._readonly:
                self._migrate(conn)
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self.version = self._version(conn)
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot open state database {str(self.path)!r}: {exc}") from exc
        self._conn = conn
        if self.version > SCHEMA_VERSION:
            conn.close()
            self._conn = None
            raise ArchiveError(
                f"state database {str(self.path)!r} has schema {self.version}; "
                f"this fetcher knows up to {SCHEMA_VERSION}: upgrade fetcher"
            )
        return self

    def _connect(self) -> sqlite3.Connection:
        """The connection, writable (WAL, synced commits) or read-only."""
        if not self._readonly:
            # sqlite3's own timeout is the busy timeout, set before a migration's BEGIN.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # The run's temporary tables (IDs new to the archive, tasks still open) go to
            # a temporary file behind SQLite's own small cache, not into memory: a first
            # run over 100,000 new pending IDs peaked 17 MiB lower.
            conn.execute("PRAGMA temp_store=FILE")
            # Their rollback journal stays in memory: a journal file per statement cost
            # a run over 2,000 small tasks about 8 % of its time.
            conn.execute("PRAGMA temp.journal_mode=MEMORY")
            return conn
        if not self.path.is_file():
            raise sqlite3.OperationalError("unable to open database file")
        # A read-only folder (a backup, a read-only mount) cannot take the -shm file
        # WAL readers need; with no -wal there is nothing outside the main file to
        # read, so SQLite may treat it as immutable and create nothing.
        wal = self.path.with_name(self.path.name + "-wal")
        immutable = not os.access(self.path.parent, os.W_OK) and not _has_bytes(wal)
        query = "mode=ro&immutable=1" if immutable else "mode=ro"
        uri = f"{self.path.as_uri()}?{query}"
        return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema up to :data:`SCHEMA_VERSION`, one migration per transaction."""
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._version(conn)
                if version >= SCHEMA_VERSION:
                    conn.execute("COMMIT")
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        """``PRAGMA user_version``; for a database made before it was kept, what its tables say."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version:
            return version
        names = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        if "tasks" not in names or "tasks_by_dir" not in names:
            # New, or the very first releases (no tasks_by_dir): migration 1 makes only
            # what is missing (IF NOT EXISTS), so it runs over either.
            return 0
        return 2 if "lists" in names else 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not self._failure_raised:
            self._raise_failure(exc)

    def _raise_failure(self, exc: BaseException | None) -> None:
        """A failed group commit is raised (never lost), ``exc`` being what is under way.

        Over another error it is raised too (that one stays as its context); a
        KeyboardInterrupt or a cancellation keeps going, with the failure as a note.
        """
        failed = self._failed
        if failed is None or exc is failed:
            return
        self._failure_raised = True
        if exc is None or isinstance(exc, Exception):
            raise failed
        exc.add_note(f"also: {failed}")

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "StateDB used outside 'with'"
        return self._conn

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One step: all of it lands, or none of it does.

        Inside :meth:`grouped`, steps taken in the same turn of the event loop share
        one transaction, committed as soon as the loop gets control back. A step must
        not ``await``: another coroutine's steps would land inside it, and its turn's
        commit would cut it in two. So a step that began inside another, or saw the
        loop turn before it ended, is rolled back and raises
        :class:`~fetcher.errors.StepSpansAwait`.
        """
        conn = self.conn
        if self._failed is not None:
            self._failure_raised = True
            raise self._failed
        if self._in_step:
            raise StepSpansAwait(
                "a state step began while another was open (one awaited, or steps nested)"
            )
        sentinel = self._watch_turn()
        turn = self._turns
        self._in_step = True
        try:
            if self._loop is None:
                conn.execute("BEGIN IMMEDIATE")
            elif not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
                self._loop.call_soon(self._commit_group)
            conn.execute("SAVEPOINT step")
            try:
                yield conn
                if self._turns != turn:
                    raise StepSpansAwait("a state step spanned an await: the loop turned inside it")
            except BaseException:
                conn.execute("ROLLBACK TO step")
                conn.execute("RELEASE step")
                if self._loop is None:
                    conn.execute("ROLLBACK")
                elif self._turns != turn:
                    # The turn's commit was held back for this step: the loop takes it now.
                    self._loop.call_soon(self._commit_group)
                raise
            conn.execute("RELEASE step")
            if self._loop is None:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc
        finally:
            self._in_step = False
            if sentinel is not None:
                sentinel.cancel()

    def _watch_turn(self) -> asyncio.Handle | None:
        """Outside a group, on a running loop: a callback that tells a step the loop turned.

        Inside a group the turn's commit does that job at no cost.
        """
        if self._loop is not None:
            return None
        loop = _running_loop()
        return None if loop is None else loop.call_soon(self._turned)

    def _turned(self) -> None:
        self._turns += 1

    @contextmanager
    def grouped(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Group the steps of each event-loop turn into one transaction (a fetch run).

        A profile of 2,000 small tasks spent a tenth of the loop's time in BEGIN and
        COMMIT, three of each per task; on a disk, each COMMIT is also an fsync. A step
        still lands whole or not at all (a savepoint each), and the order of commits
        is the order of steps; a kill can lose only the steps of the turn it hit,
        which the next run does again. The last group's commit happens on the way
        out; if it fails, that is raised here, over any other error.
        """
        self._loop = loop
        try:
            yield
        except BaseException as exc:
            self._loop = None
            self._commit_group()
            self._raise_failure(exc)
            raise
        self._loop = None
        self._commit_group()
        self._raise_failure(None)

    def _commit_group(self) -> None:
        """Commit the turn's steps; a failure is raised by the next step (a loop callback
        has no caller to raise to), or when the group or the database is closed.

        A step still open means it awaited: its commit waits for it to end (and fail).
        """
        self._turns += 1
        if self._in_step:
            return
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._failed = ArchiveError(f"state database {str(self.path)!r}: {exc}")

    def query_one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        """One row of a read (or a write with RETURNING); sqlite's errors made ArchiveError."""
        try:
            row: tuple[object, ...] | None = self.conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc
        return row

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Every row of a read (or a write with RETURNING); sqlite's errors made ArchiveError."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc

    def delete(self, sql: str, params: Sequence[object] = ()) -> int:
        """A DELETE (or UPDATE) outside any step; how many rows it touched."""
        try:
            return self.conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc

    def query_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """One statement over many rows (``executemany``); sqlite's errors made ArchiveError."""
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise ArchiveError(f"state database {str(self.path)!r}: {exc}") from exc

    def has_table(self, name: str) -> bool:
        """Whether the schema has ``name``: a read-only open of an old archive is not migrated."""
        return self.query_one("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)) is not None

    # -- input ------------------------------------------------------------------------

    def unfinished_ids(self) -> list[str]:
        """Tasks a ``--pending`` run queries: enqueued, still running, or interrupted
        mid-download."""
        rows = self.query(
            "SELECT task_id FROM tasks WHERE state IN (?, ?, ?) ORDER BY first_seen",
            (QUEUED, PENDING, INCOMPLETE),
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
            _upsert_text(conn, task)

    def record_failure(
        self,
        task_id: str,
        reason: str,
        *,
        final: bool,
        state: str = FAILED,
        task: Task | None = None,
    ) -> None:
        """A task failed; ``task``, when the API described it, records its type, time and words."""
        with self.atomic() as conn:
            if task is None:
                self._upsert_task(conn, task_id, state=state, final=int(final), reason=reason)
                return
            self._upsert_task(
                conn,
                task_id,
                state=state,
                final=int(final),
                reason=reason,
                task_type=task.task_type,
                created_at=format_time(task.created),
            )
            _upsert_text(conn, task)

    def start_task(self, task: Task, folder: str) -> tuple[str, dict[int, FileRow]] | None:
        """Record a finished task's files, which queues those not done.

        Returns the task's folder (the one recorded first wins, so files placed by
        an earlier run never move) and the file rows already done; None, recording
        nothing, when the task is archived already (its files, queued by an earlier
        run, came down while this answer was on its way).
        """
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT dir, state FROM tasks WHERE task_id = ?", (task.task_id,)
            ).fetchone()
            if row is not None and row[1] == ARCHIVED:
                return None
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
                detail=json.dumps({"status": task.status, "input": dict(task.input)}),
            )
            _upsert_text(conn, task)
            for remote in task.files:
                self._upsert_file(conn, task.task_id, remote)
        if row is None:  # new to the database: nothing of it can be done yet
            return folder, {}
        return folder, {r.index: r for r in self.files_of(task.task_id) if r.state == "done"}

    def _upsert_file(self, conn: sqlite3.Connection, task_id: str, remote: RemoteFile) -> None:
        conn.execute(
            "INSERT INTO files (task_id, idx, url, expire_time, md5, size_hint, file_type, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'wanted') "
            "ON CONFLICT (task_id, idx) DO UPDATE SET url = excluded.url, "
            "expire_time = excluded.expire_time, md5 = excluded.md5, "
            "size_hint = excluded.size_hint, file_type = excluded.file_type, "
            "state = CASE WHEN state = 'done' THEN 'done' ELSE 'wanted' END",
            (
                task_id,
                remote.index,
                remote.url,
                format_time(remote.expire_time),
                remote.md5,
                remote.size,
                remote.file_type,
            ),
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

    def requeue_file(self, task_id: str, index: int) -> None:
        """A file recorded done whose bytes are gone from the archive: wanted again."""
        with self.atomic() as conn:
            conn.execute(
                "UPDATE files SET state = 'wanted' WHERE task_id = ? AND idx = ?",
                (task_id, index),
            )

    def mark_archived(self, task_id: str) -> None:
        """The commit point: only after every file is in place and the sidecar written."""
        with self.atomic() as conn:
            self._upsert_task(conn, task_id, state=ARCHIVED, final=1, reason=None)

    # -- reading ----------------------------------------------------------------------

    def wanted_left(self, task_id: str) -> bool:
        """Whether any of the task's files is still in the queue (claimed ones included)."""
        row = self.query_one(
            "SELECT 1 FROM files WHERE task_id = ? AND state = 'wanted' LIMIT 1", (task_id,)
        )
        return row is not None

    def stored_task(self, task_id: str) -> tuple[Task, str] | None:
        """The task as its sidecar needs it, and its folder, rebuilt from its row alone.

        Downloads run from the queue, long after (or a run after) the answer was
        read, so the answer is not kept in memory: what the sidecar says of it
        (status, Input, times, type) was stored with the task's files.
        """
        row = self.query_one(
            "SELECT task_type, created_at, finished_at, dir, detail FROM tasks WHERE task_id = ?",
            (task_id,),
        )
        if row is None or row[3] is None:
            return None
        task_type, created, finished, folder, detail = row
        stored = json.loads(str(detail)) if detail is not None else {}
        stored = stored if isinstance(stored, dict) else {}
        task_input = stored.get("input")
        task = Task(
            task_id=task_id,
            task_type=str(task_type or ""),
            state=TaskState.FINISHED,
            status=str(stored.get("status") or "FINISH"),
            created=parse_time(created),
            finished=parse_time(finished),
            input=task_input if isinstance(task_input, dict) else {},
        )
        return task, str(folder)

    def files_of(self, task_id: str) -> list[FileRow]:
        return [
            _file_row(r)
            for r in self.query(_FILE_SELECT + " WHERE task_id = ? ORDER BY idx", (task_id,))
        ]

    def totals(self) -> tuple[int, int]:
        """Files in place and their bytes."""
        row = self.query_one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE state = 'done'"
        )
        assert row is not None
        return int(str(row[0])), int(str(row[1]))

    def done_file_pages(self) -> Iterator[list[FileRow]]:
        """Done file rows in (task, index) order, a page at a time: a huge archive stays small."""
        after: tuple[str, int] = ("", -1)
        while True:
            rows = self.query(
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
        """Tasks by state, every state named (zeros too), so a reader never guesses."""
        found = {
            str(s): int(str(n))
            for s, n in self.query("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        }
        return {state: found.pop(state, 0) for state in STATES} | found

    def tasks_in(
        self, states: Sequence[str], order: str = "first_seen", limit: int | None = None
    ) -> list[tuple[object, ...]]:
        """Tasks in ``states`` (at most ``limit`` of them, None: all), in ``order``."""
        marks = ",".join("?" * len(states))
        return self.query(
            "SELECT task_id, state, task_type, created_at, first_seen, updated_at, reason "  # noqa: S608
            f"FROM tasks WHERE state IN ({marks}) ORDER BY {order} LIMIT ?",
            (*states, -1 if limit is None else limit),
        )

    def files_not_done(self, limit: int | None) -> list[FileRow]:
        """Files still to download that have an expiry, nearest first (``limit``: None is all)."""
        return [
            _file_row(r)
            for r in self.query(
                _FILE_SELECT + " WHERE state != 'done' AND expire_time IS NOT NULL "
                "ORDER BY expire_time LIMIT ?",
                (-1 if limit is None else limit,),
            )
        ]

    def count_files_not_done(self) -> int:
        """How many rows :meth:`files_not_done` would give without a limit."""
        row = self.query_one(
            "SELECT COUNT(*) FROM files WHERE state != 'done' AND expire_time IS NOT NULL"
        )
        return int(str(row[0])) if row else 0


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


def _upsert_text(conn: sqlite3.Connection, task: Task) -> None:
    """The task's words for the search index, in the step that records its answer.

    Rewritten only when they changed: a pending task asked about by every cron run
    does not churn the index.
    """
    upsert_text(
        conn,
        task.task_id,
        (task.prompt, task.negative_prompt, task.model_name, task.model_version),
    )


def upsert_text(
    conn: sqlite3.Connection,
    task_id: str,
    words: tuple[str | None, str | None, str | None, str | None],
) -> None:
    """Record ``words`` (prompt, negative prompt, model name, model version) for a task."""
    conn.execute(
        "INSERT INTO task_text (task_id, prompt, negative_prompt, model, model_version) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET prompt = excluded.prompt, "
        "negative_prompt = excluded.negative_prompt, model = excluded.model, "
        "model_version = excluded.model_version "
        "WHERE (prompt, negative_prompt, model, model_version) IS NOT "
        "(excluded.prompt, excluded.negative_prompt, excluded.model, excluded.model_version)",
        (task_id, *words),
    )


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
        expire_time=opt_text(expire),
        md5=opt_text(md5),
        state=str(state),
        path=opt_text(path),
        size=None if size is None else int(str(size)),
        sha256=opt_text(sha256),
        content_type=opt_text(ctype),
        reason=opt_text(reason),
    )


def require_sqlite(version: tuple[int, int, int]) -> None:
    """Refuse an SQLite older than :data:`MIN_SQLITE`, in one line, before it fails mid-run."""
    if version < MIN_SQLITE:
        found = ".".join(map(str, version))
        needed = ".".join(map(str, MIN_SQLITE))
        raise ArchiveError(
            f"SQLite {found} is too old: fetcher needs {needed} or newer "
            "(Python's sqlite3 module uses the SQLite it was built with)"
        )


@functools.cache
def has_fts5() -> bool:
    """Whether this Python's SQLite has FTS5 built in (python.org's and Debian's do)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        options = {str(r[0]) for r in conn.execute("PRAGMA compile_options")}
    return "ENABLE_FTS5" in options


def require_fts5() -> None:
    """Refuse, in one line, an SQLite without FTS5: the state's search index needs it."""
    if not has_fts5():
        raise ArchiveError(
            f"SQLite {sqlite3.sqlite_version} has no FTS5 (full-text search), which the "
            "archive's state needs: use a Python whose sqlite3 module has it (python.org's, "
            "Debian's, Homebrew's do)"
        )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None in plain synchronous code."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _has_bytes(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def opt_text(value: object) -> str | None:
    """A nullable TEXT column as ``str | None``."""
    return None if value is None else str(value)
