"""The archive's memory: what it knows of every task and file.

One interface, :class:`~fetcher.state.records.Records` (the rows every command
reads and writes), over an implementation that owns the connection, its steps
and its schema's migrations::

    records.Records     tasks and files, the commit point (rows.py: what a row holds)
    └── sqlite.StateDB  an SQLite database (WAL) inside the archive root

Every module imports the state from here, never from an implementation.
"""

from __future__ import annotations

from .records import Cursor, Records, Step, upsert_text
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
    "FileRow",
    "Records",
    "StateDB",
    "Step",
    "has_fts5",
    "now_text",
    "opt_text",
    "require_fts5",
    "require_sqlite",
    "upsert_text",
]
