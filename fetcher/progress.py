"""How the pipeline tells the outside world what it is doing, without knowing who listens.

The core never prints: it calls a :class:`Progress`. The CLI plugs in tqdm bars
or plain log lines; library callers and tests use :class:`NullProgress`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .summary import TaskOutcome


class Progress(Protocol):
    """Events of a run, in the order they happen."""

    def task_done(self, outcome: TaskOutcome) -> None:
        """A task reached its outcome for this run."""

    def archived_before(self, task_ids: Sequence[str]) -> None:
        """These tasks were archived by an earlier run; nothing was sent for them."""

    def file_queued(self, size: int | None) -> None:
        """A file joined the download queue (``size`` when the API said)."""

    def file_done(self) -> None:
        """A file finished, in place or given up."""

    def bytes_received(self, count: int) -> None:
        """Bytes of some file arrived."""

    def message(self, text: str) -> None:
        """Something the user should read (an invalid line, a warning)."""

    def indexed(self, done: int, total: int) -> None:
        """Tasks recorded before the search index existed: ``done`` of ``total`` indexed."""


class NullProgress:
    """A listener that ignores everything."""

    def task_done(self, outcome: TaskOutcome) -> None:
        pass

    def archived_before(self, task_ids: Sequence[str]) -> None:
        pass

    def file_queued(self, size: int | None) -> None:
        pass

    def file_done(self) -> None:
        pass

    def bytes_received(self, count: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def indexed(self, done: int, total: int) -> None:
        pass
