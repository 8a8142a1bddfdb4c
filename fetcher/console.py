"""The terminal edge: tqdm bars when stderr is a terminal, plain log lines otherwise.

Cron mails and CI logs get one readable line per event; people at a terminal
get three bars (tasks, files, bytes) with the same lines printed above them.
Only the CLI imports this module.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, TextIO

from .sizes import format_size
from .summary import Outcome, RunSummary, TaskOutcome

log = logging.getLogger("fetcher")

_LEVELS = {
    Outcome.ALREADY_ARCHIVED: logging.DEBUG,
    Outcome.ARCHIVED: logging.INFO,
    Outcome.PENDING: logging.INFO,
    Outcome.READY: logging.INFO,
    Outcome.SKIPPED: logging.DEBUG,
    Outcome.ELSEWHERE: logging.INFO,
    Outcome.FAILED: logging.WARNING,
    Outcome.EXPIRED: logging.WARNING,
    Outcome.INVALID: logging.WARNING,
}


def setup_logging(verbosity: int, stream: TextIO | None = None) -> None:
    """``-q`` shows only problems; ``-v`` adds tasks already archived."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _TqdmAwareHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("fetcher: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class _TqdmAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes above the bars when they are shown, so lines and bars do not tangle."""

    bars_active = False

    def emit(self, record: logging.LogRecord) -> None:
        if not _TqdmAwareHandler.bars_active:
            super().emit(record)
            return
        from tqdm import tqdm

        tqdm.write(self.format(record), file=self.stream)


def describe(outcome: TaskOutcome) -> str:
    """One line for one task's outcome."""
    text = f"{outcome.outcome.value:<16} {outcome.task_id}"
    if outcome.outcome is Outcome.ARCHIVED:
        return (
            f"{text} ({outcome.files} file{'s' if outcome.files != 1 else ''} in {outcome.folder})"
        )
    if outcome.reason:
        return f"{text}: {outcome.reason}"
    return text


class LogProgress:
    """One log line per task; nothing for bytes and files."""

    def task_done(self, outcome: TaskOutcome) -> None:
        if outcome.outcome is Outcome.INVALID:
            return  # already said by message(), with its line number
        level = _LEVELS[outcome.outcome]
        if log.isEnabledFor(level):
            log.log(level, "%s", describe(outcome))

    def archived_before(self, task_ids: Sequence[str]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            for task_id in task_ids:
                log.debug("%s", describe(TaskOutcome(task_id, Outcome.ALREADY_ARCHIVED)))

    def file_queued(self, size: int | None) -> None:
        pass

    def file_done(self) -> None:
        pass

    def bytes_received(self, count: int) -> None:
        pass

    def message(self, text: str) -> None:
        log.warning("%s", text)

    def indexed(self, done: int, total: int) -> None:
        if done == 0:
            log.info("indexing %d tasks archived before search existed (once)", total)
        elif done >= total:
            log.info("search index built: %d tasks", total)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


class BarProgress(LogProgress):
    """Tasks, files and bytes as tqdm bars on stderr, log lines above them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        out = stream or sys.stderr
        common: dict[str, Any] = {"file": out, "dynamic_ncols": True, "leave": True}
        self._tasks = tqdm(desc="tasks", unit="task", position=0, **common)
        self._files = tqdm(desc="files", unit="file", total=0, position=1, **common)
        self._bytes = _byte_bar(desc="bytes", position=2, **common)
        self._common = common
        #: The search index's bar, shown only while an older archive is indexed.
        self._index: Any = None
        _TqdmAwareHandler.bars_active = True

    def task_done(self, outcome: TaskOutcome) -> None:
        super().task_done(outcome)
        self._tasks.update(1)

    def archived_before(self, task_ids: Sequence[str]) -> None:
        super().archived_before(task_ids)
        self._tasks.update(len(task_ids))

    def file_queued(self, size: int | None) -> None:
        self._files.total += 1
        self._files.refresh()

    def file_done(self) -> None:
        self._files.update(1)

    def bytes_received(self, count: int) -> None:
        self._bytes.update(count)

    def indexed(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._index is None:
            self._index = tqdm(
                desc="indexing for search", unit="task", total=total, position=3, **self._common
            )
        self._index.update(done - self._index.n)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for bar in (self._tasks, self._files, self._bytes, self._index):
            if bar is not None:
                bar.close()
        _TqdmAwareHandler.bars_active = False


class IndexBar:
    """The search index's bar alone, for ``fetcher search`` on an archive being indexed.

    Shown on a terminal only, and not when ``shown`` is False (``search --json``).
    """

    def __init__(self, stream: TextIO | None = None, *, shown: bool = True) -> None:
        self._stream = stream or sys.stderr
        self._shown = shown
        self._bar: Any = None

    def indexed(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                desc="indexing for search",
                unit="task",
                total=total,
                file=self._stream,
                disable=not (self._shown and self._stream.isatty()),
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


#: The bytes bar in the summary's units: tqdm's own scaling would print ``kB`` for KiB
#: and a rate in powers of 1000 beside a count in powers of 1024.
_BYTE_BAR_FORMAT = "{desc}: {size} [{elapsed}, {speed}]"


def _byte_bar(**options: Any) -> Any:
    """A tqdm bar that counts bytes and shows them, and their rate, in KiB/MiB/GiB."""
    from tqdm import tqdm

    class ByteBar(tqdm):  # type: ignore[misc]  # tqdm ships no types
        @property
        def format_dict(self) -> dict[str, Any]:
            values: dict[str, Any] = super().format_dict
            rate = values.get("rate")
            values["size"] = format_size(values.get("n") or 0)
            values["speed"] = f"{format_size(rate)}/s" if rate else "? B/s"
            return values

    return ByteBar(unit="B", bar_format=_BYTE_BAR_FORMAT, **options)


def summary_line(summary: RunSummary) -> str:
    """The run in one line: what a cron mail's subject would want to say."""
    counts = summary.counts
    totals = {
        Outcome.ALREADY_ARCHIVED: (summary.already_archived, _parts(unchanged=summary.unchanged)),
        Outcome.FAILED: (
            summary.failed,
            _parts(expired=counts[Outcome.EXPIRED], invalid=counts[Outcome.INVALID]),
        ),
    }
    shown = []
    for outcome in Outcome:
        if outcome in (Outcome.EXPIRED, Outcome.INVALID):
            continue  # shown inside "failed", as the JSON counts them
        number, parts = totals.get(outcome, (counts[outcome], ""))
        if number:
            shown.append(f"{number} {outcome.value.replace('_', ' ')}{parts}")
    if summary.from_queue:
        # Counted above under their outcomes too: tasks another run queued (an earlier
        # one, or on a shared state one running alongside).
        shown.append(f"{summary.from_queue} of them from another run's queue")
    downloaded = format_size(summary.bytes_downloaded)
    files = f"{_count(summary.files_downloaded, 'file')}, {downloaded} downloaded"
    verdict = "interrupted" if summary.interrupted else "with problems" if summary.failed else "ok"
    requests = _count(summary.requests, "request")
    if summary.archive:
        files += f" to {summary.archive}"
    return f"{', '.join(shown) or 'no tasks'}; {files}; {requests}; {verdict}"


def _parts(**parts: int) -> str:
    """`` (2 expired, 1 invalid)``: the named parts of a total that are not zero."""
    named = [f"{n} {name}" for name, n in parts.items() if n]
    return f" ({', '.join(named)})" if named else ""


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
