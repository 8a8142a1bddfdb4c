"""The gallery over HTTP on a large archive: the grid's first page and a search.

Builds an archive whose state holds ``--tasks`` archived tasks (100,000 by default;
written straight with sqlite3 in fetcher's own schema, each with a prompt, a model
and one file row, then indexed by ``fetcher.index`` as an upgraded archive's first
fetch indexes it), starts
``fetcher serve``'s application on a loopback port, and times over real HTTP
(``http.client``, a new connection each time, as a browser's first visit):

- ``/``: the grid's first page, the whole HTML (the page of cards, facets, state counts);
- ``/api/cards?q=...``: a search for a word in one prompt in a hundred;
- ``/api/cards?q=...&after=...``: the next page of that search.

Each is asked once to warm up, then ``--runs`` times; the median and the worst are
printed in milliseconds. The target: first page under 200 ms, a search under 100 ms.

    python bench/gallery.py [--tasks 100000] [--runs 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fetcher.gallery import GalleryOptions, serve
from fetcher.index import build_index
from fetcher.state import StateDB

MODELS = (("GEM", "2.5"), ("Hunyuan", "3.0"), ("Kling", "2.1"), ("Seedream", "4.0"))
WORDS = ("harbour", "forest", "neon", "desert", "glacier", "market", "orchard", "temple")
NEEDLE = "lighthouse"


def task_id(n: int) -> str:
    return f"1392336703-AigcImageTask-{hashlib.md5(f'g{n}'.encode()).hexdigest()}t"  # noqa: S324


def build_archive(root: Path, tasks: int) -> Path:
    """An archive of ``tasks`` archived tasks, one PNG row each, prompts that vary."""
    meta = root / ".fetcher"
    meta.mkdir(parents=True)
    db_path = meta / "state.sqlite"
    with StateDB(db_path):
        pass  # the current schema, migrations and triggers included, made by fetcher
    start = datetime(2026, 1, 1, tzinfo=UTC)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        task_rows, file_rows = [], []
        for n in range(tasks):
            tid = task_id(n)
            made = (start + timedelta(seconds=97 * n)).strftime("%Y-%m-%dT%H:%M:%SZ")
            model, version = MODELS[n % len(MODELS)]
            words = f"{WORDS[n % len(WORDS)]} {WORDS[(n // 8) % len(WORDS)]} number {n}"
            prompt = f"a {NEEDLE} by the {words}" if n % 100 == 0 else f"a study of {words}"
            detail = {
                "status": "FINISH",
                "input": {
                    "ModelName": model,
                    "ModelVersion": version,
                    "Prompt": prompt,
                    "NegativePrompt": "blur",
                },
            }
            folder = f"AigcImageTask/{made[:4]}/{made[5:7]}/{made[8:10]}/{tid}"
            task_rows.append(
                (tid, made, made, folder, made, made, json.dumps(detail, separators=(",", ":")))
            )
            file_rows.append((tid, f"https://files.example/{tid}.png", f"{folder}/00.png"))
        conn.executemany(
            "INSERT INTO tasks (task_id, state, final, task_type, created_at, finished_at, dir, "
            "first_seen, updated_at, detail) VALUES (?, 'archived', 1, 'AigcImageTask', ?, ?, ?, "
            "?, ?, ?)",
            task_rows,
        )
        conn.executemany(
            "INSERT INTO files (task_id, idx, url, state, path, size, sha256, content_type) "
            "VALUES (?, 0, ?, 'done', ?, 4096, '00', 'image/png')",
            file_rows,
        )
        # These rows came in behind fetcher's back: its index is no longer whole.
        conn.execute("DELETE FROM meta WHERE key = 'text_index'")
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # as fetcher leaves it
    finally:
        conn.close()
    with StateDB(db_path) as db:
        build_index(db, _Quiet())  # as the first fetch after an upgrade does
    return root


class _Quiet:
    def indexed(self, done: int, total: int) -> None:
        pass


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


def timed(address: str, target: str, runs: int) -> tuple[float, float]:
    """Median and worst milliseconds of ``runs`` GETs after one to warm up."""
    get(address, target)
    took = [get(address, target)[0] * 1000 for _ in range(runs)]
    return statistics.median(took), max(took)


def measure(archive: Path, runs: int) -> dict[str, tuple[float, float]]:
    with gallery(archive) as address:
        _, body = get(address, f"/api/cards?q={NEEDLE}")
        following = json.loads(body)["next"]
        return {
            "first page (/)": timed(address, "/", runs),
            "first page (/api/cards)": timed(address, "/api/cards", runs),
            f"search ({NEEDLE})": timed(address, f"/api/cards?q={NEEDLE}", runs),
            "search, next page": timed(address, f"/api/cards?q={NEEDLE}&after={following}", runs),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="build the archive here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch) / "archive"
        began = time.perf_counter()
        if not (root / ".fetcher" / "state.sqlite").exists():
            build_archive(root, args.tasks)
        print(f"archive of {args.tasks:,} tasks ready in {time.perf_counter() - began:.1f} s")
        for name, (median, worst) in measure(root, args.runs).items():
            print(f"{name:28} median {median:7.1f} ms   worst {worst:7.1f} ms   ({args.runs} runs)")


if __name__ == "__main__":
    main()
