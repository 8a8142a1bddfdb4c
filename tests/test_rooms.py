"""Work folders on a PostgreSQL state: each run stages downloads in a folder of its own,
so a later run cleans what a killed run left, takes over its partial download to resume
it, and never touches the folder of a run still alive (on this host or another).

Every process here is a real ``fetcher`` against the replica, sharing one archive
folder and one throwaway PostgreSQL database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
from conftest import add_image_task, add_video_task, task_id, wait_for
from test_shared import finish, shared_env, start_fetch

from fetcher.replica import Fault, Replica
from fetcher.state import DatabaseUrl
from fetcher.stores import BucketUrl
from fetcher.stores.s3 import state_path
from tests.s3server import MotoServer


def rooms(archive: Path) -> list[Path]:
    """The runs' work folders in the archive."""
    return sorted((archive / ".fetcher" / "work").glob("run-*"))


def partial_bytes(archive: Path, work: Path | None = None) -> int:
    """Bytes of partial downloads in the archive's work folders (or ``work``'s)."""
    total = 0
    for part in (work or archive / ".fetcher" / "work").rglob("*.part"):
        try:
            total += part.stat().st_size
        except FileNotFoundError:
            continue
    return total


def resumed(replica: Replica) -> bool:
    """Whether the video was asked for twice, the second time for the rest only."""
    video = [s for s in replica.seen("files") if s.path.endswith("video.mp4")]
    return len(video) == 2 and video[1].headers.get("Range", "").startswith("bytes=")


def killed_then_resumed(replica: Replica, env: dict[str, str], partials: Callable[[], int]) -> None:
    """A run SIGKILLed mid-download of a video, then a run started once its lease lapsed:
    that one archives the task, asking the host only for the rest (a Range request)."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=3_000_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(drop_after=2_500_000, stall=10.0))
    killed = start_fetch(env, "--id", slow, "--lease", "1")
    wait_for(lambda: partials() >= 2**20)
    killed.kill()
    killed.communicate(timeout=30)
    time.sleep(1.5)  # its lease, and with it the run, lapses
    assert finish(start_fetch(env, "--pending"))["archived"] == 1
    assert resumed(replica)


def test_a_killed_runs_leftovers_are_cleaned_by_a_later_run(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """SIGKILL mid-download of a file that cannot be resumed (no validator); another host
    takes the task over and archives it; a later run here, over another task, removes the
    killed run's work folder."""
    slow = task_id(0, "AigcVideoTask")
    data = add_video_task(replica, slow, size=3_000_000)
    bare = {"Content-Type": "video/mp4"}  # no ETag, no Last-Modified: nothing to resume by
    replica.fault(
        "files",
        f"{slow}/video.mp4",
        Fault(status=200, headers=bare, body=data, drop_after=2_500_000, stall=10.0),
    )
    other = task_id(1)
    add_image_task(replica, other)
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    killed = start_fetch(env, "--id", slow, "--lease", "1")
    wait_for(lambda: partial_bytes(archive_dir) >= 2**20)
    killed.kill()
    killed.communicate(timeout=30)
    time.sleep(1.5)  # its lease, and with it the run, lapses
    # Another host, with the archive mounted elsewhere: its work folder is its own.
    elsewhere = shared_env(replica, tmp_path / "mounted", tmp_path, postgres_url)
    assert finish(start_fetch(elsewhere, "--pending"))["archived"] == 1

    summary = finish(start_fetch(env, "--id", other))

    assert summary["archived"] == 1
    assert list((archive_dir / ".fetcher" / "work").iterdir()) == []


def test_a_killed_runs_partial_is_resumed_from_its_folder(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """SIGKILL mid-download; a run started after the lease lapsed takes the task over,
    resumes the partial from the dead run's folder (a Range request), archives it, and
    leaves no work folder behind."""
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)

    killed_then_resumed(replica, env, lambda: partial_bytes(archive_dir))

    assert list((archive_dir / ".fetcher" / "work").iterdir()) == []


def test_a_live_runs_work_folder_is_never_touched(
    replica: Replica, archive_dir: Path, tmp_path: Path, postgres_url: DatabaseUrl
) -> None:
    """A run starting and ending while another is mid-download leaves the other's folder
    as it is, leftovers included; the other then resumes its own partial and archives."""
    slow = task_id(0, "AigcVideoTask")
    add_video_task(replica, slow, size=3_000_000)
    replica.fault("files", f"{slow}/video.mp4", Fault(drop_after=2_500_000, stall=20.0))
    quick = task_id(1)
    add_image_task(replica, quick)
    env = shared_env(replica, archive_dir, tmp_path, postgres_url)
    alive = start_fetch(env, "--id", slow, "--lease", "3")
    wait_for(lambda: partial_bytes(archive_dir) >= 2**20)
    (room,) = rooms(archive_dir)
    leftover = room / "0123456789abcdef.json.tmp"
    leftover.write_text("{}")
    before = {p.name: p.stat().st_ino for p in room.iterdir()}

    summary = finish(start_fetch(env, "--id", quick))

    assert summary["archived"] == 1
    assert {p.name: p.stat().st_ino for p in room.iterdir()} == before
    assert rooms(archive_dir) == [room]
    assert finish(alive)["archived"] == 1
    assert resumed(replica)
    assert leftover.exists()


def test_a_bucket_runs_partial_is_resumed_from_its_folder(
    replica: Replica,
    moto: MotoServer,
    aws_env: dict[str, str],
    tmp_path: Path,
    postgres_url: DatabaseUrl,
) -> None:
    """On a bucket archive the runs' folders are in this host's work folder for it: a run
    started after a SIGKILLed one's lease lapsed resumes its partial and leaves none."""
    bucket = f"rooms-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket=bucket)
    client.close()
    where = BucketUrl(bucket, "arch")
    held = state_path(where)
    work = held.with_name(held.name + ".work")
    env = shared_env(replica, tmp_path / "unused", tmp_path, postgres_url)
    env |= {"FETCHER_ARCHIVE": str(where), "FETCHER_S3_ENDPOINT": moto.url}

    killed_then_resumed(replica, env, lambda: partial_bytes(tmp_path, work))

    assert list(work.glob("run-*")) == []
