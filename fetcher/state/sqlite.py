"""The state in an SQLite database (WAL) inside the archive root: the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import ArchiveError, StepSpansAwait
from .records import Records
from .schema import MIGRATIONS, SCHEMA_VERSION

#: Page cache. Random lookups over a million tasks thrash SQLite's default 2 MB: the
#: first run over a million-line list of archived IDs took 10.5 s with 16 MiB and
#: 9.2 s with 48 MiB (hyperfine, 5 runs each), peak RSS 81 MiB. The cache only
#: fills that far on archives that large.
CACHE_KIB = 49152
#: The oldest SQLite fetcher runs on: ``INSERT ... RETURNING`` (the de-duplication)
#: came in 3.35.0; UPSERT (3.24), row values (3.15) and the JSON functions are older.
MIN_SQLITE = (3, 35, 0)


class StateDB(Records):
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
