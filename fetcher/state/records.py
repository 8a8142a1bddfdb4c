"""What the archive records about tasks and files, over any implementation's connection.

A task row says where a task stands; a file row says whether one output file is
in place. A row that says ``archived`` is the commit point of the whole
pipeline: it is written only after every file is renamed into place and the
sidecar is written, so anything a crash interrupts before it is simply redone.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ClassVar, ParamSpec, Protocol, Self, TypeVar

from ..errors import StepLost
from ..layout import safe_segment
from ..models import RemoteFile, Task, TaskState, format_time, parse_time
from .rows import (
    ARCHIVED,
    BATCH,
    FAILED,
    FILE_SELECT,
    INCOMPLETE,
    PENDING,
    QUEUED,
    STATES,
    FileRow,
    file_row,
    now_text,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def redone(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """``func``, run again whole when one of its steps was cut off with the state's
    connection (:class:`~fetcher.errors.StepLost`: nothing of that step committed).

    Only for functions whose every effect is their steps' SQL, each step right
    again if its run was the one that committed (upserts, and checks done in the
    step that writes): running one twice does what running it once does. The wait
    for the database is the state's, and bounded there.
    """

    @functools.wraps(func)
    def again(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        while True:
            try:
                return func(*args, **kwargs)
            except StepLost:
                continue

    return again


class Cursor(Protocol):
    """What a statement gives back: its rows, and how many rows it touched."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Step(Protocol):
    """The connection a step (:meth:`Records.atomic`) hands out: it runs statements."""

    def execute(self, sql: str, params: Sequence[object] = (), /) -> Cursor: ...


#: A check made inside a settling write's own transaction, before the write: whether the
#: run still holds the task's lease (:meth:`fetcher.lease.Leases.held`).
Held = Callable[[Step], bool]


class Records(ABC):
    """The tasks and files an archive knows, read and written through the few methods an
    implementation provides (steps, reads), so each of them keeps the same rules.

    Statements are written once, in the SQL both databases speak (``?`` for a
    parameter; an implementation translates what its own dialect spells otherwise).
    """

    #: The schema version found at open (after migrating, when writable).
    version: int
    #: Which SQL the database speaks beyond what both share: ``sqlite`` or ``postgresql``.
    dialect: ClassVar[str] = "sqlite"
    #: What ``LIMIT ?`` takes to mean no limit.
    no_limit: ClassVar[int | None] = -1
    #: Whether another host may write the same state at the same time (no snapshot of it
    #: is kept beside the archive: the database is the state).
    shared: ClassVar[bool] = False

    @abstractmethod
    def __enter__(self) -> Self:
        """Open (and migrate, when writable) the state."""

    @abstractmethod
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close it; a failed group commit is raised here, never lost."""

    @abstractmethod
    def atomic(self) -> AbstractContextManager[Step]:
        """One step: all of it lands, or none of it does."""

    @abstractmethod
    def grouped(self, loop: asyncio.AbstractEventLoop) -> AbstractContextManager[None]:
        """Steps of one event-loop turn share a commit, where the implementation can."""

    @abstractmethod
    def delete(self, sql: str, params: Sequence[object] = ()) -> int:
        """A DELETE (or UPDATE) outside any step; how many rows it touched."""

    @abstractmethod
    def query_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """One statement over many rows."""

    def listen(self, channel: str) -> bool:
        """Be woken by a ``NOTIFY`` on ``channel`` (:meth:`wait_notice`); False where the
        database has no such thing (SQLite: its readers look again now and then)."""
        return False

    def wait_notice(self, timeout: float) -> bool:
        """After :meth:`listen`: wait up to ``timeout`` seconds for a notice; whether one came."""
        raise NotImplementedError("this state cannot listen")

    @abstractmethod
    def has_table(self, name: str) -> bool:
        """Whether the schema has ``name``: a read-only open of an old archive is not migrated."""

    @abstractmethod
    def query_one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        """One row of a read (or a write with RETURNING)."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Every row of a read (or a write with RETURNING)."""

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

    def _upsert_task(self, conn: Step, task_id: str, **cols: object) -> None:
        stamp = now_text()
        names = list(cols)
        conn.execute(
            f"INSERT INTO tasks (task_id, first_seen, updated_at, {', '.join(names)}) "  # noqa: S608
            f"VALUES (?, ?, ?, {', '.join('?' * len(names))}) "
            f"ON CONFLICT (task_id) DO UPDATE SET updated_at = excluded.updated_at, "
            + ", ".join(f"{n} = excluded.{n}" for n in names),
            (task_id, stamp, stamp, *cols.values()),
        )

    @redone
    def record_pending(self, task: Task, held: Held | None = None) -> bool:
        """The API still runs the task; with ``held``, only under the run's lease (see
        :meth:`mark_archived`). Returns whether the row was written."""
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return False
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
        return True

    @redone
    def record_failure(
        self,
        task_id: str,
        reason: str,
        *,
        final: bool,
        state: str = FAILED,
        task: Task | None = None,
        held: Held | None = None,
    ) -> bool:
        """A task failed; ``task``, when the API described it, records its type, time and words.

        With ``held``, only under the run's lease; returns whether the row was written.
        """
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return False
            if task is None:
                self._upsert_task(conn, task_id, state=state, final=int(final), reason=reason)
                return True
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
        return True

    @redone
    def start_task(
        self, task: Task, folder: str, held: Held | None = None
    ) -> tuple[str, dict[int, FileRow]] | None:
        """Record a finished task's files, which queues those not done.

        Returns the task's folder (the one recorded first wins, so files placed by
        an earlier run never move) and the file rows already done; None, recording
        nothing, when the task is archived already (its files, queued by an earlier
        run, came down while this answer was on its way) or, with ``held``, when the
        run no longer holds the task's lease.
        """
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return None
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

    def _upsert_file(self, conn: Step, task_id: str, remote: RemoteFile) -> None:
        conn.execute(
            "INSERT INTO files (task_id, idx, url, expire_time, md5, size_hint, file_type, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'wanted') "
            "ON CONFLICT (task_id, idx) DO UPDATE SET url = excluded.url, "
            "expire_time = excluded.expire_time, md5 = excluded.md5, "
            "size_hint = excluded.size_hint, file_type = excluded.file_type, "
            "state = CASE WHEN files.state = 'done' THEN 'done' ELSE 'wanted' END",
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

    @redone
    def refresh_file(self, task_id: str, remote: RemoteFile) -> None:
        """A second query gave the file a fresh URL (and maybe ExpireTime)."""
        with self.atomic() as conn:
            self._upsert_file(conn, task_id, remote)

    @redone
    def file_done(
        self,
        task_id: str,
        index: int,
        *,
        path: str,
        size: int,
        sha256: str,
        content_type: str | None,
        held: Held | None = None,
    ) -> bool:
        """The file is in place; with ``held``, recorded only under the run's lease."""
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return False
            conn.execute(
                "UPDATE files SET state = 'done', path = ?, size = ?, sha256 = ?, "
                "content_type = ?, reason = NULL WHERE task_id = ? AND idx = ?",
                (path, size, sha256, content_type, task_id, index),
            )
        return True

    @redone
    def file_failed(
        self, task_id: str, index: int, *, state: str, reason: str, held: Held | None = None
    ) -> bool:
        """The file could not be had; with ``held``, recorded only under the run's lease."""
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return False
            conn.execute(
                "UPDATE files SET state = ?, reason = ? WHERE task_id = ? AND idx = ?",
                (state, reason, task_id, index),
            )
        return True

    @redone
    def requeue_file(self, task_id: str, index: int, held: Held | None = None) -> None:
        """A file recorded done whose bytes are gone from the archive: wanted again (with
        ``held``, only under the run's lease)."""
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return
            conn.execute(
                "UPDATE files SET state = 'wanted' WHERE task_id = ? AND idx = ?",
                (task_id, index),
            )

    @redone
    def mark_archived(self, task_id: str, held: Held | None = None) -> bool:
        """The commit point: only after every file is in place and the sidecar written.

        With ``held``, only if it says, in the same transaction, that the run still
        holds the task's lease (fetcher/lease.py); returns whether the row was written.
        """
        with self.atomic() as conn:
            if held is not None and not held(conn):
                return False
            self._upsert_task(conn, task_id, state=ARCHIVED, final=1, reason=None)
        return True

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
            file_row(r)
            for r in self.query(FILE_SELECT + " WHERE task_id = ? ORDER BY idx", (task_id,))
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
                FILE_SELECT + " WHERE state = 'done' AND (task_id, idx) > (?, ?) "
                "ORDER BY task_id, idx LIMIT ?",
                (*after, BATCH),
            )
            if not rows:
                return
            page = [file_row(r) for r in rows]
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
            (*states, self.no_limit if limit is None else limit),
        )

    def files_not_done(self, limit: int | None) -> list[FileRow]:
        """Files still to download that have an expiry, nearest first (``limit``: None is all)."""
        return [
            file_row(r)
            for r in self.query(
                FILE_SELECT + " WHERE state != 'done' AND expire_time IS NOT NULL "
                "ORDER BY expire_time LIMIT ?",
                (self.no_limit if limit is None else limit,),
            )
        ]

    def count_files_not_done(self) -> int:
        """How many rows :meth:`files_not_done` would give without a limit."""
        row = self.query_one(
            "SELECT COUNT(*) FROM files WHERE state != 'done' AND expire_time IS NOT NULL"
        )
        return int(str(row[0])) if row else 0


def _unclaimed(conn: Step, task_id: str, folder: str) -> str:
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


def _upsert_text(conn: Step, task: Task) -> None:
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
    conn: Step,
    task_id: str,
    words: tuple[str | None, str | None, str | None, str | None],
) -> None:
    """Record ``words`` (prompt, negative prompt, model name, model version) for a task."""
    conn.execute(
        "INSERT INTO task_text (task_id, prompt, negative_prompt, model, model_version) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET prompt = excluded.prompt, "
        "negative_prompt = excluded.negative_prompt, model = excluded.model, "
        "model_version = excluded.model_version "
        "WHERE (task_text.prompt, task_text.negative_prompt, task_text.model, "
        "task_text.model_version) IS NOT "
        "(excluded.prompt, excluded.negative_prompt, excluded.model, excluded.model_version)",
        (task_id, *words),
    )
