"""The state in a PostgreSQL database that several hosts share.

psycopg (on libpq, so ``PG*`` variables and ``~/.pgpass`` fill in what the URL
leaves out) is imported here alone, when a ``postgresql://`` state is named. The
statements the rest of fetcher writes once, in SQLite's spelling, are turned into
PostgreSQL's by :func:`postgres_sql`. A step is a transaction of its own: other
hosts see its rows as soon as it ends, and a connection lost in the middle of one
commits nothing of it, so no task is ever recorded archived that is not.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from ..errors import ArchiveError, StateUnreachable, StepSpansAwait, UsageError
from .address import DatabaseUrl
from .records import Cursor, Records
from .schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg

#: Seconds a connection attempt waits for the server before it counts as unreachable.
CONNECT_TIMEOUT = 10
#: The advisory lock migrations take, so two hosts starting at once migrate one after
#: the other (a number of our own: ``fetcher`` in ASCII).
MIGRATION_LOCK = 0x66657463686572


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

    def __enter__(self) -> Self:
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(
                self.url.dsn,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="fetcher",
            )
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
        assert self._conn is not None, "PostgresState used outside 'with'"
        return self._conn

    @contextmanager
    def atomic(self) -> Iterator[_Step]:
        """One step, one transaction: all of it lands, or none of it does."""
        if self._in_step:
            raise StepSpansAwait(
                "a state step began while another was open (one awaited, or steps nested)"
            )
        psycopg = _psycopg()
        self._in_step = True
        try:
            with self.conn.transaction():
                yield _Step(self.conn)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        finally:
            self._in_step = False

    @contextmanager
    def grouped(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Each step commits on its own: other hosts are waiting to see its rows."""
        yield

    def query_one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        psycopg = _psycopg()
        try:
            cursor = self.conn.execute(postgres_sql(sql), params)
            return cursor.fetchall() if cursor.description is not None else []
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def delete(self, sql: str, params: Sequence[object] = ()) -> int:
        psycopg = _psycopg()
        try:
            return self.conn.execute(postgres_sql(sql), params).rowcount
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def query_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        psycopg = _psycopg()
        try:
            with self.conn.cursor() as cursor:
                cursor.executemany(postgres_sql(sql), rows)
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def listen(self, channel: str) -> bool:
        """``LISTEN``: a step that sends ``NOTIFY`` on ``channel`` wakes :meth:`wait_notice`."""
        self.query(f"LISTEN {channel}")
        return True

    def wait_notice(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a notice (run it on a thread)."""
        psycopg = _psycopg()
        try:
            return any(True for _ in self.conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def has_table(self, name: str) -> bool:
        row = self.query_one("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(row and row[0])

    def _error(self, exc: Exception) -> ArchiveError:
        """A database error as the run's one line; a lost connection said as such."""
        if self._conn is not None and self._conn.closed:
            return ArchiveError(
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
