"""``fetcher enqueue``: IDs recorded as queued with no query, drained by ``fetch --pending``."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import (
    add_image_task,
    add_running_task,
    archived_files,
    process_env,
    run,
    run_cli,
    task_id,
)

from fetcher.archive import Archive
from fetcher.config import Settings
from fetcher.intake import record_queued
from fetcher.replica import Replica
from fetcher.state import FAILED, QUEUED, StateDB


def _counts(env: dict[str, str]) -> dict[str, int]:
    status = run_cli(["status", "--json"], env=env)
    assert status.returncode == 0, status.stderr
    counts: dict[str, int] = json.loads(status.stdout)["counts"]
    return counts


def test_enqueue_records_ids_as_queued_without_a_query(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """IDs from a file and --id are recorded as queued; the API hears nothing."""
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{task_id(1)}\n# a comment\n\n{task_id(2)}\r\n")
    env = process_env(replica, archive_dir, tmp_path)

    result = run_cli(["enqueue", str(ids), "--id", task_id(3), "--json"], env=env)

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["queued"], summary["already_known"], summary["invalid"]) == (3, 0, 0)
    assert summary["archive"] == str(archive_dir)
    assert replica.seen("api") == []
    assert _counts(env)["queued"] == 3


def test_fetch_pending_archives_enqueued_tasks(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """``fetch --pending`` asks about every queued task and archives it."""
    tids = [task_id(n) for n in range(4)]
    for tid in tids:
        add_image_task(replica, tid)
    env = process_env(replica, archive_dir, tmp_path)
    assert run_cli(["enqueue", "-"], env=env, stdin="\n".join(tids)).returncode == 0

    result = run_cli(["fetch", "--pending", "--json"], env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["archived"] == 4
    assert len(archived_files(archive_dir)) == 8  # a file and a sidecar each
    counts = _counts(env)
    assert (counts["queued"], counts["archived"]) == (0, 4)


def test_enqueue_leaves_an_archived_task_as_it_is(
    replica: Replica, settings: Settings, archive_dir: Path, tmp_path: Path
) -> None:
    """An ID the archive holds is counted as already known and stays archived."""
    tid = task_id(1)
    add_image_task(replica, tid)
    run(settings, tid)
    env = process_env(replica, archive_dir, tmp_path)

    result = run_cli(["enqueue", "--id", tid, "--id", task_id(2), "--json"], env=env)

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["queued"], summary["already_known"]) == (1, 1)
    counts = _counts(env)
    assert (counts["archived"], counts["queued"]) == (1, 1)


def test_enqueue_reports_an_invalid_line_as_fetch_does(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A bad line gets fetch's one line with its line number and exit 1; the rest is queued."""
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{task_id(1)}\nbad/id\n")
    env = process_env(replica, archive_dir, tmp_path)

    result = run_cli(["enqueue", str(ids)], env=env)

    assert result.returncode == 1
    assert f"fetcher: {ids}:2: invalid task ID 'bad/id'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "1 queued, 0 already known, 1 invalid" in result.stdout
    assert _counts(env)["queued"] == 1


def test_enqueue_refuses_an_unreadable_file_in_one_line(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A missing list file is a usage error (exit 2), as for fetch, and nothing is queued."""
    env = process_env(replica, archive_dir, tmp_path)

    result = run_cli(["enqueue", str(tmp_path / "missing.txt")], env=env)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot read task-ID file" in result.stderr


def test_enqueue_with_nothing_named_is_a_usage_error(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """``enqueue`` alone says what it needs, exit 2."""
    result = run_cli(["enqueue"], env=process_env(replica, archive_dir, tmp_path))

    assert result.returncode == 2
    assert "nothing to enqueue" in result.stderr


def test_enqueue_works_while_a_run_holds_the_lock(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """Enqueueing takes no lock: it adds IDs while another run holds the archive."""
    archive = Archive(archive_dir)
    archive.prepare()
    with archive.lock():
        result = run_cli(
            ["enqueue", "--id", task_id(1)], env=process_env(replica, archive_dir, tmp_path)
        )
    assert result.returncode == 0, result.stderr


def test_enqueue_queues_a_retryable_failure_again(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A task that failed for now is queued again; one that failed for good is left alone."""
    for_now, for_good = task_id(1), task_id(2)
    Archive(archive_dir).prepare()
    with StateDB(Archive(archive_dir).db_path) as db:
        db.record_failure(for_now, "HTTP 503", final=False)
        db.record_failure(for_good, "task not found", final=True)

        assert record_queued(db, [for_now, for_good, for_now]) == 1

        states = dict(db.query("SELECT task_id, state FROM tasks"))
    assert states == {for_now: QUEUED, for_good: FAILED}


def test_a_queued_task_still_running_becomes_pending(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A queued task the API still runs is pending after the drain, then archived later."""
    tid = task_id(1)
    add_running_task(replica, tid)
    env = process_env(replica, archive_dir, tmp_path)
    assert run_cli(["enqueue", "--id", tid], env=env).returncode == 0

    first = run_cli(["fetch", "--pending", "--json"], env=env)
    second = run_cli(["fetch", "--pending", "--json"], env=env)

    assert json.loads(first.stdout)["pending"] == 1
    assert json.loads(second.stdout)["archived"] == 1
