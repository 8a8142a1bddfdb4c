"""What the state's rows hold, and the small conversions every implementation shares."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ..models import format_time

#: IDs looked up per statement (passed as one JSON array, so no variable limit).
BATCH = 2000

#: Task states.
#: Named by ``fetcher enqueue`` and not asked about yet (fetcher/intake.py).
QUEUED = "queued"
PENDING = "pending"
INCOMPLETE = "incomplete"
ARCHIVED = "archived"
FAILED = "failed"
EXPIRED = "expired"
#: Every task state, in the order reports list them.
STATES = (ARCHIVED, PENDING, INCOMPLETE, FAILED, EXPIRED, QUEUED)


@dataclass(frozen=True, slots=True)
class FileRow:
    """A file row, as the pipeline and ``status``/``verify`` read it."""

    task_id: str
    index: int
    url: str
    expire_time: str | None
    md5: str | None
    state: str
    path: str | None
    size: int | None
    sha256: str | None
    content_type: str | None
    reason: str | None


_last_stamp: list[tuple[int, str]] = [(-1, "")]


def now_text() -> str:
    """The current time in :func:`format_time`'s form; one ``strftime`` per second."""
    second = int(time.time())
    cached_second, text = _last_stamp[0]
    if second != cached_second:
        text = format_time(datetime.fromtimestamp(second, UTC)) or ""
        _last_stamp[0] = (second, text)
    return text


FILE_SELECT = (
    "SELECT task_id, idx, url, expire_time, md5, state, path, size, sha256, content_type, reason "
    "FROM files"
)


def file_row(row: tuple[object, ...]) -> FileRow:
    task_id, idx, url, expire, md5, state, path, size, sha256, ctype, reason = row
    return FileRow(
        task_id=str(task_id),
        index=int(str(idx)),
        url=str(url),
        expire_time=opt_text(expire),
        md5=opt_text(md5),
        state=str(state),
        path=opt_text(path),
        size=None if size is None else int(str(size)),
        sha256=opt_text(sha256),
        content_type=opt_text(ctype),
        reason=opt_text(reason),
    )


def opt_text(value: object) -> str | None:
    """A nullable TEXT column as ``str | None``."""
    return None if value is None else str(value)
