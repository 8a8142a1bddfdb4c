"""Bench row (g): four runs sharing one PostgreSQL state, against one run with as many downloads.

``run.py`` measures the row; this module holds what is particular to it: the
PostgreSQL cluster (``tests/pgserver.py``'s throwaway one: ``initdb`` and
``pg_ctl`` on a free loopback port, as the ``postgres`` user when run as root,
stopped by a watcher even if the harness is killed), a fresh database for every
measure, and the checks of what the runs left between them: the state's rows,
the archive's files and their SHA-256, and how many times nginx served each file.

The files are served at :data:`RATE` per request by nginx's ``limit_rate`` (a
``location`` of their own in ``run.py``'s configuration), so the row measures how
the runs share the work, not how fast one process moves bytes: 16 downloads at
once fill the same pipe whether one run makes them or four runs make four each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where ``pgserver.py`` is: the tests' cluster, started as they start it.
TESTS = Path(__file__).resolve().parent.parent / "tests"

ROW = "g"
#: nginx's ``limit_rate`` for the row's files: 256 KiB in a quarter of a second, so
#: 2,000 of them over 16 connections take about 31 s.
RATE = "1m"
#: ... in pieces this small (``sendfile_max_chunk``). nginx sends a request the first
#: second's worth of bytes at once and only waits after each write, for as long as
#: that write's bytes take at the rate: with whole files as one write, a 256 KiB
#: file under a 1 MiB/s limit would go out at once and nothing would be slowed.
CHUNK = "16k"
#: How many runs share the state, and each one's ``--downloads``.
RUNS = 4
SHARED_DOWNLOADS = 4
#: One run's ``--downloads``: as many as the four runs have together.
SINGLE_DOWNLOADS = RUNS * SHARED_DOWNLOADS
#: The two parts, as the report's table names them.
SINGLE = "fetcher"
SHARED = f"{RUNS} runs"
#: Tasks in ``--quick``.
QUICK_TASKS = 200
#: What a run's ``--json`` summary counts every task it was given under, exactly once.
OUTCOMES = ("archived", "already_archived", "elsewhere", "pending", "failed", "skipped")
#: The sidecar's name (``fetcher/stores/local.py``'s ``SIDECAR_NAME``).
SIDECAR = "task.json"


def missing() -> list[str]:
    """What the row needs beyond the rest: PostgreSQL's server, and psycopg in this Python."""
    found = list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    out = [] if found else ["PostgreSQL's server (Debian package 'postgresql')"]
    if importlib.util.find_spec("psycopg") is None:
        out.append(f"psycopg in {sys.executable} (pip install -e '.[postgres]')")
    return out


class Cluster:
    """The row's PostgreSQL server: a database per measure, each run given its URL.

    ``pgserver`` (and psycopg, which it imports) is imported here, so the other rows
    run without fetcher's ``postgres`` extra.
    """

    def __init__(self) -> None:
        if str(TESTS) not in sys.path:
            sys.path.append(str(TESTS))
        import pgserver

        self.user = pgserver.USER
        self.server: Any = pgserver.PostgresServer()

    def __enter__(self) -> Cluster:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def database(self) -> str:
        """A new, empty database's URL, without the password (it goes in ``PGPASSWORD``)."""
        name = self.server.database().rsplit("/", 1)[1]
        return f"postgresql://{self.user}@127.0.0.1:{self.server.port}/{name}"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` and the password, which libpq reads from ``PGPASSWORD``."""
        return {**base, "PGPASSWORD": self.server.password}

    def counts(self, url: str) -> tuple[int, int, int]:
        """Archived tasks, files done, and leases or runs left behind, in ``url``'s database."""
        import psycopg

        with psycopg.connect(url, password=self.server.password) as conn:
            tasks = conn.execute("SELECT COUNT(*) FROM tasks WHERE state = 'archived'").fetchone()
            files = conn.execute("SELECT COUNT(*) FROM files WHERE state = 'done'").fetchone()
            left = conn.execute(
                "SELECT (SELECT COUNT(*) FROM leases) + (SELECT COUNT(*) FROM runs)"
            ).fetchone()
        tasks_n, files_n, left_n = (int(row[0]) if row else -1 for row in (tasks, files, left))
        return tasks_n, files_n, left_n


def expected_hashes(ids: Sequence[str], files: Sequence[Path]) -> dict[str, str]:
    """Each task's file's SHA-256, the task's ID to it (the lists are in the same order)."""
    return {tid: sha256(path) for tid, path in zip(ids, files, strict=True)}


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    """What one measure's archive folder holds, against what was served."""

    files: int
    sidecars: int
    right: int  # files whose SHA-256 is the served file's

    def problem(self, tasks: int) -> str:
        if (self.files, self.sidecars, self.right) != (tasks, tasks, tasks):
            return (
                f"the archive holds {self.files} files ({self.right} with the right SHA-256) "
                f"and {self.sidecars} sidecars, wanted {tasks} of each"
            )
        return ""


def check_archive(folder: Path, hashes: dict[str, str]) -> Stored:
    """Every task's folder (named by its ID) with one file and a sidecar, the file whole."""
    files = sidecars = right = 0
    for sidecar in folder.rglob(SIDECAR):
        if ".fetcher" in sidecar.parts:
            continue
        sidecars += 1
        want = hashes.get(sidecar.parent.name)
        for path in sidecar.parent.iterdir():
            if path.name != SIDECAR and path.is_file():
                files += 1
                right += want is not None and sha256(path) == want
    return Stored(files, sidecars, right)


@dataclass(frozen=True, slots=True)
class Served:
    """The file host's requests during one measure, counted per path."""

    gets: int
    paths: int
    twice: int  # paths requested more than once
    never: int  # paths of the list never requested

    def problem(self) -> str:
        if self.twice or self.never:
            return f"{self.twice} files requested more than once, {self.never} never"
        return ""


def count_gets(lines: Sequence[str], paths: Sequence[str]) -> Served:
    """nginx's ``bench`` log lines (status, method, URI, bytes, auth) counted by path."""
    per_path = Counter(line.split()[2] for line in lines if line.split()[1:2] == ["GET"])
    twice = sum(1 for n in per_path.values() if n > 1)
    never = sum(1 for path in paths if path not in per_path)
    return Served(sum(per_path.values()), len(per_path), twice, never)


@dataclass(frozen=True, slots=True)
class Process:
    """One ``fetcher fetch`` of a measure: how it ended and what its summary says."""

    wall: float
    rss_kib: int
    exit_code: int
    counts: dict[str, int]
    #: Tasks it finished from the queue before its list named them to it (another run
    #: had asked): counted under their outcome, and again when the list names them.
    from_queue: int
    files_downloaded: int

    @property
    def accounted(self) -> int:
        """The tasks its summary counts: every one it was given, if it adds up."""
        return sum(self.counts.values()) - self.from_queue

    @classmethod
    def of(
        cls, wall: float, rss_kib: int, exit_code: int, summary: dict[str, object] | None
    ) -> Process:
        """From how the process ended and its summary (None: it printed none)."""
        summary = summary or {}
        counts = {key: _int(summary.get(key)) for key in OUTCOMES}
        from_queue, files = (_int(summary.get(k)) for k in ("from_queue", "files_downloaded"))
        return cls(wall, rss_kib, exit_code, counts, from_queue, files)


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1


@dataclass(frozen=True, slots=True)
class Part:
    """One measure: one run or the four, over a fresh database and archive folder."""

    part: str
    run: int
    wall: float  # from the first start to the last exit
    processes: list[Process]
    archived_rows: int
    files_done: int
    left: int  # leases and runs still in the state after the last exit
    stored: Stored
    served: Served
    note: str


@dataclass(slots=True)
class FleetRow:
    """Row (g): every measure, for the report's table and targets."""

    tasks: int
    parts: list[Part] = field(default_factory=list)

    def walls(self, part: str) -> list[float]:
        return [p.wall for p in self.parts if p.part == part and not p.note]

    def lines(self) -> list[str]:
        """Every process of every measure, and what the state, archive and file host say."""
        out = [
            f"#### ({ROW}) each process: its summary (`--json`), the state, the archive, "
            "the file host",
            "",
            "| run | part | set wall s | process | wall s | peak RSS MiB | archived | "
            "already | elsewhere | pending | failed | skipped | from queue | sum - from queue "
            "| files downloaded |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
            "---: | ---: | ---: | ---: |",
        ]
        for p in self.parts:
            for n, proc in enumerate(p.processes, 1):
                c = proc.counts
                out.append(
                    f"| {p.run + 1} | {p.part} | {p.wall:.2f} | {n} | {proc.wall:.2f} | "
                    f"{proc.rss_kib / 1024:.1f} | {c['archived']} | {c['already_archived']} | "
                    f"{c['elsewhere']} | {c['pending']} | {c['failed']} | {c['skipped']} | "
                    f"{proc.from_queue} | {proc.accounted} | {proc.files_downloaded} |"
                )
        out += [
            "",
            "| run | part | archived rows | files done | leases + runs left | archive files "
            "(SHA-256 right) + sidecars | GETs | paths | requested twice | never | ok |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in self.parts:
            s, g = p.stored, p.served
            out.append(
                f"| {p.run + 1} | {p.part} | {p.archived_rows} | {p.files_done} | {p.left} | "
                f"{s.files} ({s.right}) + {s.sidecars} | {g.gets} | {g.paths} | {g.twice} | "
                f"{g.never} | {'yes' if not p.note else p.note} |"
            )
        return [*out, ""]

    def targets(self) -> list[tuple[str, str, str, str, bool | None]]:
        """(workload, goal, measured, limit, met) for each of the row's targets."""
        single, shared = self.walls(SINGLE), self.walls(SHARED)
        goal = f"{SHARED}' wall (first start to last exit) <= 1.1x one run's"
        if single and shared:
            one, four = statistics.median(single), statistics.median(shared)
            wall = (ROW, goal, f"{four:.3g} s", f"{1.1 * one:.3g} s", four <= 1.1 * one)
        else:
            wall = (ROW, goal, "not measured (a run failed)", "-", None)
        counted = [p for p in self.parts if p.part == SHARED]
        twice = sum(p.served.twice for p in counted)
        once = all(
            p.archived_rows == self.tasks and not p.stored.problem(self.tasks) for p in counted
        )
        summed = all(proc.accounted == self.tasks for p in counted for proc in p.processes)
        archived = f"{SHARED}: every task archived once (state rows, files, SHA-256)"
        adds_up = f"{SHARED}: each summary adds up to the tasks given"
        return [
            wall,
            (ROW, f"{SHARED}: files requested twice (nginx's log)", str(twice), "0", twice == 0),
            (ROW, archived, "yes" if once else "no", "yes", once),
            (ROW, adds_up, "yes" if summed else "no", "yes", summed),
        ]
