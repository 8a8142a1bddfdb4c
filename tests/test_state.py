"""The state database's rules: steps never span an await, a failed commit is never lost,
the schema moves by ordered migrations, and an SQLite too old is refused at open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import add_image_task, process_env, run_cli, task_id

from fetcher.errors import ArchiveError, StepSpansAwait
from fetcher.replica import Replica
from fetcher.state import MIN_SQLITE, SCHEMA_VERSION, StateDB, require_sqlite


def committed(path: Path) -> dict[str, str]:
    """Task states another connection sees: only what was committed."""
    uri = f"{path.as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return {str(t): str(s) for t, s in conn.execute("SELECT task_id, state FROM tasks")}


def _insert(conn: sqlite3.Connection, task: str) -> None:
    conn.execute(
        "INSERT INTO tasks (task_id, state, first_seen, updated_at) "
        "VALUES (?, 'pending', 'x', 'x')",
        (task,),
    )


@pytest.mark.parametrize(
    "grouped", [pytest.param(True, id="grouped"), pytest.param(False, id="alone")]
)
def test_step_that_awaits_is_refused_and_rolled_back(tmp_path: Path, grouped: bool) -> None:
    """A step whose body awaits raises StepSpansAwait and lands nothing; other steps still do."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db:
            group = db.grouped(asyncio.get_running_loop()) if grouped else contextlib.nullcontext()
            with group:
                db.mark_archived("before")
                with pytest.raises(StepSpansAwait), db.atomic() as conn:
                    _insert(conn, "half")
                    await asyncio.sleep(0)
                    _insert(conn, "other-half")
                db.mark_archived("after")

    asyncio.run(scenario())
    assert committed(path) == {"before": "archived", "after": "archived"}


def test_step_interleaved_by_another_coroutine_is_refused(tmp_path: Path) -> None:
    """A coroutine whose step begins while another coroutine's step awaits gets StepSpansAwait."""
    path = tmp_path / "state.sqlite"
    errors: list[BaseException] = []

    async def awaiting_step(db: StateDB, entered: asyncio.Event) -> None:
        with db.atomic() as conn:
            _insert(conn, "slow")
            entered.set()
            await asyncio.sleep(0)

    async def quick_step(db: StateDB, entered: asyncio.Event) -> None:
        await entered.wait()
        db.mark_archived("quick")

    async def scenario() -> None:
        with StateDB(path) as db, db.grouped(asyncio.get_running_loop()):
            entered = asyncio.Event()
            results = await asyncio.gather(
                awaiting_step(db, entered), quick_step(db, entered), return_exceptions=True
            )
            errors.extend(r for r in results if isinstance(r, BaseException))

    asyncio.run(scenario())
    assert [type(e) for e in errors] == [StepSpansAwait, StepSpansAwait]
    assert committed(path) == {}


class _CommitFails:
    """A connection whose COMMIT fails (as on a full disk); everything else is the real one."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_last_group_commit_that_fails_is_raised_over_the_error_under_way(tmp_path: Path) -> None:
    """The run's last COMMIT failing while another error leaves the group is raised, not lost."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db:
            real = db.conn
            try:
                with db.grouped(asyncio.get_running_loop()):
                    db._conn = _CommitFails(real)  # type: ignore[assignment]
                    db.mark_archived("t1")
                    raise RuntimeError("the run stopped")
            finally:
                db._conn = real

    with pytest.raises(ArchiveError, match="disk is full") as caught:
        asyncio.run(scenario())
    assert isinstance(caught.value.__context__, RuntimeError)
    assert committed(path) == {}


def test_group_commit_failure_nobody_heard_of_is_raised_at_close(tmp_path: Path) -> None:
    """A commit failing in a loop callback, with no step after it, is raised at close."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db:
            real = db.conn
            db._loop = asyncio.get_running_loop()  # a group whose end never came
            db._conn = _CommitFails(real)  # type: ignore[assignment]
            db.mark_archived("t1")
            await asyncio.sleep(0)  # the turn's COMMIT fails; no further step
            db._loop = None
            db._conn = real

    with pytest.raises(ArchiveError, match="disk is full"):
        asyncio.run(scenario())


# -- migrations ---------------------------------------------------------------------------

#: The schema as the first releases made it (84be717): no tasks_by_dir, no lists.
_FIRST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY, state TEXT NOT NULL, final INTEGER NOT NULL DEFAULT 0,
    task_type TEXT, created_at TEXT, finished_at TEXT, dir TEXT, reason TEXT,
    first_seen TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE INDEX tasks_by_state ON tasks (state);
CREATE TABLE files (
    task_id TEXT NOT NULL REFERENCES tasks (task_id), idx INTEGER NOT NULL, url TEXT NOT NULL,
    expire_time TEXT, md5 TEXT, state TEXT NOT NULL, path TEXT, size INTEGER, sha256 TEXT,
    content_type TEXT, reason TEXT, PRIMARY KEY (task_id, idx)
);
INSERT INTO meta VALUES ('schema_version', '1');
"""
#: The schema just before list files were remembered (76e81ef^): no lists table.
_BEFORE_LISTS = _FIRST_SCHEMA + "CREATE INDEX tasks_by_dir ON tasks (dir COLLATE NOCASE);\n"


def _old_archive(root: Path, schema: str, archived: str) -> Path:
    """An archive whose state an older fetcher wrote: ``archived`` is held, one file done."""
    db = root / ".fetcher" / "state.sqlite"
    (root / ".fetcher" / "work").mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(schema)
        conn.execute(
            "INSERT INTO tasks VALUES (?, 'archived', 1, 'AigcImageTask', NULL, NULL, ?, NULL,"
            " '2026-11-24T00:00:00Z', '2026-11-24T00:00:00Z')",
            (archived, f"old/{archived}"),
        )
        conn.execute(
            "INSERT INTO files VALUES (?, 0, 'http://x/0.png', NULL, NULL, 'done', ?, 3, 'ab',"
            " 'image/png', NULL)",
            (archived, f"old/{archived}/00.png"),
        )
    return db


@pytest.mark.parametrize(
    "schema",
    [pytest.param(_BEFORE_LISTS, id="before-lists"), pytest.param(_FIRST_SCHEMA, id="first")],
)
def test_state_of_an_older_schema_is_migrated_by_a_run(
    replica: Replica, tmp_path: Path, schema: str
) -> None:
    """A run over an archive an older fetcher made migrates it, keeps its rows, and bookmarks."""
    held, new = task_id(1), task_id(2)
    add_image_task(replica, new)
    archive = tmp_path / "archive"
    db = _old_archive(archive, schema, held)
    listing = tmp_path / "ids.txt"
    listing.write_text(f"{held}\n{new}\n")

    result = run_cli(["fetch", str(listing), "--json"], env=process_env(replica, archive, tmp_path))

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["already_archived"], summary["archived"]) == (1, 1)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT path FROM files WHERE task_id = ?", (held,)).fetchall() == [
            (f"old/{held}/00.png",)
        ]
        assert conn.execute("SELECT lines, ids FROM lists").fetchall() == [(2, 2)]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"tasks_by_dir", "lists"} <= names


def test_state_of_a_newer_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    """A database a newer fetcher migrated further is refused at open: upgrade fetcher."""
    path = tmp_path / "state.sqlite"
    with StateDB(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    for readonly in (False, True):
        with (
            pytest.raises(ArchiveError, match="upgrade fetcher") as caught,
            StateDB(path, readonly=readonly),
        ):
            pass
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("version", "refused"),
    [
        pytest.param((3, 34, 1), True, id="3.34.1"),
        pytest.param((3, 31, 1), True, id="3.31.1"),
        pytest.param(MIN_SQLITE, False, id="minimum"),
        pytest.param((3, 45, 0), False, id="newer"),
    ],
)
def test_sqlite_older_than_needed_is_refused_in_one_line(
    version: tuple[int, int, int], refused: bool
) -> None:
    """An SQLite without RETURNING (before 3.35) is refused with one line naming both versions."""
    if not refused:
        require_sqlite(version)
        return
    with pytest.raises(ArchiveError) as caught:
        require_sqlite(version)
    message = str(caught.value)
    assert "\n" not in message
    assert ".".join(map(str, version)) in message
    assert "3.35.0" in message


def test_grouped_commit_that_fails_is_raised_by_the_next_step(tmp_path: Path) -> None:
    """A COMMIT failing in a loop callback rolls the turn back and stops the next step."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db:
            real = db.conn
            with (
                pytest.raises(ArchiveError, match="disk is full"),
                db.grouped(asyncio.get_running_loop()),
            ):
                db._conn = _CommitFails(real)  # type: ignore[assignment]
                db.mark_archived("t1")
                await asyncio.sleep(0)  # the turn ends: its COMMIT fails
                assert not real.in_transaction
                with pytest.raises(ArchiveError, match="disk is full"):
                    db.mark_archived("t2")
            db._conn = real
        assert committed(path) == {}

    asyncio.run(scenario())
