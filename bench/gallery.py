"""Bench row (i), over HTTP: ``fetcher serve``'s first page and a search, 100,000 tasks.

``bench/catalog.py`` builds the row's archive and times the catalog's queries in
process; this adds what a browser waits for: the gallery's application is started
on a loopback port (in this process, on a loop thread of its own), and each GET
is timed over real HTTP with ``http.client``, a new connection each time, to the
last byte:

- ``/``: the grid's whole first page (a page of cards, the filters' task types and
  models, the state counts), against the 200 ms target;
- ``/api/cards``: the cards the grid's script asks for as it scrolls;
- ``/api/cards?q=pig``: a search for a word in one prompt in a hundred, against the
  100 ms target, and its next page by the cursor.

One warm-up call, then ``runs``; :func:`add_http` adds the timings to a
:class:`~catalog.CatalogRow`, which ``bench/run.py`` reports as row (i).

    python bench/gallery.py [--tasks 100000] [--runs 21]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from catalog import FIRST_PAGE_LIMIT, RARE_WORD, RUNS, SEARCH_LIMIT, TASKS, CatalogRow, build_state


@contextmanager
def gallery(archive: Path) -> Iterator[str]:
    """The gallery on its own event loop in a thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    ready: list[str] = []
    started = threading.Event()

    def on_ready(url: str) -> None:
        ready.append(url)
        started.set()

    async def run() -> None:
        from fetcher.gallery import GalleryOptions, serve

        try:
            await serve(GalleryOptions(archive, port=0), stop, on_ready)
        finally:
            started.set()

    done = asyncio.run_coroutine_threadsafe(run(), loop)
    started.wait(60)
    if not ready:
        done.result()
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        done.result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def get(address: str, target: str) -> tuple[float, bytes]:
    """Seconds for one GET on a new connection, to the last byte; and the body."""
    host, port = address.removeprefix("http://").rstrip("/").split(":")
    began = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", target)
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise SystemExit(f"{target}: HTTP {answer.status}: {body[:200]!r}")
    finally:
        connection.close()
    return time.perf_counter() - began, body


def add_http(row: CatalogRow, root: Path, runs: int = RUNS) -> None:
    """Time the gallery over HTTP on the archive at ``root``; the timings join ``row``."""
    with gallery(root) as address:
        following = json.loads(get(address, f"/api/cards?q={RARE_WORD}")[1])["next"]
        measures = [
            ("first page over HTTP, GET /", "/", FIRST_PAGE_LIMIT),
            ("first page over HTTP, GET /api/cards", "/api/cards", FIRST_PAGE_LIMIT),
            (f"search '{RARE_WORD}' over HTTP", f"/api/cards?q={RARE_WORD}", SEARCH_LIMIT),
            (
                f"search '{RARE_WORD}' over HTTP, next page",
                f"/api/cards?q={RARE_WORD}&after={following}",
                SEARCH_LIMIT,
            ),
        ]
        for name, target, limit in measures:
            get(address, target)  # warm up, as a running server would be
            row.timings[name] = [get(address, target)[0] for _ in range(runs)]
            row.limits[name] = limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fetcher-gallery-") as work:
        root = Path(work) / "archive"
        started = time.perf_counter()
        build_state(root, args.tasks)
        row = CatalogRow(args.tasks, build_seconds=time.perf_counter() - started)
        add_http(row, root, args.runs)
    print("\n".join(row.lines()))
    return (
        0 if all(limit is None or row.median(n) < limit for n, limit in row.limits.items()) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
