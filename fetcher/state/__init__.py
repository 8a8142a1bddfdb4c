"""The archive's memory: what it knows of every task and file.

One interface, :class:`~fetcher.state.records.Records` (the rows every command
reads and writes), over an implementation that owns the connection, its steps
and its schema's migrations::

    records.Records            tasks and files, the commit point (rows.py: what a row holds)
    ├── sqlite.StateDB         an SQLite database (WAL) inside the archive root
    └── postgres.PostgresState a PostgreSQL database several hosts share
                               (``postgresql://``; psycopg is imported by it alone)

Every module imports the state from here, never from an implementation, and
opens it with :func:`open_state`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .address import DatabaseUrl, is_database
from .records import Cursor, Held, Records, Step, redone, upsert_text
from .rows import (
    ARCHIVED,
    BATCH,
    EXPIRED,
    FAILED,
    INCOMPLETE,
    PENDING,
    QUEUED,
    STATES,
    FileRow,
    now_text,
    opt_text,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, TEXT_SCHEMA
from .sqlite import CACHE_KIB, MIN_SQLITE, StateDB, has_fts5, require_fts5, require_sqlite


class Holder(Protocol):
    """Where a state is: an SQLite file, unless a PostgreSQL database takes its place."""

    @property
    def db_path(self) -> Path: ...

    @property
    def state_url(self) -> DatabaseUrl | None: ...


def open_state(holder: Holder, *, readonly: bool = False) -> Records:
    """The state of an archive store, to be entered with ``with``; PostgreSQL's library is
    imported only when the store names a database."""
    if holder.state_url is None:
        return StateDB(holder.db_path, readonly=readonly)
    from .postgres import PostgresState

    return PostgresState(holder.state_url, readonly=readonly)


__all__ = [
    "ARCHIVED",
    "BATCH",
    "CACHE_KIB",
    "EXPIRED",
    "FAILED",
    "INCOMPLETE",
    "MIGRATIONS",
    "MIN_SQLITE",
    "PENDING",
    "QUEUED",
    "SCHEMA_VERSION",
    "STATES",
    "TEXT_SCHEMA",
    "Cursor",
    "DatabaseUrl",
    "FileRow",
    "Held",
    "Holder",
    "Records",
    "StateDB",
    "Step",
    "has_fts5",
    "is_database",
    "now_text",
    "open_state",
    "opt_text",
    "redone",
    "require_fts5",
    "require_sqlite",
    "upsert_text",
]
