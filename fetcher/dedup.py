"""De-duplication of one run's input: each task ID once, with what the archive knows of it.

A cron list of a million archived IDs must not grow the process or crawl, so no
set of strings: a task the database held when the run began is recognised again
by one bit for its rowid (a million tasks: 125 KB), and only IDs it did not hold
go into a temporary table of the run's own connection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from .state import ARCHIVED, BATCH, Records, opt_text


@dataclass(frozen=True, slots=True)
class Known:
    """What the database already knows of a task named in the input."""

    state: str
    final: bool
    reason: str | None


_ARCHIVED = Known(ARCHIVED, True, None)


class FirstSight:
    """Which IDs a run meets for the first time; make one per run, before its first step."""

    def __init__(self, db: Records) -> None:
        self._db = db
        db.query("CREATE TEMP TABLE IF NOT EXISTS seen (task_id TEXT PRIMARY KEY) WITHOUT ROWID")
        row = db.query_one("SELECT COALESCE(MAX(rowid), 0) FROM tasks")
        #: Tasks with a rowid up to this were in the database when the run began.
        self._rowid_limit = int(str(row[0])) if row else 0
        self._marks = bytearray(self._rowid_limit // 8 + 1)

    def first_sight(self, ids: Sequence[str]) -> tuple[list[str], dict[str, Known]]:
        """Of ``ids``, those not seen before in this run, and what is known of them."""
        fresh: list[str] = []
        known: dict[str, Known] = {}
        for start in range(0, len(ids), BATCH):
            chunk = list(dict.fromkeys(ids[start : start + BATCH]))
            # The cron case is a million archived rows: they share one Known, and the
            # columns come back as the types SQLite stores (TEXT, INTEGER) unconverted.
            found = cast(
                list[tuple[int, str, str, int, str | None]],
                self._db.query(
                    "SELECT rowid, task_id, state, final, reason FROM tasks "
                    "WHERE task_id IN (SELECT value FROM json_each(?))",
                    (json.dumps(chunk),),
                ),
            )
            rows = {
                task_id: (
                    rowid,
                    _ARCHIVED
                    if state == ARCHIVED and final and reason is None
                    else Known(str(state), bool(final), opt_text(reason)),
                )
                for rowid, task_id, state, final, reason in found
            }
            limit, marks = self._rowid_limit, self._marks
            newcomers = [i for i in chunk if i not in rows or rows[i][0] > limit]
            first_time = self._first_time(newcomers)
            for task_id in chunk:
                row = rows.get(task_id)
                if row is not None and row[0] <= limit:
                    # One bit per rowid: set means this run met the task already.
                    byte, bit = row[0] >> 3, 1 << (row[0] & 7)
                    if marks[byte] & bit:
                        continue
                    marks[byte] |= bit
                elif task_id not in first_time:
                    continue
                fresh.append(task_id)
                if row is not None:
                    known[task_id] = row[1]
        return fresh, known

    def _first_time(self, task_ids: list[str]) -> set[str]:
        """Of IDs the database did not hold at the start, those this run has not met yet."""
        if not task_ids:
            return set()
        rows = self._db.query(
            "INSERT INTO temp.seen SELECT value FROM json_each(?) WHERE true "
            "ON CONFLICT DO NOTHING RETURNING task_id",
            (json.dumps(task_ids),),
        )
        return {str(r[0]) for r in rows}
