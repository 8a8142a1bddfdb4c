"""A state moved from one implementation to another (``fetcher state copy``), so an
archive can grow from one host's SQLite file into a fleet's PostgreSQL, and back.

Rows are read a page at a time in key order and written a page per step; each
table's own ``rowid`` is the target's to number. The source is only read (opening
it migrates an older schema, as any command that writes it would).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .address import DatabaseUrl, is_database
from .records import Records
from .rows import BATCH

#: What is copied, in the order the references need: (table, key columns, columns).
TABLES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "tasks",
        ("task_id",),
        (
            "task_id",
            "state",
            "final",
            "task_type",
            "created_at",
            "finished_at",
            "dir",
            "reason",
            "first_seen",
            "updated_at",
            "detail",
        ),
    ),
    (
        "files",
        ("task_id", "idx"),
        (
            "task_id",
            "idx",
            "url",
            "expire_time",
            "md5",
            "state",
            "path",
            "size",
            "sha256",
            "content_type",
            "reason",
            "size_hint",
            "file_type",
        ),
    ),
    ("lists", ("source",), ("source", "settled_bytes", "lines", "ids", "digest", "updated_at")),
    (
        "task_text",
        ("task_id",),
        ("task_id", "prompt", "negative_prompt", "model", "model_version"),
    ),
)


@dataclass(frozen=True, slots=True)
class StatePlace:
    """Where a state is, as :func:`~fetcher.state.open_state` takes it: an SQLite file, or
    a PostgreSQL database."""

    db_path: Path
    state_url: DatabaseUrl | None = None

    @classmethod
    def parse(cls, text: str) -> StatePlace:
        """A ``postgresql://`` URL, an SQLite state file (``*.sqlite``), or an archive folder
        (its own state file)."""
        if is_database(text):
            return cls(Path(), DatabaseUrl.parse(text))
        if not text:
            raise UsageError("an empty path is not a state")
        path = Path(text).expanduser()
        if path.suffix != ".sqlite":
            path = path / ".fetcher" / "state.sqlite"
        return cls(path.absolute())

    def __str__(self) -> str:
        return str(self.state_url) if self.state_url is not None else str(self.db_path)


def copy_state(source: Records, target: Records, *, replace: bool = False) -> dict[str, int]:
    """Copy every task, file, list file and search word of ``source`` into ``target``.

    Refuses a target that holds tasks unless ``replace``, which empties it first.
    Returns how many rows each table gave.
    """
    if target.query_one("SELECT 1 FROM tasks LIMIT 1") is not None:
        if not replace:
            raise UsageError("the target state holds tasks already: --replace empties it first")
        with target.atomic() as conn:
            for table, _key, _columns in reversed(TABLES):
                conn.execute(f"DELETE FROM {table}")  # noqa: S608 (names from TABLES)
    copied: dict[str, int] = {}
    for table, key, columns in TABLES:
        copied[table] = 0
        for page in _pages(source, table, key, columns):
            marks = ", ".join("?" * len(columns))
            with target.atomic() as conn:
                for row in page:
                    conn.execute(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                        row,
                    )
            copied[table] += len(page)
    # Words an older archive never indexed are indexed on the target (fetcher.index).
    with target.atomic() as conn:
        conn.execute(
            "INSERT INTO meta VALUES ('text_index', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ("whole" if _text_index(source) == "whole" else "partial",),
        )
    return copied


def _pages(
    source: Records, table: str, key: tuple[str, ...], columns: tuple[str, ...]
) -> Iterator[list[tuple[object, ...]]]:
    """The table's rows in key order, :data:`BATCH` at a time (keyset: a page costs the same
    however deep it is)."""
    order = ", ".join(key)
    after: tuple[object, ...] | None = None
    while True:
        where = f"WHERE ({order}) > ({', '.join('?' * len(key))}) " if after is not None else ""
        rows = source.query(
            f"SELECT {', '.join(columns)} FROM {table} {where}"  # noqa: S608 (names from TABLES)
            f"ORDER BY {order} LIMIT ?",
            (*(after or ()), BATCH),
        )
        if not rows:
            return
        yield rows
        after = tuple(rows[-1][columns.index(k)] for k in key)


def _text_index(source: Records) -> str | None:
    row = source.query_one("SELECT value FROM meta WHERE key = 'text_index'")
    return None if row is None else str(row[0])
