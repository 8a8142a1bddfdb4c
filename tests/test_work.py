"""``fetcher work``: draining the queue as IDs are enqueued, idle exit, and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import (
    add_image_task,
    add_running_task,
    process_env,
    run_cli,
    start_cli,
    task_id,
    wait_for,
)

from fetcher.archive import Archive
from fetcher.config import Settings
from fetcher.intake import record_queued
from fetcher.replica import Replica
from fetcher.state import StateDB
from fetcher.worker import WorkOptions, work_sync


def start_work(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``fetcher work ARGS`` in the background."""
    return start_cli(["work", "--no-progress", *args], env)


def test_work_archives_ids_enqueued_while_it_runs(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """IDs enqueued one after another while ``work`` runs are each archived by it."""
    tids = [task_id(n) for n in range(3)]
    for tid in tids:
        add_image_task(replica, tid)
    env = process_env(replica, archive_dir, tmp_path)
    worker = start_work(env, "--idle-exit", "3", "--json")
    for tid in tids:
        assert run_cli(["enqueue", "--id", tid], env=env).returncode == 0
        time.sleep(0.3)

    out, err = worker.communicate(timeout=60)

    assert worker.returncode == 0, err
    summary = json.loads(out)
    assert (summary["archived"], summary["failed"]) == (3, 0)
    assert sorted(t["task_id"] for t in summary["tasks"]) == sorted(tids)


def test_work_exits_after_idle_exit_with_nothing_to_do(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """With nothing queued, ``work --idle-exit`` exits 0 once that many seconds pass."""
    env = process_env(replica, archive_dir, tmp_path)
    began = time.monotonic()

    result = run_cli(["work", "--idle-exit", "0.5"], env=env, timeout=30)

    assert result.returncode == 0, result.stderr
    assert 0.5 <= time.monotonic() - began < 20
    assert replica.seen("api") == []


def test_sigterm_winds_work_down_and_reports(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM ends a waiting ``work`` cleanly: exit 143, the summary says interrupted."""
    env = process_env(replica, archive_dir, tmp_path)
    worker = start_work(env, "--json")
    wait_for(lambda: Archive(archive_dir).exists())
    time.sleep(0.3)

    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)

    assert worker.returncode == 143, err
    assert json.loads(out)["interrupted"] is True
    assert "Traceback" not in err


def test_work_asks_about_running_tasks_again_later(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A queued task still running is asked about again after ``pending_every``, then archived,
    and counted once: by its last outcome."""
    tid = task_id(1)
    add_running_task(replica, tid)
    Archive(archive_dir).prepare()
    with StateDB(Archive(archive_dir).db_path) as db:
        record_queued(db, [tid])

    summary = work_sync(settings, WorkOptions(idle_exit=1.0, poll=0.05, pending_every=0.2))

    assert summary.counts["pending"] == 0
    assert summary.counts["archived"] == 1
    assert sum(summary.counts.values()) == 1
    assert len(replica.seen("api")) == 2


def test_work_with_a_bad_idle_exit_is_a_usage_error(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """``--idle-exit soon`` is one line on stderr, exit 2."""
    result = run_cli(
        ["work", "--idle-exit", "soon"], env=process_env(replica, archive_dir, tmp_path)
    )

    assert result.returncode == 2
    assert "'soon' is not a number of seconds" in result.stderr
