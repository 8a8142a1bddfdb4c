"""Several runs on one PostgreSQL state at once: no lock, each task under a lease.

Every process here is a real ``fetcher`` against the replica, sharing one archive
folder and one throwaway PostgreSQL database.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import (
    add_image_task,
    add_video_task,
    process_env,
    run_cli,
    start_cli,
    task_id,
    wait_for,
)

from fetcher.intake import record_queued
from fetcher.lease import Leases
from fetcher.replica import Fault, Replica, task_response
from fetcher.state import DatabaseUrl
from fetcher.state.postgres import PostgresState


def shared_env(replica: Replica, archive: Path, tmp_path: Path, url: DatabaseUrl) -> dict[str, str]:
    """A CLI environment whose state is the test's PostgreSQL database."""
    return process_env(replica, archive, tmp_path) | {"FETCHER_STATE": url.dsn}


def start_fetch(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_cli(["fetch", "--no-progress", "--json", *args], env)


def finish(run: subprocess.Popen[str]) -> dict[str, object]:
    """The run's ``--json`` summary, once it exited 0."""
    out, err = run.communicate(timeout=90)
    assert run.returncode == 0, err
    summary: dict[str, object] = json.loads(out)
    return summary


def given(summary: dict[str, object]) -> int:
    """Every task a run was given, as its summary counts them: tasks of other runs'
    lists that it finished from the queue (``from_queue``) are counted under their
    outcomes too, and are not among them."""
    keys = ("archived", "already_archived", "elsewhere", "pending", "failed", "skipped")
    return sum(int(str(summary[k])) for k in keys) - int(str(summary["from_queue"]))


def archived_in_state(env: dict[str, str]) -> int:
    status = run_cli(["status", "--json"], env=env)
    assert status.returncode == 0, status.stderr
    counts: dict[str, int] = json.loads(status.stdout)["counts"]
    return counts["archived"]


#: The issue's sizes: each run is given a window of this many of the tasks, every
#: window a different one, so neighbouring runs share most of theirs.
TASKS, WINDOW = 500, 300


@pytest.mark.parametrize("runs", [pytest.param(2, id="2-runs"), pytest.param(4, id="4-runs")])
def test_runs_over_overlapping_lists_archive_each_task_once(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl, runs: int
) -> None:
    """Runs at once over overlapping lists of 500 tasks: every task archived, each by one
    run, every file asked for once, and each run accounts for every task it was given."""
    tids = [task_id(n) for n in range(TASKS)]
    for tid in tids:
        add_image_task(replica, tid)
        replica.fault("files", f"{tid}/image_0.png", Fault(delay=0.02))
    starts = [k * (TASKS - WINDOW) // (runs - 1) for k in range(runs)]
    lists = [tids[start : start + WINDOW] for start in starts]
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    started = []
    for n, part in enumerate(lists):
        listed = tmp_path / f"ids-{n}.txt"
        listed.write_text("\n".join(part) + "\n")
        started.append(start_fetch(env, str(listed), "--downloads", "4"))

    summaries = [finish(run) for run in started]

    assert sum(int(str(s["archived"])) for s in summaries) == len(tids)
    assert [given(s) for s in summaries] == [len(part) for part in lists]
    files = [s.path for s in replica.seen("files")]
    assert len(files) == len(set(files)) == len(tids)
    assert archived_in_state(env) == len(tids)


def test_runs_given_the_same_list_share_it_out(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """A run started while another works through the same list takes its share of the
    tasks still ahead (a run claims what its queries are about to take, not the list at
    once), and each task is archived by one of them."""
    tids = [task_id(n) for n in range(100)]
    for tid in tids:
        add_image_task(replica, tid)
        replica.fault("api", tid, Fault(delay=0.5))  # 8 answers a second for 4 queries
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(tids) + "\n")
    first = start_fetch(env, str(listed), "--concurrency", "4")
    wait_for(lambda: replica.seen("api"))
    second = start_fetch(env, str(listed), "--concurrency", "4")

    summaries = [finish(first), finish(second)]

    assert all(int(str(s["archived"])) > 0 for s in summaries)
    assert sum(int(str(s["archived"])) for s in summaries) == len(tids)
    assert [given(s) for s in summaries] == [len(tids)] * 2
    queried = [s.path for s in replica.seen("api")]
    assert len(queried) == len(set(queried)) == len(tids)


def waits_for_a_lock(url: DatabaseUrl) -> bool:
    """Whether a statement of a run on the database at ``url`` waits for another's lock."""
    with psycopg.connect(url.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'fetcher' AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


def test_a_task_archived_elsewhere_between_its_lookup_and_its_claim_is_counted_elsewhere(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """Another run archives a task and lets go of its lease after this run looked the task
    up and before its claim lands: the claim does not take it, and the run counts it
    elsewhere, with no query and no download of it."""
    tid = task_id(0)
    add_image_task(replica, tid)
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    with PostgresState(postgres_url) as other, other.atomic() as step:
        # The other run's lease and archived row, not committed yet: the run looks the
        # task up (it is new to the state), and its claim waits for this transaction.
        step.execute(
            "INSERT INTO leases (task_id, run_id, expires_at) VALUES (?, 'other', ?)",
            (tid, time.time() + 60),
        )
        step.execute(
            "INSERT INTO tasks (task_id, state, final, first_seen, updated_at) "
            "VALUES (?, 'archived', 1, '', '')",
            (tid,),
        )
        run = start_fetch(env, "--id", tid)
        wait_for(lambda: waits_for_a_lock(postgres_url))
        # Settled and let go of: the claim goes on with no lease in its way.
        step.execute("DELETE FROM leases WHERE task_id = ?", (tid,))

    summary = finish(run)

    assert (summary["archived"], summary["elsewhere"]) == (0, 1)
    assert given(summary) == 1
    assert replica.seen("api") == []
    assert replica.seen("files") == []


def test_a_killed_runs_task_is_taken_over_once_its_lease_lapses(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """A run SIGKILLed mid-download holds its task until the lease lapses; then the other
    run takes it over, resumes the partial file and archives it."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=3_000_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(drop_after=2_500_000, stall=10.0))
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    first = start_fetch(env, "--id", slow, "--lease", "2")
    wait_for(lambda: sum(p.stat().st_size for p in archive_dir.rglob("*.part")) >= 2**20)
    second = start_fetch(env, "--id", slow, "--lease", "2")
    time.sleep(1.0)  # the second run waits: the first is alive and renewing
    assert second.poll() is None
    killed_at = time.monotonic()
    first.kill()
    first.communicate(timeout=30)

    summary = finish(second)

    assert summary["archived"] == 1
    assert time.monotonic() - killed_at >= 1.0  # not before the lease lapsed
    video = [s for s in replica.seen("files") if s.path.endswith("video.mp4")]
    assert len(video) == 2
    assert video[1].headers.get("Range", "").startswith("bytes=")


def test_a_run_paused_past_its_lease_does_not_commit_over_the_new_holder(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """SIGSTOP past the lease: another run takes the task over and archives it; the paused
    run, continued, finishes its download but reports the task as settled elsewhere."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=500_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(delay=3.0))
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    paused = start_fetch(env, "--id", slow, "--lease", "1")
    wait_for(lambda: replica.seen("files"))
    paused.send_signal(signal.SIGSTOP)
    try:
        other = finish(start_fetch(env, "--id", slow, "--lease", "5"))
    finally:
        paused.send_signal(signal.SIGCONT)

    late = finish(paused)

    assert other["archived"] == 1
    assert (late["archived"], late["elsewhere"]) == (0, 1)
    assert archived_in_state(env) == 1
    status = run_cli(["status", "--json"], env=env)
    assert json.loads(status.stdout)["failures"] == []


def lease_lapsed(url: DatabaseUrl, tid: str) -> bool:
    """Whether the lease on ``tid`` is past its time (its run stopped renewing it)."""
    with psycopg.connect(url.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT expires_at FROM leases WHERE task_id = %s", (tid,)).fetchone()
    return row is not None and float(row[0]) < time.time()


def test_a_lease_cannot_be_taken_over_while_its_runs_settling_write_waits(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """A run whose pending row waits to be written, past its lease, keeps the task: the
    lease check and the write are one transaction, which holds the lease row, so another
    run's claim passes the task by, and the row written is the holder's."""
    tid = task_id(0)
    replica.set_task(tid, task_response(tid, status="PROCESSING"))
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    with PostgresState(postgres_url) as db:
        record_queued(db, [tid])
    with (
        PostgresState(postgres_url) as other,
        PostgresState(postgres_url) as blocker,
        blocker.atomic() as step,
    ):
        # The task's row locked: the run's pending write waits for it.
        step.execute("SELECT task_id FROM tasks WHERE task_id = ? FOR UPDATE", (tid,))
        run = start_fetch(env, "--id", tid, "--lease", "1")
        wait_for(lambda: waits_for_a_lock(postgres_url))
        # The run's loop waits with it, so nothing renews the lease.
        wait_for(lambda: lease_lapsed(postgres_url, tid))

        assert Leases(other, 60).claim([tid]) == set()

    summary = finish(run)

    assert summary["pending"] == 1
    status = run_cli(["status", "--json"], env=env)
    assert json.loads(status.stdout)["counts"]["pending"] == 1


def test_enqueue_while_two_work_runs_drain(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """IDs enqueued while two ``work`` runs drain are each archived once, by one of them."""
    tids = [task_id(n) for n in range(20)]
    for tid in tids:
        add_image_task(replica, tid)
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    workers = [start_cli(["work", "--no-progress", "--idle-exit", "3", "--json"], env)]
    workers.append(start_cli(["work", "--no-progress", "--idle-exit", "3", "--json"], env))
    for batch in (tids[:10], tids[10:]):
        assert run_cli(["enqueue", "-"], env=env, stdin="\n".join(batch)).returncode == 0
        time.sleep(0.5)

    summaries = [finish(worker) for worker in workers]

    assert sum(int(str(s["archived"])) for s in summaries) == len(tids)
    files = [s.path for s in replica.seen("files")]
    assert sorted(files) == sorted(set(files))
    assert archived_in_state(env) == len(tids)


def test_runs_over_one_list_share_its_downloads(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """A run started while another downloads the same list takes files from the shared
    queue too: the first run's queries do not keep every task to its own workers."""
    tids = [task_id(n) for n in range(30)]
    for tid in tids:
        add_image_task(replica, tid)
        replica.fault("files", f"{tid}/image_0.png", Fault(delay=0.5))
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(tids) + "\n")
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    first = start_fetch(env, str(listed), "--downloads", "2")
    wait_for(lambda: replica.seen("files"))
    second = start_fetch(env, str(listed), "--downloads", "2")

    summaries = [finish(first), finish(second)]

    assert all(int(str(s["files_downloaded"])) > 0 for s in summaries)
    assert sum(int(str(s["archived"])) for s in summaries) == len(tids)
    # What the second run archived, the first was given too: settled elsewhere, for it.
    assert summaries[0]["elsewhere"] == summaries[1]["archived"]
    assert [given(s) for s in summaries] == [len(tids), len(tids)]
    files = [s.path for s in replica.seen("files")]
    assert sorted(files) == sorted(set(files)) and len(files) == len(tids)
    assert archived_in_state(env) == len(tids)
