"""An S3-compatible server for the tests: moto's server mode in a subprocess on port 0,
behind a small recording proxy that can inject what moto cannot produce.

:class:`MotoServer` is one ``moto`` process per test session (buckets are made per
test, so tests do not see each other's objects). :class:`StoreProxy` listens on
its own port 0, forwards every request to moto byte for byte, records
``(method, path, query)`` of each, and answers instead of moto when a
:class:`Fault` matches: a status with an S3 error body (503 SlowDown, 500, 403
AccessDenied or InvalidAccessKeyId, a quota), or a connection dropped before any
answer. It can also make an object look older than it is (moto stamps every
write with its own clock, which no client can set): the ``Last-Modified`` of
answers on a path in :attr:`StoreProxy.aged` is moved that many seconds back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Self

import aiohttp
from aiohttp import web

from tests.servers import LoopThread

#: The AWS secret the tests use: a test fails wherever it shows up.
SECRET = "s3cr3t-Wr0ngly-Printed-Would-Show"
#: Variables of the user's own AWS setup that a test must not inherit.
AWS_USER_VARIABLES = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN")
#: The server, started by the test process itself: a child that dies with stdin's close.
_SERVE = (
    "import sys\n"
    "from moto.server import ThreadedMotoServer\n"
    "server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
    "server.start()\n"
    "print(server.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"
    "server.stop()\n"
)
#: Hop-by-hop and framing headers the proxy does not pass on; aiohttp sets its own.
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "date", "server"}
)


class MotoServer:
    """moto's S3 in a child process on 127.0.0.1, port chosen by the OS."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # werkzeug's line per request
            text=True,
        )
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


@dataclass
class Fault:
    """Answer requests whose method and path match, ``times`` times, instead of the store."""

    method: str
    #: A substring of the path (with the query): ``"/00.png"``, ``".fetcher/lock"``, ``"?uploads"``.
    path: str = ""
    status: int = 503
    code: str = "SlowDown"
    times: int = 1
    #: Close the connection without any answer, instead of ``status``.
    drop: bool = False
    #: Never answer: ``"before"`` passing the request on, or ``"after"`` the store took it
    #: (a client killed meanwhile left an object it never heard of).
    hold: str | None = None
    #: Pass the store's answer on, but only this many bytes of its body, then drop the
    #: connection (a store that fails midway through a body).
    cut: int | None = None


@dataclass
class StoreProxy:
    """A recording, fault-injecting reverse proxy in front of :class:`MotoServer`."""

    upstream: str
    #: Every request seen: (method, path with query), in order.
    seen: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    #: For each request with a body: its Content-MD5 header and the MD5 of the body it had.
    digests: list[tuple[str, str | None, str]] = field(default_factory=list)
    #: For each request with a body: its path and the X-Amz-Content-SHA256 it was signed with.
    payload_hashes: list[tuple[str, str | None]] = field(default_factory=list)
    #: The most part uploads in flight at once.
    most_parts: int = 0
    #: Set when a held request arrives.
    holding: threading.Event = field(default_factory=threading.Event)
    #: Path substring -> seconds: answers there say the object was last modified that long ago.
    aged: dict[str, float] = field(default_factory=dict)
    _parts: int = 0
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def _hold(self) -> web.StreamResponse:
        """No answer until the proxy closes (the client is killed meanwhile)."""
        self.holding.set()
        await self._closing.wait()
        return web.Response(status=503)

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def requests(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.seen)

    def _fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            self.seen.append((method, target))
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path in target:
                    fault.times -= 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._fault(request.method, request.path_qs)
        if body:
            digest = base64.b64encode(hashlib.md5(body).digest()).decode()
            with self._lock:
                self.digests.append((request.path_qs, request.headers.get("Content-MD5"), digest))
                signed = request.headers.get("X-Amz-Content-SHA256")
                self.payload_hashes.append((request.path_qs, signed))
        if fault is not None and fault.hold == "before":
            return await self._hold()
        if fault is not None and fault.drop:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fault is not None and fault.hold is None and fault.cut is None:
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f"<Error><Code>{fault.code}</Code><Message>injected</Message></Error>"
            )
            return web.Response(status=fault.status, text=xml, content_type="application/xml")
        assert self._session is not None
        part = "partNumber=" in request.path_qs
        if part:
            self._parts += 1
            self.most_parts = max(self.most_parts, self._parts)
        try:
            return await self._forward(request, body, fault)
        finally:
            if part:
                self._parts -= 1

    async def _cut(
        self, request: web.Request, status: int, headers: dict[str, str], part: bytes, size: int
    ) -> web.StreamResponse:
        """The answer's head, promising ``size`` bytes, then ``part`` of them and no more."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = size
        await response.prepare(request)
        await response.write(part)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _forward(
        self, request: web.Request, body: bytes, fault: Fault | None
    ) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Host"] = request.headers.get("Host", "")
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=io.BytesIO(body) if body else None,
            allow_redirects=False,
        ) as answer:
            data = await answer.read()
            if fault is not None and fault.hold == "after":
                return await self._hold()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            self._age(request.path_qs, out)
            if fault is not None and fault.cut is not None:
                return await self._cut(request, answer.status, out, data[: fault.cut], len(data))
            if request.method == "HEAD":
                # No body, but the object's length: verify compares it with the state.
                out["Content-Length"] = answer.headers.get("Content-Length", "0")
                return web.Response(status=answer.status, headers=out)
            return web.Response(status=answer.status, headers=out, body=data)

    def _age(self, target: str, headers: dict[str, str]) -> None:
        seconds = next((s for path, s in self.aged.items() if path in target), None)
        if seconds is not None and "Last-Modified" in headers:
            modified = parsedate_to_datetime(headers["Last-Modified"])
            headers["Last-Modified"] = format_datetime(
                modified - timedelta(seconds=seconds), usegmt=True
            )


def aws_credentials(folder: Path) -> dict[str, str]:
    """Credentials as the AWS CLI takes them, and none of the user's own files."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIATESTING",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
    }


@contextmanager
def store_proxy(upstream: str) -> Iterator[StoreProxy]:
    """A :class:`StoreProxy` in front of ``upstream``, on its own loop thread."""
    with LoopThread() as loop, loop.serving(StoreProxy(upstream)) as proxy:
        yield proxy
