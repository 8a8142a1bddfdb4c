"""Behaviour of a run on the file-host side: expiry, refusals, resume, integrity, work files."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import add_image_task, add_video_task, archived_files, run, task_id, tweak
from test_fetch import db_row, image_file, outcome_of, sidecar

from fetcher.config import Settings
from fetcher.replica import Fault, Replica, file_info, pseudo_video, task_response
from fetcher.summary import Outcome


def leftovers(archive: Path) -> list[str]:
    """Work or temp files visible outside ``.fetcher``."""
    return [p for p in archived_files(archive) if p.endswith((".part", ".tmp"))]


# -- expiry and missing files ---------------------------------------------------------------


def test_file_served_after_its_expire_time_is_archived(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A host that still serves a file 2 minutes after its ExpireTime: the file is archived."""
    tid = task_id(12)
    data, url = image_file(replica, tid)
    past = datetime.now(UTC) - timedelta(minutes=2)
    replica.set_task(tid, task_response(tid, files=[file_info(url, expire=past)]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED, got.reason
    assert summary.exit_code == 0
    assert data in archived_files(archive_dir).values()
    assert db_row(archive_dir, tid) == ("archived", 1, None)


def test_file_refused_after_its_expire_time_is_expired_for_good(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Past its ExpireTime, the host's 404 (asked once, no re-query) records the file expired."""
    tid = task_id(14)
    _, url = image_file(replica, tid)
    replica.remove_file(url.removeprefix(replica.files_url))
    past = datetime.now(UTC) - timedelta(minutes=2)
    replica.set_task(tid, task_response(tid, files=[file_info(url, expire=past)]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.EXPIRED
    assert "expired at" in str(got.reason)
    assert summary.exit_code == 1
    assert len(replica.seen("files")) == 1
    assert len(replica.seen("api")) == 1
    state, final, _ = db_row(archive_dir, tid) or ("", 0, None)
    assert (state, final) == ("expired", 1)


def test_file_missing_on_host_before_expiry_fails(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A 404 from the file host for a file not yet expired fails the task; nothing is archived."""
    tid = task_id(13)
    url = replica.files_url + f"/{tid}/never-uploaded.png"
    replica.set_task(tid, task_response(tid, files=[file_info(url)]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert "404" in str(got.reason)
    assert archived_files(archive_dir) == {}
    state, _, _ = db_row(archive_dir, tid) or ("", 0, None)
    assert state == "failed"


# -- refused URLs ---------------------------------------------------------------------------


def test_file_url_on_the_api_origin_is_refused(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A FileUrl pointing at the API's origin fails the task without being requested."""
    tid = task_id(43)
    url = replica.api_url + "/tencent-vod/v1/query/" + tid
    replica.set_task(tid, task_response(tid, files=[file_info(url)]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert "API's origin" in str(got.reason)
    assert len(replica.seen("api")) == 1
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}


def test_file_url_naming_the_api_host_in_punycode_is_refused(tmp_path: Path) -> None:
    """An IDNA API host and its punycode spelling are one origin: that FileUrl is refused too."""
    from fetcher.api import ApiClient
    from fetcher.download import Downloader
    from fetcher.errors import DownloadError
    from fetcher.models import RemoteFile
    from fetcher.retry import RetryPolicy

    policy = RetryPolicy(retries=0)
    api = ApiClient(
        "http://b\u00fccher.example", "key", timeout=1, policy=policy, rate=1, concurrency=1
    )

    async def attempt() -> None:
        async with Downloader(
            timeout=1,
            policy=policy,
            max_file_size=1000,
            api_origin=api.origin,
            connections=1,
        ) as downloader:
            url = "http://xn--bcher-kva.example/x.png"
            await downloader.download("t", RemoteFile(0, url, None), tmp_path / "w.part")

    with pytest.raises(DownloadError, match="points at the API's origin"):
        asyncio.run(attempt())


# -- downloads ------------------------------------------------------------------------------


def test_dropped_download_resumes_with_range(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A connection dropped mid-body is resumed from the bytes received, ending byte-identical."""
    tid = task_id(70, "AigcVideoTask")
    data = add_video_task(replica, tid, size=300_000)
    cut = 123_457
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=cut))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    requests = replica.seen("files")
    assert len(requests) == 2
    assert "Range" not in requests[0].headers
    assert requests[1].headers.get("Range") == f"bytes={cut}-"
    on_disk = (archive_dir / str(got.folder) / "00.mp4").read_bytes()
    assert on_disk == data
    assert sidecar(archive_dir, str(got.folder))["files"][0]["sha256"] == (
        hashlib.sha256(data).hexdigest()
    )
    assert summary.bytes_downloaded == len(data)


def test_wrong_md5_fails_and_leaves_nothing_visible(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Bytes that do not match MetaData.Md5 fail the task as an integrity error, never archived."""
    tid = task_id(71)
    data, url = image_file(replica, tid)
    wrong = hashlib.md5(data + b"x").hexdigest()
    replica.set_task(tid, task_response(tid, files=[file_info(url, md5=wrong)]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert "MD5" in str(got.reason)
    assert archived_files(archive_dir) == {}
    assert len(replica.seen("files")) == settings.retries + 1
    state, _, _ = db_row(archive_dir, tid) or ("", 0, None)
    assert state == "failed"


def _html() -> Fault:
    return Fault(status=200, headers={"Content-Type": "text/html"}, body=b"<html>")


def _empty() -> Fault:
    return Fault(status=200, headers={"Content-Type": "image/png"}, body=b"")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(_html, id="html-page"),
        pytest.param(_empty, id="empty-body"),
    ],
)
def test_bogus_body_is_rejected_then_retried(
    replica: Replica, settings: Settings, archive_dir: Path, bad: Any
) -> None:
    """An HTML page or empty body in place of the file is never archived; a retry gets the file."""
    tid = task_id(72)
    (data,) = add_image_task(replica, tid)
    replica.fault("files", f"{tid}/image_0.png", bad())

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data
    assert len(replica.seen("files")) == 2
    # The retry started over instead of resuming after the bogus bytes.
    assert "Range" not in replica.seen("files")[1].headers


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        pytest.param(_html, "HTML", id="html-page"),
        pytest.param(_empty, "empty body", id="empty-body"),
    ],
)
def test_bogus_body_every_time_fails_the_task(
    replica: Replica, settings: Settings, archive_dir: Path, bad: Any, needle: str
) -> None:
    """A host that only ever sends an HTML page or an empty body fails the task with the cause."""
    tid = task_id(73)
    add_image_task(replica, tid)
    replica.fault("files", f"{tid}/image_0.png", *[bad() for _ in range(settings.retries + 1)])

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert needle in str(got.reason)
    assert archived_files(archive_dir) == {}


# -- work files -----------------------------------------------------------------------------


def test_successful_run_leaves_no_work_files(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """After a successful run, the work folder is empty and no .part/.tmp file is visible."""
    tids = [task_id(90), task_id(91, "AigcVideoTask")]
    add_image_task(replica, tids[0], count=3)
    add_video_task(replica, tids[1])
    replica.fault("files", f"{tids[1]}/video.mp4", Fault(drop_after=1000))

    summary = run(settings, *tids)

    assert summary.counts[Outcome.ARCHIVED] == 2
    assert list((archive_dir / ".fetcher" / "work").iterdir()) == []
    assert leftovers(archive_dir) == []


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(status=503), id="server-error"),
        pytest.param(Fault(drop_after=500), id="dropped"),
        pytest.param(_html(), id="html"),
    ],
)
def test_failed_downloads_leave_no_partial_files_visible(
    replica: Replica, settings: Settings, archive_dir: Path, fault: Fault
) -> None:
    """A download that keeps failing never leaves a .part/.tmp file in the visible archive."""
    tid = task_id(92)
    _, image_url = image_file(replica, tid)
    # Big enough that three resumed 500-byte slices do not complete it.
    video_url = replica.add_file(f"{tid}/clip.mp4", pseudo_video(50_000), "video/mp4")
    infos = [file_info(image_url), file_info(video_url, file_type="video")]
    replica.set_task(tid, task_response(tid, files=infos))
    replica.fault("files", f"{tid}/clip.mp4", *[fault] * (settings.retries + 1))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert leftovers(archive_dir) == []
    visible = archived_files(archive_dir)
    # The good file and a sidecar naming the missing one; nothing half-written.
    assert sorted(Path(p).name for p in visible) == ["00.png", "task.json"]
    entries = json.loads(visible[f"{got.folder}/task.json"])["files"]
    assert entries[1]["path"] is None
    assert entries[1]["missing"]


def test_files_are_downloaded_earliest_expiry_first(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Behind a busy download slot, the file that expires soonest is fetched next."""
    now = datetime.now(UTC)
    blocker, late, soon, middle = (task_id(90 + n) for n in range(4))
    expiries = {blocker: 7, late: 6, soon: 1, middle: 3}
    for tid, days in expiries.items():
        _, url = image_file(replica, tid)
        replica.set_task(
            tid, task_response(tid, files=[file_info(url, expire=now + timedelta(days=days))])
        )
    # One query at a time, one download at a time: the blocker's slow answer lets the
    # other three pile up in the queue before the worker is free again.
    replica.fault("files", f"{blocker}/image_0.png", Fault(delay=0.5))
    ordered = run(tweak(settings, concurrency=1, downloads=1), blocker, late, soon, middle)

    assert ordered.counts[Outcome.ARCHIVED] == 4
    fetched = [r.path.split("/")[1] for r in replica.seen("files")]
    assert fetched == [blocker, soon, middle, late]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://[oops/x.png", id="broken-ipv6-host"),
        pytest.param("http://127.0.0.1:99999/x.png", id="port-out-of-range"),
    ],
)
def test_unparseable_url_from_anywhere_is_a_download_error(tmp_path: Path, url: str) -> None:
    """A URL that skipped the API's parser (read back from the database) is refused cleanly."""
    from fetcher.download import Downloader
    from fetcher.errors import DownloadError
    from fetcher.models import RemoteFile
    from fetcher.retry import RetryPolicy

    async def attempt() -> None:
        async with Downloader(
            timeout=1,
            policy=RetryPolicy(retries=0),
            max_file_size=1000,
            api_origin=None,
            connections=1,
        ) as downloader:
            await downloader.download("t", RemoteFile(0, url, None), tmp_path / "w.part")

    with pytest.raises(DownloadError, match="unusable FileUrl"):
        asyncio.run(attempt())


@pytest.mark.parametrize(
    ("promised", "sent"),
    [
        pytest.param(300_000, 1_000, id="short-with-matching-content-length"),
        pytest.param(500, 1_000, id="longer-with-matching-content-length"),
    ],
)
def test_body_that_does_not_match_metadata_size_is_retried_then_fails(
    replica: Replica, settings: Settings, archive_dir: Path, promised: int, sent: int
) -> None:
    """MetaData.Size says one size, the host another (Content-Length agreeing with its body,
    no Md5): not archived; tried from scratch each attempt, then an integrity failure that
    the next run retries; a host that mends it is archived then."""
    tid = task_id(40, "AigcVideoTask")
    whole = pseudo_video(promised, seed=4)
    url = replica.add_file(f"{tid}/v.mp4", pseudo_video(sent, seed=5), "video/mp4")
    info = file_info(url, size=promised, file_type="video")
    replica.set_task(tid, task_response(tid, task_type="AigcVideoTask", files=[info]))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert "MetaData.Size" in str(got.reason)
    assert summary.exit_code == 1
    requests = replica.seen("files")
    assert len(requests) == settings.retries + 1
    assert all("Range" not in r.headers for r in requests)
    assert not any(k.endswith(".mp4") for k in archived_files(archive_dir))
    assert db_row(archive_dir, tid) == ("failed", 0, got.reason)
    assert leftovers(archive_dir) == []

    replica.add_file(f"{tid}/v.mp4", whole, "video/mp4")
    again = run(settings, tid)

    assert outcome_of(again, tid).outcome is Outcome.ARCHIVED
    assert whole in archived_files(archive_dir).values()
