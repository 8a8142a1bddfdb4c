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

from .ids import Mark

#: Marks of sources that are not files: tasks read after one belong to no list file.
NO_FILE = Mark("", 0, 0, 0, "")


class BookmarkTracker:
    """Follows one run's marks and unsettled tasks; :meth:`reached` is what to remember."""

    def __init__(self) -> None:
        self._marks: dict[str, list[Mark]] = {}
        self._position: tuple[str, int] = ("", 0)
        #: Task ID -> {list file: marks seen in it before the task's first line there},
        #: for every task asked about and not settled yet, whatever its source.
        self._open: dict[str, dict[str, int]] = {}

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
        """Where the line being read sits: pass it to :meth:`waiting` for its task."""
        return self._position

    def waiting(self, task_id: str) -> None:
        """The task is being asked about: its lines hold back until it is settled."""
        self._open.setdefault(task_id, {})

    def sighted(self, task_id: str, position: tuple[str, int]) -> None:
        """The task was read from the line at ``position``; held back while it is open.

        A task already settled (or never asked about: archived before) holds nothing.
        """
        source, index = position
        lines = self._open.get(task_id)
        if lines is not None and source:
            lines[source] = min(lines.get(source, index), index)

    def asked(self, task_id: str) -> bool:
        """Whether the task was handed to this run and is not settled yet."""
        return task_id in self._open

    def settled(self, task_id: str) -> None:
        """The task's answer will not change: its line need not be read again."""
        self._open.pop(task_id, None)

    def reached(self) -> dict[str, Mark]:
        """Per list file, the last mark before which every task was settled."""
        blocked: dict[str, int] = {}
        for lines in self._open.values():
            for source, index in lines.items():
                blocked[source] = min(blocked.get(source, index), index)
        reached: dict[str, Mark] = {}
        for source, marks in self._marks.items():
            usable = marks[: blocked[source]] if source in blocked else marks
            if usable:
                reached[source] = usable[-1]
        return reached
