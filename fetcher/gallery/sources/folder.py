"""The gallery's files from an archive folder: paths checked by
:func:`~fetcher.gallery.guard.contained`, bytes sent by aiohttp's FileResponse."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Self

from aiohttp import web

from ...archive import SIDECAR_NAME, Archive
from ...errors import UsageError
from ..guard import Outside, contained
from ..thumbs import Thumbnails
from . import SIDECAR_HEADERS, file_headers

if TYPE_CHECKING:
    from ...catalog import CardFile
    from ...state import DatabaseUrl
    from ..reader import Reader


class ArchivedFile(web.FileResponse):
    """aiohttp's FileResponse, sending the archived file itself and nothing beside it.

    FileResponse serves ``00.png.br`` or ``00.png.gz``, when one lies beside
    ``00.png`` and the browser accepts that encoding, in place of ``00.png``: a file
    planted there (not archived, never checked) would be what the browser gets. Here
    the encodings FileResponse looks for are always none.
    """

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[Path | None, os.stat_result, str | None]:
        return super()._get_file_path_stat_encoding("")


class FolderSource:
    """The :class:`~fetcher.gallery.sources.FileSource` of an archive folder."""

    def __init__(self, root: Path, state_url: DatabaseUrl | None = None) -> None:
        archive = Archive(root, state_url)
        self.name = str(archive.root)
        self.db_path = archive.db_path
        self.state_url = state_url
        self._archive = archive
        self.root = archive.root
        self._thumbs = Thumbnails(archive.meta_dir / "thumbs")

    async def __aenter__(self) -> Self:
        # A PostgreSQL state holds no file here: the folder must still be there to serve.
        if not (self._archive.exists() and self._archive.root.is_dir()):
            raise UsageError(f"no fetcher archive at {self.name!r}")
        # Resolved once: contained() compares each file's real path with the root's.
        self.root = self._archive.root.resolve()
        self.db_path = self.root / self.db_path.relative_to(self._archive.root)
        self._thumbs = Thumbnails(self.root / self._thumbs.folder.relative_to(self._archive.root))
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(
        self, request: web.Request, relative: str, content_type: str | None
    ) -> web.StreamResponse:
        path = contained(self.root, relative)
        return ArchivedFile(path, headers=file_headers(content_type, path.name))

    async def send_sidecar(self, request: web.Request, folder: str) -> web.StreamResponse:
        path = contained(self.root, str(PurePosixPath(folder) / SIDECAR_NAME))
        return ArchivedFile(path, headers=dict(SIDECAR_HEADERS))

    async def sidecar(self, folder: str, limit: int) -> str | None:
        try:
            path = contained(self.root, str(PurePosixPath(folder) / SIDECAR_NAME))
            if path.stat().st_size > limit:
                return None
            return path.read_text(encoding="utf-8", errors="replace")
        except (Outside, OSError):
            return None

    async def thumbnail(self, reader: Reader, item: CardFile) -> bytes:
        path = contained(self.root, item.path or "")
        relative = item.path or ""
        return await reader.picture(lambda: self._thumbs.get(path, relative))
