"""``fetch --json-lines``: each task's outcome on stdout as it happens, one compact object a line.

A script that follows a long run reads a line per task (the same object as an
entry of ``--json``'s ``tasks``) while the run goes on, then the summary object,
last. Everything else the run has to say stays on stderr, through the progress
listener this one wraps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TextIO

from .progress import Progress
from .summary import TaskOutcome


def compact(document: Any) -> str:
    """One line of JSON, as ``--json-lines`` prints each object."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def write_object(out: TextIO, document: Mapping[str, Any], *, one_line: bool) -> None:
    """``json.dumps(document)`` (indented by 2, or :func:`compact`), written a piece at a
    time: a value that is an iterator is written as an array, item by item, so a
    long run's ``tasks`` never sit in memory as one list or one string."""
    dump = compact if one_line else _indent2
    open_, sep, close, item_sep = ("{", ",", "}", ",") if one_line else _INDENTED
    out.write(open_)
    for n, (key, value) in enumerate(document.items()):
        if n:
            out.write(sep)
        name = dump(key) + (":" if one_line else ": ")
        out.write(name if one_line else "  " + name)
        if isinstance(value, Iterator):
            _write_array(out, value, dump, one_line=one_line, item_sep=item_sep)
        else:
            out.write(dump(value) if one_line else _indented(dump(value), "  "))
    out.write(close + "\n")
    out.flush()


_INDENTED = ("{\n", ",\n", "\n}", ",\n")


def _indent2(value: Any) -> str:
    return json.dumps(value, indent=2)


def _write_array(
    out: TextIO,
    items: Iterator[Any],
    dump: Callable[[Any], str],
    *,
    one_line: bool,
    item_sep: str,
) -> None:
    first = True
    for item in items:
        if first:
            out.write("[" if one_line else "[\n    ")
            first = False
        else:
            out.write(item_sep if one_line else item_sep + "    ")
        out.write(dump(item) if one_line else _indented(dump(item), "    "))
    if first:
        out.write("[]")
    else:
        out.write("]" if one_line else "\n  ]")


def _indented(text: str, prefix: str) -> str:
    """Every line after the first moved right by ``prefix``, as a nested value sits."""
    return text.replace("\n", "\n" + prefix)


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

    def indexed(self, done: int, total: int) -> None:
        self._inner.indexed(done, total)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass
