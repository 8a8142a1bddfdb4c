"""Leases: a task held by a live run is left to it, a lapsed one is taken over, and a run
that lost its lease never settles the task over the new holder."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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

from fetcher.archive import Archive
from fetcher.errors import ArchiveError
from fetcher.intake import record_queued
from fetcher.lease import Leases, live_runs
from fetcher.models import RemoteFile, Task, TaskState
from fetcher.replica import Fault, Replica
from fetcher.state import DatabaseUrl, Held, Records, StateDB
from fetcher.state.postgres import PostgresState


class Clock:
    """A time of day the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(archive_dir: Path, state: DatabaseUrl | None) -> Iterator[Records]:
    """An empty state, once per implementation."""
    archive = Archive(archive_dir)
    archive.prepare()
    with StateDB(archive.db_path) if state is None else PostgresState(state) as opened:
        yield opened


def holds(db: Records, leases: Leases, task_id: str) -> bool:
    """Whether ``leases``' run holds ``task_id``, checked as a settling write does."""
    with db.atomic() as step:
        return leases.held(task_id, step)


def test_a_task_held_by_a_live_run_is_left_to_it(db: Records) -> None:
    """A second run's claim does not take a task whose lease the first still holds."""
    clock = Clock()
    first, second = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    first.begin()
    second.begin()

    assert first.claim(["a", "b"]) == {"a", "b"}
    clock.now += 9
    assert second.claim(["b", "c"]) == {"c"}


def test_a_lapsed_lease_is_taken_over(db: Records) -> None:
    """Once a run stops renewing, its tasks go to the next run that claims them."""
    clock = Clock()
    first, second = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    first.claim(["a"])
    clock.now += 11

    assert second.claim(["a"]) == {"a"}
    assert holds(db, second, "a")


def test_renewal_keeps_a_lease_past_its_first_term(db: Records) -> None:
    """A run that renews keeps its tasks however long it works on them."""
    clock = Clock()
    first, second = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    first.claim(["a"])
    for _ in range(5):
        clock.now += 5
        first.renew()

    assert second.claim(["a"]) == set()


def test_a_run_paused_past_its_lease_cannot_settle_over_the_new_holder(db: Records) -> None:
    """The lease check before a settling write fails for the run whose task was taken over."""
    clock = Clock()
    paused, other = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    paused.claim(["a"])
    clock.now += 30
    other.claim(["a"])
    paused.renew()  # it wakes up: its renewal touches only what it still holds

    assert not holds(db, paused, "a")
    assert holds(db, other, "a")


def taken_over(db: Records) -> tuple[Held, Held]:
    """Task ``a`` queued, claimed by a run paused past its lease, and taken over by another:
    the lease checks of the paused run and of the new holder."""
    clock = Clock()
    record_queued(db, ["a"])
    paused, other = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    paused.claim(["a"])
    clock.now += 30
    other.claim(["a"])
    return functools.partial(paused.held, "a"), functools.partial(other.held, "a")


def test_the_archived_row_is_written_only_under_a_held_lease(db: Records) -> None:
    """The commit point checks the lease in its own transaction: the old holder's is refused."""
    lost, kept = taken_over(db)

    assert not db.mark_archived("a", lost)
    assert db.counts()["archived"] == 0
    assert db.mark_archived("a", kept)
    assert db.counts()["archived"] == 1


def test_a_lapsed_lease_nobody_took_is_still_its_runs(db: Records) -> None:
    """A run paused past its lease may still settle the task when no other run took it."""
    clock = Clock()
    paused = Leases(db, 10, clock=clock)
    paused.claim(["a"])
    clock.now += 30

    assert holds(db, paused, "a")


def test_an_exclusive_run_takes_over_every_other_lease(db: Records) -> None:
    """Under the archive's lock, a lease left by a run that is gone is taken at once."""
    clock = Clock()
    gone = Leases(db, 60, clock=clock)
    gone.claim(["a"])

    assert Leases(db, 60, exclusive=True, clock=clock).claim(["a"]) == {"a"}


def test_a_claim_leaves_a_task_another_run_archived(db: Records) -> None:
    """A task another run archived and let go of after this run read its state is not
    taken: the claim sees the archived row in its own transaction, and leaves no lease."""
    clock = Clock()
    record_queued(db, ["a", "b"])
    mine, other = Leases(db, 10, clock=clock), Leases(db, 10, clock=clock)
    other.claim(["a"])
    assert db.mark_archived("a", functools.partial(other.held, "a"))
    other.release("a")

    assert mine.claim(["a", "b"]) == {"b"}
    assert [h.run_id for h in mine.holders(["a", "b"])] == [None, mine.run_id]


def test_a_task_failed_for_good_is_claimed_only_to_retry_it(db: Records) -> None:
    """A final failure another run recorded is settled, unless the run retries failures."""
    record_queued(db, ["a"])
    db.record_failure("a", "ErrCode 70000", final=True)
    leases = Leases(db, 10, clock=Clock())

    assert leases.claim(["a"]) == set()
    assert leases.claim(["a"], retry_failed=True) == {"a"}


def test_claims_at_once_pass_each_others_leases_by(postgres_url: DatabaseUrl) -> None:
    """On PostgreSQL a claim does not wait for a lease another claim is taking over and
    has not committed yet: it leaves that task to the other and takes the rest."""
    clock = Clock()
    with PostgresState(postgres_url) as one, PostgresState(postgres_url) as two:
        Leases(one, 10, clock=clock).claim(["a"])
        clock.now += 30  # that run is gone: its lease lapsed
        # Waiting for the other claim's lock would be an error here, not a hang.
        two.query("SET lock_timeout = '3s'")
        first, second = Leases(one, 10, clock=clock), Leases(two, 10, clock=clock)
        with one.atomic() as step:
            assert first.take(step, ["a"]) == {"a"}
            assert second.claim(["a", "b"]) == {"b"}

        assert second.claim(["a"]) == set()
        assert [h.run_id for h in second.holders(["a", "b"])] == [first.run_id, second.run_id]


class Skewed:
    """A host's clock, ``by`` seconds off the true time (fast when positive); the test
    steps it as NTP would."""

    def __init__(self, by: float) -> None:
        self.by = by

    def __call__(self) -> float:
        return time.time() + self.by


def test_runs_whose_clocks_differ_leave_each_others_live_leases(
    postgres_url: DatabaseUrl,
) -> None:
    """On PostgreSQL lease times are the server's: runs whose clocks are ten minutes fast
    or slow neither take another live run's lease nor have their own taken, and status
    shows each alive for one lease."""
    with PostgresState(postgres_url) as db:
        skews = {"a": 0, "b": 600, "c": -600}
        runs = {task: Leases(db, 10, clock=Skewed(by)) for task, by in skews.items()}
        for task, run in runs.items():
            run.begin()
            assert run.claim([task]) == {task}
        for _ in range(2):
            assert {task: run.claim(list(runs)) for task, run in runs.items()} == {
                task: {task} for task in runs
            }
            for run in runs.values():
                run.renew()

        alive = {str(r["run_id"]): r["alive_for_seconds"] for r in live_runs(db, time.time(), None)}
    assert alive.keys() == {run.run_id for run in runs.values()}
    assert all(9 <= int(str(seconds)) <= 10 for seconds in alive.values())


def test_a_fast_clocked_runs_lease_lapses_on_time(postgres_url: DatabaseUrl) -> None:
    """A run whose clock is ten minutes fast and that stops renewing lets its task go once
    its lease lapses by the server's clock, not ten minutes later."""
    with PostgresState(postgres_url) as db:
        fast, other = Leases(db, 0.5, clock=Skewed(600)), Leases(db, 0.5)
        fast.begin()
        other.begin()
        assert fast.claim(["a"]) == {"a"}
        assert other.claim(["a"]) == set()
        time.sleep(0.7)

        assert other.claim(["a"]) == {"a"}


def test_a_clock_stepped_mid_run_is_caught_up_at_renewal(postgres_url: DatabaseUrl) -> None:
    """A host clock stepped ten minutes between renewals: the renewal learns the server's
    time again before it writes, so the lease lasts one lease from then, no more."""
    with PostgresState(postgres_url) as db:
        clock = Skewed(0)
        stepped, other = Leases(db, 0.5, clock=clock), Leases(db, 0.5)
        stepped.begin()
        other.begin()
        assert stepped.claim(["a"]) == {"a"}
        clock.by = 600
        stepped.renew()
        assert other.claim(["a"]) == set()
        time.sleep(0.7)

        assert other.claim(["a"]) == {"a"}


def test_settling_writes_are_refused_to_a_run_that_lost_its_lease(db: Records) -> None:
    """Pending, failed and file rows, like the archived one, are written only under a lease
    the run still holds, checked in the write's own transaction."""
    lost, kept = taken_over(db)
    running = Task("a", "AigcImageTask", TaskState.PENDING, "PROCESSING")
    finished = Task(
        "a",
        "AigcImageTask",
        TaskState.FINISHED,
        "FINISH",
        files=(RemoteFile(0, "http://h/0", None),),
    )

    assert not db.record_pending(running, lost)
    assert not db.record_failure("a", "HTTP 500", final=False, held=lost)
    assert db.start_task(finished, "a", lost) is None
    assert db.counts()["queued"] == 1
    assert db.files_of("a") == []
    assert db.start_task(finished, "a", kept) is not None
    assert not db.file_failed("a", 0, state="failed", reason="HTTP 500", held=lost)
    assert not db.file_done(
        "a", 0, path="a/00.png", size=1, sha256="0", content_type=None, held=lost
    )
    assert [f.state for f in db.files_of("a")] == ["wanted"]
    assert db.file_done("a", 0, path="a/00.png", size=1, sha256="0", content_type=None, held=kept)
    assert [f.state for f in db.files_of("a")] == ["done"]


def start_fetch(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``fetcher fetch ARGS --json`` in the background."""
    return start_cli(["fetch", "--no-progress", "--json", *args], env)


def archived_count(archive_dir: Path) -> int:
    """Tasks the state holds as archived, read as ``status`` does (no lock)."""
    try:
        with StateDB(Archive(archive_dir).db_path, readonly=True) as db:
            return db.counts()["archived"]
    except ArchiveError:  # not there yet, or not migrated yet
        return 0


def partial_bytes(archive_dir: Path) -> int:
    """Bytes of partial downloads in the work folder."""
    return sum(p.stat().st_size for p in Archive(archive_dir).work_dir.glob("*.part"))


def test_status_lists_a_live_run_and_its_leases(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """During a run, ``status --json`` names the run and the tasks it holds."""
    slow = task_id(1, "AigcVideoTask")
    add_video_task(replica, slow, size=2_000_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(drop_after=100_000, stall=10.0))
    env = process_env(replica, archive_dir, tmp_path)
    fetching = start_fetch(env, "--id", slow)
    try:
        wait_for(lambda: replica.seen("files"))
        status = run_cli(["status", "--json"], env=env)
    finally:
        fetching.send_signal(signal.SIGTERM)
        fetching.communicate(timeout=30)

    runs = json.loads(status.stdout)["runs"]
    assert len(runs) == 1
    assert runs[0]["pid"] == fetching.pid
    assert [lease["task_id"] for lease in runs[0]["leases"]] == [slow]
    assert 0 < runs[0]["leases"][0]["expires_in_seconds"] <= 60
    after = run_cli(["status", "--json"], env=env)
    assert json.loads(after.stdout)["runs"] == []


def test_a_run_killed_mid_download_is_taken_over_and_completed(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """Two runs over overlapping lists; the first is SIGKILLed mid-download, the second
    (waiting for the lock) takes its tasks over and archives every one, each file once."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=3_000_000)
    # Past two of the sink's 1 MiB blocks: bytes on disk for the next run to resume from.
    replica.fault("files", f"{slow}/video.mp4", Fault(drop_after=2_500_000, stall=10.0))
    tids = [task_id(n) for n in range(1, 7)]
    for tid in tids:
        add_image_task(replica, tid)
    first_list, second_list = tmp_path / "a.txt", tmp_path / "b.txt"
    first_list.write_text("\n".join([slow, *tids[:4]]) + "\n")
    second_list.write_text("\n".join([*tids[2:], slow]) + "\n")
    env = process_env(replica, archive_dir, tmp_path)

    first = start_fetch(env, str(first_list), "--lease", "2")
    wait_for(lambda: replica.seen("files"))  # it holds the lock
    second = start_fetch(env, str(second_list), "--lease", "2", "--wait-lock")
    # Killed with its images archived and part of the video on disk, nothing in between.
    wait_for(lambda: archived_count(archive_dir) == 4 and partial_bytes(archive_dir) >= 2**20)
    first.kill()
    first.communicate(timeout=30)
    out, err = second.communicate(timeout=60)

    assert second.returncode == 0, err
    summary = json.loads(out)
    assert summary["failed"] == 0
    counts = run_cli(["status", "--json"], env=env)
    assert json.loads(counts.stdout)["counts"]["archived"] == 7
    images = [s.path for s in replica.seen("files") if s.path.endswith(".png")]
    assert sorted(images) == sorted(set(images))  # no image asked for twice
    video = [s for s in replica.seen("files") if s.path.endswith("video.mp4")]
    assert len(video) == 2
    assert video[1].headers.get("Range", "").startswith("bytes=")  # resumed, not again


def test_a_run_paused_past_its_lease_finishes_its_tasks(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """SIGSTOP past the lease, then SIGCONT: no run took the tasks, so it still archives them."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=1_000_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(delay=1.0))
    add_image_task(replica, task_id(1))
    env = process_env(replica, archive_dir, tmp_path)
    running = start_fetch(env, "--id", slow, "--id", task_id(1), "--lease", "1")
    wait_for(lambda: any(s.path.endswith("video.mp4") for s in replica.seen("files")))

    running.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    running.send_signal(signal.SIGCONT)
    out, err = running.communicate(timeout=60)

    assert running.returncode == 0, err
    assert json.loads(out)["archived"] == 2
