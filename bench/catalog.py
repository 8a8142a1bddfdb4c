"""Bench row (i): the catalog over 100,000 archived tasks (first page, searches, a deep page).

The state is written straight with SQL in fetcher's own schema (made by fetcher
itself, so the triggers fill the search index as a run would): archiving
100,000 tasks first would measure nothing this row is about. Each query is timed
in this process, on a catalog opened once, as ``fetcher serve`` holds it; the
median of ``RUNS`` calls after one warm-up call.

    python bench/catalog.py [--tasks N] [--runs N]

:func:`measure` is what ``bench/run.py`` calls for workload ``i``; its
:class:`CatalogRow` keeps one list of timings per measure, so another measure
(the gallery's first page over HTTP) joins the row as one more entry.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

TASKS = 100_000
RUNS = 21
#: Targets, in seconds.
FIRST_PAGE_LIMIT = 0.200
SEARCH_LIMIT = 0.100
#: One task in about a hundred has it in its prompt.
RARE_WORD = "pig"
_WORDS = [
    "lighthouse",
    "dusk",
    "oil",
    "painting",
    "fox",
    "snow",
    "watercolour",
    "boat",
    "rainy",
    "street",
    "city",
    "glass",
    "portrait",
    "mountain",
    "river",
    "forest",
    "castle",
    "dragon",
    "robot",
    "garden",
    "ocean",
    "desert",
    "sunset",
    "neon",
    "cyberpunk",
    "cat",
    "dog",
    "horse",
    "bird",
    "flower",
    "tree",
    "bridge",
    "train",
    "night",
    "morning",
    "storm",
    "cloud",
    "moon",
    "star",
    "galaxy",
    "village",
    "market",
    "festival",
    "lantern",
    "temple",
    "ruins",
    "knight",
    "wizard",
    "sword",
    "shield",
    "crown",
]
_MODELS = (("GEM", "2.5"), ("Hunyuan", "3.0"), ("Kling", "2.1"))


@dataclass(slots=True)
class CatalogRow:
    """Row (i): seconds per call, by measure, and each measure's limit (None: shown only)."""

    tasks: int
    timings: dict[str, list[float]] = field(default_factory=dict)
    limits: dict[str, float | None] = field(default_factory=dict)
    build_seconds: float = 0.0
    state_bytes: int = 0

    def median(self, name: str) -> float:
        return statistics.median(self.timings[name])

    def lines(self) -> list[str]:
        """The row's table, as ``bench/run.py``'s report shows it."""
        out = [
            f"### (i) the catalog over {self.tasks:,} archived tasks",
            "",
            f"State built in {self.build_seconds:.1f} s, {self.state_bytes / 2**20:.0f} MiB "
            "(tasks, files, words and their FTS5 index). Median of each call's wall time.",
            "",
            "| measure | median | min | max | limit | met |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, values in self.timings.items():
            limit = self.limits.get(name)
            met = "n/a" if limit is None else ("yes" if self.median(name) < limit else "**no**")
            shown = "-" if limit is None else f"< {limit * 1000:.0f} ms"
            out.append(
                f"| {name} | {self.median(name) * 1000:.1f} ms | {min(values) * 1000:.1f} ms "
                f"| {max(values) * 1000:.1f} ms | {shown} | {met} |"
            )
        return [*out, ""]


def build_state(root: Path, tasks: int, seed: int = 1) -> None:
    """An archive at ``root`` whose state holds ``tasks`` archived tasks, one image each."""
    from fetcher.archive import Archive
    from fetcher.state import StateDB

    archive = Archive(root)
    archive.prepare()
    with StateDB(archive.db_path):
        pass  # the schema, made by fetcher
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    conn = sqlite3.connect(archive.db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        for n in range(tasks):
            _insert_task(conn, rng, n, start + timedelta(seconds=n * 300))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('text_index', 'whole')")
        conn.execute("COMMIT")
    finally:
        conn.close()


def _insert_task(conn: sqlite3.Connection, rng: random.Random, n: int, created: datetime) -> None:
    task_id = f"1392336703-AigcImageTask-{rng.getrandbits(128):032x}t"
    stamp = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    folder = f"AigcImageTask/{created:%Y/%m/%d}/{task_id}"
    words = rng.sample(_WORDS, 8)
    if n % 100 == 0:
        words[3] = RARE_WORD
    model, version = _MODELS[n % len(_MODELS)]
    conn.execute(
        "INSERT INTO tasks (task_id, state, final, task_type, created_at, finished_at, dir, "
        "first_seen, updated_at) VALUES (?, 'archived', 1, 'AigcImageTask', ?, ?, ?, ?, ?)",
        (task_id, stamp, stamp, folder, stamp, stamp),
    )
    conn.execute(
        "INSERT INTO task_text (task_id, prompt, negative_prompt, model, model_version) "
        "VALUES (?, ?, 'blur, distorted', ?, ?)",
        (task_id, "a " + " ".join(words), model, version),
    )
    conn.execute(
        "INSERT INTO files (task_id, idx, url, state, path, size, sha256, content_type) "
        "VALUES (?, 0, 'https://files.example/x.png', 'done', ?, 262144, ?, 'image/png')",
        (task_id, f"{folder}/00.png", f"{n:064x}"),
    )


def _time(call: Callable[[], object], runs: int) -> list[float]:
    call()  # warm the page cache, as a running server would be
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def measure(work: Path, tasks: int = TASKS, runs: int = RUNS) -> CatalogRow:
    """Build the state under ``work`` and time the catalog's queries on it."""
    from fetcher.catalog import Query, reading

    root = work / "catalog-archive"
    started = time.perf_counter()
    build_state(root, tasks)
    row = CatalogRow(tasks, build_seconds=time.perf_counter() - started)
    row.state_bytes = sum(p.stat().st_size for p in (root / ".fetcher").glob("state.sqlite*"))
    with reading(root) as catalog:
        deep = catalog.find(Query(limit=1000))
        for _ in range(tasks // 2000):  # about half way down the list
            deep = catalog.find(Query(limit=1000, after=deep.next))
        measures: list[tuple[str, Query, float | None]] = [
            ("first page, find(Query())", Query(), FIRST_PAGE_LIMIT),
            (f"search '{RARE_WORD}' (1 task in 100)", Query(text=RARE_WORD), SEARCH_LIMIT),
            ("search 'dragon knight' (2 common words)", Query(text="dragon knight"), SEARCH_LIMIT),
            ("search 'zebra' (no match)", Query(text="zebra"), SEARCH_LIMIT),
            ("search 'distorted' (every task)", Query(text="distorted"), None),
            ("page half way down (keyset cursor)", Query(after=deep.next), None),
            (
                "first page, --state archived --model Kling",
                Query(states=("archived",), model="Kling"),
                None,
            ),
            ("facets", None, None),
        ]
        for name, query, limit in measures:
            call = catalog.facets if query is None else (lambda q=query: catalog.find(q))
            row.timings[name] = _time(call, runs)
            row.limits[name] = limit
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fetcher-catalog-") as work:
        row = measure(Path(work), args.tasks, args.runs)
    print("\n".join(row.lines()))
    return (
        0
        if all(limit is None or row.median(name) < limit for name, limit in row.limits.items())
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
