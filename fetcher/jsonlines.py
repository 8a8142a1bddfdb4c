"""``fetch --json-lines``: each task's outcome on stdout as it happens, one compact object a line.

A script that follows a long run reads a line per task (the same object as an
entry of ``--json``'s ``tasks``) while the run goes on, then the summary object,
last. Everything else the run has to say stays on stderr, through the progress
listener this one wraps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, TextIO

from .progress import Progress
from .summary import TaskOutcome


def compact(document: Any) -> str:
    """One line of JSON, as ``--json-lines`` prints each object."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


class JsonLinesProgress:
    """Prints every task outcome to ``out`` at once, and passes every event on to ``inner``."""

    def __init__(self, inner: Progress, out: TextIO) -> None:
        self._inner = inner
        self._out = out

    def task_done(self, outcome: TaskOutcome) -> None:
        self._inner.task_done(outcome)
        print(compact(outcome.to_json()), file=self._out, flush=True)

    def archived_before(self, task_ids: Sequence[str]) -> None:
        self._inner.archived_before(task_ids)

    def file_queued(self, size: int | None) -> None:
        self._inner.file_queued(size)

    def file_done(self) -> None:
        self._inner.file_done()

    def bytes_received(self, count: int) -> None:
        self._inner.bytes_received(count)

    def message(self, text: str) -> None:
        self._inner.message(text)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass
