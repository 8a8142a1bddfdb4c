"""Where the gallery's files come from: an archive folder (:mod:`.folder`) or a bucket
(:mod:`.bucket`).

The routes speak only :class:`FileSource`; :func:`open_source` picks one by the
``archive`` setting. Either way the catalog is the archive's state: its SQLite file
on this machine (a bucket's restored from its snapshot when this host has none), or
the PostgreSQL database the ``state`` setting names; every path a
card names passes :func:`~fetcher.gallery.guard.visible_parts` before it is
served, and nothing is written to the archive.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

from aiohttp import web

from ...stores import BucketUrl, database_url, open_store

if TYPE_CHECKING:
    from ...catalog import CardFile
    from ...config import Settings
    from ...state import DatabaseUrl
    from ..reader import Reader

#: Content types a file is served as; anything else is a download (no browser renders it).
SHOWN_TYPES = ("image/", "video/", "audio/")
#: A sidecar opened on its own is JSON, shown as text.
SIDECAR_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


class FileSource(Protocol):
    """The archive's files and sidecars as the gallery reads them; ``async with`` opens it."""

    #: How the archive is named to the user: a folder path, or ``s3://BUCKET/PREFIX``.
    name: str
    #: The SQLite state the catalog reads, unless :attr:`state_url` takes its place.
    db_path: Path
    #: The PostgreSQL state the catalog reads instead, when the settings name one.
    state_url: DatabaseUrl | None

    async def __aenter__(self) -> Self:
        """Check the archive is there (a bucket: reachable, its state here); usage errors if not."""

    async def __aexit__(self, *exc: object) -> None:
        """Let go of connections."""

    async def send(
        self, request: web.Request, relative: str, content_type: str | None
    ) -> web.StreamResponse:
        """The file at ``relative`` as the answer to ``request``, ranges included.

        :class:`~fetcher.gallery.guard.Outside` when it is not a file the gallery serves.
        """

    async def send_sidecar(self, request: web.Request, folder: str) -> web.StreamResponse:
        """A task folder's ``task.json`` as the answer to ``request``; Outside when missing."""

    async def sidecar(self, folder: str, limit: int) -> str | None:
        """A task folder's ``task.json`` as text; None when it is missing or over ``limit``."""

    async def thumbnail(self, reader: Reader, item: CardFile) -> bytes:
        """A picture's thumbnail (kept outside the archive's files); Outside or NotAPicture."""


def file_headers(content_type: str | None, name: str) -> dict[str, str]:
    """How an archived file is sent: shown when a browser shows it inertly, else downloaded.

    SVG is never shown: it is a document that can carry script.
    """
    headers = {"Cache-Control": "private, max-age=3600"}
    kind = content_type or ""
    if kind.startswith(SHOWN_TYPES) and "svg" not in kind:
        headers["Content-Type"] = kind
    else:
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return headers


def open_source(archive: Path | BucketUrl, settings: Settings | None) -> FileSource:
    """The source an ``archive`` setting names; a bucket's library is imported only here."""
    if isinstance(archive, BucketUrl):
        store = open_store(archive, settings)  # a usage error when aiobotocore is missing
        from ...stores.s3 import S3Store
        from .bucket import BucketSource

        assert isinstance(store, S3Store)
        return BucketSource(store)
    from .folder import FolderSource

    return FolderSource(archive, database_url(settings))
