"""Task IDs from files, standard input and the command line, streamed line by line.

Lists grow to millions of lines in cron setups, so nothing here holds a whole
source in memory: :func:`iter_entries` yields one entry a line, and the
pipeline pulls them in batches.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

MAX_ID_LENGTH = 256
_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class InvalidId:
    """A line that is not a valid task ID, kept so the run can report where it was."""

    source: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"{self.source}:{self.line}: invalid task ID {shown!r}: {self.reason}"


def id_problem(text: str) -> str | None:
    """Why ``text`` is not a valid task ID, or None when it is one."""
    if not text:
        return "empty"
    if len(text) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    if text in (".", ".."):
        return "not a name"
    if not _ID_CHARS.fullmatch(text):
        return "only letters, digits, '-', '_' and '.' are allowed"
    return None


@dataclass(frozen=True, slots=True)
class IdSource:
    """One place task IDs come from: a file, a stream, or values given as flags."""

    name: str
    stream: BinaryIO | None = None
    values: tuple[str, ...] = ()

    @classmethod
    def from_path(cls, path: Path) -> IdSource:
        """Open ``path`` now, so an unreadable file is a usage error before any work starts."""
        try:
            stream = path.open("rb")
        except OSError as exc:
            raise InputError(f"cannot read task-ID file {str(path)!r}: {exc.strerror}") from exc
        return cls(name=str(path), stream=stream)

    @classmethod
    def from_stream(cls, name: str, stream: BinaryIO) -> IdSource:
        return cls(name=name, stream=stream)

    @classmethod
    def from_values(cls, name: str, values: Iterable[str]) -> IdSource:
        return cls(name=name, values=tuple(values))

    def lines(self) -> Iterator[str]:
        if self.stream is None:
            yield from self.values
            return
        # utf-8-sig drops a BOM; universal newlines fold CRLF; undecodable bytes
        # survive as escapes so the line is reported as invalid, not fatal.
        text = io.TextIOWrapper(self.stream, encoding="utf-8-sig", errors="backslashreplace")
        try:
            yield from text
        except OSError as exc:
            raise InputError(f"cannot read task-ID file {self.name!r}: {exc.strerror}") from exc
        finally:
            text.detach()
            self.stream.close()


def iter_entries(sources: Iterable[IdSource]) -> Iterator[str | InvalidId]:
    """Every task ID and every invalid line, in order.

    Blank lines and ``#`` comments are skipped in files; a value given as a flag
    is always an ID, so an empty one is reported rather than ignored.
    """
    for source in sources:
        for number, raw in enumerate(source.lines(), start=1):
            text = raw.strip()
            is_file = source.stream is not None
            if is_file and (not text or text.startswith("#")):
                continue
            problem = id_problem(text)
            if problem is None:
                yield text
            else:
                yield InvalidId(source.name, number, text, problem)
