"""HTTP through aiohttp: a session per kind of peer, and aiohttp's errors made fetcher's.

A run opens two sessions (STYLE 5): the API's, which carries the key and follows
no redirect, and the file hosts', which never holds the key. Both are made here,
the same way: TLS from the system's trust store (``ssl.create_default_context``,
which honours ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), made when a session first
needs it, so a variable set before the run counts; the proxy the settings name
for each origin, with ``no_proxy`` read as curl reads it; per-phase timeouts; no
cookies; aiohttp's limits on a response head.

Redirects are never followed here: the downloader follows them itself, so that
each hop is checked (no hop to the API's origin, none to a non-http(s) URL).

What a failure means for a retry is decided once, in :func:`translate`: a drop,
a timeout or a refused connection may pass; a certificate that does not verify,
or an answer that is not valid HTTP, will be the same next time.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .errors import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    HttpError,
    TimedOut,
    UntrustedCertificate,
)
from .models import one_line
from .url import Url

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

# aiohttp (about 0.15 s to import) is imported when a session first sends a
# request, not with this module: a cron re-run over a settled list sends none.

#: Where aiohttp's parse errors start quoting the server's bytes.
_QUOTED_BYTES = re.compile(r"\n|:?\s+b['\"]")
#: How much aiohttp buffers from the socket before it pauses reading (its default is
#: 256 KiB): a download's blocks are 1 MiB, so fewer, larger reads per file.
READ_BUFFER = 1024 * 1024


class Session:
    """GETs to one kind of peer: ``async with Session(...) as s: async with s.get(url) as r``.

    ``headers`` go with every request to its origin, and to nothing else: not to a
    proxy, not to a CONNECT. ``connections`` bounds the connections to
    each origin. ``proxies`` maps ``http``/``https``/``all`` to an ``http://`` proxy
    URL and ``no`` to the hosts that bypass it (:func:`fetcher.config.load_settings`
    reads them from the environment). ``decompress`` undoes a gzip or deflate
    Content-Encoding, as a query answer may carry; aiohttp checks Content-Length
    against the bytes as sent either way.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        connections: int,
        timeout: float,
        proxies: Mapping[str, str] | None = None,
        decompress: bool = True,
    ) -> None:
        self._headers = dict(headers)
        self._connections = connections
        self._timeout = timeout
        self._proxies = dict(proxies or {})
        self._decompress = decompress
        self._routes: dict[tuple[str, str, int], URL | None] = {}
        self._tls: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @asynccontextmanager
    async def get(
        self, url: Url, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``url``; the response is valid inside the block, its body read by the caller.

        aiohttp's failures, while the request is sent and while the caller reads the
        body inside the block, come out as :class:`~fetcher.errors.HttpError`.
        """
        import aiohttp
        from yarl import URL

        session = self._session or self._open()
        proxy = self._route(url)
        try:
            async with session.get(
                URL(f"{url.scheme}://{url.authority}{url.target}", encoded=True),
                headers={**self._headers, **headers} if headers else self._headers,
                allow_redirects=False,
                proxy=proxy,
                ssl=self._tls_context() if url.scheme == "https" else True,
            ) as response:
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, url, proxy) from exc

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._connections)
        # The headers go with each request, never as the session's defaults: aiohttp
        # sends those to a proxy too, and turns an Authorization among them into the
        # proxy's, so the API key would reach the proxy (in clear, in a CONNECT).
        self._session = aiohttp.ClientSession(
            connector=connector,
            # No total: a large file may take hours. Each phase must make progress.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=self._timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=self._decompress,
            read_bufsize=READ_BUFFER,
            trust_env=False,  # the proxies come from the settings, read once at start-up
        )
        return self._session

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _route(self, url: Url) -> URL | None:
        """The proxy for ``url``'s origin, if the settings name one and do not bypass it."""
        if not self._proxies:
            return None
        origin = url.origin
        if origin not in self._routes:
            chosen = self._proxies.get(url.scheme) or self._proxies.get("all")
            if chosen is None or _bypassed(self._proxies.get("no", ""), url):
                self._routes[origin] = None
            else:
                from yarl import URL

                self._routes[origin] = URL(chosen)
        return self._routes[origin]


def translate(exc: BaseException, url: Url, proxy: URL | None = None) -> HttpError:
    """aiohttp's (or asyncio's) failure as fetcher's, in words that hold no secret.

    The texts are fetcher's own: aiohttp's may quote a proxy URL, password included.
    """
    import aiohttp

    host = url.host
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None) or "verification failed"
        return UntrustedCertificate(f"the TLS certificate of {host} is not trusted ({reason})")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ConnectFailed(f"the proxy answered HTTP {exc.status} to CONNECT {url.authority}")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        where = f"{proxy.host}:{proxy.port}" if proxy is not None else "the proxy"
        return ConnectFailed(f"cannot connect to the proxy {where} ({_os_reason(exc)})")
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return ConnectFailed(f"TLS with {host} failed ({_os_reason(exc)})")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TimedOut("connect")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return TimedOut("read")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(f"cannot connect to {url.authority} ({_os_reason(exc)})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ConnectionLost("connection closed before a response")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ConnectionLost(f"body cut short ({_payload_reason(exc)})")
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised while the head is parsed: two Content-Lengths, a line or a header
        # count over the limits, a status line that is not HTTP.
        # aiohttp's words name the fault, then quote the server's bytes (b'...', and
        # a caret under them): the reason keeps the words only.
        words = _QUOTED_BYTES.split(str(exc.message), maxsplit=1)[0]
        detail = one_line(words).rstrip(": ")[:120] or "unparseable head"
        return BadResponse(f"malformed response ({detail})")
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return ConnectionLost(f"connection lost ({_os_reason(exc)})")
    return ConnectionLost(one_line(f"{type(exc).__name__}: {exc}")[:200])


def _os_reason(exc: BaseException) -> str:
    error = getattr(exc, "os_error", exc)
    strerror = getattr(error, "strerror", None)
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    return strerror or type(error).__name__


def _payload_reason(exc: BaseException) -> str:
    """aiohttp's own words for a cut body (``received 10 of 1000 bytes``), without its code."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    text = getattr(cause, "message", None) or str(cause)
    return one_line(str(text)).rstrip(".")[:160] or "the connection closed"


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
