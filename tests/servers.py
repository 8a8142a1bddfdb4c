"""Hostile loopback servers for end-to-end HTTP tests, each run on an asyncio loop in a thread.

A fetch run is synchronous (``fetch_sync`` runs its own event loop), so the servers it
talks to live on another loop, in a background thread: :class:`LoopThread`.
:class:`Scripted` answers each request with exact bytes the test gives and records the
raw requests, connections and bytes it sent; :class:`Proxy` is a small forwarding
proxy (absolute-form GET, or a CONNECT tunnel) that records what it was asked.
All of them listen on port 0 (the OS picks) and close every connection they accepted.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections import deque
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
#: An endless body stops here even if the client never hangs up.
ENDLESS_LIMIT = 16 * 1024 * 1024
#: How long a server call from the test thread may take before the test fails.
CALL_TIMEOUT = 10.0


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``with LoopThread() as loop:``."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-servers", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (or exception) here."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(CALL_TIMEOUT)

    @contextmanager
    def serving(self, server: _ServerT) -> Iterator[_ServerT]:
        """``server`` listening for the ``with`` block, then closed with all its connections."""
        self.call(server.__aenter__())
        try:
            yield server
        finally:
            self.call(server.__aexit__(None, None, None))

    async def _cancel_the_rest(self) -> None:
        current = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await self._loop.shutdown_asyncgens()


@dataclass(frozen=True)
class Reply:
    """What the scripted server does for one request."""

    data: bytes = b""
    #: Close the connection once ``data`` is sent.
    close: bool = False
    #: After ``data``, say nothing more until the client goes away.
    hang: bool = False
    #: After ``data``, send filler bytes until the client hangs up (then close).
    endless: bool = False
    #: Seconds between two 64 KiB blocks of an endless body: a rate, so that what the
    #: server has sent measures what the client asked for, not what kernel buffers took.
    pace: float = 0.0
    #: Wait this long before sending.
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    """One request head as a server received it."""

    raw: bytes

    @property
    def line(self) -> str:
        """The request line, e.g. ``GET /x.png HTTP/1.1``."""
        return self.raw.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        """Header fields by lower-case name (a repeated name keeps its last value)."""
        fields: dict[str, str] = {}
        for line in self.raw.split(b"\r\n")[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return fields


class _Server:
    """A loopback server whose connections and handlers all end with ``async with``.

    With ``tls`` the TCP connection is counted when accepted and TLS is started on
    it afterwards, so a handshake the client refuses still shows as a connection.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self._tls = tls
        self._host = host
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        #: TCP connections accepted so far.
        self.connections = 0
        #: Body and head bytes handed to the socket so far.
        self.sent = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
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

    @property
    def origin(self) -> str:
        scheme = "https" if self._tls else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        """A URL on this server, optionally naming it by another ``host`` (``localhost``)."""
        if host is None:
            return self.origin + path
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        number = self.connections
        self.connections += 1
        try:
            if self._tls is not None:
                await writer.start_tls(self._tls)
            await self._handle(reader, writer, number)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or refused the handshake: that is its right
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.sent += len(data)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        raise NotImplementedError


_ServerT = TypeVar("_ServerT", bound=_Server)


class Scripted(_Server):
    """Answers the n-th request with the n-th reply, byte for byte; no replies left: hangs up."""

    def __init__(
        self, *replies: bytes | Reply, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(tls, host)
        self._replies: deque[Reply] = deque()
        #: Each request's head as received, and the number of the connection it came on.
        self.requests: list[Request] = []
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
            self.requests.append(Request(head))
            self.conn_of.append(number)
            if not self._replies:
                return
            reply = self._replies.popleft()
            if reply.delay:
                await asyncio.sleep(reply.delay)
            await self._send(writer, reply.data)
            if reply.endless:
                block, streamed = bytes(65536), 0
                while streamed < ENDLESS_LIMIT:
                    await self._send(writer, block)
                    streamed += len(block)
                    if reply.pace:
                        await asyncio.sleep(reply.pace)
                return
            if reply.hang:
                await reader.read()
                return
            if reply.close or "close" in self.requests[-1].headers.get("connection", "").lower():
                return


class Proxy(_Server):
    """A forwarding HTTP proxy, or one that gives every request the same ``answer``.

    Forwarding, it sends an absolute-form GET on to its origin in origin form, with
    ``Connection: close`` both ways (one request per connection, whatever the origin),
    and leaves every header as the client sent it, ``Proxy-Authorization`` included;
    a CONNECT is answered 200 and bytes are piped both ways as they come.
    """

    def __init__(self, answer: bytes | None = None) -> None:
        super().__init__()
        self._answer = answer
        #: Each request head the proxy received, as received.
        self.requests: list[Request] = []
        #: Every byte the client sent inside CONNECT tunnels.
        self.tunneled = bytearray()

    def proxy_url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            request = Request(head)
            self.requests.append(request)
            method, target, _ = request.line.split(" ", 2)
            if self._answer is not None:
                await self._send(writer, self._answer)
                if method == "CONNECT":
                    return
                continue
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                await self._send(writer, b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _pipe(reader, writer, up_reader, up_writer, self.tunneled)
                return
            await self._forward(head, target, writer)
            return

    async def _forward(self, head: bytes, target: str, writer: asyncio.StreamWriter) -> None:
        parts = urlsplit(target)
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            lines = head.rstrip(b"\r\n").split(b"\r\n")
            path = parts.path + "?" * bool(parts.query) + parts.query
            lines[0] = b"GET %s HTTP/1.1" % path.encode()
            kept = [x for x in lines if not x.lower().startswith(b"connection:")]
            up_writer.write(b"\r\n".join([*kept, b"Connection: close", b"", b""]))
            answer_head = await up_reader.readuntil(b"\r\n\r\n")
            status, rest = answer_head.split(b"\r\n", 1)
            await self._send(writer, status + b"\r\nConnection: close\r\n" + rest)
            while data := await up_reader.read(65536):
                await self._send(writer, data)
        finally:
            up_writer.close()
            with suppress(OSError):
                await up_writer.wait_closed()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    record: bytearray,
) -> None:
    """Copy bytes both ways until either side stops; ``record`` gets the client's bytes."""

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


# -- answers --------------------------------------------------------------------------------


def ok(body: bytes, *fields: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    """A response with a Content-Length for ``body``."""
    extra = "".join(f"{f}\r\n" for f in fields)
    return f"{status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def moved(location: str, status: str = "302 Found") -> bytes:
    """A redirect to ``location`` with an empty body."""
    return f"HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()


def chunked(data: bytes, size: int = 7000) -> bytes:
    """``data`` in chunked transfer coding, ``size`` bytes a chunk, ending with the last chunk."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def basic(user: str, password: str) -> str:
    """The value of a Basic (Proxy-)Authorization header."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
