"""``fetcher enqueue``: task IDs recorded as queued, with no query, for a later run to drain.

An app that submits generations hands their IDs over as it gets them, instead
of writing list files. Enqueueing sends no request and takes no lock, so it
works while a run (``fetch``, ``work``) holds the archive: the IDs are rows in
the state database, state ``queued``, which ``fetch --pending`` and ``work``
ask about like pending ones. IDs stream from their sources (the same input
rules as ``fetch``) and each batch that gathers is one transaction: a batch is
queued whole or not at all, and a slow generator's IDs are queued as they come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .errors import EXIT_FAILED, EXIT_OK
from .feed import batches
from .ids import IdSource, InvalidId, iter_entries
from .state import FAILED, QUEUED, Records, now_text, open_state, redone
from .stores import open_store

#: At most this many IDs to a transaction (the lines a batch may gather).
BATCH = 2000
#: Rows to one INSERT statement: three parameters each, well under SQLite's limit.
ROWS_PER_STATEMENT = 500
#: The channel a shared (PostgreSQL) state's ``work`` runs listen on for new IDs.
CHANNEL = "fetcher_queued"


@dataclass(slots=True)
class EnqueueSummary:
    """What one ``enqueue`` did with the IDs it read."""

    archive: str | None = None
    #: IDs recorded as queued now: new to the archive, or failed in a way worth retrying.
    queued: int = 0
    #: IDs the state already held (archived, pending, queued, failed for good, or named
    #: twice), left as they were.
    already_known: int = 0
    #: Lines that are not a valid task ID.
    invalid: int = 0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.invalid else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "archive": self.archive,
            "queued": self.queued,
            "already_known": self.already_known,
            "invalid": self.invalid,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        }


async def enqueue(
    settings: Settings,
    sources: Iterable[IdSource],
    on_invalid: Callable[[InvalidId], None],
    stop: asyncio.Event | None = None,
    summary: EnqueueSummary | None = None,
) -> EnqueueSummary:
    """Record every valid ID in ``sources`` as queued; ``on_invalid`` hears of each bad line.

    Setting ``stop`` ends it between two batches: what was queued stays queued.
    """
    summary = summary if summary is not None else EnqueueSummary()
    store = open_store(settings.archive, settings)
    summary.archive = store.name
    await store.open()
    try:
        await store.restore_state()
        with open_state(store) as db:
            async for batch in batches(iter_entries(sources), BATCH):
                ids: list[str] = []
                for entry in batch:
                    if isinstance(entry, str):
                        ids.append(entry)
                    elif isinstance(entry, InvalidId):
                        summary.invalid += 1
                        on_invalid(entry)
                queued = record_queued(db, ids)
                summary.queued += queued
                summary.already_known += len(ids) - queued
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
    finally:
        await store.close()
    return summary


@redone
def record_queued(db: Records, task_ids: Sequence[str]) -> int:
    """Queue ``task_ids`` in one transaction; how many were recorded as queued.

    A task the state holds is left as it is, unless it failed in a way that asking
    again may change (not ``final``): that one is queued again, or no run would
    ever ask about it. The statement is plain SQL (UPSERT, RETURNING) that SQLite
    3.35 and PostgreSQL both run. On a shared state the step also notifies
    :data:`CHANNEL`, which PostgreSQL delivers when it commits: ``work`` runs wake.
    """
    unique = list(dict.fromkeys(task_ids))
    stamp = now_text()
    recorded = 0
    with db.atomic() as step:
        for start in range(0, len(unique), ROWS_PER_STATEMENT):
            chunk = unique[start : start + ROWS_PER_STATEMENT]
            rows = ", ".join(["(?, ?, 0, ?, ?)"] * len(chunk))
            params = [value for task_id in chunk for value in (task_id, QUEUED, stamp, stamp)]
            returned = db.query(
                "INSERT INTO tasks (task_id, state, final, first_seen, updated_at) "  # noqa: S608
                f"VALUES {rows} ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, "
                "reason = NULL, updated_at = excluded.updated_at "
                "WHERE tasks.state = ? AND tasks.final = 0 RETURNING task_id",
                (*params, FAILED),
            )
            recorded += len(returned)
        if recorded and db.shared:
            step.execute("SELECT pg_notify(?, '')", (CHANNEL,))
    return recorded
