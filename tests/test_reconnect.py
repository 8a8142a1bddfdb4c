"""A PostgreSQL state whose server goes away mid-run: the run connects again and goes on,
or, when the server stays away past ``--state-reconnect``, stops in one line.

The server is restarted (or stopped) under real runs; nothing is mocked.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from conftest import (
    add_image_task,
    archived_files,
    process_env,
    run_cli,
    start_cli,
    task_id,
    wait_for,
)

from fetcher.config import Settings
from fetcher.errors import ArchiveError
from fetcher.replica import Fault, Replica
from fetcher.state import DatabaseUrl, redone
from fetcher.state.postgres import PostgresState
from tests.pgserver import PostgresServer

#: Tasks of a run the server restarts under.
TASKS = 12


def _archived(url: str) -> list[str]:
    """The tasks the database records archived, each as often as it holds the row."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT task_id FROM tasks WHERE state = 'archived'").fetchall()
    return sorted(str(r[0]) for r in rows)


def _slow_tasks(replica: Replica, count: int) -> tuple[list[str], dict[str, bytes]]:
    """``count`` one-file tasks whose files take 0.4 s each to start: downloads in flight."""
    ids = [task_id(n) for n in range(count)]
    datas = {tid: add_image_task(replica, tid)[0] for tid in ids}
    for tid in ids:
        replica.fault("files", f"{tid}/image_0.png", Fault(delay=0.4))
    return ids, datas


def _in_place(archive: Path, datas: dict[str, bytes]) -> None:
    """Each task's file is in the archive with its bytes."""
    on_disk = archived_files(archive)
    for tid, data in datas.items():
        found = [d for path, d in on_disk.items() if tid in path and path.endswith(".png")]
        assert found == [data], tid


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_run_goes_on_after_the_database_restarts(
    postgres: PostgresServer, replica: Replica, settings: Settings, tmp_path: Path, mode: str
) -> None:
    """The server restarted mid-run (an administrator's shutdown, or a crash): the run
    reconnects, exits 0, and every task is archived once, each file requested once."""
    url = postgres.database()
    ids, datas = _slow_tasks(replica, TASKS)
    env = process_env(replica, settings.archive, tmp_path) | {
        "FETCHER_STATE": url,
        "FETCHER_DOWNLOADS": "2",
    }
    command = [sys.executable, "-m", "fetcher", "fetch", "--json", *(f"--id={t}" for t in ids)]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        wait_for(lambda: len(replica.seen("files")) >= 3)  # downloads under way
        postgres.restart(mode)
        out, err = proc.communicate(timeout=90)

    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert (summary["archived"], summary["failed"], summary["pending"]) == (TASKS, 0, 0)
    assert sorted(t["task_id"] for t in summary["tasks"]) == sorted(ids)
    assert _archived(url) == sorted(ids)
    _in_place(settings.archive, datas)
    requested = collections.Counter(r.path for r in replica.seen("files"))
    assert set(requested.values()) == {1}, requested
    assert "connected again to the state database" in err
    assert postgres.password not in out + err


def test_a_run_stops_in_one_line_when_the_database_stays_away(
    postgres: PostgresServer, replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """The server stopped past ``--state-reconnect``: exit 3 and one line naming the server
    (no password, no traceback); what is recorded archived is in place, and a run after its
    leases lapse ends the rest."""
    url = postgres.database()
    ids, datas = _slow_tasks(replica, TASKS)
    env = process_env(replica, settings.archive, tmp_path) | {
        "FETCHER_STATE": url,
        "FETCHER_DOWNLOADS": "2",
        "FETCHER_STATE_RECONNECT": "1.5",
    }
    # Its leases cannot be let go of with the server away: short, so the next run need not wait.
    command = [sys.executable, "-m", "fetcher", "fetch", "-q", "--lease", "1"]
    command += [f"--id={t}" for t in ids]
    try:
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            wait_for(lambda: len(replica.seen("files")) >= 3)
            postgres.stop()
            began = time.monotonic()
            out, err = proc.communicate(timeout=60)
            waited = time.monotonic() - began
    finally:
        postgres.start()

    assert proc.returncode == 3, err
    assert err.count("\n") == 1, err
    assert "the connection was lost and did not come back within 1.5 s" in err
    assert "127.0.0.1" in err and "Traceback" not in err
    assert postgres.password not in out + err
    assert waited < 30
    archived = _archived(url)
    assert len(archived) < len(ids)
    _in_place(settings.archive, {tid: datas[tid] for tid in archived})
    time.sleep(1.2)  # past the stopped run's leases
    again = run_cli(["fetch", "--json", *(f"--id={t}" for t in ids)], env=env)
    assert again.returncode == 0, again.stderr
    counts = json.loads(again.stdout)
    assert counts["archived"] + counts["already_archived"] == len(ids)
    _in_place(settings.archive, datas)


def test_a_lease_that_lapsed_while_reconnecting_is_settled_by_one_run_only(
    postgres: PostgresServer, replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """The server away longer than a run's leases, and a second run starting as it comes
    back: whichever takes each task settles it, each task archived by one of the two, and
    both exit 0."""
    url = postgres.database()
    ids, datas = _slow_tasks(replica, 8)
    env = process_env(replica, settings.archive, tmp_path) | {
        "FETCHER_STATE": url,
        "FETCHER_DOWNLOADS": "2",
    }
    args = ["fetch", "--json", "--no-progress", "--lease", "1", *(f"--id={t}" for t in ids)]
    first = start_cli(args, env)
    try:
        wait_for(lambda: len(replica.seen("files")) >= 2)
        postgres.stop()
        time.sleep(2.5)  # past the first run's leases: it cannot renew them
        postgres.start()
        second = run_cli(args, env=env, timeout=90)
        out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    by_first, by_second = json.loads(out), json.loads(second.stdout)
    assert by_first["archived"] + by_second["archived"] == len(ids)
    assert _archived(url) == sorted(ids)
    _in_place(settings.archive, datas)


def test_work_drains_what_is_enqueued_after_a_restart(
    postgres: PostgresServer, replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """``fetcher work`` outlives a restart of the server: IDs enqueued before and after it
    are each archived, and it exits 0 once idle."""
    url = postgres.database()
    first, second = task_id(1), task_id(2)
    add_image_task(replica, first)
    add_image_task(replica, second)
    env = process_env(replica, settings.archive, tmp_path) | {"FETCHER_STATE": url}
    worker = start_cli(["work", "--no-progress", "--json", "--idle-exit", "4"], env)
    try:
        assert run_cli(["enqueue", "--id", first], env=env).returncode == 0
        wait_for(lambda: _archived(url) == [first], timeout=30)
        postgres.restart("fast")
        assert run_cli(["enqueue", "--id", second], env=env).returncode == 0
        out, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    assert worker.returncode == 0, err
    summary = json.loads(out)
    assert (summary["archived"], summary["failed"]) == (2, 0)
    assert _archived(url) == sorted([first, second])


def test_a_step_cut_off_by_a_restart_runs_again_whole_and_commits_once(
    postgres: PostgresServer, postgres_url: DatabaseUrl
) -> None:
    """A step whose connection is lost between two statements commits nothing of that
    attempt; its function runs again on a new connection and commits once."""
    attempts: list[int] = []

    @redone
    def step(db: PostgresState) -> None:
        with db.atomic() as conn:
            conn.execute("INSERT INTO meta VALUES (?, 'x')", (f"attempt {len(attempts)}",))
            attempts.append(1)
            if len(attempts) == 1:
                postgres.restart("fast")
            conn.execute("SELECT 1")

    with PostgresState(postgres_url) as db:
        step(db)
        rows = db.query("SELECT key FROM meta WHERE key LIKE 'attempt%'")

    assert len(attempts) == 2
    assert rows == [("attempt 1",)]


def test_the_session_is_made_again_on_a_new_connection(
    postgres: PostgresServer, postgres_url: DatabaseUrl
) -> None:
    """After a restart the connection's temporary tables hold what they held, and its
    ``LISTEN`` hears a ``NOTIFY`` again."""
    with PostgresState(postgres_url) as db:
        db.query("CREATE TEMP TABLE IF NOT EXISTS kept (v TEXT PRIMARY KEY)")
        db.query_many("INSERT INTO temp.kept VALUES (?)", [("a",), ("b",)])
        db.delete("DELETE FROM temp.kept WHERE v = ?", ("a",))
        assert db.listen("fetcher_test")
        postgres.restart("fast")

        assert db.wait_notice(0.1)  # the notices sent meanwhile are lost: look again
        assert db.query("SELECT v FROM temp.kept") == [("b",)]
        assert not db.wait_notice(0.2)
        with psycopg.connect(postgres_url.dsn, autocommit=True) as other:
            other.execute("NOTIFY fetcher_test")
        assert db.wait_notice(5)


def test_a_temporary_table_emptied_is_not_refilled_on_a_new_connection(
    postgres: PostgresServer, postgres_url: DatabaseUrl
) -> None:
    """What a long ``work`` process wrote to a temporary table before emptying it (each
    pass does) is neither kept for a new connection nor redone on it: what is kept stays
    one pass's worth however many passes ran."""
    with PostgresState(postgres_url) as db:
        db.query("CREATE TEMP TABLE IF NOT EXISTS kept (v TEXT PRIMARY KEY)")
        db.query("CREATE TEMP TABLE IF NOT EXISTS other (v TEXT PRIMARY KEY)")
        db.query_many("INSERT INTO temp.other VALUES (?)", [("x",)])
        sizes = []
        for n in range(50):
            db.delete("DELETE FROM temp.kept")
            db.query_many("INSERT INTO temp.kept VALUES (?)", [(f"{n}-a",), (f"{n}-b",)])
            db.delete("DELETE FROM temp.kept WHERE v = ?", (f"{n}-a",))
            sizes.append(len(db._session))
        postgres.restart("fast")

        assert db.query("SELECT v FROM temp.kept") == [("49-b",)]
        assert db.query("SELECT v FROM temp.other") == [("x",)]
    assert sizes[-1] == sizes[1]


def test_a_database_that_stays_away_is_one_archive_error(
    postgres: PostgresServer, postgres_url: DatabaseUrl
) -> None:
    """Past the URL's ``reconnect`` seconds a statement gives up with one line, after
    attempts that waited longer each time (0.5 s, then 1 s)."""
    short = dataclasses.replace(postgres_url, reconnect=1.2)
    with PostgresState(short) as db:
        postgres.stop()
        began = time.monotonic()
        try:
            with pytest.raises(ArchiveError, match=r"did not come back within 1\.2 s") as caught:
                db.query("SELECT 1")
            waited = time.monotonic() - began
        finally:
            postgres.start()

    assert 1.2 <= waited < 10
    assert postgres.password not in str(caught.value)
