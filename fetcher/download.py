"""Downloading one output file into a work file, verified, with resume after a drop.

The file hosts are a different origin from the API, so this module owns a
separate session that never holds the API key; a ``FileUrl``, or a redirect,
pointing back at the API's own origin is refused outright. Bytes stream to disk through
a bounded buffer (memory does not grow with file size) and are hashed on the
way; a dropped connection resumes from the bytes on disk with ``Range`` and
``If-Range`` where the host allows it. Nothing here decides where a file ends
up: the caller renames the verified work file into the archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urljoin, urlsplit

from .api import USER_AGENT
from .durable import fsync_dir, fsync_file, write_text_durably
from .errors import DownloadError, FileExpired, FileGone, HttpError, IntegrityError
from .models import RemoteFile, format_time, one_line
from .retry import RETRY_STATUSES, RetryPolicy, attempts, parse_retry_after
from .sink import ShortWorkFile, WorkSink
from .transport import Session
from .url import InvalidUrl, Url

if TYPE_CHECKING:
    from aiohttp import ClientResponse

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
GONE_STATUSES = frozenset({403, 404, 410})
_URL_EXTENSION = re.compile(r"\.([A-Za-z0-9]{1,5})$")
#: A strong entity tag as RFC 9110 section 8.8.3 draws it, ASCII only: what ``If-Range``
#: may carry back. Anything else (a NUL or other control character, a byte over 0x7E)
#: is dropped when received, so it is never sent, nor stored for a later run.
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]*"')
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
#: Called with each chunk's length, so the edge can draw a bytes bar.
BytesCallback = Callable[[int], None]
_PREFERRED_EXTENSIONS = {".jpe": ".jpg", ".jpeg": ".jpg", ".mpga": ".mp3", ".qt": ".mov"}


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A complete, verified work file and what was learnt about it."""

    path: Path
    size: int
    sha256: str
    content_type: str | None
    extension: str


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another attempt."""

    def __init__(self, reason: str, retry_after: float | None = None, restart: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.restart = restart


@dataclass(slots=True)
class _WorkFile:
    """A work file, and the URL and validator of the response its bytes came from.

    The pair is kept in ``<work file>.json`` so a later run can resume too. It is
    written before the first body byte that is not the whole file: a stale pairing
    can then only make ``If-Range`` fail safe (the host sends the whole file again),
    never splice two versions. A file that arrives whole in one write needs none.
    """

    path: Path
    url: str
    validator: str | None = None
    #: A record for this work file is on disk (found by :meth:`resume` or written).
    recorded: bool = False

    @property
    def meta(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @classmethod
    def resume(cls, path: Path, url: str) -> _WorkFile:
        """Pick up what an earlier attempt or run left for this same URL."""
        work = cls(path, url)
        try:
            data = json.loads(work.meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return work
        except (OSError, ValueError):
            work.recorded = True  # unreadable: cleared before any byte is written
            return work
        work.recorded = True
        if isinstance(data, dict) and data.get("url") == url:
            # Checked again: a record written before validators were checked may hold
            # one the client refuses to send; without it the bytes are fetched anew.
            work.validator = checked_validator(data.get("validator"))
        if work.validator is not None:
            work.make_durable()
        return work

    def make_durable(self) -> None:
        """Before a resume builds on them: the partial bytes and their record on disk.

        A run killed outright leaves them in the page cache only; the bytes the
        resume appends are fsynced at the end, but a power cut before that could
        take the older ones, or the record, back.
        """
        with contextlib.suppress(FileNotFoundError):
            fsync_file(self.path)
        fsync_file(self.meta)
        fsync_dir(self.path.parent)

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size  # noqa: PTH116 (a hot path; Path.stat costs more)
        except FileNotFoundError:
            return 0

    def begin(self, validator: str | None, start: int, have: int) -> None:
        """A response is about to be written from ``start``: forget any other one.

        Bytes of an older response go first, and a record naming another response
        goes before any new byte: no later resume can splice two versions. The new
        record is written by :meth:`record`, just before the first partial bytes
        reach the disk.
        """
        if start == 0 and have:
            self.path.unlink(missing_ok=True)
        if self.recorded and validator != self.validator:
            self.meta.unlink(missing_ok=True)
            self.recorded = False
        self.validator = validator

    def record(self) -> None:
        """Name the response the work file's bytes come from (runs on the sink's thread)."""
        if self.validator is not None and not self.recorded:
            # Durable before the partial bytes it names: a resume may rely on it.
            write_text_durably(
                self.meta, json.dumps({"url": self.url, "validator": self.validator})
            )
            self.recorded = True

    def finish(self) -> None:
        if self.recorded:
            self.meta.unlink(missing_ok=True)
            self.recorded = False

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        self.recorded = False
        self.validator = None


class Downloader:
    """Downloads files; use as ``async with Downloader(...) as d: await d.download(...)``."""

    def __init__(
        self,
        *,
        timeout: float,
        policy: RetryPolicy,
        max_file_size: int,
        api_origin: tuple[str, str, int] | None,
        connections: int,
        on_bytes: BytesCallback | None = None,
        proxies: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._timeout = timeout
        self._policy = policy
        self._max_size = max_file_size
        self._api_origin = api_origin
        self._connections = connections
        self._on_bytes = on_bytes
        self._proxies = dict(proxies)
        self._client: Session | None = None

    async def __aenter__(self) -> Self:
        self._client = Session(
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            timeout=self._timeout,
            connections=self._connections,
            proxies=self._proxies,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def download(self, task_id: str, remote: RemoteFile, work_path: Path) -> Downloaded:
        """Fetch ``remote`` into ``work_path``; raises a :class:`DownloadError` subclass."""
        url = self._check_url(task_id, remote.url)
        work = _WorkFile.resume(work_path, remote.url)
        attempt = 0
        while True:
            attempt += 1
            try:
                done = await self._attempt(task_id, remote, url, work)
            except DownloadError:
                # Refused outright (gone, too large, bad redirect): the bytes so far
                # serve no later attempt. Only a transient failure keeps them.
                work.discard()
                raise
            except _Retry as exc:
                if exc.restart:
                    work.discard()
                if attempt > self._policy.retries:
                    if exc.restart:
                        raise IntegrityError(
                            f"file {remote.index}: {exc.reason} (after {attempts(attempt)})",
                            task_id=task_id,
                            url=remote.url,
                        ) from None
                    raise DownloadError(
                        f"file {remote.index}: {exc.reason} (after {attempts(attempt)})",
                        task_id=task_id,
                        url=remote.url,
                    ) from None
                await asyncio.sleep(self._policy.delay(attempt, exc.retry_after))
            except Exception:
                # Not one of ours (a bug, a library's surprise, an OS error): the bytes
                # and their record cannot be trusted, so no later run resumes from them.
                work.discard()
                raise
            else:
                work.finish()
                return done

    def _check_url(self, task_id: str, url: str) -> Url:
        """Refuse what must never be fetched, whether it came from the API or the database."""
        try:
            parsed = Url.parse(url)
        except InvalidUrl as exc:
            problem = one_line(str(exc)) or type(exc).__name__
            raise DownloadError(f"unusable FileUrl: {problem}", task_id=task_id, url=url) from exc
        # Compared as parsed: an IDNA host and its punycode form are one origin.
        if self._api_origin is not None and parsed.origin == self._api_origin:
            raise DownloadError("refusing FileUrl that points at the API's origin", task_id=task_id)
        return parsed

    async def _attempt(
        self, task_id: str, remote: RemoteFile, url: Url, work: _WorkFile
    ) -> Downloaded:
        assert self._client is not None, "Downloader used outside 'async with'"
        have = work.size()
        headers: dict[str, str] = {}
        if have and work.validator:
            headers = {"Range": f"bytes={have}-", "If-Range": work.validator}
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with self._client.get(url, headers) as response:
                    location = (
                        response.headers.get("Location")
                        if response.status in REDIRECT_STATUSES
                        else None
                    )
                    if location is None:
                        return await self._receive(task_id, remote, work, response, have)
                url = self._redirected(task_id, remote, url, location)
        except HttpError as exc:
            if exc.retryable:
                raise _Retry(str(exc)) from exc
            raise DownloadError(
                f"file {remote.index}: {exc}", task_id=task_id, url=remote.url
            ) from exc
        raise DownloadError(
            f"file {remote.index}: too many redirects (more than {MAX_REDIRECTS})",
            task_id=task_id,
            url=remote.url,
        )

    def _redirected(self, task_id: str, remote: RemoteFile, url: Url, location: str) -> Url:
        """The next hop, checked as the first was: http(s) only, never the API's origin."""
        try:
            following = Url.parse(urljoin(url.text, location))
        except InvalidUrl:
            following = None
        if following is None or following.origin == self._api_origin:
            where = "an unsupported URL" if following is None else "the API's origin"
            raise DownloadError(
                f"file {remote.index}: redirected to {where}", task_id=task_id, url=remote.url
            )
        return following

    async def _receive(
        self,
        task_id: str,
        remote: RemoteFile,
        work: _WorkFile,
        response: ClientResponse,
        have: int,
    ) -> Downloaded:
        status = response.status
        if status in GONE_STATUSES:
            # The host's word, read against ExpireTime: refused after it, the file has
            # expired; refused before it, the task may have a fresh URL.
            now = datetime.now(UTC)
            if remote.expire_time is not None and remote.expire_time <= now:
                raise FileExpired(
                    f"file {remote.index}: expired at {format_time(remote.expire_time)}: "
                    f"file host answered HTTP {status} (seen {format_time(now)})",
                    task_id=task_id,
                    url=remote.url,
                )
            raise FileGone(
                f"file {remote.index}: file host answered HTTP {status}",
                task_id=task_id,
                url=remote.url,
            )
        if status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
        if status == 416:
            raise _Retry("HTTP 416 for a resumed range", restart=True)
        if status not in (200, 206):
            raise DownloadError(
                f"file {remote.index}: file host answered HTTP {status}",
                task_id=task_id,
                url=remote.url,
            )
        start = _resume_offset(response, have) if status == 206 else 0
        total = _expected_total(response, start)
        self._check_promised(task_id, remote, total)
        content_type = _content_type(response)
        if content_type == "text/html" and remote.file_type not in ("text", "html"):
            raise _Retry("file host sent an HTML page instead of the file", restart=True)
        # A range of an encoded body is no range of the file: such a body is not resumed.
        work.begin(_validator(response) if _identity(response) else None, start, have)
        sink = await self._stream_to(work, response, start, remote)
        size = sink.size
        if total is not None and size != total:
            raise _Retry(f"body ended after {size} of {total} bytes")
        if size == 0:
            raise _Retry("file host sent an empty body", restart=True)
        if remote.size is not None and size != remote.size:
            # The host called a shorter body whole: asking for the rest gets nothing.
            raise _Retry(
                f"body ended after {size} of the {remote.size} bytes of its MetaData.Size",
                restart=total is not None,
            )
        if remote.md5 is not None and sink.md5 != remote.md5:
            raise _Retry("MD5 does not match the API's MetaData.Md5", restart=True)
        return Downloaded(
            path=work.path,
            size=size,
            sha256=sink.sha256,
            content_type=content_type,
            extension=extension_for(remote.url, content_type),
        )

    def _check_promised(self, task_id: str, remote: RemoteFile, total: int | None) -> None:
        """Refuse, before any byte, a file that could only end over its size or the cap."""
        if total is not None and total > self._max_size:
            raise DownloadError(
                f"file {remote.index}: {total} bytes is over the {self._max_size}-byte limit",
                task_id=task_id,
            )
        if remote.size is not None and remote.size > self._max_size:
            raise DownloadError(
                f"file {remote.index}: its MetaData.Size of {remote.size} bytes is over "
                f"the {self._max_size}-byte limit",
                task_id=task_id,
            )
        if total is not None and remote.size is not None and total > remote.size:
            # Not the file the API describes, perhaps not yet: retried from scratch.
            raise _Retry(
                f"the host announces {total} bytes, past its MetaData.Size of {remote.size}",
                restart=True,
            )

    async def _stream_to(
        self, work: _WorkFile, response: ClientResponse, start: int, remote: RemoteFile
    ) -> WorkSink:
        # MetaData.Size is the file's size: a body running past it is cut off at once,
        # not read on to the general cap (16 GiB by default), and fetched again from
        # scratch: an integrity failure, like a body that ends short of it.
        limit = remote.size if remote.size is not None else self._max_size
        try:
            async with WorkSink(
                work.path, start, md5=remote.md5 is not None, before_partial=work.record
            ) as sink:
                # Chunks as received, not re-joined to a size: the sink joins them into
                # its blocks, and one copy of each byte on the loop is enough.
                async for chunk, _ in response.content.iter_chunks():
                    if sink.size + len(chunk) > limit:
                        raise self._overrun(remote)
                    await sink.write(chunk)
                    if self._on_bytes is not None:
                        self._on_bytes(len(chunk))
                await sink.sync()
        except ShortWorkFile:
            raise _Retry("work file shorter than its record says", restart=True) from None
        return sink

    def _overrun(self, remote: RemoteFile) -> Exception:
        if remote.size is not None:
            return _Retry(f"body runs past its MetaData.Size of {remote.size} bytes", restart=True)
        return DownloadError(
            f"file {remote.index}: body passes the {self._max_size}-byte limit", url=remote.url
        )


def _validator(response: ClientResponse) -> str | None:
    """What ``If-Range`` may carry: a strong ETag, else Last-Modified (weak ETags may not).

    Either is checked as it arrives and dropped when malformed: a file with neither
    is still downloaded, only not resumed after a drop.
    """
    return checked_validator(response.headers.get("ETag"), date=False) or checked_validator(
        response.headers.get("Last-Modified"), date=True
    )


def checked_validator(value: object, *, date: bool | None = None) -> str | None:
    """``value`` if it is a well-formed strong ETag or HTTP date, else None.

    ``date`` None accepts either (a stored record does not say which it holds).
    """
    if not isinstance(value, str):
        return None
    if date is not True and _STRONG_ETAG.fullmatch(value):
        return value
    if date is not False and _PRINTABLE.fullmatch(value):
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return value
    return None


def _identity(response: ClientResponse) -> bool:
    return response.headers.get("Content-Encoding", "identity").strip().lower() == "identity"


def _resume_offset(response: ClientResponse, have: int) -> int:
    """Where a 206 body starts; anything but the bytes we have means start over."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != have or not _identity(response):
        raise _Retry("file host sent an unexpected range", restart=True)
    return have


def _expected_total(response: ClientResponse, start: int) -> int | None:
    """The file's size by the Content-Length, when the body is the file's own bytes."""
    if not _identity(response) or response.content_length is None:
        return None
    return start + response.content_length


def _content_type(response: ClientResponse) -> str | None:
    value = response.headers.get("Content-Type")
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def extension_for(url: str, content_type: str | None) -> str:
    """A file extension from the URL's path, else from the Content-Type, else ``.bin``."""
    match = _URL_EXTENSION.search(urlsplit(url).path)
    if match:
        ext = "." + match.group(1).lower()
    elif content_type and (guessed := mimetypes.guess_extension(content_type)):
        ext = guessed
    else:
        ext = ".bin"
    return _PREFERRED_EXTENSIONS.get(ext, ext)
