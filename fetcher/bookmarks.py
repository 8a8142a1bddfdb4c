"""How far into each list file a run has settled every task: where the next run may start.

A cron job re-reads a list that only grows. Reading a million archived IDs and
looking each up costs seconds every time, for lines that cannot have changed
their answer, so each run remembers, per list file, the longest beginning in
which every task is settled: archived, or failed for good, or an invalid line.
The next run checks that the file still starts with those very bytes (their
SHA-256) and reads on from there; a list that was edited, not just appended to,
is read whole again. A task still pending, or failed in a way worth retrying,
stops the settled beginning just before the chunk of lines it is in, so it is
asked about again next time: before *every* chunk it is in, in every list file,
however it was first read (standard input, ``--id``, another file, an earlier
line). A task is asked about once a run, but each of its lines waits for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .ids import Mark
from .state import Records

#: Marks of sources that are not files: tasks read after one belong to no list file.
NO_FILE = Mark("", 0, 0, 0, "")


class BookmarkTracker:
    """Follows one run's marks and unsettled tasks; :meth:`reached` is what to remember.

    The unsettled tasks live in a temporary table of the run's database connection,
    not in a dict: a first run over 100,000 new IDs that all stay pending holds every
    one of them open to its end, and as Python objects they were a third of its memory.
    """

    def __init__(self, db: Records) -> None:
        self._db = db
        self._marks: dict[str, list[Mark]] = {}
        self._position: tuple[str, int] = ("", 0)
        #: For every task asked about and not settled yet, whatever its source: a row
        #: with source '' (it is open), and one per list file it was read from, with
        #: the marks seen in that file before the task's first line there.
        db.query(
            "CREATE TEMP TABLE IF NOT EXISTS open_tasks (task_id TEXT NOT NULL, "
            "source TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (task_id, source)) "
            "WITHOUT ROWID"
        )
        db.query("DELETE FROM temp.open_tasks")

    def mark(self, mark: Mark) -> None:
        """Lines up to ``mark`` have been read (a mark of :data:`NO_FILE`: left the files)."""
        if mark.source:
            seen = self._marks.setdefault(mark.source, [])
            seen.append(mark)
            self._position = (mark.source, len(seen))
        else:
            self._position = ("", 0)

    @property
    def position(self) -> tuple[str, int]:
        """Where the line being read sits: pass it to :meth:`sighted` for its task."""
        return self._position

    def waiting(self, task_ids: Iterable[str]) -> None:
        """The tasks are being asked about: their lines hold back until each is settled."""
        self._db.query_many(
            "INSERT INTO temp.open_tasks VALUES (?, '', 0) ON CONFLICT DO NOTHING",
            ((t,) for t in task_ids),
        )

    def sighted(self, lines: Iterable[tuple[str, tuple[str, int]]]) -> None:
        """Each task was read from the line at its position; held back while it is open.

        A task already settled (or never asked about: archived before) holds nothing.
        """
        self._db.query_many(
            "INSERT INTO temp.open_tasks SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM "
            "temp.open_tasks WHERE task_id = ? AND source = '') AND ? != '' "
            "ON CONFLICT (task_id, source) DO UPDATE SET idx = CASE WHEN "
            "excluded.idx < open_tasks.idx THEN excluded.idx ELSE open_tasks.idx END",
            ((task_id, source, index, task_id, source) for task_id, (source, index) in lines),
        )

    def asked(self, task_id: str) -> bool:
        """Whether the task was handed to this run and is not settled yet."""
        row = self._db.query_one(
            "SELECT 1 FROM temp.open_tasks WHERE task_id = ? AND source = ''", (task_id,)
        )
        return row is not None

    def still_asked(self, task_ids: Iterable[str]) -> set[str]:
        """Of ``task_ids``, those handed to this run and not settled yet (:meth:`asked`)."""
        ids = json.dumps(list(task_ids))
        rows = self._db.query(
            "SELECT task_id FROM temp.open_tasks WHERE source = '' "
            "AND task_id IN (SELECT value FROM json_each(?))",
            (ids,),
        )
        return {str(r[0]) for r in rows}

    def settled(self, task_id: str) -> bool:
        """The task's answer will not change: its line need not be read again.

        Returns whether it was open: handed to this run and not settled before.
        """
        return self._db.delete("DELETE FROM temp.open_tasks WHERE task_id = ?", (task_id,)) > 0

    def reached(self) -> dict[str, Mark]:
        """Per list file, the last mark before which every task was settled."""
        blocked = {
            str(source): int(str(index))
            for source, index in self._db.query(
                "SELECT source, MIN(idx) FROM temp.open_tasks WHERE source != '' GROUP BY source"
            )
        }
        reached: dict[str, Mark] = {}
        for source, marks in self._marks.items():
            usable = marks[: blocked[source]] if source in blocked else marks
            if usable:
                reached[source] = usable[-1]
        return reached
