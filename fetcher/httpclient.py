"""HTTP/1.1 GETs over asyncio streams: the only HTTP this tool speaks.

Why by hand: a run is thousands of small GETs to two origins, and the client's
own cost per request is most of what a run costs. On the benchmark's nginx
(``bench/``), httpx 0.28 with httpcore 1.0 spent about 1.7 ms of CPU per request:
2,000 queries took 3.4 s, where the same GETs over asyncio streams took 0.09 s,
and httpx's client layer alone over a minimal transport still took 0.6 s. A GET
with keep-alive, Content-Length, chunked and close-delimited bodies, redirects,
TLS and a proxy from the environment is all fetcher needs, and is small enough
to own.

It is strict where a guess could make a short file look whole: two
Content-Lengths that differ, an unknown Transfer-Encoding, a malformed status
line, header or chunk are errors, never guesses. Errors form one small tree::

    HttpError                 the request failed on the way: worth another attempt
    ├── ConnectFailed         no connection (refused, DNS, TLS, proxy)
    ├── TimedOut              no progress within the timeout (connect/read/write)
    ├── ProtocolError         closed early, or not a valid HTTP/1.1 answer
    └── RedirectError         too many redirects, or to a URL that is not http(s)

and :class:`~fetcher.url.InvalidUrl` (a ``ValueError``) for a URL that cannot be
requested.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

from .url import InvalidUrl, Url

#: A response head (status line and headers) larger than this is refused.
MAX_HEAD_BYTES = 64 * 1024
#: StreamReader's buffer limit: reads up to this much before pausing the socket.
_READ_LIMIT = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_T = TypeVar("_T")


class HttpError(Exception):
    """The request failed on the way; its text is one line saying how."""


class ConnectFailed(HttpError):
    """No connection: refused, unknown host, TLS failure, or the proxy said no."""


class TimedOut(HttpError):
    """Nothing moved for ``timeout`` seconds; ``phase`` is connect, read or write."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"timed out ({phase})")
        self.phase = phase


class ProtocolError(HttpError):
    """The connection closed early, or the answer was not valid HTTP/1.1."""


class RedirectError(HttpError):
    """Too many redirects, or a redirect to something that is not an http(s) URL."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The request line names the whole URL: a plain-HTTP proxy sits in between.
    absolute_form: bool = False
    proxy_auth: str | None = None

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class _Pool:
    """Connections to one origin (through one proxy, if any)."""

    limit: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)


class Response:
    """A response whose body has not been read yet; iterate :meth:`iter_raw` for it."""

    def __init__(
        self,
        conn: _Connection,
        url: Url,
        status: int,
        headers: dict[str, str],
        *,
        timeout: float,
        keep_alive: bool,
        no_body: bool,
    ) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self._conn = conn
        self._timeout = timeout
        self._done = no_body
        self.reusable = keep_alive
        self._chunked = False
        self._left: int | None = None
        if no_body:
            return
        coding = headers.get("transfer-encoding")
        if coding is not None:
            codings = [c.strip().lower() for c in coding.split(",")]
            if codings[-1] != "chunked" or any(c not in ("chunked", "identity") for c in codings):
                raise ProtocolError(f"unsupported Transfer-Encoding {coding!r}")
            self._chunked = True
            # Both framings at once is how responses get smuggled (RFC 9112 6.3): read
            # this one as chunked, and trust nothing after it on this connection.
            if "content-length" in headers:
                self.reusable = False
        elif (length := headers.get("content-length")) is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not (value := values.pop()).isdigit() or not value.isascii():
                raise ProtocolError(f"invalid Content-Length {length!r}")
            self._left = int(value)
            self._done = self._left == 0
        else:
            self.reusable = False  # the body runs until the server closes

    @property
    def complete(self) -> bool:
        """The whole body has been read."""
        return self._done

    async def iter_raw(self, size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The body as sent (not decoded), in pieces of at most ``size`` bytes."""
        if self._chunked:
            async for piece in self._iter_chunked(size):
                yield piece
            return
        while not self._done:
            want = size if self._left is None else min(size, self._left)
            data = await self._io(self._conn.reader.read(want), "read")
            if not data:
                if self._left is None:
                    self._done = True
                    return
                raise ProtocolError(f"connection closed with {self._left} body bytes unsent")
            if self._left is not None:
                self._left -= len(data)
                self._done = self._left == 0
            yield data

    async def iter_decoded(self, size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The body with any gzip or deflate Content-Encoding undone."""
        coding = self.headers.get("content-encoding", "identity").strip().lower()
        if coding == "identity":
            async for piece in self.iter_raw(size):
                yield piece
            return
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise ProtocolError(f"unsupported Content-Encoding {coding!r}")
        # 47 reads a gzip or zlib header, whichever comes; raw deflate is retried as such.
        inflate = zlib.decompressobj(47)
        started = False
        try:
            async for piece in self.iter_raw(size):
                if not started and coding == "deflate" and piece[:1] != b"\x78":
                    inflate = zlib.decompressobj(-15)
                started = True
                if out := inflate.decompress(piece):
                    yield out
            if tail := inflate.flush():
                yield tail
            if started and not inflate.eof:
                raise ProtocolError(f"{coding} body ends before its compressed stream")
        except zlib.error as exc:
            raise ProtocolError(f"body does not decode as {coding}: {exc}") from exc

    async def read(self, limit: int) -> bytes:
        """The whole decoded body; :class:`ProtocolError` if it passes ``limit`` bytes."""
        body = bytearray()
        async for piece in self.iter_decoded():
            body += piece
            if len(body) > limit:
                raise ProtocolError(f"response larger than {limit} bytes")
        return bytes(body)

    async def _iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        while not self._done:
            line = await self._line()
            digits = line.split(b";", 1)[0].strip()
            if not digits or len(digits) > 16 or not set(digits) <= _HEX:
                raise ProtocolError("malformed chunk size")
            left = int(digits, 16)
            if left == 0:
                while await self._line():  # trailer fields: read and ignored
                    pass
                self._done = True
                return
            while left:
                data = await self._io(reader.read(min(size, left)), "read")
                if not data:
                    raise ProtocolError("connection closed inside a chunk")
                left -= len(data)
                yield data
            if await self._line():
                raise ProtocolError("chunk longer than its size")

    async def _line(self) -> bytes:
        try:
            line = await self._io(self._conn.reader.readuntil(b"\r\n"), "read")
        except asyncio.IncompleteReadError:
            raise ProtocolError("connection closed inside the chunked body") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError("chunk line too long") from None
        return line[:-2]

    async def _io(self, step: Awaitable[_T], phase: str) -> _T:
        return await _within(self._timeout, step, phase)


async def _within(seconds: float, step: Awaitable[_T], phase: str) -> _T:
    """Await one network step; no progress in ``seconds`` is :class:`TimedOut`."""
    try:
        async with asyncio.timeout(seconds):
            return await step
    except TimeoutError:
        raise TimedOut(phase) from None
    except ssl.SSLError as exc:
        raise ProtocolError(f"TLS error ({exc.reason or exc})") from exc
    except OSError as exc:
        raise ProtocolError(f"connection lost ({exc.strerror or type(exc).__name__})") from exc


class HttpClient:
    """Keep-alive connections, at most ``connections`` per origin; ``async with`` owns them.

    ``headers`` go with every request; on a redirect to another origin any
    ``Authorization`` is dropped. ``max_redirects`` of 0 hands redirects back to
    the caller as responses. ``proxies`` maps ``http``/``https``/``all`` to an
    ``http://`` proxy URL and ``no`` to the hosts that bypass it, as curl reads
    them from ``*_proxy`` variables; HTTPS goes through a proxy in a CONNECT tunnel.
    """

    def __init__(
        self,
        *,
        timeout: float,
        connections: int,
        headers: Mapping[str, str],
        max_redirects: int = 0,
        proxies: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = timeout
        self._connections = connections
        self._headers = {k.lower(): (k, v) for k, v in headers.items()}
        self._max_redirects = max_redirects
        self._proxies = dict(proxies or {})
        self._routes: dict[tuple[str, str, int], Url | None] = {}
        self._tls_context = tls
        self._pools: dict[tuple[str, str, int, str], _Pool] = {}

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        closing = [conn for pool in self._pools.values() for conn in pool.idle]
        self._pools.clear()
        for conn in closing:
            conn.close()
        for conn in closing:
            with suppress(OSError, TimeoutError):
                await asyncio.wait_for(conn.writer.wait_closed(), 1.0)

    @asynccontextmanager
    async def stream(
        self, url: str | Url, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Response]:
        """GET ``url``; the response is valid inside the block, its body read by the caller."""
        target = url if isinstance(url, Url) else Url.parse(url)
        sent = {**self._headers, **{k.lower(): (k, v) for k, v in (headers or {}).items()}}
        hops = 0
        while True:
            pool, conn, response = await self._send(target, sent)
            location = response.headers.get("location") if response.status in _REDIRECTS else None
            if location is None or not self._max_redirects:
                break
            self._release(pool, conn, response)
            if hops == self._max_redirects:
                raise RedirectError(f"too many redirects (more than {self._max_redirects})")
            hops += 1
            try:
                following = Url.parse(urljoin(target.text, location))
            except InvalidUrl:
                raise RedirectError("redirected to an unsupported URL") from None
            if following.origin != target.origin:
                sent.pop("authorization", None)
            target = following
        try:
            yield response
        finally:
            self._release(pool, conn, response)

    # -- one request on one connection -------------------------------------------------

    async def _send(
        self, url: Url, headers: Mapping[str, tuple[str, str]]
    ) -> tuple[_Pool, _Connection, Response]:
        proxy = self._route(url)
        key = (*url.origin, proxy.text if proxy is not None else "")
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(asyncio.Semaphore(self._connections))
        await pool.limit.acquire()
        try:
            # A connection the server closed while idle has seen EOF and is skipped; one
            # closed in the instant before reuse fails this attempt, and the caller's
            # retry policy takes it from there (a silent second try would hide a server
            # that hangs up on every request).
            conn = _take_idle(pool) or await self._connect(url, proxy)
            try:
                return pool, conn, await self._exchange(conn, url, headers)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            pool.limit.release()
            raise

    def _release(self, pool: _Pool, conn: _Connection, response: Response) -> None:
        if response.complete and response.reusable and not conn.writer.is_closing():
            pool.idle.append(conn)
        else:
            conn.close()
        pool.limit.release()

    async def _exchange(
        self, conn: _Connection, url: Url, headers: Mapping[str, tuple[str, str]]
    ) -> Response:
        target = f"{url.scheme}://{url.authority}{url.target}" if conn.absolute_form else url.target
        lines = [f"GET {target} HTTP/1.1", f"Host: {url.authority}"]
        if conn.proxy_auth is not None:
            lines.append(f"Proxy-Authorization: {conn.proxy_auth}")
        for name, value in headers.values():
            if not (name and name.isascii() and set(name.encode()) <= _TOKEN):
                raise InvalidUrl(f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\0"):
                raise InvalidUrl(f"header {name} holds a line break")
            lines.append(f"{name}: {value}")
        try:
            request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidUrl("a request header is not Latin-1 text") from None
        conn.writer.write(request)
        await _within(self._timeout, conn.writer.drain(), "write")
        head = await self._head(conn)
        status, keep_alive, fields = _parse_head(head)
        while 100 <= status < 200:  # interim answers (103 Early Hints and such)
            if status == 101:
                raise ProtocolError("server switched protocols")
            status, keep_alive, fields = _parse_head(await self._head(conn))
        return Response(
            conn,
            url,
            status,
            fields,
            timeout=self._timeout,
            keep_alive=keep_alive,
            no_body=status in (204, 304),
        )

    async def _head(self, conn: _Connection) -> bytes:
        try:
            return await _within(self._timeout, conn.reader.readuntil(b"\r\n\r\n"), "read")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ProtocolError("connection closed inside the response head") from None
            raise ProtocolError("connection closed before a response") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"response head larger than {_READ_LIMIT} bytes") from None

    # -- connections ------------------------------------------------------------------

    async def _connect(self, url: Url, proxy: Url | None) -> _Connection:
        tls = self._tls() if url.scheme == "https" else None
        via = proxy or url
        try:
            async with asyncio.timeout(self._timeout):
                if proxy is None:
                    reader, writer = await asyncio.open_connection(
                        url.host,
                        url.port,
                        ssl=tls,
                        server_hostname=url.host if tls else None,
                        limit=_READ_LIMIT,
                    )
                    return _Connection(reader, writer)
                reader, writer = await asyncio.open_connection(
                    proxy.host, proxy.port, limit=_READ_LIMIT
                )
                auth = _proxy_auth(proxy)
                if tls is None:
                    return _Connection(reader, writer, absolute_form=True, proxy_auth=auth)
                try:
                    await _tunnel(reader, writer, url, auth)
                    await writer.start_tls(tls, server_hostname=url.host)
                except BaseException:
                    writer.close()
                    raise
                return _Connection(reader, writer)
        except TimeoutError:
            raise TimedOut("connect") from None
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            raise ConnectFailed(f"TLS with {url.host} failed ({reason})") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {via.authority} ({reason})") from exc

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._tls_context = context
        return self._tls_context

    def _route(self, url: Url) -> Url | None:
        """The proxy for ``url``'s origin, if the environment named one and does not bypass it."""
        if not self._proxies:
            return None
        origin = url.origin
        if origin not in self._routes:
            self._routes[origin] = _pick_proxy(self._proxies, url)
        return self._routes[origin]


def _take_idle(pool: _Pool) -> _Connection | None:
    """A kept connection still fit for a request, or None."""
    while pool.idle:
        conn = pool.idle.pop()
        # Bytes that arrived while it sat idle answer no request of ours (a server that
        # sent more than its Content-Length): read as the next answer, they would lie.
        # StreamReader has no public way to ask, hence its private buffer.
        stray = getattr(conn.reader, "_buffer", b"")
        if conn.reader.at_eof() or conn.writer.is_closing() or stray:
            conn.close()
            continue
        return conn
    return None


def _parse_head(head: bytes) -> tuple[int, bool, dict[str, str]]:
    """Status, whether the connection may be kept, and the fields (lower-case names)."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if (
        len(parts) < 2
        or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:60]!r}")
    if len(lines) > 101 or len(head) > MAX_HEAD_BYTES:
        raise ProtocolError("response head too large")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN:
            raise ProtocolError(f"malformed header line: {line[:60]!r}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    connection = fields.get("connection", "").lower()
    keep_alive = parts[0] == b"HTTP/1.1" and "close" not in connection
    return int(parts[1]), keep_alive, fields


async def _tunnel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: Url, auth: str | None
) -> None:
    """Ask the proxy for a tunnel to ``url``'s origin (CONNECT)."""
    authority = f"{url.host}:{url.port}" if ":" not in url.host else f"[{url.host}]:{url.port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {auth}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ConnectFailed("the proxy closed the connection during CONNECT") from None
    status, _, _ = _parse_head(head)
    if not 200 <= status < 300:
        raise ConnectFailed(f"the proxy answered HTTP {status} to CONNECT {authority}")


def _proxy_auth(proxy: Url) -> str | None:
    import base64

    parts = urlsplit(proxy.text)
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _pick_proxy(proxies: Mapping[str, str], url: Url) -> Url | None:
    chosen = proxies.get(url.scheme) or proxies.get("all")
    if chosen is None or _bypassed(proxies.get("no", ""), url):
        return None
    return Url.parse(chosen)


def _bypassed(no_proxy: str, url: Url) -> bool:
    """Whether ``no_proxy`` (comma-separated hosts, domains, ``*``) covers ``url``'s host."""
    host = url.host.lower()
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, port = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
        if port and port != str(url.port):
            continue
        name = name.lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
    return False
