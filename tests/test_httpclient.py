"""The HTTP/1.1 client on its own: framing, keep-alive, redirects, URLs, proxies and TLS.

Every test talks to real servers on 127.0.0.1 started inside the test (ports picked by
the OS): :class:`Scripted` answers each request with exact bytes the test gives and
records the raw requests and connections; :class:`Proxy` is a tiny forwarding proxy.
The TLS certificates in ``tests/data`` are self-signed, valid for a hundred years and
committed (made with the openssl CLI once, never at test time).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import random
import socket
import ssl
import time
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pytest

from fetcher.config import load_settings
from fetcher.errors import ConfigError
from fetcher.httpclient import (
    ConnectFailed,
    HttpClient,
    InvalidUrl,
    ProtocolError,
    RedirectError,
    TimedOut,
    Url,
    _bypassed,
)

DATA = Path(__file__).resolve().parent / "data"
#: Self-signed for DNS:localhost, IP:127.0.0.1 and IP:::1.
CERT, KEY = DATA / "localhost.pem", DATA / "localhost-key.pem"
#: Self-signed for DNS:wrong.example only.
WRONG_CERT, WRONG_KEY = DATA / "wrong-host.pem", DATA / "wrong-host-key.pem"


def _half_noise(size: int) -> bytes:
    """``size`` bytes that compress to about half: several reads' worth either way."""
    noise = random.Random(7)
    return b"".join(noise.randbytes(64) + bytes(64) for _ in range(size // 128))


PAYLOAD = _half_noise(100 * 1024)


# -- servers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the scripted server does for one request."""

    data: bytes = b""
    #: Close the connection once ``data`` is sent.
    close: bool = False
    #: After ``data``, say nothing more until the client goes away.
    hang: bool = False
    #: Wait this long before sending.
    delay: float = 0.0


class _Server:
    """A loopback server whose connections and handlers all end with ``async with``."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self._tls = tls
        self._host = host
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        #: Connections accepted so far, and the most that were open at once.
        self.connections = 0
        self.most_open = 0
        self._open = 0
        #: Set each time a connection ends on the server's side.
        self.hung_up = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self._host, 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        number = self.connections
        self.connections += 1
        self._open += 1
        self.most_open = max(self.most_open, self._open)
        try:
            await self._handle(reader, writer, number)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
            self.hung_up.set()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        raise NotImplementedError


class Scripted(_Server):
    """Answers the n-th request with the n-th reply, byte for byte; no replies left: hangs up."""

    def __init__(
        self, *replies: bytes | Reply, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(tls, host)
        self._replies: deque[Reply] = deque()
        #: Each request's head as received, and the number of the connection it came on.
        self.requests: list[bytes] = []
        self.conn_of: list[int] = []
        self.add(*replies)

    def add(self, *replies: bytes | Reply) -> None:
        self._replies.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            self.requests.append(head)
            self.conn_of.append(number)
            if not self._replies:
                return
            reply = self._replies.popleft()
            if reply.delay:
                await asyncio.sleep(reply.delay)
            writer.write(reply.data)
            await writer.drain()
            if reply.hang:
                await reader.read()
                return
            if reply.close:
                return


class Proxy(_Server):
    """A forwarding HTTP proxy, or one that gives every request the same ``answer``.

    Forwarding, it rewrites the first absolute-form GET on a connection to origin form
    (or answers a CONNECT), then pipes bytes both ways as they come.
    """

    def __init__(self, answer: bytes | None = None) -> None:
        super().__init__()
        self._answer = answer
        #: Each request head the proxy received, as received.
        self.requests: list[bytes] = []
        #: Every byte the client sent inside CONNECT tunnels.
        self.tunneled = bytearray()

    def url(self, path: str = "", host: str = "127.0.0.1", userinfo: str = "") -> str:
        return f"http://{userinfo}{host}:{self.port}{path}"

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            self.requests.append(head)
            method, target, _ = head.split(b" ", 2)
            if self._answer is not None:
                writer.write(self._answer)
                await writer.drain()
                if method == b"CONNECT":
                    return
                continue
            if method == b"CONNECT":
                host, _, port = target.decode().rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await self._pipe(reader, writer, up_reader, up_writer, self.tunneled)
                return
            parts = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
            lines = head.split(b"\r\n")
            lines[0] = (
                b"GET %s HTTP/1.1" % (parts.path + "?" * bool(parts.query) + parts.query).encode()
            )
            up_writer.write(
                b"\r\n".join(x for x in lines if not x.lower().startswith(b"proxy-authorization:"))
            )
            await self._pipe(reader, writer, up_reader, up_writer, None)
            return

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        record: bytearray | None,
    ) -> None:
        async def copy(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, sink: bytearray | None
        ) -> None:
            with suppress(OSError):
                while data := await src.read(65536):
                    if sink is not None:
                        sink += data
                    dst.write(data)
                    await dst.drain()

        both = [
            asyncio.create_task(copy(reader, up_writer, record)),
            asyncio.create_task(copy(up_reader, writer, None)),
        ]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in both:
                task.cancel()
            await asyncio.gather(*both, return_exceptions=True)
            up_writer.close()
            with suppress(OSError):
                await up_writer.wait_closed()


# -- helpers --------------------------------------------------------------------------------


def ok(body: bytes, *fields: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    """A response with a Content-Length for ``body``."""
    extra = "".join(f"{f}\r\n" for f in fields)
    return f"{status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def client(
    *,
    timeout: float = 2.0,
    connections: int = 4,
    headers: Mapping[str, str] | None = None,
    max_redirects: int = 0,
    proxies: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> HttpClient:
    return HttpClient(
        timeout=timeout,
        connections=connections,
        headers=headers or {},
        max_redirects=max_redirects,
        proxies=proxies,
        tls=tls,
    )


async def get(
    http: HttpClient, url: str, headers: Mapping[str, str] | None = None, limit: int = 1 << 22
) -> tuple[int, bytes]:
    """Status and decoded body of one GET."""
    async with http.stream(url, headers) as response:
        return response.status, await response.read(limit)


def body_of(*replies: bytes | Reply, limit: int = 1 << 22) -> bytes:
    """The decoded body of one GET answered by ``replies``."""

    async def scenario() -> bytes:
        async with Scripted(*replies) as server, client() as http:
            return (await get(http, server.url(), limit=limit))[1]

    return asyncio.run(scenario())


def server_tls(cert: Path = CERT, key: Path = KEY) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def trusting(cert: Path = CERT) -> ssl.SSLContext:
    """A client context that trusts ``cert`` and nothing else."""
    return ssl.create_default_context(cafile=str(cert))


@contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so a connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- chunked bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        pytest.param(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", id="plain"),
        pytest.param(
            b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n",
            b"0123456789" + b"abcdefghij",
            id="hex-sizes",
        ),
        pytest.param(
            b'5;name=value\r\nhello\r\n3 ; x="y"\r\n!!!\r\n0;end\r\n\r\n',
            b"hello!!!",
            id="extensions",
        ),
        pytest.param(b"2\r\nhi\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n", b"hi", id="trailers"),
        pytest.param(b"0\r\n\r\n", b"", id="empty"),
    ],
)
def test_chunked_body_is_decoded_and_the_connection_kept(wire: bytes, body: bytes) -> None:
    """A chunked body comes out whole, and the next response on the connection parses after it."""

    async def scenario() -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        async with Scripted(head + wire, ok(b"next")) as server, client() as http:
            assert await get(http, server.url("/a")) == (200, body)
            assert await get(http, server.url("/b")) == (200, b"next")
            assert server.conn_of == [0, 0]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", "malformed chunk size", id="not-hex"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", "malformed chunk size", id="empty-size"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk size", id="0x-prefix"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", "malformed chunk size", id="negative"),
        pytest.param(b"1" * 17 + b"\r\nhello\r\n", "malformed chunk size", id="17-digits"),
        pytest.param(b"3\r\nabcdef\r\n0\r\n\r\n", "chunk longer than its size", id="long-chunk"),
        pytest.param(b"5\r\nab", "connection closed inside a chunk", id="closed-in-chunk"),
        pytest.param(
            b"5\r\nhello\r\n", "connection closed inside the chunked body", id="closed-before-last"
        ),
        pytest.param(
            b"0\r\nX-Trailer: 1\r\n",
            "connection closed inside the chunked body",
            id="closed-in-trailers",
        ),
    ],
)
def test_bad_chunked_body_is_a_protocol_error(wire: bytes, message: str) -> None:
    """Malformed chunk framing, or a close inside it, is a ProtocolError saying which."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(ProtocolError, match=f"^{message}$"):
        body_of(Reply(head + wire, close=True))


# -- Content-Length and Transfer-Encoding ---------------------------------------------------


def test_body_cut_short_of_content_length_is_a_protocol_error() -> None:
    """A close before Content-Length bytes arrived is a ProtocolError counting what is missing."""
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    with pytest.raises(ProtocolError, match=r"^connection closed with 7 body bytes unsent$"):
        body_of(Reply(cut, close=True))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param("Content-Length: 5\r\nContent-Length: 6", id="two-differing"),
        pytest.param("Content-Length: 5, 6", id="differing-list"),
        pytest.param("Content-Length: five", id="non-numeric"),
        pytest.param("Content-Length: -5", id="negative"),
        pytest.param("Content-Length: +5", id="plus-sign"),
        pytest.param("Content-Length: 0x5", id="hex"),
        pytest.param("Content-Length: \xb2", id="latin1-superscript-digit"),
        pytest.param("Content-Length:", id="empty"),
    ],
)
def test_invalid_content_length_is_a_protocol_error(fields: str) -> None:
    """Differing or non-decimal Content-Length values are refused, never guessed at."""
    raw = f"HTTP/1.1 200 OK\r\n{fields}\r\n\r\nhello".encode("latin-1")
    with pytest.raises(ProtocolError, match=r"^invalid Content-Length "):
        body_of(raw)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param("Content-Length: 5\r\nContent-Length: 5", id="two-fields"),
        pytest.param("Content-Length: 5,5", id="list"),
        pytest.param("content-length:   5  ", id="padded-lower-case"),
    ],
)
def test_identical_content_lengths_are_accepted(fields: str) -> None:
    """Repeated identical Content-Length values frame the body; the connection is reused."""

    async def scenario() -> None:
        raw = f"HTTP/1.1 200 OK\r\n{fields}\r\n\r\nhello".encode()
        async with Scripted(raw, ok(b"next")) as server, client() as http:
            assert await get(http, server.url()) == (200, b"hello")
            assert await get(http, server.url()) == (200, b"next")
            assert server.conn_of == [0, 0]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "coding",
    [
        pytest.param("gzip", id="gzip-alone"),
        pytest.param("identity", id="identity-alone"),
        pytest.param("chunked, gzip", id="chunked-not-last"),
        pytest.param("gzip, chunked", id="gzip-then-chunked"),
        pytest.param("x-custom", id="unknown"),
    ],
)
def test_transfer_encoding_other_than_chunked_is_a_protocol_error(coding: str) -> None:
    """A Transfer-Encoding that does not end in plain chunked is refused, naming the value."""
    raw = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n".encode()
    with pytest.raises(ProtocolError, match=f"^unsupported Transfer-Encoding '{coding}'$"):
        body_of(Reply(raw, close=True))


@pytest.mark.parametrize(
    ("first", "body"),
    [
        pytest.param(
            Reply(b"HTTP/1.1 200 OK\r\n\r\nuntil the very end", close=True),
            b"until the very end",
            id="close-delimited",
        ),
        pytest.param(
            Reply(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            ),
            b"hello",
            id="chunked-and-content-length",
        ),
    ],
)
def test_body_read_whole_but_connection_not_reused(first: Reply, body: bytes) -> None:
    """No length (the body runs to the close), or both framings at once (read as chunked):
    the body is read whole and the next GET opens a new connection."""

    async def scenario() -> None:
        async with Scripted(first, ok(b"second")) as server, client() as http:
            async with http.stream(server.url()) as response:
                assert await response.read(1000) == body
                assert response.complete
                assert not response.reusable
            assert await get(http, server.url()) == (200, b"second")
            assert server.conn_of == [0, 1]

    asyncio.run(scenario())


def test_bytes_past_the_body_keep_the_connection_out_of_the_pool() -> None:
    """A server that sends more than its Content-Length: those bytes never become an answer."""

    async def scenario() -> None:
        spill = Reply(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
            b"Content-Length: 4\r\n\r\nLIES"
        )
        async with Scripted(spill, ok(b"truth")) as server, client() as http:
            assert await get(http, server.url()) == (200, b"ok")
            await asyncio.sleep(0.05)  # let the stray bytes arrive while the connection idles
            assert await get(http, server.url()) == (200, b"truth")
            assert server.conn_of == [0, 1]

    asyncio.run(scenario())


# -- Content-Encoding and read limits -------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


def _chunked(data: bytes, size: int = 7000) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        pytest.param("gzip", gzip.compress(PAYLOAD), id="gzip"),
        pytest.param("x-gzip", gzip.compress(PAYLOAD), id="x-gzip"),
        pytest.param("GZip", gzip.compress(PAYLOAD), id="gzip-mixed-case"),
        pytest.param("deflate", zlib.compress(PAYLOAD), id="deflate-zlib"),
        pytest.param("deflate", _raw_deflate(PAYLOAD), id="deflate-raw"),
        pytest.param("identity", PAYLOAD, id="identity"),
    ],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_content_encoding_is_decoded(coding: str, encoded: bytes, framing: str) -> None:
    """gzip and deflate (zlib or raw) bodies come out decoded, whatever the framing."""
    if framing == "chunked":
        raw = f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\nTransfer-Encoding: chunked\r\n\r\n"
        reply = raw.encode() + _chunked(encoded)
    else:
        reply = ok(encoded, f"Content-Encoding: {coding}")
    assert body_of(reply) == PAYLOAD


def test_iter_decoded_yields_the_decoded_pieces() -> None:
    """iter_decoded yields the decoded body in several pieces as the raw pieces arrive."""

    async def scenario() -> None:
        async with (
            Scripted(ok(gzip.compress(PAYLOAD), "Content-Encoding: gzip")) as server,
            client() as http,
            http.stream(server.url()) as response,
        ):
            pieces = [piece async for piece in response.iter_decoded(1000)]
            assert b"".join(pieces) == PAYLOAD
            assert len(pieces) > 1
            assert response.complete

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("coding", "message"),
    [
        pytest.param("br", "unsupported Content-Encoding 'br'", id="br"),
        pytest.param("compress", "unsupported Content-Encoding 'compress'", id="compress"),
        pytest.param("gzip, br", "unsupported Content-Encoding 'gzip, br'", id="stacked"),
    ],
)
def test_unknown_content_encoding_is_a_protocol_error(coding: str, message: str) -> None:
    """A Content-Encoding the client cannot undo is refused, not passed on encoded."""
    with pytest.raises(ProtocolError, match=f"^{message}$"):
        body_of(ok(b"\x0b\x02\x80hello\x03", f"Content-Encoding: {coding}"))


def test_corrupt_gzip_body_is_a_protocol_error() -> None:
    """Bytes that do not inflate are a ProtocolError naming the coding."""
    with pytest.raises(ProtocolError, match=r"^body does not decode as gzip: "):
        body_of(ok(b"\x1f\x8b\x08\x00garbage-garbage-garbage", "Content-Encoding: gzip"))


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        pytest.param("gzip", gzip.compress(PAYLOAD), id="gzip"),
        pytest.param("deflate", zlib.compress(PAYLOAD), id="deflate-zlib"),
        pytest.param("deflate", _raw_deflate(PAYLOAD), id="deflate-raw"),
    ],
)
@pytest.mark.parametrize("framing", ["close-delimited", "content-length"])
def test_compressed_stream_cut_short_is_a_protocol_error(
    coding: str, encoded: bytes, framing: str
) -> None:
    """A compressed stream that stops before its end is an error, never a short body."""
    half = encoded[: len(encoded) // 2]
    if framing == "close-delimited":
        raw = f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n\r\n".encode() + half
    else:
        raw = ok(half, f"Content-Encoding: {coding}")
    with pytest.raises(ProtocolError, match=f"^{coding} body ends before its compressed stream$"):
        body_of(Reply(raw, close=True))


@pytest.mark.parametrize(
    ("reply", "limit", "expected"),
    [
        pytest.param(ok(b"0123456789"), 10, b"0123456789", id="at-limit"),
        pytest.param(
            ok(gzip.compress(bytes(1000)), "Content-Encoding: gzip"),
            1000,
            bytes(1000),
            id="gzip-at-limit",
        ),
    ],
)
def test_read_takes_a_body_up_to_its_limit(reply: bytes, limit: int, expected: bytes) -> None:
    """read(limit) returns a body of exactly ``limit`` bytes."""
    assert body_of(reply, limit=limit) == expected


@pytest.mark.parametrize(
    ("reply", "limit"),
    [
        pytest.param(ok(b"0123456789"), 9, id="identity"),
        pytest.param(
            ok(gzip.compress(bytes(1000)), "Content-Encoding: gzip"), 999, id="gzip-decoded-size"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(PAYLOAD),
            50_000,
            id="chunked",
        ),
    ],
)
def test_read_over_its_limit_is_a_protocol_error(reply: bytes, limit: int) -> None:
    """read(limit) refuses a (decoded) body larger than ``limit``."""
    with pytest.raises(ProtocolError, match=f"^response larger than {limit} bytes$"):
        body_of(reply, limit=limit)


# -- status line and head -------------------------------------------------------------------


def test_interim_responses_are_skipped() -> None:
    """103 and 100 answers before the real one are read past; their fields are not kept."""

    async def scenario() -> None:
        interim = (
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        async with Scripted(interim + ok(b"final"), ok(b"next")) as server, client() as http:
            async with http.stream(server.url()) as response:
                assert response.status == 200
                assert "link" not in response.headers
                assert await response.read(100) == b"final"
            assert await get(http, server.url()) == (200, b"next")
            assert server.conn_of == [0, 0]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            "^server switched protocols$",
            id="101",
        ),
        pytest.param(
            b"HTTP/2 200 OK\r\n\r\n", "^not an HTTP/1.1 status line: b'HTTP/2 200 OK'$", id="http2"
        ),
        pytest.param(b"ICY 200 OK\r\n\r\n", "^not an HTTP/1.1 status line", id="icy"),
        pytest.param(
            b"HTTP/1.1 20 OK\r\n\r\n", "^not an HTTP/1.1 status line", id="two-digit-status"
        ),
        pytest.param(
            b"HTTP/1.1 2000 OK\r\n\r\n", "^not an HTTP/1.1 status line", id="four-digit-status"
        ),
        pytest.param(b"HTTP/1.1 abc OK\r\n\r\n", "^not an HTTP/1.1 status line", id="word-status"),
        pytest.param(b"HTTP/1.1\r\n\r\n", "^not an HTTP/1.1 status line", id="no-status"),
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 20x OK\r\n\r\n",
            "^not an HTTP/1.1 status line",
            id="bad-after-103",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Broken\r\n\r\n",
            "^malformed header line: b'X-Broken'$",
            id="no-colon",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\n\r\n",
            "^malformed header line: b' two'$",
            id="obs-fold",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: one\r\n\tX-B: two\r\n\r\n",
            "^malformed header line",
            id="obs-fold-with-colon",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A : one\r\n\r\n",
            "^malformed header line: b'X-A : one'$",
            id="space-before-colon",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n", "^malformed header line", id="empty-name"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX(A): 1\r\n\r\n", "^malformed header line", id="non-token-name"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            "^response head too large$",
            id="70k-head",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"X-N: 1\r\n" * 150 + b"\r\n",
            "^response head too large$",
            id="150-fields",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1_200_000,
            "^response head larger than 1048576 bytes$",
            id="unending-head",
        ),
        pytest.param(b"", "^connection closed before a response$", id="closed-at-once"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-",
            "^connection closed inside the response head$",
            id="closed-in-head",
        ),
    ],
)
def test_malformed_head_is_a_protocol_error(raw: bytes, message: str) -> None:
    """A status line or header the client cannot trust is a ProtocolError saying what it saw."""
    with pytest.raises(ProtocolError, match=message):
        body_of(Reply(raw, close=True))


# -- keep-alive -----------------------------------------------------------------------------


def test_sequential_requests_share_one_connection() -> None:
    """Two GETs one after the other go over one connection, both heads as expected."""

    async def scenario() -> None:
        async with Scripted(ok(b"one"), ok(b"two")) as server, client() as http:
            assert await get(http, server.url("/1")) == (200, b"one")
            assert await get(http, server.url("/2")) == (200, b"two")
        assert server.connections == 1
        assert server.requests == [
            f"GET /{n} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode() for n in (1, 2)
        ]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(ok(b"one", "Connection: close"), id="connection-close"),
        pytest.param(ok(b"one", "Connection: Keep-Alive, Close"), id="connection-list-close"),
        pytest.param(ok(b"one", status="HTTP/1.0 200 OK"), id="http-1.0"),
        pytest.param(
            ok(b"one", "Connection: keep-alive", status="HTTP/1.0 200 OK"), id="http-1.0-keep-alive"
        ),
    ],
)
def test_connection_not_reused_when_the_answer_says_so(first: bytes) -> None:
    """After ``Connection: close`` or an HTTP/1.0 answer the next GET opens a new connection."""

    async def scenario() -> None:
        # The server keeps the first connection open: only the client can choose not to reuse it.
        async with Scripted(first, ok(b"two")) as server, client() as http:
            assert await get(http, server.url()) == (200, b"one")
            assert await get(http, server.url()) == (200, b"two")
            assert server.conn_of == [0, 1]

    asyncio.run(scenario())


def test_connection_closed_by_server_while_idle_is_not_reused() -> None:
    """A pooled connection the server has since closed is skipped; the next GET succeeds anew."""

    async def scenario() -> None:
        async with Scripted(Reply(ok(b"one"), close=True), ok(b"two")) as server, client() as http:
            assert await get(http, server.url()) == (200, b"one")
            await asyncio.wait_for(server.hung_up.wait(), 2)
            await asyncio.sleep(0.05)  # for the client's side to see the FIN
            assert await get(http, server.url()) == (200, b"two")
            assert server.conn_of == [0, 1]

    asyncio.run(scenario())


def test_response_with_unread_body_is_not_pooled() -> None:
    """Leaving a stream before its body is read closes that connection instead of pooling it."""

    async def scenario() -> None:
        async with Scripted(ok(b"x" * 5000), ok(b"two")) as server, client() as http:
            async with http.stream(server.url()) as response:
                assert response.status == 200
                assert not response.complete
            await asyncio.wait_for(server.hung_up.wait(), 2)  # the client closed it
            assert await get(http, server.url()) == (200, b"two")
            assert server.conn_of == [0, 1]

    asyncio.run(scenario())


def test_connection_limit_per_origin_holds_under_concurrency() -> None:
    """Six concurrent GETs with connections=2 use exactly two connections, never more at once."""

    async def scenario() -> None:
        replies = [Reply(ok(b"body %d" % n), delay=0.03) for n in range(6)]
        async with Scripted(*replies) as server, client(connections=2) as http:
            got = await asyncio.gather(*(get(http, server.url(f"/{n}")) for n in range(6)))
            assert sorted(body for _, body in got) == [b"body %d" % n for n in range(6)]
            assert server.connections == 2
            assert server.most_open == 2
            assert sorted(server.conn_of) == [0, 0, 0, 1, 1, 1]

    asyncio.run(scenario())


# -- timeouts and refused connections -------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(b"", hang=True), id="no-head"),
        pytest.param(
            Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", hang=True), id="stalled-body"
        ),
        pytest.param(
            Reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", hang=True),
            id="stalled-chunk",
        ),
    ],
)
def test_server_that_stops_answering_times_out_reading(reply: Reply) -> None:
    """No bytes for ``timeout`` seconds is TimedOut with phase "read", raised about on time."""

    async def scenario() -> None:
        async with Scripted(reply) as server, client(timeout=0.2) as http:
            started = time.monotonic()
            with pytest.raises(TimedOut, match=r"^timed out \(read\)$") as caught:
                await get(http, server.url())
            assert caught.value.phase == "read"
            assert 0.15 < time.monotonic() - started < 1.5

    asyncio.run(scenario())


def test_connect_to_a_port_nobody_listens_on_fails() -> None:
    """A refused connection is ConnectFailed naming the host and port."""

    async def scenario() -> None:
        with dead_port() as port:
            async with client() as http:
                with pytest.raises(
                    ConnectFailed, match=rf"^cannot connect to 127\.0\.0\.1:{port} \("
                ):
                    await get(http, f"http://127.0.0.1:{port}/")

    asyncio.run(scenario())


# -- redirects ------------------------------------------------------------------------------


def moved(location: str, status: str = "302 Found") -> bytes:
    return f"HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()


def test_relative_redirect_is_followed() -> None:
    """A relative Location resolves against the request URL and is fetched on one connection."""

    async def scenario() -> None:
        async with (
            Scripted(moved("next?x=1"), ok(b"landed")) as server,
            client(max_redirects=3) as http,
            http.stream(server.url("/dir/start")) as response,
        ):
            assert response.status == 200
            assert await response.read(100) == b"landed"
            assert response.url.target == "/dir/next?x=1"
        assert [r.split(b"\r\n")[0] for r in server.requests] == [
            b"GET /dir/start HTTP/1.1",
            b"GET /dir/next?x=1 HTTP/1.1",
        ]
        assert server.conn_of == [0, 0]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "same_origin", [pytest.param(True, id="same-origin"), pytest.param(False, id="cross-origin")]
)
def test_redirect_keeps_authorization_only_on_the_same_origin(same_origin: bool) -> None:
    """Authorization follows a redirect on the same origin and is dropped on another port's."""

    async def scenario() -> None:
        headers = {"Authorization": "Bearer s3cret", "X-Other": "kept"}
        async with (
            Scripted() as first,
            Scripted(ok(b"there")) as second,
            client(headers=headers, max_redirects=1) as http,
        ):
            target = first if same_origin else second
            first.add(moved(target.url("/there"), "307 Temporary Redirect"), ok(b"there"))
            assert await get(http, first.url("/here")) == (200, b"there")
            hop = target.requests[-1]
        assert b"Authorization: Bearer s3cret\r\n" in first.requests[0]
        assert hop.startswith(b"GET /there HTTP/1.1\r\n")
        assert b"X-Other: kept\r\n" in hop
        assert (b"Authorization: Bearer s3cret\r\n" in hop) is same_origin
        assert b"s3cret" not in b"".join(second.requests)

    asyncio.run(scenario())


def test_more_redirects_than_allowed_is_a_redirect_error() -> None:
    """Past max_redirects hops the client stops with RedirectError after max_redirects+1 GETs."""

    async def scenario() -> None:
        async with Scripted(*[moved("/again")] * 5) as server, client(max_redirects=2) as http:
            with pytest.raises(RedirectError, match=r"^too many redirects \(more than 2\)$"):
                await get(http, server.url())
            assert len(server.requests) == 3

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "location",
    [
        pytest.param("ftp://127.0.0.1/file", id="ftp"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("http://:80/", id="no-host"),
        pytest.param("http://127.0.0.1:99999/", id="bad-port"),
    ],
)
def test_redirect_to_an_unsupported_url_is_a_redirect_error(location: str) -> None:
    """A Location that is not a requestable http(s) URL stops with RedirectError, unrequested."""

    async def scenario() -> None:
        async with Scripted(moved(location), ok(b"no")) as server, client(max_redirects=5) as http:
            with pytest.raises(RedirectError, match=r"^redirected to an unsupported URL$"):
                await get(http, server.url())
            assert len(server.requests) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "status",
    [
        "301 Moved Permanently",
        "302 Found",
        "303 See Other",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ],
)
def test_redirect_is_handed_back_when_not_following(status: str) -> None:
    """With max_redirects=0 the 3xx itself is the response, its Location untouched."""

    async def scenario() -> None:
        async with (
            Scripted(moved("/elsewhere", status), ok(b"no")) as server,
            client() as http,
            http.stream(server.url()) as response,
        ):
            assert response.status == int(status[:3])
            assert response.headers["location"] == "/elsewhere"
            assert await response.read(10) == b""
        assert len(server.requests) == 1

    asyncio.run(scenario())


# -- URLs and request heads -----------------------------------------------------------------


def test_path_and_query_are_percent_encoded_on_the_wire() -> None:
    """Spaces and non-ASCII in path and query go out percent-encoded (UTF-8); escapes stay."""

    async def scenario() -> None:
        async with Scripted(ok(b"ok")) as server, client() as http:
            await get(http, server.url("/a b/ü%41.png?q=a b&x=é#frag"))
        assert server.requests[0].split(b"\r\n")[0] == (
            b"GET /a%20b/%C3%BC%41.png?q=a%20b&x=%C3%A9 HTTP/1.1"
        )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("text", "target"),
    [
        pytest.param("http://h", "/", id="empty-path"),
        pytest.param("http://h/a b/c", "/a%20b/c", id="space"),
        pytest.param("http://h/ü?é=ü", "/%C3%BC?%C3%A9=%C3%BC", id="non-ascii"),
        pytest.param("http://h/%2F%zz", "/%2F%zz", id="escapes-kept"),
        pytest.param('http://h/a"<>`{|}^\\', "/a%22%3C%3E%60%7B%7C%7D%5E%5C", id="unsafe-ascii"),
        pytest.param("http://h/p?a=1&b=/:@,;", "/p?a=1&b=/:@,;", id="query-delimiters"),
        pytest.param("http://h/p#frag ment", "/p", id="fragment-dropped"),
    ],
)
def test_url_target_is_normalised(text: str, target: str) -> None:
    """Url.parse percent-encodes what may not go on the wire as it is."""
    assert Url.parse(text).target == target


@pytest.mark.parametrize(
    ("text", "host", "port", "authority"),
    [
        pytest.param("http://Example.COM/", "example.com", 80, "example.com", id="lower-cased"),
        pytest.param(
            "http://example.com:80/", "example.com", 80, "example.com", id="http-80-omitted"
        ),
        pytest.param(
            "https://example.com:443/", "example.com", 443, "example.com", id="https-443-omitted"
        ),
        pytest.param(
            "https://example.com:80/", "example.com", 80, "example.com:80", id="https-80-kept"
        ),
        pytest.param(
            "http://example.com:8080/", "example.com", 8080, "example.com:8080", id="port-kept"
        ),
        pytest.param(
            "http://bücher.example/",
            "xn--bcher-kva.example",
            80,
            "xn--bcher-kva.example",
            id="idna",
        ),
        pytest.param("http://[::1]:8080/", "::1", 8080, "[::1]:8080", id="ipv6-port"),
        pytest.param("https://[::1]/", "::1", 443, "[::1]", id="ipv6-default"),
        pytest.param("http://user:pw@h:81/", "h", 81, "h:81", id="userinfo-not-sent"),
    ],
)
def test_url_host_and_authority(text: str, host: str, port: int, authority: str) -> None:
    """Hosts are normalised (IDNA, IPv6 brackets) and default ports left out of the authority."""
    url = Url.parse(text)
    assert (url.host, url.port, url.authority) == (host, port, authority)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("http://h/a\nb", "URL holds a control character", id="newline"),
        pytest.param("http://h/a\rb", "URL holds a control character", id="carriage-return"),
        pytest.param("http://h/\x00", "URL holds a control character", id="nul"),
        pytest.param("http://h/\x7f", "URL holds a control character", id="del"),
        pytest.param("http://h/a\tb", "URL holds a control character", id="tab"),
        pytest.param(" http://h/", "URL starts or ends with a space", id="leading-space"),
        pytest.param("http://h/ ", "URL starts or ends with a space", id="trailing-space"),
        pytest.param("http://h:99999/", "Port out of range 0-65535", id="port-too-big"),
        pytest.param(
            "http://h:abc/", "Port could not be cast to integer value as 'abc'", id="port-word"
        ),
        pytest.param("http://h:-1/", "Port could not be cast", id="port-negative"),
        pytest.param("http://h:0/", "port 0 is not a port to connect to", id="port-zero"),
        pytest.param("http:///path", "URL has no host", id="no-host"),
        pytest.param("http://:8080/", "URL has no host", id="port-only"),
        pytest.param(
            "http://exa_mple!.com/", "host 'exa_mple!.com' is not a valid name", id="bang"
        ),
        pytest.param("http://a..b/", "host 'a..b' is not a valid name", id="empty-label"),
        pytest.param(
            "http://-a.example/", "host '-a.example' is not a valid name", id="leading-hyphen"
        ),
        pytest.param(
            "http://exa mple.com/", "host 'exa mple.com' is not a valid name", id="space-in-host"
        ),
        pytest.param(
            "http://ex%41mple.com/", "host 'ex%41mple.com' is not a valid name", id="escape-in-host"
        ),
        pytest.param("http://" + "a" * 64 + ".com/", "is not a valid name", id="label-64"),
        pytest.param(
            "http://[::g]/", "does not appear to be an IPv4 or IPv6 address", id="bad-ipv6"
        ),
        pytest.param("ftp://h/", "scheme 'ftp' is not http or https", id="ftp"),
        pytest.param("h/path", "scheme 'none' is not http or https", id="no-scheme"),
    ],
)
def test_unusable_url_is_invalid(text: str, message: str) -> None:
    """Url.parse refuses what cannot be requested, with a message saying why."""
    with pytest.raises(InvalidUrl) as caught:
        Url.parse(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("default", "extra", "message"),
    [
        pytest.param(
            {"X-A": "v\r\nX-Evil: 1"}, None, "header X-A holds a line break", id="default-crlf"
        ),
        pytest.param({}, {"X-A": "v\nX-Evil: 1"}, "header X-A holds a line break", id="request-lf"),
        pytest.param({}, {"X-A": "v\rX-Evil: 1"}, "header X-A holds a line break", id="request-cr"),
        pytest.param({}, {"X-A": "v\x00"}, "header X-A holds a line break", id="request-nul"),
        pytest.param({"X-A\r\nX-Evil": "1"}, None, "is not a valid header name", id="name-crlf"),
        pytest.param({}, {"X-A: 1\r\nX-Evil": "1"}, "is not a valid header name", id="name-colon"),
        pytest.param({}, {"": "1"}, "is not a valid header name", id="name-empty"),
        pytest.param(
            {}, {"X-A": "\u2028"}, "a request header is not Latin-1 text", id="not-latin-1"
        ),
    ],
)
def test_header_that_could_break_the_request_is_refused_unsent(
    default: dict[str, str], extra: dict[str, str] | None, message: str
) -> None:
    """A header name or value that could split the request is InvalidUrl and is never sent."""

    async def scenario() -> None:
        async with Scripted(ok(b"ok")) as server, client(headers=default) as http:
            with pytest.raises(InvalidUrl, match=message):
                await get(http, server.url(), extra)
        assert server.requests == []

    asyncio.run(scenario())


# -- proxies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "userinfo", "authorization"),
    [
        pytest.param(
            "http", "alice:p%40ss%3Aw0rd@", basic("alice", "p@ss:w0rd"), id="http-with-auth"
        ),
        pytest.param("all", "bob@", basic("bob", ""), id="all-user-only"),
        pytest.param("http", "", None, id="no-auth"),
    ],
)
def test_http_url_goes_through_the_proxy_in_absolute_form(
    key: str, userinfo: str, authorization: str | None
) -> None:
    """Plain HTTP via a proxy: absolute-form request line, Basic Proxy-Authorization if given."""

    async def scenario() -> None:
        async with Scripted(ok(b"via proxy"), ok(b"again")) as origin, Proxy() as proxy:
            proxies = {key: proxy.url(userinfo=userinfo)}
            async with client(proxies=proxies) as http:
                assert await get(http, origin.url("/f?x=1")) == (200, b"via proxy")
                assert await get(http, origin.url("/g")) == (200, b"again")
        auth = "" if authorization is None else f"Proxy-Authorization: {authorization}\r\n"
        host = f"Host: 127.0.0.1:{origin.port}\r\n"
        assert proxy.requests == [
            f"GET {origin.url('/f?x=1')} HTTP/1.1\r\n{host}{auth}\r\n".encode()
        ]
        assert origin.requests[0] == f"GET /f?x=1 HTTP/1.1\r\n{host}\r\n".encode()
        # The second GET reused the proxy connection, which by then pipes bytes as sent.
        assert proxy.connections == 1
        assert origin.requests[1] == f"GET {origin.url('/g')} HTTP/1.1\r\n{host}{auth}\r\n".encode()

    asyncio.run(scenario())


def test_https_url_goes_through_a_connect_tunnel_then_tls() -> None:
    """HTTPS through a proxy: CONNECT with credentials, then TLS end to end inside the tunnel."""

    async def scenario() -> None:
        async with Scripted(ok(b"secret body"), tls=server_tls()) as origin, Proxy() as proxy:
            proxies = {"https": proxy.url(userinfo="carol:pw@")}
            async with client(proxies=proxies, tls=trusting()) as http:
                assert await get(http, origin.url("/secure?k=v")) == (200, b"secret body")
        authority = f"127.0.0.1:{origin.port}"
        assert proxy.requests == [
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {basic('carol', 'pw')}\r\n\r\n".encode()
        ]
        assert origin.requests == [
            f"GET /secure?k=v HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        ]
        assert proxy.tunneled  # the TLS handshake and request went through it...
        assert b"/secure" not in proxy.tunneled  # ...encrypted

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("url", "request_line", "host"),
    [
        pytest.param(
            "http://[::1]:{port}/x", "GET http://[::1]:{port}/x HTTP/1.1", "[::1]:{port}", id="ipv6"
        ),
        pytest.param(
            "http://bücher.example:80/x",
            "GET http://xn--bcher-kva.example/x HTTP/1.1",
            "xn--bcher-kva.example",
            id="idna-default-port",
        ),
        pytest.param(
            "http://Files.Example:8080/a b",
            "GET http://files.example:8080/a%20b HTTP/1.1",
            "files.example:8080",
            id="port-kept",
        ),
    ],
)
def test_request_head_names_the_host_as_the_wire_wants(
    url: str, request_line: str, host: str
) -> None:
    """The Host header and absolute form carry IPv6 brackets, IDNA names, no default port."""

    async def scenario() -> None:
        async with (
            Proxy(answer=ok(b"from proxy")) as proxy,
            client(proxies={"http": proxy.url()}) as http,
        ):
            port = proxy.port  # any port will do: only the proxy is connected to
            assert await get(http, url.format(port=port)) == (200, b"from proxy")
        line, host_field = proxy.requests[0].split(b"\r\n")[:2]
        assert line == request_line.format(port=port).encode()
        assert host_field == f"Host: {host.format(port=port)}".encode()

    asyncio.run(scenario())


def _ipv6_loopback() -> bool:
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_literal_host_is_reached_directly() -> None:
    """A GET to http://[::1]:port/ connects over IPv6 and sends ``Host: [::1]:port``."""

    async def scenario() -> None:
        async with Scripted(ok(b"over ipv6"), host="::1") as server, client() as http:
            assert await get(http, f"http://[::1]:{server.port}/v6") == (200, b"over ipv6")
        assert server.requests == [
            f"GET /v6 HTTP/1.1\r\nHost: [::1]:{server.port}\r\n\r\n".encode()
        ]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", True, id="exact-ip"),
        pytest.param("localhost", "localhost", True, id="exact-name"),
        pytest.param("localhost", "LOCALHOST", True, id="exact-other-case"),
        pytest.param("localhost", ".localhost", True, id="dot-domain"),
        pytest.param("localhost", "*", True, id="star"),
        pytest.param("127.0.0.1", "other.example, 127.0.0.1", True, id="in-a-list"),
        pytest.param("127.0.0.1", "127.0.0.1:{port}", True, id="host-and-port"),
        pytest.param("127.0.0.1", "127.0.0.1:1", False, id="other-port"),
        pytest.param("localhost", "host", False, id="not-a-label-suffix"),
        pytest.param("localhost", "other.example", False, id="other-host"),
        pytest.param("localhost", "", False, id="empty"),
    ],
)
def test_no_proxy_entries_bypass_the_proxy(host: str, no_proxy: str, bypassed: bool) -> None:
    """Hosts covered by ``no`` are fetched directly; the rest go through the proxy."""

    async def scenario() -> None:
        async with Scripted(ok(b"direct")) as origin, Proxy(answer=ok(b"proxied")) as proxy:
            proxies = {"http": proxy.url(), "no": no_proxy.format(port=origin.port)}
            async with client(proxies=proxies) as http:
                _, body = await get(http, origin.url("/", host=host))
        assert body == (b"direct" if bypassed else b"proxied")
        assert len(origin.requests) == int(bypassed)
        assert len(proxy.requests) == int(not bypassed)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        pytest.param("cdn.example.com", ".example.com", True, id="dot-domain-subdomain"),
        pytest.param("cdn.example.com", "example.com", True, id="domain-subdomain"),
        pytest.param("a.b.example.com", "example.com", True, id="deeper-subdomain"),
        pytest.param("badexample.com", "example.com", False, id="not-a-label-suffix"),
        pytest.param("example.com.evil", "example.com", False, id="prefix-only"),
    ],
)
def test_no_proxy_domain_covers_its_subdomains(host: str, no_proxy: str, bypassed: bool) -> None:
    """A no_proxy domain covers names under it, on label boundaries only (no DNS needed here)."""
    assert _bypassed(no_proxy, Url.parse(f"http://{host}/")) is bypassed


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
            b"Content-Length: 0\r\n\r\n",
            "^the proxy answered HTTP 407 to CONNECT 127.0.0.1:{port}$",
            id="407",
        ),
        pytest.param(b"", "^the proxy closed the connection during CONNECT$", id="closed"),
    ],
)
def test_proxy_refusing_the_tunnel_is_connect_failed(answer: bytes, message: str) -> None:
    """A proxy refusing a CONNECT tunnel is ConnectFailed; its socket is closed, not leaked."""

    async def scenario() -> None:
        async with (
            Scripted(ok(b"never"), tls=server_tls()) as origin,
            Proxy(answer=answer) as proxy,
            client(proxies={"https": proxy.url()}, tls=trusting()) as http,
        ):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with pytest.raises(ConnectFailed, match=message.format(port=origin.port)):
                    await get(http, origin.url())
                gc.collect()  # a connection left open would warn as it is collected
            assert [str(w.message) for w in seen if w.category is ResourceWarning] == []
            assert len(proxy.requests) == 1
            assert origin.requests == []

    asyncio.run(scenario())


def test_tls_failure_inside_a_tunnel_is_connect_failed() -> None:
    """An untrusted certificate behind a CONNECT tunnel is ConnectFailed; nothing is leaked."""

    async def scenario() -> None:
        async with (
            Scripted(ok(b"never"), tls=server_tls()) as origin,
            Proxy() as proxy,
            client(proxies={"https": proxy.url()}) as http,
        ):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with pytest.raises(
                    ConnectFailed, match=r"^TLS with 127\.0\.0\.1 failed \(self.signed"
                ):
                    await get(http, origin.url())
                gc.collect()
            assert [str(w.message) for w in seen if w.category is ResourceWarning] == []
            assert proxy.requests[0].startswith(f"CONNECT 127.0.0.1:{origin.port} ".encode())
            assert origin.requests == []

    asyncio.run(scenario())


def test_unreachable_proxy_is_connect_failed_naming_the_proxy() -> None:
    """When the proxy cannot be reached, the error names the proxy, not the origin."""

    async def scenario() -> None:
        with dead_port() as port:
            async with client(proxies={"http": f"http://127.0.0.1:{port}"}) as http:
                with pytest.raises(
                    ConnectFailed, match=rf"^cannot connect to 127\.0\.0\.1:{port} "
                ):
                    await get(http, "http://files.example/x")

    asyncio.run(scenario())


# -- proxy settings from the environment ----------------------------------------------------


@pytest.fixture
def empty_config(tmp_path: Path) -> dict[str, str]:
    """An environment whose config file is empty, so no user setting leaks in."""
    path = tmp_path / "config.toml"
    path.write_text("")
    return {"FETCHER_CONFIG": str(path)}


@pytest.mark.parametrize(
    ("env", "proxies"),
    [
        pytest.param(
            {"HTTPS_PROXY": "host:3128"}, (("https", "http://host:3128"),), id="no-scheme"
        ),
        pytest.param(
            {"http_proxy": "http://a:1", "HTTP_PROXY": "http://b:2"},
            (("http", "http://a:1"),),
            id="lower-case-first",
        ),
        pytest.param(
            {"ALL_PROXY": "p:8080", "NO_PROXY": "localhost,.corp"},
            (("all", "http://p:8080"), ("no", "localhost,.corp")),
            id="all-and-no",
        ),
        pytest.param({"HTTP_PROXY": "  "}, (), id="blank"),
    ],
)
def test_proxy_settings_come_from_the_environment(
    empty_config: dict[str, str], env: dict[str, str], proxies: tuple[tuple[str, str], ...]
) -> None:
    """load_settings reads curl's proxy variables; a proxy without a scheme is http://."""
    assert load_settings({}, {**empty_config, **env}).settings.proxies == proxies


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"HTTPS_PROXY": "https://bob:hunter2@proxy:3128"},
            "HTTPS_PROXY: only http:// proxies are supported",
            id="https-proxy",
        ),
        pytest.param(
            {"all_proxy": "socks5://bob:hunter2@proxy:1080"},
            "all_proxy: only http:// proxies are supported",
            id="socks",
        ),
        pytest.param(
            {"HTTP_PROXY": "http://bob:hunter2@proxy:99999"},
            "HTTP_PROXY is not a usable proxy URL",
            id="bad-port",
        ),
        pytest.param(
            {"HTTP_PROXY": "http://bob:hunter2@proxy:0"},
            "HTTP_PROXY is not a usable proxy URL",
            id="port-zero",
        ),
        pytest.param(
            {"http_proxy": "http://bob:hunter2@pro<xy:3128"},
            "http_proxy is not a usable proxy URL",
            id="bad-host",
        ),
    ],
)
def test_unusable_proxy_is_a_one_line_config_error(
    empty_config: dict[str, str], env: dict[str, str], message: str
) -> None:
    """An unusable proxy is a one-line ConfigError naming the variable, never the password."""
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {**empty_config, **env})
    assert str(caught.value) == message
    assert "hunter2" not in str(caught.value)


def test_proxy_password_with_a_hash_is_not_echoed(empty_config: dict[str, str]) -> None:
    """A password with an unescaped '#' does not appear in the ConfigError it causes."""
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {**empty_config, "HTTP_PROXY": "http://bob:hunter2#x@proxy:3128"})
    assert "hunter2" not in str(caught.value)


def test_proxy_password_is_not_in_the_settings_repr(empty_config: dict[str, str]) -> None:
    """repr() of the settings (and of what load_settings returns) never shows a proxy password."""
    loaded = load_settings({}, {**empty_config, "HTTP_PROXY": "http://bob:hunter2@proxy:3128"})
    assert loaded.settings.proxies == (("http", "http://bob:hunter2@proxy:3128"),)
    assert "hunter2" not in repr(loaded.settings)
    assert "hunter2" not in repr(loaded)


# -- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_with_a_trusted_certificate_gets_the_body(host: str) -> None:
    """Over TLS with a context trusting the server's certificate, GETs work on one connection."""

    async def scenario() -> None:
        async with (
            Scripted(ok(b"over tls"), ok(b"again"), tls=server_tls()) as server,
            client(tls=trusting()) as http,
        ):
            assert await get(http, server.url("/s", host=host)) == (200, b"over tls")
            assert await get(http, server.url("/t", host=host)) == (200, b"again")
        assert server.connections == 1
        assert (
            server.requests[0] == f"GET /s HTTP/1.1\r\nHost: {host}:{server.port}\r\n\r\n".encode()
        )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("server_cert", "trusted", "host", "reason"),
    [
        pytest.param((CERT, KEY), None, "127.0.0.1", r"self.signed certificate", id="untrusted"),
        pytest.param(
            (WRONG_CERT, WRONG_KEY),
            WRONG_CERT,
            "127.0.0.1",
            r"IP address mismatch, certificate is not valid for '127\.0\.0\.1'\.",
            id="wrong-ip",
        ),
        pytest.param(
            (WRONG_CERT, WRONG_KEY),
            WRONG_CERT,
            "localhost",
            r"Hostname mismatch, certificate is not valid for 'localhost'\.",
            id="wrong-name",
        ),
    ],
)
def test_tls_certificate_check_failure_is_connect_failed(
    server_cert: tuple[Path, Path], trusted: Path | None, host: str, reason: str
) -> None:
    """A certificate the client cannot verify is ConnectFailed saying TLS failed and why."""

    async def scenario() -> None:
        tls = trusting(trusted) if trusted is not None else None
        async with (
            Scripted(ok(b"never"), tls=server_tls(*server_cert)) as server,
            client(tls=tls) as http,
        ):
            with pytest.raises(ConnectFailed, match=rf"^TLS with {host} failed \({reason}\)$"):
                await get(http, server.url(host=host))
        assert server.requests == []

    asyncio.run(scenario())
