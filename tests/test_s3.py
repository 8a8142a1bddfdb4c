"""Archiving into a bucket: moto's S3 server over loopback, behind a recording proxy.

The proxy (:mod:`tests.s3server`) records every request the store received and
injects what moto cannot do by itself: throttling, 5xx, dropped connections,
refusals, a full quota, and answers held while a run is killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from fetcher.config import Settings
from fetcher.errors import AuthError, UsageError
from fetcher.layout import Layout, LayoutFields
from fetcher.replica import Fault as ReplicaFault
from fetcher.replica import Replica, png
from fetcher.state import DatabaseUrl
from fetcher.stores import BucketUrl
from fetcher.summary import Outcome
from fetcher.verify import Problem
from tests.conftest import ROOT, add_image_task, add_video_task, run, task_id, tweak
from tests.s3server import SECRET, Fault, MotoServer, StoreProxy, store_proxy

#: A file over the single-PUT limit: it goes up in parts.
LARGE = 40 * 1024 * 1024


@dataclass
class World:
    """A bucket behind the proxy, the replica, and settings that archive into the bucket."""

    moto: MotoServer
    proxy: StoreProxy
    replica: Replica
    bucket: str
    settings: Settings
    client: Any
    tmp: Path
    env: dict[str, str]

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket, by key."""
        found: dict[str, bytes] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                found[item["Key"]] = body.read()
        return found

    def cli_env(self, state: Path | None = None) -> dict[str, str]:
        """What a command run on this world reads from its environment."""
        return dict(
            self.env,
            FETCHER_BASE_URL=self.replica.api_url,
            FETCHER_API_KEY=self.replica.api_key,
            FETCHER_ARCHIVE=f"s3://{self.bucket}/arch",
            FETCHER_S3_ENDPOINT=self.proxy.url,
            FETCHER_STATE=str(state or self.tmp / "state.sqlite"),
            FETCHER_RETRY_WAIT="0.01",
            XDG_CONFIG_HOME=str(self.tmp / "no-config"),
            XDG_DATA_HOME=str(self.tmp / "data"),
        )

    def cli(self, *args: str, state: Path | None = None, **popen: Any) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
        env.update(self.cli_env(state))
        return subprocess.Popen(
            [sys.executable, "-m", "fetcher", *args],
            env=env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )

    def run_cli(self, *args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
        process = self.cli(*args, state=state)
        out, err = process.communicate(timeout=120)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture
def world(
    moto: MotoServer, replica: Replica, settings: Settings, tmp_path: Path, aws_env: dict[str, str]
) -> Iterator[World]:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket=bucket)
    with store_proxy(moto.url) as proxy:
        s3_settings = tweak(
            settings,
            archive=BucketUrl(bucket, "arch"),
            s3_endpoint=proxy.url,
            state=tmp_path / "state.sqlite",
        )
        yield World(moto, proxy, replica, bucket, s3_settings, client, tmp_path, aws_env)
    client.close()


def object_paths(world: World) -> set[str]:
    return set(world.objects())


def file_requests(world: World) -> list[str]:
    return [r.path for r in world.replica.seen("files")]


# -- the happy path ---------------------------------------------------------------------


def test_tasks_become_objects_with_the_folder_archives_names(world: World, tmp_path: Path) -> None:
    """Images, a multi-file task and a video land under PREFIX as they would on disk."""
    multi, single = task_id(1), task_id(2)
    video = task_id(3, "AigcVideoTask")
    datas = add_image_task(world.replica, multi, 3)
    add_image_task(world.replica, single)
    video_bytes = add_video_task(world.replica, video)

    summary = run(world.settings, multi, single, video)
    on_disk = run(tweak(world.settings, archive=tmp_path / "disk"), multi, single, video)

    assert summary.counts[Outcome.ARCHIVED] == 3
    assert summary.archive == f"s3://{world.bucket}/arch"
    objects = world.objects()
    disk = {
        "arch/" + str(p.relative_to(tmp_path / "disk")): p.read_bytes()
        for p in (tmp_path / "disk").rglob("*")
        if p.is_file() and ".fetcher" not in p.parts
    }
    visible = {k: v for k, v in objects.items() if "/.fetcher/" not in k}
    assert set(visible) == set(disk)
    assert on_disk.counts[Outcome.ARCHIVED] == 3
    folder = next(k for k in visible if multi in k).rsplit("/", 1)[0]
    assert [objects[f"{folder}/{n:02d}.png"] for n in range(3)] == datas
    assert video_bytes in visible.values()
    sidecar = json.loads(objects[f"{folder}/task.json"])
    assert sidecar["task_id"] == multi
    head = world.client.head_object(Bucket=world.bucket, Key=f"{folder}/00.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == hashlib.sha256(datas[0]).hexdigest()
    assert "arch/.fetcher/state.sqlite" in objects
    assert "arch/.fetcher/lock" not in objects


def uploaded_bodies(world: World) -> list[tuple[str, str | None, str]]:
    """Archive a video (in parts) and a two-image task; each body sent: path, Content-MD5, MD5."""
    tid = task_id(4, "AigcVideoTask")
    add_video_task(world.replica, tid, size=LARGE)
    add_image_task(world.replica, task_id(5), 2)

    run(world.settings, tid, task_id(5))

    uploads = [
        d
        for d in world.proxy.digests
        if "/.fetcher/lock" not in d[0] and not ("uploadId=" in d[0] and "partNumber=" not in d[0])
    ]
    assert len(uploads) >= 9  # 5 parts, 2 images, 2 sidecars (and the snapshot)
    return uploads


def test_every_upload_carries_the_md5_of_its_bytes(world: World) -> None:
    """Each PUT, part or whole, sends a Content-MD5 the store can check the body against."""
    uploads = uploaded_bodies(world)

    assert [(path, sent) for path, sent, actual in uploads if sent != actual] == []


def test_upload_bodies_are_hashed_once_not_signed(world: World) -> None:
    """On plain HTTP too, a body is checked by its Content-MD5, not hashed again to sign it."""
    uploads = uploaded_bodies(world)

    signed = dict(world.proxy.payload_hashes)
    assert all(md5 for _, md5, _ in uploads)
    assert {signed[path] for path, _, _ in uploads} == {"UNSIGNED-PAYLOAD"}


def test_moto_takes_a_wrong_content_md5(world: World) -> None:
    """What the test server does with a Content-MD5 that does not match: it stores the object.

    So the store's own check is not exercised here (a real S3 answers BadDigest);
    the test above checks what fetcher sends instead.
    """
    wrong = "1B2M2Y8AsgTpgAmY7PhCfg=="  # the MD5 of no bytes
    world.client.put_object(Bucket=world.bucket, Key="k", Body=b"data", ContentMD5=wrong)
    assert world.client.get_object(Bucket=world.bucket, Key="k")["Body"].read() == b"data"


def test_a_large_file_goes_up_in_parts_several_at_once(world: World) -> None:
    """A file over 16 MiB is a multipart upload with parts in flight together."""
    tid = task_id(6, "AigcVideoTask")
    data = add_video_task(world.replica, tid, size=LARGE)

    summary = run(world.settings, tid)

    assert summary.counts[Outcome.ARCHIVED] == 1
    parts = [p for m, p in world.proxy.requests() if m == "PUT" and "partNumber=" in p]
    assert len(parts) == 5
    assert world.proxy.most_parts >= 2
    (key,) = [k for k in object_paths(world) if k.endswith("00.mp4")]
    assert world.client.get_object(Bucket=world.bucket, Key=key)["Body"].read() == data


def test_a_rerun_asks_nothing_of_archived_objects(world: World) -> None:
    """A second run over archived tasks: no API query, no file, no request on an object."""
    ids = [task_id(n) for n in range(10, 14)]
    for tid in ids:
        add_image_task(world.replica, tid, 2)
    run(world.settings, *ids)
    world.proxy.clear()
    api_before, files_before = len(world.replica.seen("api")), len(world.replica.seen("files"))

    summary = run(world.settings, *ids)

    assert summary.counts[Outcome.ALREADY_ARCHIVED] == 4
    assert len(world.replica.seen("api")) == api_before
    assert len(world.replica.seen("files")) == files_before
    for method, path in world.proxy.requests():
        bucket_level = path.split("?")[0] in (f"/{world.bucket}", f"/{world.bucket}/")
        assert bucket_level or path.startswith(f"/{world.bucket}/arch/.fetcher/"), (method, path)


def test_the_snapshot_is_uploaded_only_when_the_state_changed(world: World) -> None:
    """An unchanged state is not uploaded again; a changed one is."""
    add_image_task(world.replica, task_id(20))
    run(world.settings, task_id(20))
    world.proxy.clear()
    run(world.settings, task_id(20))
    assert ("PUT", f"/{world.bucket}/arch/.fetcher/state.sqlite") not in world.proxy.requests()
    add_image_task(world.replica, task_id(21))
    run(world.settings, task_id(21))
    assert ("PUT", f"/{world.bucket}/arch/.fetcher/state.sqlite") in world.proxy.requests()


def test_a_postgresql_state_keeps_no_snapshot_in_the_bucket(
    world: World, postgres_url: DatabaseUrl, tmp_path: Path
) -> None:
    """With the state in PostgreSQL the bucket gets the files and sidecars and no snapshot,
    no SQLite file is made here, and another host's run finds the task archived."""
    tid = task_id(30)
    add_image_task(world.replica, tid, 2)
    shared = tweak(world.settings, state=postgres_url)

    assert run(shared, tid).counts[Outcome.ARCHIVED] == 1

    assert not any("/.fetcher/state" in key for key in object_paths(world))
    assert not (tmp_path / "state.sqlite").exists()
    elsewhere = tweak(shared, archive=BucketUrl(world.bucket, "arch"))
    assert run(elsewhere, tid).counts[Outcome.ALREADY_ARCHIVED] == 1


def test_a_fresh_host_starts_from_the_snapshot(world: World, tmp_path: Path) -> None:
    """With no local state, the bucket's snapshot is the state: nothing is fetched again."""
    ids = [task_id(n) for n in range(30, 33)]
    for tid in ids:
        add_image_task(world.replica, tid)
    run(world.settings, *ids)
    fresh = tweak(world.settings, state=tmp_path / "other-host" / "state.sqlite")
    files_before = len(world.replica.seen("files"))

    summary = run(fresh, *ids)

    assert summary.counts[Outcome.ALREADY_ARCHIVED] == 3
    assert len(world.replica.seen("files")) == files_before
    status = world.run_cli("status", "--json", state=tmp_path / "third-host" / "state.sqlite")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["archived"] == 3


def snapshot_counts(world: World, host: str) -> dict[str, int]:
    """The task counts a host with no state of its own reads from the bucket's snapshot."""
    status = world.run_cli("status", "--json", state=world.tmp / host / "state.sqlite")
    assert status.returncode == 0, status.stderr
    counts: dict[str, int] = json.loads(status.stdout)["counts"]
    return counts


def test_a_run_stopped_by_an_error_still_stores_its_snapshot(world: World) -> None:
    """The key refused after one task was archived: the bucket's snapshot records that task."""
    done, refused = task_id(25), task_id(26)
    add_image_task(world.replica, done)
    add_image_task(world.replica, refused)
    # Late enough that the first task is archived before the refusal stops the run.
    world.replica.fault("api", refused, ReplicaFault(status=401, delay=2.0))

    with pytest.raises(AuthError):
        run(tweak(world.settings, concurrency=1), done, refused)

    assert "arch/.fetcher/state.sqlite" in object_paths(world)
    assert snapshot_counts(world, "fresh-host")["archived"] == 1


def test_an_interrupted_run_stores_its_snapshot(world: World) -> None:
    """SIGTERM while a file is going up: what was archived before is in the snapshot."""
    done, held = task_id(27), task_id(28)
    add_image_task(world.replica, done)
    add_image_task(world.replica, held)
    assert world.run_cli("fetch", "--id", done).returncode == 0
    # Gone, so only the interrupted run can have stored the one read below.
    world.client.delete_object(Bucket=world.bucket, Key="arch/.fetcher/state.sqlite")
    world.proxy.faults.append(Fault("PUT", f"{held}/00.png", hold="before"))
    second = world.cli("fetch", "--id", held)
    assert world.proxy.holding.wait(30)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=60)

    assert second.returncode == 143, err
    assert snapshot_counts(world, "fresh-host")["archived"] == 1


def test_a_failing_store_is_not_sent_the_snapshot(world: World) -> None:
    """When the store is what stopped the run, the run does not try it once more."""
    add_image_task(world.replica, task_id(29))
    world.proxy.faults.append(Fault("PUT", "/00.png", 503, "SlowDown", times=100))
    result = world.run_cli("fetch", "--id", task_id(29), "--retries", "1")
    assert result.returncode == 3, result.stderr
    snapshot = [(m, p) for m, p in world.proxy.requests() if p.endswith("/.fetcher/state.sqlite")]
    assert [(m, p) for m, p in snapshot if m != "GET"] == []  # only the restore's look


# -- the store's trouble ----------------------------------------------------------------


def test_throttling_and_dropped_connections_are_retried(world: World) -> None:
    """503 SlowDown, a 500 and a dropped connection: retried, and the file archived once."""
    tid = task_id(40)
    add_image_task(world.replica, tid)
    world.proxy.faults += [
        Fault("PUT", "/00.png", 503, "SlowDown"),
        Fault("PUT", "/00.png", 500, "InternalError"),
        Fault("PUT", "/task.json", drop=True),
    ]
    summary = run(tweak(world.settings, retries=3), tid)

    assert summary.counts[Outcome.ARCHIVED] == 1
    puts = [p for m, p in world.proxy.requests() if m == "PUT" and p.endswith("/00.png")]
    assert len(puts) == 3
    assert len(file_requests(world)) == 1


def test_a_store_still_failing_after_the_retries_stops_the_run(world: World) -> None:
    """A store answering 503 to every try stops the run with exit 3, one line."""
    add_image_task(world.replica, task_id(41))
    world.proxy.faults.append(Fault("PUT", "/00.png", 503, "SlowDown", times=100))
    result = world.run_cli("fetch", "--id", task_id(41), "--retries", "2")
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fetcher: error: bucket {world.bucket!r}: put object failed: SlowDown (3 attempts)"
    ]


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        pytest.param(
            Fault("PUT", "/.fetcher/lock", 403, "InvalidAccessKeyId"),
            "the store rejected the AWS credentials (InvalidAccessKeyId)",
            id="wrong-key",
        ),
        pytest.param(
            Fault("PUT", "/00.png", 403, "AccessDenied"),
            "access denied to bucket",
            id="denied-write",
        ),
    ],
)
def test_a_refusing_store_stops_the_run_with_one_line(
    world: World, fault: Fault, words: str
) -> None:
    """Wrong key or a denied write: exit 2 at once, one line naming the bucket, no secret."""
    add_image_task(world.replica, task_id(42))
    world.proxy.faults.append(fault)
    result = world.run_cli("fetch", "--id", task_id(42), "--json", "-v")
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("fetcher: error:")]
    assert words in line and repr(world.bucket) in line
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "store"
    assert SECRET not in result.stdout + result.stderr


def test_a_missing_bucket_is_named(world: World) -> None:
    """A bucket that does not exist: exit 2, one line, before any query."""
    result = world.run_cli("fetch", "--id", task_id(43), "--archive", "s3://no-such-bucket-here")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fetcher: error: bucket 'no-such-bucket-here' does not exist at "
        f"{world.proxy.url.removeprefix('http://')}"
    ]
    assert world.replica.seen("api") == []


def test_a_full_quota_is_reported_like_a_full_disk(world: World) -> None:
    """The store's quota error stops the run with the archive's exit code, 3."""
    add_image_task(world.replica, task_id(44))
    world.proxy.faults.append(Fault("PUT", "/00.png", 403, "QuotaExceeded"))
    result = world.run_cli("fetch", "--id", task_id(44))
    assert result.returncode == 3
    assert "is full (QuotaExceeded)" in result.stderr


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://a b/x"])
def test_a_bucket_url_without_a_bucket_is_a_usage_error(world: World, url: str) -> None:
    """No bucket (or no valid one) in the URL: exit 2, one line."""
    result = world.run_cli("fetch", "--id", task_id(45), "--archive", url)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "bucket" in result.stderr


def test_a_failed_multipart_upload_is_aborted(world: World) -> None:
    """A part that keeps failing: the upload is aborted, none is left open."""
    tid = task_id(46, "AigcVideoTask")
    add_video_task(world.replica, tid, size=LARGE)
    world.proxy.faults.append(Fault("PUT", "partNumber=2", 500, "InternalError", times=100))
    result = world.run_cli("fetch", "--id", tid, "--retries", "1")
    assert result.returncode == 3
    assert world.client.list_multipart_uploads(Bucket=world.bucket).get("Uploads", []) == []


def test_stale_multipart_uploads_are_aborted_when_the_lock_is_taken(world: World) -> None:
    """Uploads a killed run left open under the prefix are aborted; others are left alone."""
    stale = world.client.create_multipart_upload(Bucket=world.bucket, Key="arch/x/00.mp4")
    other = world.client.create_multipart_upload(Bucket=world.bucket, Key="elsewhere/00.mp4")
    add_image_task(world.replica, task_id(47))
    run(world.settings, task_id(47))
    left = world.client.list_multipart_uploads(Bucket=world.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]
    assert stale["UploadId"] not in [u["UploadId"] for u in left]


# -- the lock ---------------------------------------------------------------------------


def test_a_second_run_on_the_bucket_exits_75(world: World) -> None:
    """While one run holds the bucket's lock another exits 75, or waits with --wait-lock."""
    tid = task_id(50)
    add_image_task(world.replica, tid)
    world.proxy.faults.append(Fault("PUT", "/00.png", hold="before"))
    first = world.cli("fetch", "--id", tid)
    try:
        assert world.proxy.holding.wait(30)
        second = world.run_cli("fetch", "--id", tid, state=world.tmp / "b.sqlite")
        assert second.returncode == 75
        assert "holds the lock on s3://" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.communicate()


def test_a_lock_naming_a_dead_process_here_is_taken_over(world: World) -> None:
    """A killed run's lock (this host, a PID that is gone) does not block the next run."""
    tid = task_id(51)
    add_image_task(world.replica, tid)
    world.proxy.faults.append(Fault("PUT", "/00.png", hold="before"))
    first = world.cli("fetch", "--id", tid)
    assert world.proxy.holding.wait(30)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert "arch/.fetcher/lock" in object_paths(world)

    again = world.run_cli("fetch", "--id", tid)

    assert again.returncode == 0, again.stderr
    assert "arch/.fetcher/lock" not in object_paths(world)


LOCK = "arch/.fetcher/lock"


def plant_lock(world: World, host: str, pid: int) -> None:
    """A lock object as another run writes it."""
    document = {"host": host, "pid": pid, "renewed": "2026-01-01T00:00:00+00:00"}
    world.client.put_object(Bucket=world.bucket, Key=LOCK, Body=json.dumps(document).encode())


def gone_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return int(child.stdout)


@pytest.mark.parametrize(
    ("host", "pid", "age", "code"),
    [
        pytest.param("elsewhere", 4242, 90.0, 0, id="lapsed-other-host"),
        pytest.param("elsewhere", 4242, 30.0, 75, id="live-other-host"),
        pytest.param(None, None, 0.0, 0, id="dead-pid-this-host"),
        pytest.param(None, os.getpid(), 0.0, 75, id="live-pid-this-host"),
    ],
)
def test_a_planted_lock_is_taken_over_only_when_lapsed_or_its_run_is_gone(
    world: World, host: str | None, pid: int | None, age: float, code: int
) -> None:
    """A lock last renewed over 60 s ago by the store's clock, or naming this host and a
    PID that no longer runs, is taken over; a live one makes the run exit 75."""
    add_image_task(world.replica, task_id(53))
    plant_lock(world, host or socket.gethostname(), pid or gone_pid())
    world.proxy.aged[f"/{LOCK}"] = age

    result = world.run_cli("fetch", "--id", task_id(53))

    assert result.returncode == code, result.stderr
    if code == 75:
        (line,) = result.stderr.strip().splitlines()
        assert "holds the lock on s3://" in line and f"pid {pid}" in line
        assert LOCK in object_paths(world)  # still the other run's
    else:
        assert LOCK not in object_paths(world)  # taken over, then released
        assert snapshot_counts(world, "fresh-host")["archived"] == 1


def test_a_run_that_loses_its_lock_stops_with_exit_75(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another writer replaces the lock mid-run: the next renewal sees it, the run stops
    taking work, leaves the other run's lock and snapshot alone, and exits 75 with one line."""
    from fetcher.cli import main
    from fetcher.stores import s3lock

    monkeypatch.setattr(s3lock, "RENEW", 0.2)
    for name, value in world.cli_env().items():
        monkeypatch.setenv(name, value)
    tid = task_id(54)
    add_image_task(world.replica, tid)
    world.proxy.faults.append(Fault("PUT", "/00.png", hold="before"))

    def intruder() -> None:
        assert world.proxy.holding.wait(30)
        plant_lock(world, "elsewhere", 4242)

    thread = threading.Thread(target=intruder)
    thread.start()
    code = main(["fetch", "--id", tid, "--json", "--no-progress"])
    thread.join()

    out, err = capsys.readouterr()
    assert code == 75, err
    assert [line for line in err.splitlines() if "lock" in line] == [
        f"fetcher: error: lost the lock on s3://{world.bucket}/arch: another run took it over;"
        " this run stopped taking work"
    ]
    assert json.loads(out)["error"]["code"] == "locked"
    assert json.loads(world.objects()[LOCK])["host"] == "elsewhere"
    assert "arch/.fetcher/state.sqlite" not in object_paths(world)


def test_a_repair_that_loses_its_lock_stops_with_exit_75(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify --repair under a lock another writer replaces: it stops, stores no snapshot,
    leaves the other run's lock, and exits 75 with one line."""
    from fetcher.cli import main
    from fetcher.stores import s3lock

    monkeypatch.setattr(s3lock, "RENEW", 0.2)
    for name, value in world.cli_env().items():
        monkeypatch.setenv(name, value)
    add_image_task(world.replica, task_id(55))
    run(world.settings, task_id(55))
    (key,) = [k for k in object_paths(world) if k.endswith("00.png")]
    world.client.delete_object(Bucket=world.bucket, Key=key)
    world.proxy.faults.append(Fault("PUT", "/00.png", hold="before"))
    world.proxy.clear()

    def intruder() -> None:
        assert world.proxy.holding.wait(30)
        plant_lock(world, "elsewhere", 4242)

    thread = threading.Thread(target=intruder)
    thread.start()
    code = main(["verify", "--repair", "--no-progress"])
    thread.join()

    err = capsys.readouterr().err
    assert code == 75, err
    assert err.strip().splitlines() == [
        f"fetcher: error: lost the lock on s3://{world.bucket}/arch: another run took it over;"
        " this run stopped taking work"
    ]
    assert json.loads(world.objects()[LOCK])["host"] == "elsewhere"
    assert ("PUT", f"/{world.bucket}/arch/.fetcher/state.sqlite") not in world.proxy.requests()


def test_a_lock_lapses_by_the_stores_clock() -> None:
    """Last-Modified over 60 s before the answer's Date is lapsed; within it, held."""
    from datetime import UTC, datetime

    from fetcher.stores.s3lock import BucketLock

    def answer(age: float) -> dict[str, Any]:
        modified = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        date = datetime.fromtimestamp(modified.timestamp() + age, UTC)
        http_date = date.strftime("%a, %d %b %Y %H:%M:%S GMT")
        return {"LastModified": modified, "ResponseMetadata": {"HTTPHeaders": {"date": http_date}}}

    assert BucketLock._lapsed(answer(61))
    assert not BucketLock._lapsed(answer(59))


# -- killed runs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "stored"),
    [
        pytest.param(Fault("PUT", "/00.mp4", hold="before"), False, id="during-upload"),
        pytest.param(Fault("PUT", "/00.mp4", hold="after"), True, id="stored-unrecorded"),
        pytest.param(Fault("PUT", "/task.json", hold="before"), True, id="during-sidecar"),
        pytest.param(Fault("PUT", "/task.json", hold="after"), True, id="sidecar-no-row"),
        pytest.param(Fault("HEAD", "/.fetcher/state.sqlite", hold="before"), True, id="snapshot"),
    ],
)
def test_sigkill_at_each_step_then_a_rerun_completes_without_downloading_twice(
    world: World, fault: Fault, stored: bool
) -> None:
    """Killed at any step of the commit order, the next run completes the archive, and a
    file once stored is not downloaded again."""
    tid = task_id(60, "AigcVideoTask")
    data = add_video_task(world.replica, tid)
    world.proxy.faults.append(fault)
    first = world.cli("fetch", "--id", tid)
    assert world.proxy.holding.wait(30)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    downloads = len(file_requests(world))

    again = world.run_cli("fetch", "--id", tid)

    assert again.returncode == 0, again.stderr
    objects = world.objects()
    (key,) = [k for k in objects if k.endswith("00.mp4")]
    assert objects[key] == data
    assert json.loads(objects[key.replace("00.mp4", "task.json")])["task_id"] == tid
    if stored:
        assert len(file_requests(world)) == downloads
    status = world.run_cli("status", "--json")
    assert json.loads(status.stdout)["counts"]["archived"] == 1


# -- verify -----------------------------------------------------------------------------


def test_verify_finds_missing_and_corrupt_objects_and_repairs_them(world: World) -> None:
    """HEAD finds a missing or resized object; --deep finds bytes changed under the same
    size and checksum; --repair uploads them again."""
    ids = [task_id(n) for n in range(70, 73)]
    for tid in ids:
        add_image_task(world.replica, tid)
    run(world.settings, *ids)
    keys = sorted(k for k in object_paths(world) if k.endswith("00.png"))
    assert world.run_cli("verify").returncode == 0
    world.client.delete_object(Bucket=world.bucket, Key=keys[0])
    world.client.put_object(Bucket=world.bucket, Key=keys[1], Body=b"short")
    head = world.client.head_object(Bucket=world.bucket, Key=keys[2])
    size = head["ContentLength"]
    world.client.put_object(
        Bucket=world.bucket, Key=keys[2], Body=b"x" * size, Metadata=head["Metadata"]
    )

    shallow = world.run_cli("verify", "--json")
    deep = world.run_cli("verify", "--json", "--deep")
    repaired = world.run_cli("verify", "--repair", "--json")
    after = world.run_cli("verify", "--deep", "--json")

    assert shallow.returncode == 1
    found = {p["path"]: p["found"] for p in json.loads(shallow.stdout)["problems"]}
    assert sorted(found.values()) == ["corrupt", "missing"]
    assert deep.returncode == 1
    assert json.loads(deep.stdout)["corrupt"] == 2
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["repaired"] == 2
    assert after.returncode == 1  # the same-size change is found only by --deep
    again = world.run_cli("verify", "--repair", "--deep", "--json")
    assert again.returncode == 0, again.stdout
    final = world.run_cli("verify", "--deep", "--json")
    assert final.returncode == 0
    assert json.loads(final.stdout)["problems"] == []
    assert {p["problem"] for p in json.loads(repaired.stdout)["problems"]} == {
        Problem.REPAIRED.value
    }


def only_problem(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)["problems"]
    problem: dict[str, Any] = entry
    return problem


def test_repair_copies_a_corrupt_object_to_quarantine_first(world: World) -> None:
    """A damaged object is copied under PREFIX/.fetcher/quarantine/ at its own path before the
    repair overwrites it; a second damage of the same object gets a name of its own."""
    add_image_task(world.replica, task_id(73))
    run(world.settings, task_id(73))
    (key,) = [k for k in object_paths(world) if k.endswith("00.png")]
    relative = key.removeprefix("arch/")
    good = world.objects()[key]
    damages = [b"damaged once", b"damaged twice"]
    for damaged in damages:
        world.client.put_object(Bucket=world.bucket, Key=key, Body=damaged)

        entry = only_problem(world.run_cli("verify", "--repair", "--json"))

        assert entry["problem"] == "repaired"
    objects = world.objects()
    assert objects[key] == good
    assert objects[f"arch/.fetcher/quarantine/{relative}"] == damages[0]
    assert objects[f"arch/.fetcher/quarantine/{relative}.1"] == damages[1]
    assert entry["quarantined"] == f".fetcher/quarantine/{relative}.1"
    assert world.run_cli("verify", "--deep").returncode == 0


def test_repair_accepting_changes_keeps_the_original_sha256_in_the_sidecar(world: World) -> None:
    """--accept-changed: the host's new bytes replace the object, and the sidecar's entry takes
    them while its original_sha256 stays the first one's, over two changes in a row."""
    tid = task_id(74)
    add_image_task(world.replica, tid)
    run(world.settings, tid)
    (key,) = [k for k in object_paths(world) if k.endswith("00.png")]
    first_sha = hashlib.sha256(world.objects()[key]).hexdigest()
    for seed in (99, 100):
        new = png(20, 20, seed=seed)
        world.replica.add_file(f"{tid}/image_0.png", new)
        world.client.put_object(Bucket=world.bucket, Key=key, Body=b"damaged")

        entry = only_problem(world.run_cli("verify", "--repair", "--accept-changed", "--json"))

        assert entry["problem"] == "replaced-different"
        objects = world.objects()
        assert objects[key] == new
        (document,) = json.loads(objects[key.replace("00.png", "task.json")])["files"]
        new_sha = hashlib.sha256(new).hexdigest()
        assert (document["sha256"], document["size"]) == (new_sha, len(new))
        assert document["original_sha256"] == first_sha
    assert world.run_cli("verify", "--deep").returncode == 0


# -- keys and secrets -------------------------------------------------------------------

_hostile = st.lists(
    st.sampled_from(["..", ".", "/", "\\", "a", "%2e", "\x00", " ", ".fetcher", "~"]),
    min_size=1,
    max_size=12,
).map("".join)


@given(task=_hostile, kind=_hostile, model=_hostile)
@hypothesis_settings(max_examples=300, deadline=None)
def test_every_key_stays_under_the_prefix(task: str, kind: str, model: str) -> None:
    """Whatever the API returns for a layout's fields, the object key is under PREFIX/ and
    outside PREFIX/.fetcher/."""
    from fetcher.stores.s3 import S3Store

    store = S3Store(BucketUrl("bucket", "team/arch"))
    layout = Layout("{model_name}/{task_type}/{task_id}")
    try:
        folder = layout.render(LayoutFields(task_id=task, task_type=kind, model_name=model))
    except UsageError:
        return  # nothing left to name a folder: refused before any key is made
    for relative in (folder / "00.png", folder / "task.json"):
        key = store._key(PurePosixPath(relative))
        assert key.startswith("team/arch/")
        parts = key.split("/")
        assert ".." not in parts and "." not in parts and "" not in parts
        assert parts[2] != ".fetcher"


def test_the_aws_secret_appears_nowhere(world: World) -> None:
    """Not in output, -v logs, --json, sidecars, objects or the state snapshot."""
    add_image_task(world.replica, task_id(80), 2)
    world.proxy.faults.append(Fault("PUT", "/00.png", 503, "SlowDown"))
    result = world.run_cli("fetch", "--id", task_id(80), "--json", "-v")
    status = world.run_cli("status", "--json")
    verify = world.run_cli("verify", "--json", "-q")
    assert result.returncode == 0, result.stderr
    texts = [result.stdout, result.stderr, status.stdout, verify.stdout]
    assert not [t for t in texts if SECRET in t]
    assert not [k for k, v in world.objects().items() if SECRET.encode() in v]
    assert SECRET.encode() not in (world.tmp / "state.sqlite").read_bytes()
    assert world.replica.api_key.encode() not in world.objects()["arch/.fetcher/state.sqlite"]


def test_the_bucket_library_is_imported_only_for_a_bucket() -> None:
    """``import fetcher.cli`` and a folder's run never load botocore."""
    code = (
        "import sys, fetcher.cli, fetcher.pipeline, fetcher.status, fetcher.verify\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'aiobotocore')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


def test_addressing_auto_is_path_style_for_an_ip_endpoint(world: World) -> None:
    """auto puts the bucket in the path for 127.0.0.1; virtual would need DNS for it."""
    add_image_task(world.replica, task_id(81))
    run(tweak(world.settings, s3_addressing="auto"), task_id(81))
    assert all(p.startswith(f"/{world.bucket}") for _, p in world.proxy.requests())
