"""``fetcher serve``: the gallery's web application and its lifetime.

One :func:`serve` call owns everything: the archive's file source (a folder, or a
bucket and its client), the catalog (opened read-only: an SQLite file, or a
PostgreSQL state), the aiohttp application and
its runner, the listening socket. It returns when ``stop`` is set (the CLI sets it on
SIGINT/SIGTERM), after the runner has closed every connection.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ListenError, UsageError
from ..stores import BucketUrl
from .guard import Gate, is_loopback, make_guard, secure_headers
from .reader import Reader
from .routes import READER, SOURCE, add_routes
from .sources import FileSource, open_source

if TYPE_CHECKING:
    from ..config import Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: A token shorter than this is refused: it would be guessed across a network.
MIN_TOKEN = 16
SHUTDOWN = 2.0


@dataclass(frozen=True, slots=True)
class GalleryOptions:
    """Where the gallery listens, and the token every request needs (None: none needed)."""

    #: A folder, or ``s3://BUCKET/PREFIX`` (reached as ``settings`` say).
    archive: Path | BucketUrl
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    #: A bucket's endpoint, addressing, retries and state file; a PostgreSQL state, for
    #: either.
    settings: Settings | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: a port is 0 to 65535")
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise UsageError(f"the serve token needs at least {MIN_TOKEN} characters")
        if self.token is None and not is_loopback(self.host):
            raise UsageError(
                f"--host {self.host} is reachable from other machines: give --token "
                "(or FETCHER_SERVE_TOKEN), which every request will then need"
            )


def gallery_url(host: str, port: int) -> str:
    """The address to open; an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def build_app(options: GalleryOptions, reader: Reader, source: FileSource) -> web.Application:
    """The application: the guard in front of the routes, secure headers on every answer."""
    gate = Gate(options.token, loopback=is_loopback(options.host))
    app = web.Application(middlewares=[make_guard(gate)])
    app[READER] = reader
    app[SOURCE] = source
    app.on_response_prepare.append(secure_headers)
    add_routes(app)
    return app


async def serve(options: GalleryOptions, stop: asyncio.Event, ready: Callable[[str], None]) -> None:
    """Serve the gallery until ``stop`` is set; ``ready(url)`` once it listens.

    A missing archive, a port in use or a host that does not resolve is a
    :class:`~fetcher.errors.UsageError` (one line, exit 2) before anything is served;
    so is a bucket that does not exist or refuses the credentials.
    """
    async with (
        open_source(options.archive, options.settings) as source,
        Reader(source) as reader,
    ):
        # A video still streaming gets SHUTDOWN seconds to finish once stopped, not 60.
        runner = web.AppRunner(
            build_app(options, reader, source), access_log=None, shutdown_timeout=SHUTDOWN
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, options.host, options.port)
            try:
                await site.start()
            except OSError as exc:
                raise _listen_error(options, exc) from exc
            ready(gallery_url(options.host, _bound_port(runner, options.port)))
            await stop.wait()
        finally:
            await runner.cleanup()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    """The port the OS gave (``--port 0`` asks it to pick one)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


def _listen_error(options: GalleryOptions, exc: OSError) -> ListenError:
    where = f"{options.host}:{options.port}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"cannot listen on {where}: the port is in use (try another --port)")
    if isinstance(exc, socket.gaierror):
        return ListenError(f"cannot listen on {where}: unknown host {options.host!r}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot listen on {where}: this machine has no such address")
    if exc.errno == errno.EACCES:
        return ListenError(f"cannot listen on {where}: permission denied (a port under 1024?)")
    return ListenError(f"cannot listen on {where}: {exc.strerror or exc}")
