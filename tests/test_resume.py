"""Work survives a stop: resume across runs, clean winding-down on signals, waiting for the lock,
and one more query for a fresh URL when a host drops a file early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import (
    add_image_task,
    add_video_task,
    archived_files,
    on_each_state,
    process_env,
    run,
    task_id,
    tweak,
)

from fetcher.archive import RESUME_WINDOW, Archive
from fetcher.config import Settings
from fetcher.errors import LockedError
from fetcher.replica import Fault, Replica, file_info, png, pseudo_video, task_response
from fetcher.summary import Outcome

#: Every test here exercises the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)


def work_files(archive: Path) -> list[str]:
    """The files in the work folder, and in the runs' own folders there (a shared state's)."""
    folder = archive / ".fetcher" / "work"
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_partial_download_resumes_in_the_next_run(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Bytes a failed run received are kept, and the next run asks only for the rest."""
    tid = task_id(1, "AigcVideoTask")
    data = add_video_task(replica, tid, size=300_000)
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=120_000))

    first = run(tweak(settings, retries=0), tid)

    assert first.counts[Outcome.FAILED] == 1
    assert len(work_files(archive_dir)) == 2  # the partial file and its record
    second = run(settings, tid)
    assert second.counts[Outcome.ARCHIVED] == 1
    resumed = replica.seen("files")[-1].headers
    assert resumed.get("Range") == "bytes=120000-"
    assert resumed.get("If-Range")
    assert archived_files(archive_dir)[f"{second.tasks[0].folder}/00.mp4"] == data
    assert work_files(archive_dir) == []


def test_changed_file_on_the_host_is_fetched_whole(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """If the host's file changed since the partial download, If-Range gets the whole new file."""
    tid = task_id(2, "AigcVideoTask")
    add_video_task(replica, tid, size=300_000)
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=100_000))
    run(tweak(settings, retries=0), tid)
    changed = pseudo_video(300_000, seed=99)  # a new ETag on the host
    replica.add_file(f"{tid}/video.mp4", changed, "video/mp4")

    second = run(settings, tid)

    assert second.counts[Outcome.ARCHIVED] == 1
    assert archived_files(archive_dir)[f"{second.tasks[0].folder}/00.mp4"] == changed


@pytest.mark.parametrize(
    ("names", "age", "kept"),
    [
        pytest.param(["a.part", "a.part.json"], 0.0, ["a.part", "a.part.json"], id="resumable"),
        pytest.param(["a.part"], 0.0, [], id="partial-without-record"),
        pytest.param(["a.part.json"], 0.0, [], id="record-without-partial"),
        pytest.param(["x.json.tmp"], 0.0, [], id="sidecar-temp"),
        pytest.param(["a.part", "a.part.json"], RESUME_WINDOW + 60, [], id="older-than-any-url"),
    ],
)
def test_start_of_run_keeps_only_resumable_work(
    tmp_path: Path, names: list[str], age: float, kept: list[str]
) -> None:
    """What a killed run left is kept only if a later download can resume it."""
    archive = Archive(tmp_path / "archive")
    archive.prepare()
    for name in names:
        path = archive.work_dir / name
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))

    with archive.lock():
        archive.clean_work()

    assert work_files(archive.root) == kept


def test_file_dropped_early_is_fetched_from_a_fresh_url(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A 404 before ExpireTime makes fetcher ask the API once more, and the fresh URL works."""
    tid = task_id(3)
    data = png(20, 20, seed=3)
    stale = replica.add_file(f"{tid}/old.png", data)
    replica.remove_file(f"{tid}/old.png")
    fresh = replica.add_file(f"{tid}/new.png", data)
    replica.set_task(
        tid,
        task_response(tid, files=[file_info(stale)]),
        task_response(tid, files=[file_info(fresh)]),
    )

    summary = run(settings, tid)

    assert summary.counts[Outcome.ARCHIVED] == 1
    assert len(replica.seen("api")) == 2
    assert [r.path for r in replica.seen("files")] == [f"/{tid}/old.png", f"/{tid}/new.png"]
    sidecar = archived_files(archive_dir)[f"{summary.tasks[0].folder}/task.json"]
    assert fresh.encode() in sidecar and stale.encode() not in sidecar


def test_file_gone_from_every_url_fails_after_one_more_query(
    replica: Replica, settings: Settings
) -> None:
    """When the fresh URL is gone too, the task fails with a reason, after exactly one re-query."""
    tid = task_id(4)
    url = replica.add_file(f"{tid}/img.png", b"never served")
    replica.remove_file(f"{tid}/img.png")
    replica.set_task(tid, task_response(tid, files=[file_info(url)]))

    summary = run(settings, tid)

    got = summary.tasks[0]
    assert got.outcome is Outcome.FAILED
    assert "also after asking the API again" in str(got.reason)
    assert len(replica.seen("api")) == 2


def test_wait_lock_waits_for_the_other_run(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """With wait_lock, a run starts as soon as the other holder lets go (on a shared
    PostgreSQL state there is no lock: it starts at once)."""
    tid = task_id(5, "AigcVideoTask")
    add_video_task(replica, tid)
    archive = Archive(archive_dir)
    archive.prepare()
    if settings.state is not None:
        with archive.lock():
            assert run(settings, tid, wait_lock=10.0).counts[Outcome.ARCHIVED] == 1
        return
    holding, released = threading.Event(), threading.Event()

    def hold() -> None:
        with archive.lock():
            holding.set()
            time.sleep(0.8)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    start = time.monotonic()
    summary = run(settings, tid, wait_lock=10.0)
    holder.join()

    assert released.is_set()
    assert time.monotonic() - start >= 0.5
    assert summary.counts[Outcome.ARCHIVED] == 1


def test_wait_lock_gives_up_after_its_time(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A lock still held after wait_lock seconds is LockedError, saying how long it waited
    (on a shared PostgreSQL state there is no lock to wait for)."""
    archive = Archive(archive_dir)
    archive.prepare()
    if settings.state is not None:
        add_image_task(replica, task_id(6))
        with archive.lock():
            assert run(settings, task_id(6), wait_lock=0.3).counts[Outcome.ARCHIVED] == 1
        return
    with archive.lock(), pytest.raises(LockedError, match=r"waited 0\.3 s"):
        run(settings, task_id(6), wait_lock=0.3)


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
        pytest.param(signal.SIGINT, 130, id="sigint"),
    ],
)
def test_signal_winds_down_then_the_next_run_resumes(
    replica: Replica, tmp_path: Path, signum: int, code: int
) -> None:
    """A signal mid-download exits 130/143 with a summary; the next run resumes the bytes kept."""
    tid = task_id(7, "AigcVideoTask")
    data = add_video_task(replica, tid, size=400_000)
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=150_000, stall=30))
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path)
    command = [sys.executable, "-m", "fetcher", "fetch", "--id", tid, "--json"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        record = archive / ".fetcher" / "work"
        deadline = time.monotonic() + 15
        while not list(record.glob("*.part.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the first 150,000 bytes arrive, then the host stalls
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)

    assert proc.returncode == code, err
    assert '"interrupted": true' in out
    document = json.loads(out)
    assert document["bytes_downloaded"] == 150_000  # what did arrive, though not yet whole
    assert document["archive"] == str(archive)
    assert signal.Signals(signum).name in err
    partial = [p for p in record.iterdir() if p.name.endswith(".part")]
    assert [p.stat().st_size for p in partial] == [150_000]

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    assert again.returncode == 0, again.stderr
    assert replica.seen("files")[-1].headers.get("Range") == "bytes=150000-"
    (video,) = [v for k, v in archived_files(archive).items() if k.endswith(".mp4")]
    assert video == data


def test_expired_file_records_when_it_was_seen(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """An expired file's reason says when it expired and when fetcher saw it refused."""
    tid = task_id(8)
    url = replica.add_file(f"{tid}/img.png", png(8, 8))
    replica.remove_file(f"{tid}/img.png")
    past = datetime.now(UTC) - timedelta(hours=1)
    replica.set_task(tid, task_response(tid, files=[file_info(url, expire=past)]))

    summary = run(settings, tid)

    got = summary.tasks[0]
    assert got.outcome is Outcome.EXPIRED
    assert "expired at" in str(got.reason) and "seen" in str(got.reason)


def test_two_runs_at_once_one_works_one_exits_75(replica: Replica, tmp_path: Path) -> None:
    """Two runs started together on one archive: one archives everything, the other exits 75."""
    tids = [task_id(20 + n, "AigcVideoTask") for n in range(3)]
    datas = {tid: add_video_task(replica, tid, size=100_000 + n) for n, tid in enumerate(tids)}
    for tid in tids:  # slow enough that the runs overlap
        replica.fault("files", f"{tid}/video.mp4", Fault(delay=0.4))
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path)
    ids = [arg for tid in tids for arg in ("--id", tid)]
    command = [sys.executable, "-m", "fetcher", "fetch", *ids, "-q"]
    procs = [
        subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = sorted((p.wait(timeout=30), p.stderr.read() if p.stderr else "") for p in procs)
    for proc in procs:
        if proc.stderr:
            proc.stderr.close()

    assert [code for code, _ in results] == [0, 75], results
    assert "holds the lock" in results[1][1]
    videos = {k: v for k, v in archived_files(archive).items() if k.endswith(".mp4")}
    assert sorted(videos.values()) == sorted(datas.values())
    assert len(replica.seen("files")) == 3


def test_no_splice_when_a_new_version_drops_before_its_first_byte(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Old partial bytes never join a newer file, even if the newer one drops at once."""
    tid = task_id(30, "AigcVideoTask")
    add_video_task(replica, tid, size=300_000)
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=120_000))
    run(tweak(settings, retries=0), tid)  # 120,000 bytes of the first version kept
    changed = pseudo_video(300_000, seed=7)
    replica.add_file(f"{tid}/video.mp4", changed, "video/mp4")
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=0))
    run(tweak(settings, retries=0), tid)  # the new version's headers, then nothing

    final = run(settings, tid)

    assert final.counts[Outcome.ARCHIVED] == 1
    assert archived_files(archive_dir)[f"{final.tasks[0].folder}/00.mp4"] == changed
