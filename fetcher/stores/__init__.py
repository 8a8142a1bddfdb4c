"""Where an archive's files go: a folder (:mod:`.local`) or a bucket (:mod:`.s3`).

The pipeline, ``status`` and ``verify`` speak only :class:`ArchiveStore`; which
one a run gets is decided by the ``archive`` setting alone (:func:`open_store`).
Either way downloads stage in a local work folder (on a shared state, a folder of
the run's own inside it: :mod:`.rooms`), so the commit order is the same: work file,
verify, place, sidecar, archived row. A bucket's library is imported by :func:`open_store` only
when an ``s3://`` archive is named.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError

if TYPE_CHECKING:
    import asyncio

    from ..config import Settings
    from ..state.address import DatabaseUrl

SCHEME = "s3://"
#: What a bucket name may hold: S3's rules, plus the upper case and ``_`` older stores allow.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


@dataclass(frozen=True, slots=True)
class BucketUrl:
    """``s3://BUCKET[/PREFIX]``: a bucket and the key prefix the archive lives under."""

    bucket: str
    #: Segments joined by ``/``, no leading or trailing slash; ``""`` for the whole bucket.
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> BucketUrl:
        """The URL, or a one-line :class:`UsageError` (no bucket, an odd name, ``..``)."""
        if not is_bucket(text):
            raise UsageError(f"{text!r} is not an s3:// URL")
        rest = text[len(SCHEME) :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"{text!r} names no bucket: use s3://BUCKET[/PREFIX]")
        if not _BUCKET.fullmatch(bucket):
            raise UsageError(f"{bucket!r} is not a bucket name (letters, digits, '.', '-', '_')")
        parts = [part for part in prefix.split("/") if part]
        if any(part in (".", "..") or not part.isprintable() for part in parts):
            raise UsageError(f"{text!r}: the prefix may not hold '.', '..' or control characters")
        return cls(bucket, "/".join(parts))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, relative: PurePosixPath | str) -> str:
        """The object key of an archive-relative path: always under the prefix."""
        path = PurePosixPath(relative)
        if path.is_absolute() or not path.parts or ".." in path.parts:
            raise ValueError(f"{str(relative)!r} is not a path inside the archive")
        return f"{self.prefix}/{path}" if self.prefix else str(path)

    @property
    def root(self) -> str:
        """The prefix every key of the archive starts with (``""`` or ``PREFIX/``)."""
        return f"{self.prefix}/" if self.prefix else ""


def is_bucket(text: object) -> bool:
    """Whether an ``archive`` setting names a bucket rather than a folder."""
    return isinstance(text, str) and text[: len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True, slots=True)
class Placed:
    """A file in its place: archive-relative path, and what its state row records."""

    path: str
    size: int
    sha256: str
    content_type: str | None


class ArchiveStore(Protocol):
    """What a run needs of the place its archive lives in."""

    #: How the archive is named to the user: a folder path, or ``s3://BUCKET/PREFIX``.
    name: str
    #: The SQLite state (on this machine, for a bucket too).
    db_path: Path
    #: Or the PostgreSQL state that takes its place, when the ``state`` setting names one.
    state_url: DatabaseUrl | None

    def exists(self) -> bool:
        """Whether there is an archive here already (its state on this machine)."""

    async def open(self) -> None:
        """Make it ready to write: folders made, or the bucket checked and its state restored."""

    async def close(self) -> None:
        """Let go of what :meth:`open` took (connections); safe to call when it failed."""

    def wait_lock(
        self,
        wait: float | None,
        stop: asyncio.Event | None = None,
        waiting: Callable[[], None] | None = None,
    ) -> AbstractAsyncContextManager[bool]:
        """Hold the one-run-at-a-time lock; yields False when ``stop`` was set while waiting."""

    async def clean(self) -> None:
        """Under the lock: drop what a killed run left and cannot resume."""

    def work_path(self, task_id: str, index: int) -> Path:
        """The local work file of one task's file (stable, for resume)."""

    def work_in_room(self, run_id: str, live: Callable[[], Collection[str]]) -> None:
        """On a shared state, once the run is registered: stage in a work folder of the
        run's own, after cleaning what dead runs left in theirs (:mod:`.rooms`)."""

    def leave_room(self) -> None:
        """The run is over: its own work folder goes, unless something is left in it."""

    async def stored(self, task_id: str, index: int) -> Placed | None:
        """The file as an earlier, killed run already placed it, if it did; else None."""

    async def put_file(self, work_file: Path, placed: Placed) -> None:
        """Place a verified work file at ``placed.path``, whole or not at all."""

    async def put_sidecar(self, folder: PurePosixPath, document: Mapping[str, Any]) -> None:
        """Write a task's ``task.json``, whole or not at all."""

    def has_file(self, relative: str) -> bool:
        """Whether a file its row records as done is still in place, without a request."""

    async def committed(self) -> None:
        """The run's state is closed and durable: keep a copy of it where the archive is."""

    async def restore_state(self) -> bool:
        """After :meth:`open`: bring the state here from the archive if only it has one.

        False when there is no state anywhere: no archive yet.
        """


async def fetch_state(store: ArchiveStore) -> bool:
    """Whether the store has a state on this machine, restoring it from the archive if need be."""
    if store.exists():
        return True
    await store.open()
    try:
        return await store.restore_state()
    finally:
        await store.close()


def state_here(url: BucketUrl, settings: Settings | None = None) -> Path:
    """A bucket archive's state on this machine, for reading: restored from the bucket's
    snapshot when this host has none; a usage error when the bucket holds no archive."""
    import asyncio

    store = open_store(url, settings)
    if not asyncio.run(fetch_state(store)):
        raise UsageError(f"no fetcher archive at {store.name!r}")
    return store.db_path


def open_store(archive: Path | BucketUrl, settings: Settings | None = None) -> ArchiveStore:
    """The store an ``archive`` setting names; a bucket's library is imported only here."""
    if isinstance(archive, BucketUrl):
        try:
            from .s3 import S3Store
        except ImportError:
            raise UsageError(
                f"archiving into {archive} needs aiobotocore: pip install 'fetcher[s3]'"
            ) from None
        return S3Store(archive, settings)
    from .local import Archive

    return Archive(archive, database_url(settings))


def database_url(settings: Settings | None) -> DatabaseUrl | None:
    """The PostgreSQL state the settings name, if they name one."""
    from ..state.address import DatabaseUrl

    state = settings.state if settings is not None else None
    return state if isinstance(state, DatabaseUrl) else None
