"""The gallery's files from a bucket: streamed through the server, never a redirect.

A browser gets every byte from the gallery's own origin (its Content Security
Policy allows no other, and the store's secret stays in this process): each
request is a GetObject, with the browser's single ``Range`` passed on, and the
body is copied to the browser a chunk at a time, so memory stays flat whatever
the file's size. Keys are the bucket URL's prefix plus a path that passed
:func:`~fetcher.gallery.guard.visible_parts`, so nothing outside the prefix, and
nothing under ``PREFIX/.fetcher/``, is ever asked for. Thumbnails are kept in the
user cache dir, one folder per bucket and prefix: nothing is written to the bucket.

A store that refuses at start (no such bucket, wrong credentials) stops ``serve``
with one line (exit 2); one that fails a request later answers that request 502,
with the store's error code and never a credential.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import platformdirs
from aiohttp import web
from botocore.exceptions import HTTPClientError

from ...archive import SIDECAR_NAME
from ...durable import make_folders
from ...errors import ArchiveError, StoreRefused, UsageError
from ...stores import BucketUrl
from ...stores.s3 import Expected, S3Store, state_path
from ..guard import Outside, visible_parts
from ..thumbs import NotAPicture, Thumbnails, make_thumbnail
from . import SIDECAR_HEADERS, file_headers

if TYPE_CHECKING:
    from ...catalog import CardFile
    from ..reader import Reader

#: Bytes copied to the browser at a time.
CHUNK = 256 * 1024
#: A picture larger than this gets no thumbnail (it would be read whole to make one).
MAX_PICTURE = 256 * 1024 * 1024
#: One range of bytes, as a browser's media element asks: ``bytes=A-``, ``A-B`` or ``-N``.
_RANGE = re.compile(r"bytes=(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))")
#: A body that stops coming from the store midway.
_BROKEN = (aiohttp.ClientError, HTTPClientError, TimeoutError)

_log = logging.getLogger("fetcher")


def thumbs_folder(url: BucketUrl) -> Path:
    """Where a bucket's thumbnails are kept: the user cache dir, one folder per bucket and
    prefix, named as its state file is."""
    cache = Path(os.path.realpath(platformdirs.user_cache_dir("fetcher")))
    return cache / "thumbs" / state_path(url).stem


class BucketSource:
    """The :class:`~fetcher.gallery.sources.FileSource` of an archive in a bucket."""

    def __init__(self, store: S3Store) -> None:
        self.url = store.url
        self.name = store.name
        self.db_path = store.db_path
        self.state_url = store.state_url
        self._store = store
        self._bucket = store.bucket
        self._thumbs = Thumbnails(thumbs_folder(store.url))

    async def __aenter__(self) -> Self:
        try:
            await self._store.open()  # the bucket checked: a refusal is one line, exit 2
            if not await self._store.restore_state():
                raise UsageError(f"no fetcher archive at {self.name!r}")
        except BaseException:
            await self._store.close()
            raise
        with contextlib.suppress(OSError):  # no cache: thumbnails are made for each view
            make_folders(self._thumbs.folder.parent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._store.close()

    def _key(self, relative: str) -> str:
        return self.url.key("/".join(visible_parts(relative)))

    async def send(
        self, request: web.Request, relative: str, content_type: str | None
    ) -> web.StreamResponse:
        key = self._key(relative)
        with _bad_gateway():
            return await self._stream(
                request,
                key,
                lambda kind: file_headers(kind or content_type, PurePosixPath(key).name),
            )

    async def send_sidecar(self, request: web.Request, folder: str) -> web.StreamResponse:
        key = self._key(str(PurePosixPath(folder) / SIDECAR_NAME))
        with _bad_gateway():
            return await self._stream(request, key, lambda _kind: dict(SIDECAR_HEADERS))

    async def _stream(
        self, request: web.Request, key: str, headers: Callable[[str | None], dict[str, str]]
    ) -> web.StreamResponse:
        """The object at ``key`` (or the range asked for); ``headers(its Content-Type)``."""
        params: dict[str, Any] = {"Key": key}
        wanted = single_range(request.headers.get("Range"))
        if wanted is not None:
            params["Range"] = wanted
        try:
            answer = await self._bucket.request("get_object", expect=(404, 416), **params)
        except Expected as exc:
            if exc.status == 416:
                return await self._unsatisfiable(key)
            raise Outside(key) from None
        response = web.StreamResponse(
            status=206 if answer.get("ContentRange") else 200,
            headers=headers(answer.get("ContentType")),
        )
        response.headers["Accept-Ranges"] = "bytes"
        if answer.get("ContentRange"):
            response.headers["Content-Range"] = str(answer["ContentRange"])
        response.content_length = int(answer["ContentLength"])
        async with answer["Body"] as body:
            await response.prepare(request)
            if request.method == "HEAD":
                await response.write_eof()
            else:
                await _copy(request, body, response, key)
        return response

    async def _unsatisfiable(self, key: str) -> web.StreamResponse:
        """416, with the object's length as RFC 9110 asks, for a range past its end."""
        head = await self._bucket.head(key)
        if head is None:
            raise Outside(key)
        return web.Response(
            status=416,
            text="416: range not satisfiable\n",
            headers={"Content-Range": f"bytes */{int(head['ContentLength'])}"},
        )

    async def sidecar(self, folder: str, limit: int) -> str | None:
        try:
            key = self._key(str(PurePosixPath(folder) / SIDECAR_NAME))
            answer = await self._bucket.request(
                "get_object", expect=(404, 416), Key=key, Range=f"bytes=0-{limit}"
            )
            async with answer["Body"] as body:
                data: bytes = await body.read()
        except (Outside, Expected, ArchiveError, StoreRefused, *_BROKEN):
            return None  # the page is still shown, without the sidecar
        return None if len(data) > limit else data.decode("utf-8", errors="replace")

    async def thumbnail(self, reader: Reader, item: CardFile) -> bytes:
        relative = item.path or ""
        key = self._key(relative)
        identity = f"{relative}\0{item.size}\0{item.sha256}"
        found = await reader.picture(lambda: self._thumbs.kept(identity))
        if found is not None:
            return found
        if item.size is not None and item.size > MAX_PICTURE:
            raise NotAPicture(f"{relative}: larger than {MAX_PICTURE} bytes")
        handle, name = tempfile.mkstemp(prefix="fetcher-thumb-")
        temp = Path(name)
        try:
            with os.fdopen(handle, "wb") as out, _bad_gateway():
                if await self._bucket.read(key, out.write) is None:
                    raise Outside(key)
            return await reader.picture(lambda: self._thumbs.keep(identity, make_thumbnail(temp)))
        finally:
            temp.unlink(missing_ok=True)


def single_range(header: str | None) -> str | None:
    """The ``Range`` to pass on to the store: one well-formed range, else none (the whole
    file, as RFC 9110 lets a server answer a range it does not take)."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        return f"bytes=-{int(suffix)}" if int(suffix) > 0 else None
    if last and int(last) < int(first):
        return None
    return f"bytes={int(first)}-{int(last) if last else ''}"


async def _copy(request: web.Request, body: Any, response: web.StreamResponse, key: str) -> None:
    """The object's bytes to the browser, until it has them all or goes away; a store that
    stops midway ends the connection.

    Too late for a status then (the headers went): the browser sees a body shorter
    than its Content-Length, and the log one line.
    """
    while True:
        try:
            chunk = await body.read(CHUNK)
        except _BROKEN as exc:
            _log.warning("reading %s from the store failed midway (%s)", key, type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
            return
        try:
            if not chunk:
                await response.write_eof()
                return
            await response.write(chunk)
        except ConnectionError:
            return  # the browser went away (a seek, a closed tab): nothing is wrong


@contextlib.contextmanager
def _bad_gateway() -> Iterator[None]:
    """A store error on one request: 502 with its one line (a bucket, a code, no secret)."""
    try:
        yield
    except (ArchiveError, StoreRefused) as exc:
        raise web.HTTPBadGateway(text=f"502: {exc}\n") from None
