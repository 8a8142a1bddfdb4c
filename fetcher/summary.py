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
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(slots=True)
class RunSummary:
    """Totals and listed outcomes of one ``fetch`` run."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    tasks: list[TaskOutcome] = field(default_factory=list)
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

    def add(self, outcome: TaskOutcome) -> None:
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
            tasks=[t.to_json() for t in self.tasks],
        )
        return data
