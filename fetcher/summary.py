"""What a run did: one outcome per task it acted on, and the totals.

Tasks that were already archived are counted but not listed, so the summary of
a cron run over a million-line list stays small.

Two totals hold their parts, so a script can read one key for each question:
``already_archived`` is every named task the archive held before the run, the
``unchanged`` ones (in a list file's settled beginning, not read again) included;
``failed`` is every named task or line the run could not archive, ``expired``
and ``invalid`` included.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from .errors import EXIT_FAILED, EXIT_OK

#: The version of the ``--json`` object's shape; raised when a key changes meaning.
SCHEMA = 1


class Outcome(enum.StrEnum):
    """Where a task ended up in this run."""

    ARCHIVED = "archived"
    ALREADY_ARCHIVED = "already_archived"
    PENDING = "pending"
    FAILED = "failed"
    EXPIRED = "expired"
    INVALID = "invalid"
    #: Failed in an earlier run with an answer that will not change; not asked again.
    SKIPPED = "skipped"
    #: ``--dry-run``: finished at the API, would have been downloaded.
    READY = "ready"
    #: Another run held the task's lease and settled it (see :mod:`fetcher.lease`).
    ELSEWHERE = "elsewhere"


#: Outcomes that make the run exit 1: something could not be archived. Each counts
#: in the summary's ``failed``.
BAD_OUTCOMES = frozenset({Outcome.FAILED, Outcome.EXPIRED, Outcome.INVALID})


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """One task's outcome, with the reason when it is not plain success."""

    task_id: str
    outcome: Outcome
    reason: str | None = None
    files: int = 0
    folder: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task_id": self.task_id, "outcome": self.outcome.value}
        if self.reason is not None:
            data["reason"] = self.reason
        if self.files:
            data["files"] = self.files
        if self.folder is not None:
            data["folder"] = self.folder
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskOutcome:
        return cls(
            task_id=data["task_id"],
            outcome=Outcome(data["outcome"]),
            reason=data.get("reason"),
            files=data.get("files", 0),
            folder=data.get("folder"),
        )


#: Outcomes a summary keeps in memory; the rest wait in a temporary file.
KEEP_IN_MEMORY = 1000


class OutcomeList(Sequence[TaskOutcome]):
    """The outcomes a run listed, in order, with memory that does not grow with them.

    A first run over 100,000 new IDs lists 100,000 outcomes (each pending, say):
    held as objects they were about half of such a run's memory. So the first
    :data:`KEEP_IN_MEMORY` stay in memory and the rest go, a batch at a time, as
    JSON lines to an unnamed temporary file that lives as long as the list.
    Reading them (``--json`` printing its ``tasks``) streams the file back.
    """

    def __init__(self) -> None:
        self._head: list[TaskOutcome] = []
        self._batch: list[str] = []
        self._spilled = 0
        self._path: Path | None = None

    def append(self, outcome: TaskOutcome) -> None:
        if len(self._head) < KEEP_IN_MEMORY:
            self._head.append(outcome)
            return
        self._batch.append(json.dumps(outcome.to_json(), ensure_ascii=False) + "\n")
        if len(self._batch) >= KEEP_IN_MEMORY:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        if self._path is None:
            fd, name = tempfile.mkstemp(prefix="fetcher-outcomes-", suffix=".jsonl")
            os.close(fd)
            self._path = Path(name)
            weakref.finalize(self, self._path.unlink, missing_ok=True)
        with self._path.open("a", encoding="utf-8") as spill:
            spill.writelines(self._batch)
        self._spilled += len(self._batch)
        self._batch.clear()

    def __len__(self) -> int:
        return len(self._head) + self._spilled + len(self._batch)

    def __iter__(self) -> Iterator[TaskOutcome]:
        yield from self._head
        self._flush()
        if self._path is not None:
            with self._path.open(encoding="utf-8") as spill:
                for line in spill:
                    yield TaskOutcome.from_json(json.loads(line))

    @overload
    def __getitem__(self, index: int) -> TaskOutcome: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[TaskOutcome]: ...
    def __getitem__(self, index: int | slice) -> TaskOutcome | Sequence[TaskOutcome]:
        if isinstance(index, int) and 0 <= index < len(self._head):
            return self._head[index]
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        # Cheap on purpose: asyncio.run reprs the main task's result (this summary) on
        # the way out (Python 3.11's signal.getsignal), and a full list cost 40 MiB.
        shown = ", ".join(map(repr, self._head[:3]))
        more = f", … {len(self) - 3} more" if len(self) > 3 else ""
        return f"OutcomeList([{shown}{more}])"


@dataclass(slots=True)
class RunSummary:
    """Totals and listed outcomes of one ``fetch`` run."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    tasks: OutcomeList = field(default_factory=OutcomeList)
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    requests: int = 0
    interrupted: bool = False
    #: IDs in the unchanged, settled beginning of a list file, not read again.
    unchanged: int = 0
    #: The archive's absolute path.
    archive: str | None = None
    #: Tasks this run was not given whose files it took from the download queue an
    #: earlier run left, and settled; each is also counted under its outcome.
    from_queue: int = 0
    #: Set by a run made of passes (``fetcher work``): the tasks last counted as
    #: pending, so a task asked about again in a later pass moves to its new outcome
    #: instead of being counted twice. Only pending tasks are kept: no other outcome
    #: is followed by another in the same run, so a long-running worker holds no more
    #: than the tasks still running at the API.
    pending_ids: set[str] | None = None

    def add(self, outcome: TaskOutcome) -> None:
        if self.pending_ids is not None:
            if outcome.task_id in self.pending_ids:
                self.pending_ids.discard(outcome.task_id)
                self.counts[Outcome.PENDING] -= 1
            if outcome.outcome is Outcome.PENDING:
                self.pending_ids.add(outcome.task_id)
        self.counts[outcome.outcome] += 1
        if outcome.outcome is not Outcome.ALREADY_ARCHIVED:
            self.tasks.append(outcome)

    @property
    def already_archived(self) -> int:
        """Every named task the archive held before this run, read or not."""
        return self.counts[Outcome.ALREADY_ARCHIVED] + self.unchanged

    @property
    def failed(self) -> int:
        """Every named task or line this run could not archive, for whatever reason."""
        return sum(self.counts[o] for o in BAD_OUTCOMES)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object, its ``tasks`` a list (see :meth:`to_json_streamed`)."""
        data = self.to_json_streamed()
        data["tasks"] = list(data["tasks"])
        return data

    def to_json_streamed(self) -> dict[str, Any]:
        """The ``--json`` object with ``tasks`` an iterator, for printing a long run's
        outcomes one at a time."""
        data: dict[str, Any] = {"schema": SCHEMA, "archive": self.archive}
        data.update((o.value, self.counts[o]) for o in Outcome)
        data.update(
            already_archived=self.already_archived,
            failed=self.failed,
            unchanged=self.unchanged,
            from_queue=self.from_queue,
            files_downloaded=self.files_downloaded,
            bytes_downloaded=self.bytes_downloaded,
            requests=self.requests,
            interrupted=self.interrupted,
            exit_code=self.exit_code,
            tasks=(t.to_json() for t in self.tasks),
        )
        return data
