"""One HTTP client on one workload, in a fresh process: what ``bench/clients.py`` times.

The parent runs this file with the interpreter that has the client installed (the
project's venv for aiohttp and fetcher's old client, another venv for the httpx
family), so every measurement starts cold and pays the same process costs. Only
the standard library is imported at the top: each runner imports its library and
builds its client before the clock starts, so the time covers the requests alone.

    python bench/clients_child.py --client aiohttp --urls URLS [--bearer KEY] [--whole]

Prints one JSON object: seconds, requests, body bytes and the versions measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: Largest piece a streamed body is read in, where the client lets the caller choose.
CHUNK = 256 * 1024
#: Generous: a timeout firing would be a failed run, not a slow one.
TIMEOUT = 120.0
#: The old client's whole-body read refuses anything larger (a JSON answer is ~3 KiB).
JSON_LIMIT = 1024 * 1024
CLIENTS = ("legacy", "aiohttp", "httpx-aiohttp", "httpx2", "httpx")
#: Distributions whose versions each client's result names.
DISTRIBUTIONS = {
    "legacy": (),
    "aiohttp": ("aiohttp",),
    "httpx-aiohttp": ("httpx", "httpx-aiohttp", "aiohttp"),
    "httpx2": ("httpx2", "httpcore2"),
    "httpx": ("httpx", "httpcore"),
}

#: One GET: returns the body's length once it has all been read.
Fetch = Callable[[str], Awaitable[int]]


class BadStatus(Exception):
    """A response other than 200: the run is void."""


@dataclass(frozen=True, slots=True)
class Job:
    """What to request and how: the same for every client."""

    urls: list[str]
    headers: dict[str, str]
    #: Read each body whole, as the query API's answers are; else stream and discard it.
    whole: bool
    connections: int


@dataclass(frozen=True, slots=True)
class Timed:
    seconds: float
    requests: int
    bytes: int


def check(status: int, url: str) -> None:
    if status != 200:
        raise BadStatus(f"{url}: HTTP {status}")


async def drive(job: Job, fetch: Fetch) -> Timed:
    """``connections`` workers take the next URL until none is left, so that many are in flight.

    Workers rather than a task per URL: every client then pays for the same 16
    tasks, and none for 2,000 tasks waiting on a semaphore.
    """
    urls = iter(job.urls)
    done = [0, 0]

    async def worker() -> None:
        for url in urls:
            size = await fetch(url)  # not `+= await`: that reads the total before awaiting
            done[0] += 1
            done[1] += size

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(job.connections)))
    return Timed(time.perf_counter() - start, done[0], done[1])


async def run_aiohttp(job: Job) -> Timed:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=job.connections)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT, sock_read=TIMEOUT)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=job.headers
    ) as session:

        async def fetch(url: str) -> int:
            async with session.get(url) as response:
                check(response.status, url)
                if job.whole:
                    return len(await response.read())
                size = 0
                async for chunk in response.content.iter_chunked(CHUNK):
                    size += len(chunk)
                return size

        return await drive(job, fetch)


async def run_httpx(job: Job, httpx: Any, transport: Any = None) -> Timed:
    """httpx and its fork share one API; ``transport`` swaps httpcore for another.

    ``httpx`` is the module (httpx or httpx2), typed ``Any``: neither is installed
    where mypy checks this file. ``aiter_raw()`` without a size yields the pieces
    as the transport reads them, where a size would copy them into new buffers.
    """
    limits = httpx.Limits(
        max_connections=job.connections, max_keepalive_connections=job.connections
    )
    async with httpx.AsyncClient(
        limits=limits, timeout=TIMEOUT, headers=job.headers, trust_env=False, transport=transport
    ) as client:

        async def fetch(url: str) -> int:
            if job.whole:
                response = await client.get(url)
                check(response.status_code, url)
                return len(response.content)
            async with client.stream("GET", url) as response:
                check(response.status_code, url)
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                return size

        return await drive(job, fetch)


async def run_legacy(job: Job, package_root: Path) -> Timed:
    """fetcher's own client, from the package the parent rebuilt out of git history."""
    sys.path.insert(0, str(package_root))
    # Not importable where mypy runs: the parent writes the package at run time.
    from legacyhttp.httpclient import HttpClient  # type: ignore[import-not-found]

    headers = job.headers
    async with HttpClient(timeout=TIMEOUT, connections=job.connections, headers=headers) as client:

        async def fetch(url: str) -> int:
            async with client.stream(url) as response:
                check(response.status, url)
                if job.whole:
                    return len(await response.read(JSON_LIMIT))
                size = 0
                async for piece in response.iter_raw(CHUNK):
                    size += len(piece)
                return size

        return await drive(job, fetch)


async def run(client: str, job: Job, legacy_root: Path | None) -> Timed:
    if client == "aiohttp":
        return await run_aiohttp(job)
    if client == "legacy":
        if legacy_root is None:
            raise SystemExit("clients_child: --client legacy needs --legacy-root")
        return await run_legacy(job, legacy_root)
    if client == "httpx2":
        import httpx2  # type: ignore[import-not-found]  # lives in the competitors' venv

        return await run_httpx(job, httpx2)
    import httpx  # type: ignore[import-not-found]  # lives in the competitors' venv

    if client == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport  # type: ignore[import-not-found]  # ditto

        limits = httpx.Limits(max_connections=job.connections)
        return await run_httpx(job, httpx, AiohttpTransport(limits=limits))
    return await run_httpx(job, httpx)


def versions(client: str) -> dict[str, str]:
    found = {name: metadata.version(name) for name in DISTRIBUTIONS[client]}
    return {**found, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--client", required=True, choices=CLIENTS)
    parser.add_argument("--urls", required=True, type=Path, help="file with one URL a line")
    parser.add_argument("--bearer", default="", help="send Authorization: Bearer KEY")
    parser.add_argument("--whole", action="store_true", help="read bodies whole (JSON)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--legacy-root", type=Path, help="folder holding legacyhttp/")
    args = parser.parse_args(argv)
    urls = args.urls.read_text(encoding="utf-8").split()
    headers = {"Authorization": f"Bearer {args.bearer}"} if args.bearer else {}
    job = Job(urls, headers, args.whole, args.connections)
    timed = asyncio.run(run(args.client, job, args.legacy_root))
    result = {
        "client": args.client,
        "seconds": timed.seconds,
        "requests": timed.requests,
        "bytes": timed.bytes,
        "versions": versions(args.client),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
