"""Task IDs from files, standard input and the command line, streamed line by line.

Lists grow to millions of lines in cron setups, so nothing here holds a whole
source in memory: :func:`iter_entries` yields one entry a line, and the
pipeline pulls them in batches.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

MAX_ID_LENGTH = 256
#: Bytes asked of a stream at a time; a mark follows each such chunk of whole lines.
READ_CHUNK = 256 * 1024
#: A line longer than this is not kept whole: it is reported by its start.
LONG_LINE = 64 * 1024
#: Byte-order marks of UTF-16, as Windows Notepad's "Unicode" and PowerShell 5's ``>`` write.
_UTF16_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}
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
class Mark:
    """Between the entries of a list file: every line before ``offset`` has been yielded.

    ``lines`` and ``ids`` count the lines and task IDs before ``offset``, and
    ``digest`` is the SHA-256 of those bytes, so a later run can tell that the
    list still starts the same way (see :mod:`fetcher.bookmarks`). The first mark
    of a source says where reading began; ``skipped`` is how many IDs an
    unchanged, already settled beginning held and were not read again.
    """

    source: str
    offset: int
    lines: int
    ids: int
    digest: str
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class IdSource:
    """One place task IDs come from: a file, a stream, or values given as flags.

    ``key`` (the absolute path) is set for files: only a file can be recognised
    again by a later run, so only a file gets :class:`Mark` entries.
    """

    name: str
    stream: BinaryIO | None = None
    values: tuple[str, ...] = ()
    key: str = ""

    @classmethod
    def from_path(cls, path: Path) -> IdSource:
        """Open ``path`` now, so an unreadable file is a usage error before any work starts."""
        try:
            stream = path.open("rb")
            if path.is_file():  # a pipe (``<(generator)``) is checked as it is read instead
                _refuse_utf16(str(path), stream.read(2))
                stream.seek(0)
        except OSError as exc:
            raise InputError(f"cannot read task-ID file {str(path)!r}: {exc.strerror}") from exc
        except InputError:
            stream.close()
            raise
        return cls(name=str(path), stream=stream, key=str(path.resolve()))

    @classmethod
    def from_stream(cls, name: str, stream: BinaryIO) -> IdSource:
        return cls(name=name, stream=stream)

    @classmethod
    def from_values(cls, name: str, values: Iterable[str]) -> IdSource:
        return cls(name=name, values=tuple(values))


def iter_entries(
    sources: Iterable[IdSource], bookmarks: Mapping[str, Mark] | None = None
) -> Iterator[str | InvalidId | Mark]:
    """Every task ID and every invalid line, in order, with :class:`Mark` entries in files.

    Blank lines and ``#`` comments are skipped in files; a value given as a flag
    is always an ID, so an empty one is reported rather than ignored. A file whose
    first bytes still match its entry in ``bookmarks`` is read from there on.
    """
    for source in sources:
        if source.stream is None:
            for number, value in enumerate(source.values, start=1):
                text = value.strip()
                problem = id_problem(text)
                yield text if problem is None else InvalidId(source.name, number, text, problem)
        else:
            yield from _stream_entries(source, (bookmarks or {}).get(source.key))


def _stream_entries(source: IdSource, bookmark: Mark | None) -> Iterator[str | InvalidId | Mark]:
    """Lines of a byte stream, read as they arrive (``read1``: a slow pipe is not waited on).

    Bytes are split into lines here rather than by a text wrapper so the offset of
    every line is known: a :class:`Mark` follows each chunk of whole lines.
    """
    stream = source.stream
    assert stream is not None
    marks = bool(source.key)
    digest = hashlib.sha256()
    offset = lines = ids = skipped = 0
    try:
        if marks and bookmark is not None and _starts_as(stream, bookmark, digest):
            offset, lines, ids, skipped = (
                bookmark.offset,
                bookmark.lines,
                bookmark.ids,
                bookmark.ids,
            )
        elif marks and bookmark is not None:
            stream.seek(0)
            digest = hashlib.sha256()
        if marks:
            yield Mark(source.key, offset, lines, ids, digest.hexdigest(), skipped)
        read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
        tail = b""
        #: The start of a line too long to be an ID, held while the rest goes by unkept.
        long_head: bytes | None = None
        while chunk := read(READ_CHUNK):
            data = tail + chunk if tail else chunk
            if offset == 0:  # ``data`` starts at the file's first byte until a line is done
                _refuse_utf16(source.name, data[:2])
            cut = data.rfind(b"\n") + 1
            if not cut:
                tail = data
                if len(tail) > LONG_LINE:  # no ID is this long: keep its start for the message
                    digest.update(tail)
                    offset += len(tail)
                    long_head = long_head or tail[:80]
                    tail = b""
                continue
            whole, tail = data[:cut], data[cut:]
            if marks:
                digest.update(whole)
            start = 0
            if long_head is not None:
                start = whole.index(b"\n") + 1
                lines += 1
                text = (long_head + whole[: start - 1]).decode("utf-8", "backslashreplace")
                yield InvalidId(source.name, lines, text.strip()[:80], "a line far too long")
                long_head = None
            found, lines = _entries(source.name, whole[start:], lines, at_start=offset == 0)
            ids += sum(1 for entry in found if isinstance(entry, str))
            yield from found
            offset += cut
            if marks:
                yield Mark(source.key, offset, lines, ids, digest.hexdigest())
        if long_head is not None:
            yield InvalidId(
                source.name,
                lines + 1,
                long_head.decode("utf-8", "replace")[:80],
                "a line far too long",
            )
        elif tail:  # a last line without its newline: read, but not marked (it may still grow)
            yield from _entries(source.name, tail + b"\n", lines, at_start=offset == 0)[0]
    except OSError as exc:
        raise InputError(f"cannot read task-ID file {source.name!r}: {exc.strerror}") from exc
    finally:
        stream.close()


def _refuse_utf16(name: str, head: bytes) -> None:
    """A UTF-16 list is refused whole, with a line saying so, not read as a page of bad IDs.

    Lines are found and remembered (see :mod:`fetcher.bookmarks`) by their bytes,
    with ``\\n`` as one byte; in UTF-16 it is two, and half the bytes are NULs.
    """
    kind = _UTF16_BOMS.get(head)
    if kind is not None:
        raise InputError(
            f"task-ID list {name!r} is {kind} (Notepad's 'Unicode', PowerShell 5's '>');"
            " save it as UTF-8"
        )


def _entries(
    name: str, whole: bytes, before: int, *, at_start: bool
) -> tuple[list[str | InvalidId], int]:
    """Entries of ``whole`` (complete lines), numbered from ``before + 1``, and the new count.

    The chunk is decoded at once (a bad byte cannot reach past its line's ``\\n``), and
    the common line, a plain ID, takes one regular-expression match.
    """
    text = whole.decode("utf-8", "backslashreplace")
    if at_start:
        text = text.removeprefix("\ufeff")
    found: list[str | InvalidId] = []
    number = before
    valid = _ID_CHARS.fullmatch
    for line in text.split("\n")[:-1]:
        # A lone CR ends a line too (as universal newlines read it); CRLF is one ending.
        parts = line.split("\r") if "\r" in line[:-1] else (line,)
        for part in parts:
            number += 1
            item = part.strip()
            if len(item) <= MAX_ID_LENGTH and valid(item) and item not in (".", ".."):
                found.append(item)
            elif item and not item.startswith("#"):
                found.append(InvalidId(name, number, item, id_problem(item) or "invalid"))
    return found, number


def _starts_as(stream: BinaryIO, bookmark: Mark, digest: hashlib._Hash) -> bool:
    """Whether ``stream`` begins with the bytes ``bookmark`` describes (read into ``digest``)."""
    left = bookmark.offset
    while left:
        chunk = stream.read(min(left, 1024 * 1024))
        if not chunk:
            return False
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest() == bookmark.digest
