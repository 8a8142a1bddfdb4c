"""The state in a PostgreSQL database that several hosts share.

psycopg (on libpq, so ``PG*`` variables and ``~/.pgpass`` fill in what the URL
leaves out) is imported here alone, when a ``postgresql://`` state is named. The
statements the rest of fetcher writes once, in SQLite's spelling, are turned into
PostgreSQL's by :func:`postgres_sql`. A step is a transaction of its own: other
hosts see its rows as soon as it ends, and a connection lost in the middle of one
commits nothing of it, so no task is ever recorded archived that is not.

A lost connection (the server restarted or shut down, the network cut) is made
again, waiting 0.5 s doubling to 8 s between attempts, for up to the URL's
``reconnect`` seconds in all (``--state-reconnect``); then the run stops in one
line. What lived in the lost session (``LISTEN``, temporary tables) is redone on
the new one, from the statements that made it. A statement outside a step is run
again; a step is not (its function had results it acted on): it raises
:class:`~fetcher.errors.StepLost`, and the function made of it runs again whole
(:func:`~fetcher.state.records.redone`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from ..errors import ArchiveError, StateUnreachable, StepLost, StepSpansAwait, UsageError
from .address import DatabaseUrl
from .records import Cursor, Records
from .schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg

#: Seconds a connection attempt waits for the server before it counts as unreachable.
CONNECT_TIMEOUT = 10
#: Seconds between two attempts to reconnect: the first wait, doubled up to the last.
RECONNECT_WAITS = (0.5, 8.0)
#: The advisory lock migrations take, so two hosts starting at once migrate one after
#: the other (a number of our own: ``fetcher`` in ASCII).
MIGRATION_LOCK = 0x66657463686572

_T = TypeVar("_T")
_log = logging.getLogger("fetcher")
#: Statements whose effect lives in the session, not the database: temporary tables and
#: ``LISTEN``. Those that write are redone, in order, on a new connection.
_SESSION = re.compile(r"^\s*LISTEN\b|\bpg_temp\.|\bTEMP TABLE\b", re.IGNORECASE)
#: The temporary table a kept statement writes rows of.
_WRITES = re.compile(r"^\s*(?:INSERT\s+INTO|DELETE\s+FROM|UPDATE)\s+pg_temp\.(\w+)", re.IGNORECASE)
#: A statement that empties a temporary table: what was written to it before is moot.
_EMPTIES = re.compile(r"^\s*DELETE\s+FROM\s+pg_temp\.(\w+)\s*$", re.IGNORECASE)


def _json_path(match: re.Match[str]) -> str:
    """``json_extract(t.detail, '$.a.b')`` as PostgreSQL's ``(t.detail::json #>> '{a,b}')``."""
    column, path = match.groups()
    return f"({column}::json #>> '{{{path.replace('.', ',')}}}')"


#: SQLite's spellings that PostgreSQL spells otherwise, in the order they are applied.
_DIALECT: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile("%"), "%%"),
    (re.compile(r"json_each\(\?\)"), "json_array_elements_text(?::json) AS value"),
    (re.compile(r"json_extract\((\w+\.\w+), '\$\.([\w.]+)'\)"), _json_path),
    (re.compile(r"\binstr\("), "strpos("),
    # A unary plus keeps SQLite's planner off an index; PostgreSQL has no unary plus on text.
    (re.compile(r"(^|[\s(])\+(?=[A-Za-z_])"), r"\1"),
    (re.compile(r"(\w+(?:\.\w+)?) = \? COLLATE NOCASE"), r"lower(\1) = lower(?)"),
    (re.compile(r"\bIS NOT \("), "IS DISTINCT FROM ("),
    (re.compile(r"\s+WITHOUT ROWID"), ""),
    (re.compile(r"\btemp\."), "pg_temp."),
    (re.compile(r"\?"), "%s"),
)


@functools.lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """``sql`` as PostgreSQL takes it: ``%s`` parameters, and its own words where
    SQLite's differ (``json_each``, ``COLLATE NOCASE``, ``IS NOT`` on rows, temp tables)."""
    for pattern, replacement in _DIALECT:
        sql = pattern.sub(replacement, sql)
    return sql


class _Step:
    """A step's connection: statements in SQLite's spelling, run by PostgreSQL."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = (), /) -> Cursor:
        return self._conn.execute(postgres_sql(sql), params)


class PostgresState(Records):
    """The state database in PostgreSQL; a context manager that owns one connection.

    The schema is created on first use and migrated on open (under an advisory
    lock) by every command, read-only ones included: the database is shared, and
    there is no file to keep untouched.
    """

    dialect: ClassVar[str] = "postgresql"
    no_limit: ClassVar[int | None] = None
    shared: ClassVar[bool] = True

    def __init__(self, url: DatabaseUrl, *, readonly: bool = False) -> None:
        self.url = url
        self._readonly = readonly
        self._conn: psycopg.Connection[Any] | None = None
        self._in_step = False
        self.version = 0
        #: The statements that made the session's own state, each with its rows of
        #: parameters: redone on a new connection. They grow with the run's open tasks,
        #: as the temporary tables they fill do, and are forgotten with a table emptied.
        self._session: list[tuple[str, list[Sequence[object]]]] = []
        #: When the connection was lost, if no statement succeeded since: the time the
        #: reconnects are bounded from.
        self._lost_at: float | None = None

    def __enter__(self) -> Self:
        psycopg = _psycopg()
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            raise StateUnreachable(
                f"cannot connect to the state database {self.url}: {self._reason(exc)}"
            ) from None
        try:
            self.version = self._migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise ArchiveError(
                f"cannot open the state database {self.url}: {self._reason(exc)}"
            ) from None
        if self.version > SCHEMA_VERSION:
            conn.close()
            raise ArchiveError(
                f"state database {self.url} has schema {self.version}; "
                f"this fetcher knows up to {SCHEMA_VERSION}: upgrade fetcher"
            )
        self._conn = conn
        return self

    def _connect(self) -> psycopg.Connection[Any]:
        return _psycopg().connect(  # type: ignore[no-any-return]
            self.url.dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="fetcher",
        )

    @staticmethod
    def _migrate(conn: psycopg.Connection[Any]) -> int:
        """Bring the schema up to :data:`SCHEMA_VERSION`, one migration per transaction."""
        while True:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS fetcher_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM fetcher_schema").fetchone()
                version = int(row[0]) if row else 0
                if version >= SCHEMA_VERSION:
                    return version
                for statement in POSTGRES_MIGRATIONS[version]:
                    conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO fetcher_schema VALUES (%s)", (version + 1,))
                else:
                    conn.execute("UPDATE fetcher_schema SET version = %s", (version + 1,))

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
    def conn(self) -> psycopg.Connection[Any]:
        """The connection now, a new one if the last was lost (see :meth:`_reconnect`)."""
        assert self._conn is not None, "PostgresState used outside 'with'"
        if self._conn.closed:
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        """Connect again and redo the session's statements, waiting longer after each
        failed attempt; an :class:`ArchiveError` once :attr:`DatabaseUrl.reconnect`
        seconds have passed since the connection was lost."""
        failure = _psycopg().Error
        lost_at = self._lost_at = self._lost_at or time.monotonic()
        wait, most = RECONNECT_WAITS
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self._connect()
                for sql, rows in self._session:
                    with conn.cursor() as cursor:
                        cursor.executemany(sql, rows)
                break
            except failure as exc:
                if conn is not None:
                    conn.close()
                left = lost_at + self.url.reconnect - time.monotonic()
                if left <= 0:
                    raise ArchiveError(
                        f"state database {self.url}: the connection was lost and did not come "
                        f"back within {self.url.reconnect:g} s ({self._reason(exc)}); what was "
                        "recorded before it stays, the next run goes on from there"
                    ) from None
                time.sleep(min(wait, left))
                wait = min(wait * 2, most)
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        waited = time.monotonic() - lost_at
        _log.info(
            "connected again to the state database %s, %.1f s after losing it", self.url, waited
        )

    def _run(self, statement: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``statement`` on the connection; outside a step, run again on a new connection
        when the last was lost (a statement outside a step is a transaction of its own:
        lost, it committed nothing, or what it wrote was the lost session's)."""
        failure = _psycopg().Error
        while True:
            conn = self.conn
            try:
                result = statement(conn)
            except failure as exc:
                if self._in_step or not conn.closed:
                    raise self._error(exc) from None
                continue
            if not self._in_step:
                self._lost_at = None
            return result

    def _remember(self, sql: str, rows: list[Sequence[object]]) -> None:
        """Keep a statement that wrote the session's own state, to redo it on a new one.

        Inside a step it is not kept: the step may yet roll back (none of fetcher's
        steps writes a temporary table).
        """
        if self._in_step or not _SESSION.search(sql) or sql.lstrip().startswith("SELECT"):
            return
        if emptied := _EMPTIES.match(sql):
            # A long ``work`` process empties its tables at each pass: forgetting what
            # was written before keeps what is redone, and held, to one pass's worth.
            self._session = [
                (kept, params)
                for kept, params in self._session
                if not ((wrote := _WRITES.match(kept)) and wrote[1] == emptied[1])
            ]
            return
        self._session.append((sql, rows))

    @contextmanager
    def atomic(self) -> Iterator[_Step]:
        """One step, one transaction: all of it lands, or none of it does.

        A connection lost in it (at its ``BEGIN``, statements or ``COMMIT``) raises
        :class:`StepLost`, and the next statement reconnects.
        """
        if self._in_step:
            raise StepSpansAwait(
                "a state step began while another was open (one awaited, or steps nested)"
            )
        psycopg = _psycopg()
        conn = self.conn
        self._in_step = True
        try:
            with conn.transaction():
                yield _Step(conn)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        finally:
            self._in_step = False
        self._lost_at = None

    @contextmanager
    def grouped(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Each step commits on its own: other hosts are waiting to see its rows."""
        yield

    def query_one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        spelled = postgres_sql(sql)

        def statement(conn: psycopg.Connection[Any]) -> list[tuple[object, ...]]:
            cursor = conn.execute(spelled, params)
            return cursor.fetchall() if cursor.description is not None else []

        rows = self._run(statement)
        self._remember(spelled, [params])
        return rows

    def delete(self, sql: str, params: Sequence[object] = ()) -> int:
        spelled = postgres_sql(sql)
        count = self._run(lambda conn: conn.execute(spelled, params).rowcount)
        self._remember(spelled, [params])
        return count

    def query_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        spelled, kept = postgres_sql(sql), list(rows)  # a list: run again if the first is lost

        def statement(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(spelled, kept)

        self._run(statement)
        self._remember(spelled, kept)

    def listen(self, channel: str) -> bool:
        """``LISTEN``: a step that sends ``NOTIFY`` on ``channel`` wakes :meth:`wait_notice`
        (listened again on every new connection)."""
        self.query(f"LISTEN {channel}")
        return True

    def wait_notice(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a notice (run it on a thread).

        True after a reconnect too: notices sent while the connection was away are
        lost with it, so the caller looks for itself.
        """
        psycopg = _psycopg()
        conn = self.conn
        try:
            return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error as exc:
            if not conn.closed:
                raise self._error(exc) from None
        self._run(lambda conn: None)  # connected again (or the run's one line why not)
        return True

    def has_table(self, name: str) -> bool:
        row = self.query_one("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(row and row[0])

    def _error(self, exc: Exception) -> ArchiveError:
        """A database error as the run's one line; a lost connection said as such (in a
        step, as :class:`StepLost`: the function made of it may run again)."""
        if self._conn is not None and self._conn.closed:
            kind = StepLost if self._in_step else ArchiveError
            return kind(
                f"state database {self.url}: the connection was lost ({self._reason(exc)}); "
                "what was recorded before it stays, the next run goes on from there"
            )
        return ArchiveError(f"state database {self.url}: {self._reason(exc)}")

    def _reason(self, exc: Exception) -> str:
        """The first line of libpq's or the server's message, with no password in it."""
        text = str(exc).strip().splitlines()
        return self.url.scrub(text[0] if text else type(exc).__name__)


def _psycopg() -> Any:
    """psycopg, imported when a PostgreSQL state is first used."""
    try:
        import psycopg
    except ImportError:
        raise UsageError(
            "a postgresql:// state needs psycopg: pip install 'fetcher[postgres]'"
        ) from None
    return psycopg
