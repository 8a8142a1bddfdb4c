"""The search index for tasks recorded before it existed, built once, under the lock.

From schema 4 on, a task's words (prompt, negative prompt, model) are indexed in
the step that records its answer. An archive made before that keeps each
finished task's answer in ``tasks.detail``; this reads them into ``task_text``
(whose triggers fill the FTS5 index) a batch per transaction, so a run stopped
halfway keeps what it did and the next one goes on from there. The first
``fetch`` or ``search`` after the upgrade does it, with a progress bar.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .archive import Archive
from .errors import LockedError
from .state import SCHEMA_VERSION, TEXT_SCHEMA, Records, StateDB, redone, upsert_text

#: Tasks indexed per transaction.
INDEX_BATCH = 2000
#: The words :func:`fetcher.state.upsert_text` takes, as the answer's Input names them.
_FIELDS = ("Prompt", "NegativePrompt", "ModelName", "ModelVersion")


class IndexProgress(Protocol):
    """The part of :class:`~fetcher.progress.Progress` building the index reports to."""

    def indexed(self, done: int, total: int) -> None:
        """``done`` of ``total`` tasks are indexed."""


def needs_index(db: Records) -> bool:
    """Whether tasks recorded before the index existed are still to be indexed."""
    if db.version < TEXT_SCHEMA:
        return False
    row = db.query_one("SELECT value FROM meta WHERE key = 'text_index'")
    return row is None or row[0] != "whole"


def index_archive(root: Path, progress: IndexProgress) -> bool:
    """Before a search: index the archive at ``root`` if it predates the index.

    Takes the lock, migrating the state, when there is something to do. Returns
    False when that cannot be done now: another run holds the lock (that run
    indexes it first thing), or the archive cannot be written (a backup, a
    read-only mount); the search then reads the stored answers row by row.
    """
    archive = Archive(root)
    if not archive.exists():
        return True
    with StateDB(archive.db_path, readonly=True) as db:
        if db.version >= SCHEMA_VERSION and not needs_index(db):
            return True
    if not os.access(archive.meta_dir, os.W_OK) or not os.access(archive.db_path, os.W_OK):
        return False
    try:
        with archive.lock(), StateDB(archive.db_path) as db:
            build_index(db, progress)
    except LockedError:
        return False
    return True


def build_index(db: Records, progress: IndexProgress) -> int:
    """Index every task not indexed yet; returns how many. The caller holds the lock."""
    steps = [done for done, _total in _steps(db, progress)]
    return steps[-1] if steps else 0


async def build_index_async(
    db: Records, progress: IndexProgress, stop: asyncio.Event | None = None
) -> bool:
    """:func:`build_index` inside a run, letting the loop turn (a signal) between batches.

    Returns False when ``stop`` was set before the index was whole.
    """
    for _ in _steps(db, progress):
        await asyncio.sleep(0)
        if stop is not None and stop.is_set():
            return not needs_index(db)
    return True


def _steps(db: Records, progress: IndexProgress) -> Iterator[tuple[int, int]]:
    """One committed batch per step; yields how many of how many are done."""
    if not needs_index(db):
        return
    total = _left(db)
    done = 0
    progress.indexed(done, total)
    after = ""
    while True:
        rows = _index_batch(db, after)
        if not rows:
            progress.indexed(total, total)
            return
        after = str(rows[-1][0])
        done += len(rows)
        progress.indexed(min(done, total), total)
        yield done, total


@redone
def _index_batch(db: Records, after: str) -> list[Any]:
    """Index the next :data:`INDEX_BATCH` tasks after ``after`` in one step; none left:
    the index is whole. Returns the tasks indexed."""
    with db.atomic() as conn:
        rows = conn.execute(
            "SELECT task_id, detail FROM tasks t WHERE task_id > ? AND detail IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM task_text x WHERE x.task_id = t.task_id) "
            "ORDER BY task_id LIMIT ?",
            (after, INDEX_BATCH),
        ).fetchall()
        for task_id, detail in rows:
            upsert_text(conn, str(task_id), _words(detail))
        if not rows:
            conn.execute(
                "INSERT INTO meta VALUES ('text_index', 'whole') "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )
    return rows


def _left(db: Records) -> int:
    row = db.query_one(
        "SELECT COUNT(*) FROM tasks t WHERE detail IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM task_text x WHERE x.task_id = t.task_id)"
    )
    return int(str(row[0])) if row else 0


def _words(detail: object) -> tuple[str | None, str | None, str | None, str | None]:
    """The words a stored answer holds; anything unusable in it is no words."""
    try:
        stored = json.loads(str(detail))
    except ValueError:
        stored = None
    task_input = stored.get("input") if isinstance(stored, dict) else None
    task_input = task_input if isinstance(task_input, dict) else {}
    prompt, negative, model, version = (
        value if isinstance(value := task_input.get(name), str) and value else None
        for name in _FIELDS
    )
    return prompt, negative, model, version
