"""Fault injection: throttling, 5xx bursts, drops, stalls, truncation, redirects, oversized
bodies and hostile API data, each served by the loopback replica to a real fetch run.

Every test checks what the run did (outcome, reason, requests sent, bytes on disk),
and most put a healthy task beside the faulty one to show the run goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import add_image_task, archived_files, run, task_id, tweak
from test_fetch import db_row, outcome_of, sidecar

from fetcher import retry
from fetcher.api import MAX_RESPONSE_BYTES
from fetcher.config import Settings
from fetcher.download import MAX_REDIRECTS
from fetcher.replica import (
    QUERY_PREFIX,
    Fault,
    Replica,
    error_response,
    file_info,
    pseudo_video,
    task_response,
)
from fetcher.summary import Outcome, RunSummary

# -- helpers --------------------------------------------------------------------------------


def file_task(
    replica: Replica,
    tid: str,
    *,
    size: int = 5000,
    name: str = "clip.mp4",
    **info: Any,
) -> tuple[bytes, str]:
    """A finished task with one file of ``size`` bytes; returns its bytes and fault key."""
    data = pseudo_video(size, seed=size + len(tid))
    key = f"{tid}/{name}"
    url = replica.add_file(key, data, "video/mp4")
    replica.set_task(tid, task_response(tid, files=[file_info(url, file_type="video", **info)]))
    return data, key


def companion(replica: Replica, n: int = 900) -> tuple[str, bytes]:
    """A healthy task to run beside a faulty one; returns its ID and file bytes."""
    tid = task_id(n)
    (data,) = add_image_task(replica, tid)
    return tid, data


def assert_archived(summary: RunSummary, archive: Path, tid: str, data: bytes) -> None:
    """``tid`` is archived with exactly ``data`` as its one file."""
    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED, got
    folder = archive / str(got.folder)
    (only,) = [p for p in folder.iterdir() if p.name != "task.json"]
    assert only.read_bytes() == data


def assert_not_archived(summary: RunSummary, archive: Path, tid: str, needle: str) -> str:
    """``tid`` failed with ``needle`` in a one-line reason and has no file in the archive."""
    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED, got
    reason = str(got.reason)
    assert needle in reason
    assert "Traceback" not in reason
    assert "\n" not in reason
    assert not any(tid in p for p in archived_files(archive))
    return reason


def file_requests(replica: Replica, key: str) -> list[Any]:
    return [r for r in replica.seen("files") if r.path == "/" + key]


def timed(settings: Settings, *tids: str, **options: Any) -> tuple[RunSummary, float]:
    start = time.monotonic()
    summary = run(settings, *tids, **options)
    return summary, time.monotonic() - start


def http_date_in_two_seconds() -> str:
    """An HTTP date 1 to 2 s ahead: the format has whole seconds, so now+1s may be 0.01 s away."""
    return format_datetime(
        datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2), usegmt=True
    )


# -- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "retry_after",
    [
        pytest.param(lambda: "1", id="seconds"),
        pytest.param(http_date_in_two_seconds, id="http-date"),
    ],
)
def test_retry_after_is_waited_before_the_next_attempt(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    retry_after: Callable[[], str],
) -> None:
    """A 429's Retry-After (seconds or HTTP date) is waited out on API and host, then archived."""
    by_api, by_host = task_id(1), task_id(2)
    api_data, _ = file_task(replica, by_api)
    host_data, key = file_task(replica, by_host)
    replica.fault("api", by_api, Fault(status=429, headers={"Retry-After": retry_after()}))
    replica.fault("files", key, Fault(status=429, headers={"Retry-After": retry_after()}))

    summary, elapsed = timed(settings, by_api, by_host)

    assert_archived(summary, archive_dir, by_api, api_data)
    assert_archived(summary, archive_dir, by_host, host_data)
    # retry_wait is 0.01 s: only the header can account for a gap this long.
    for server, needle in (("api", by_api), ("files", key)):
        first, second = [r for r in replica.seen(server) if needle in r.path]
        assert second.at - first.at >= 0.8, server
    assert elapsed < 10


@pytest.mark.parametrize(
    ("server", "retry_after"),
    [
        pytest.param("api", lambda: "3600", id="api-seconds"),
        pytest.param("api", lambda: "9" * 400, id="api-400-digit-seconds"),
        pytest.param(
            "api",
            lambda: format_datetime(datetime.now(UTC) + timedelta(days=1), usegmt=True),
            id="api-http-date",
        ),
        pytest.param("files", lambda: "86400", id="files-seconds"),
    ],
)
def test_retry_after_beyond_the_cap_is_capped(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    retry_after: Callable[[], str],
) -> None:
    """A Retry-After past the 30 s cap is waited as 30 s (recorded here, not slept)."""
    waits: list[float] = []
    original = retry.RetryPolicy.delay

    def recording(self: retry.RetryPolicy, attempt: int, after: float | None = None) -> float:
        waits.append(original(self, attempt, after))
        return 0.0

    monkeypatch.setattr(retry.RetryPolicy, "delay", recording)
    tid = task_id(2)
    data, key = file_task(replica, tid)
    fault_key = tid if server == "api" else key
    replica.fault(server, fault_key, Fault(status=429, headers={"Retry-After": retry_after()}))

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, data)
    assert waits == [30.0]


@pytest.mark.parametrize(
    "server", [pytest.param("api", id="api"), pytest.param("files", id="files")]
)
def test_retry_after_is_not_waited_when_no_attempt_is_left(
    replica: Replica, settings: Settings, archive_dir: Path, server: str
) -> None:
    """With retries=0 a 429 asking for an hour fails the task at once with the status."""
    tid = task_id(3)
    _, key = file_task(replica, tid)
    fault_key = tid if server == "api" else key
    replica.fault(server, fault_key, Fault(status=429, headers={"Retry-After": "3600"}))

    summary, elapsed = timed(tweak(settings, retries=0), tid)

    assert_not_archived(summary, archive_dir, tid, "HTTP 429")
    assert elapsed < 5
    assert len(replica.seen(server)) == 1


# -- 5xx bursts -----------------------------------------------------------------------------

BURST = [500, 502, 503, 504]


@pytest.mark.parametrize(
    ("server", "burst", "needle"),
    [
        pytest.param("api", 3, None, id="api-3-of-3-retries"),
        pytest.param("api", 4, "query failed after 4 attempts: HTTP 504", id="api-4-over-3"),
        pytest.param("files", 3, None, id="files-3-of-3-retries"),
        pytest.param("files", 4, "HTTP 504 (after 4 attempts)", id="files-4-over-3"),
    ],
)
def test_server_error_burst(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    server: str,
    burst: int,
    needle: str | None,
) -> None:
    """A 5xx burst up to ``retries`` long is ridden out; one longer fails the task, others go on."""
    tid = task_id(4)
    data, key = file_task(replica, tid)
    other, other_data = companion(replica)
    fault_key = tid if server == "api" else key
    replica.fault(server, fault_key, *[Fault(status=s) for s in BURST[:burst]])

    summary = run(tweak(settings, retries=3), tid, other)

    assert_archived(summary, archive_dir, other, other_data)
    asked = [r for r in replica.seen(server) if tid in r.path]
    if needle is None:
        assert_archived(summary, archive_dir, tid, data)
        assert len(asked) == burst + 1
    else:
        assert_not_archived(summary, archive_dir, tid, needle)
        assert len(asked) == 4
        if server == "files":
            assert (db_row(archive_dir, tid) or ("", 1, None))[:2] == ("failed", 0)


# -- Tencent errors inside HTTP 200 ---------------------------------------------------------


def _internal_error() -> Fault:
    body = json.dumps(error_response("InternalError", "internal error, try later")).encode()
    return Fault(status=200, headers={"Content-Type": "application/json"}, body=body)


@pytest.mark.parametrize(
    ("count", "archived"),
    [
        pytest.param(1, True, id="once"),
        pytest.param(2, True, id="twice"),
        pytest.param(3, False, id="every-attempt"),
    ],
)
def test_tencent_internal_error_in_http_200_is_retried(
    replica: Replica, settings: Settings, archive_dir: Path, count: int, archived: bool
) -> None:
    """``InternalError`` in a 200 body is retried like a 5xx, and fails once retries run out."""
    tid = task_id(5)
    data, _ = file_task(replica, tid)
    replica.fault("api", tid, *[_internal_error() for _ in range(count)])

    summary = run(settings, tid)

    if archived:
        assert_archived(summary, archive_dir, tid, data)
        assert len(replica.seen("api")) == count + 1
    else:
        assert_not_archived(
            summary, archive_dir, tid, "query failed after 3 attempts: InternalError"
        )
        assert len(replica.seen("api")) == 3
        assert replica.seen("files") == []


# -- dropped connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "fault"),
    [
        pytest.param("api", Fault(hang_up=True), id="api-hang-up-before-headers"),
        pytest.param("api", Fault(drop_after=25), id="api-body-cut"),
        pytest.param("files", Fault(hang_up=True), id="files-hang-up-before-headers"),
        pytest.param("files", Fault(drop_after=0), id="files-cut-at-byte-0"),
    ],
)
def test_dropped_connection_is_retried(
    replica: Replica, settings: Settings, archive_dir: Path, server: str, fault: Fault
) -> None:
    """A connection closed before or right after the headers is retried; the file arrives whole."""
    tid = task_id(6)
    data, key = file_task(replica, tid)
    replica.fault(server, tid if server == "api" else key, fault)

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, data)
    assert len(replica.seen(server)) == 2
    if server == "files":
        # Nothing was received, so nothing is resumed.
        assert "Range" not in replica.seen("files")[1].headers


@pytest.mark.parametrize(
    ("server", "fault", "needle"),
    [
        pytest.param(
            "api",
            Fault(hang_up=True),
            "query failed after 3 attempts: connection closed before a response",
            id="api",
        ),
        pytest.param(
            "files",
            Fault(hang_up=True),
            "connection closed before a response",
            id="files-hang-up-before-headers",
        ),
    ],
)
def test_connection_dropped_every_time_fails_with_a_reason(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    server: str,
    fault: Fault,
    needle: str,
) -> None:
    """A server that hangs up on every attempt fails the task; the run goes on."""
    tid = task_id(7)
    _, key = file_task(replica, tid)
    other, other_data = companion(replica)
    # aiohttp sends a GET once more on a new connection when one closes before any
    # answer (RFC 9112 9.3.1): every request hangs up, two per attempt.
    replica.fault(server, tid if server == "api" else key, *[fault] * 2 * (settings.retries + 1))

    summary = run(settings, tid, other)

    assert_not_archived(summary, archive_dir, tid, needle)
    assert_archived(summary, archive_dir, other, other_data)


# -- slow servers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "fault", "resumed_from"),
    [
        pytest.param("api", Fault(delay=1.5), None, id="api-slow-answer"),
        pytest.param("files", Fault(delay=1.5), None, id="files-slow-headers"),
        pytest.param("files", Fault(drop_after=1000, stall=1.5), 1000, id="files-body-stalls"),
    ],
)
def test_answer_slower_than_timeout_is_retried(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    server: str,
    fault: Fault,
    resumed_from: int | None,
) -> None:
    """An answer that takes longer than ``timeout`` is abandoned and retried (resumed if begun)."""
    tid = task_id(8)
    data, key = file_task(replica, tid)
    replica.fault(server, tid if server == "api" else key, fault)

    summary, elapsed = timed(tweak(settings, timeout=0.5), tid)

    assert_archived(summary, archive_dir, tid, data)
    assert elapsed >= 0.45
    requests = replica.seen(server)
    assert len(requests) == 2
    if resumed_from is not None:
        assert requests[1].headers.get("Range") == f"bytes={resumed_from}-"


def test_answer_slower_than_timeout_every_time_fails_timed_out(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """When every attempt outlasts ``timeout`` (API or host) the task fails "timed out"."""
    slow_api, slow_host = task_id(9), task_id(10)
    file_task(replica, slow_api)
    _, key = file_task(replica, slow_host)
    other, other_data = companion(replica)
    replica.fault("api", slow_api, Fault(delay=1.5), Fault(delay=1.5))
    replica.fault("files", key, Fault(delay=1.5), Fault(delay=1.5))

    summary = run(tweak(settings, timeout=0.5, retries=1), slow_api, slow_host, other)

    needle = "query failed after 2 attempts: timed out (read)"
    assert_not_archived(summary, archive_dir, slow_api, needle)
    needle = "timed out (read) (after 2 attempts)"
    assert_not_archived(summary, archive_dir, slow_host, needle)
    assert_archived(summary, archive_dir, other, other_data)


# -- truncated bodies -----------------------------------------------------------------------


def _short_body() -> Fault:
    """Promises 1000 bytes, sends 10, closes."""
    headers = {"Content-Type": "video/mp4", "Content-Length": "1000"}
    return Fault(status=200, headers=headers, body=b"x" * 10, drop_after=10)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(_short_body(), id="content-length-1000-sends-10"),
        pytest.param(Fault(drop_after=4999), id="real-file-cut-one-byte-short"),
    ],
)
def test_truncated_body_is_never_accepted(
    replica: Replica, settings: Settings, archive_dir: Path, fault: Fault
) -> None:
    """A body shorter than its Content-Length is retried; the archive gets the real bytes."""
    tid = task_id(10)
    data, key = file_task(replica, tid, size=5000)
    replica.fault("files", key, fault)

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, data)
    assert len(file_requests(replica, key)) == 2
    entry = sidecar(archive_dir, str(outcome_of(summary, tid).folder))["files"][0]
    assert entry["size"] == len(data)


def test_truncated_body_every_time_fails_and_nothing_is_visible(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A host that always cuts the body short fails the task; no part of it is archived."""
    tid = task_id(11)
    _, key = file_task(replica, tid, size=5000)
    replica.fault("files", key, *[_short_body() for _ in range(settings.retries + 1)])

    summary = run(settings, tid)

    assert_not_archived(summary, archive_dir, tid, "body cut short")
    assert "received 10 of 1000 bytes" in str(outcome_of(summary, tid).reason)
    assert archived_files(archive_dir) == {}


# -- expiry ---------------------------------------------------------------------------------


def test_past_expire_time_refused_is_expired_the_other_kept(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """Of two files, the one the host refuses past its ExpireTime is expired; the other kept."""
    tid = task_id(12)
    past = datetime.now(UTC) - timedelta(seconds=5)
    good = pseudo_video(3000, seed=1)
    good_url = replica.add_file(f"{tid}/00.mp4", good, "video/mp4")
    old_url = replica.add_file(f"{tid}/01.mp4", pseudo_video(3000, seed=2), "video/mp4")
    replica.remove_file(f"{tid}/01.mp4")
    infos = [file_info(good_url, file_type="video"), file_info(old_url, expire=past)]
    replica.set_task(tid, task_response(tid, files=infos))

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.EXPIRED
    assert "file 1" in str(got.reason)
    assert "expired" in str(got.reason)
    assert sorted(r.path for r in replica.seen("files")) == [f"/{tid}/00.mp4", f"/{tid}/01.mp4"]
    assert (archive_dir / str(got.folder) / "00.mp4").read_bytes() == good
    entries = sidecar(archive_dir, str(got.folder))["files"]
    assert entries[1]["path"] is None


def test_file_refused_after_expire_time_passed_is_expired(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """403 and 404 from the host once ExpireTime has passed (during a retry wait) mean expired."""
    soon = datetime.now(UTC) + timedelta(seconds=2)
    tids = {403: task_id(13), 404: task_id(14)}
    for status, tid in tids.items():
        _, key = file_task(replica, tid, expire=soon)
        # The 503's Retry-After carries the retry past ExpireTime; then the host refuses.
        replica.fault(
            "files", key, Fault(status=503, headers={"Retry-After": "2"}), Fault(status=status)
        )

    summary = run(settings, *tids.values())

    for status, tid in tids.items():
        got = outcome_of(summary, tid)
        assert got.outcome is Outcome.EXPIRED, got
        assert f"HTTP {status}" in str(got.reason)
        assert db_row(archive_dir, tid) == ("expired", 1, got.reason)
    assert archived_files(archive_dir) == {}


def test_file_gone_before_expire_time_is_not_archived(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A host answering 410 while ExpireTime is still ahead: expired or failed, with the status."""
    tid = task_id(15)
    _, key = file_task(replica, tid, expire=datetime.now(UTC) + timedelta(seconds=30))
    other, other_data = companion(replica)
    replica.fault("files", key, *[Fault(status=410)] * 5)

    summary = run(settings, tid, other)

    got = outcome_of(summary, tid)
    assert got.outcome in (Outcome.EXPIRED, Outcome.FAILED)
    assert "HTTP 410" in str(got.reason)
    assert not any(tid in p for p in archived_files(archive_dir))
    assert_archived(summary, archive_dir, other, other_data)


# -- redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "absolute"),
    [
        pytest.param(302, True, id="302-absolute"),
        pytest.param(301, False, id="301-relative"),
        pytest.param(307, True, id="307-absolute"),
    ],
)
def test_redirect_to_another_path_is_followed_without_a_key(
    replica: Replica, settings: Settings, archive_dir: Path, status: int, absolute: bool
) -> None:
    """One redirect to another path on the file host is followed; no request carries a key."""
    tid = task_id(16)
    _, key = file_task(replica, tid)
    moved = pseudo_video(4000, seed=99)
    target = replica.add_file(f"moved/{tid}.mp4", moved, "video/mp4")
    location = target if absolute else f"/moved/{tid}.mp4"
    replica.fault("files", key, Fault(status=status, headers={"Location": location}))

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, moved)
    requests = replica.seen("files")
    assert [r.path for r in requests] == [f"/{key}", f"/moved/{tid}.mp4"]
    for request in requests:
        assert "authorization" not in {h.lower() for h in request.headers}


def test_redirect_loop_fails_with_too_many_redirects(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A URL that redirects to itself fails after the redirect limit, and is not retried."""
    tid = task_id(17)
    _, key = file_task(replica, tid)
    other, other_data = companion(replica)
    loop = Fault(status=302, headers={"Location": replica.files_url + "/" + key})
    replica.fault("files", key, *[loop] * 30)

    summary = run(settings, tid, other)

    assert_not_archived(summary, archive_dir, tid, "too many redirects")
    assert len(file_requests(replica, key)) == MAX_REDIRECTS + 1
    assert_archived(summary, archive_dir, other, other_data)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(None, id="file-etc-passwd"),
        pytest.param("secret", id="file-local-secret"),
    ],
)
def test_redirect_to_a_local_file_is_refused(
    replica: Replica, settings: Settings, archive_dir: Path, tmp_path: Path, target: str | None
) -> None:
    """A redirect to file:// fails the task; nothing of the local file reaches the archive."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER-5e1f\n")
    location = "file:///etc/passwd" if target is None else secret.as_uri()
    marker = b"root:" if target is None else b"TOP-SECRET-MARKER"
    tid = task_id(18)
    _, key = file_task(replica, tid)
    replica.fault("files", key, Fault(status=302, headers={"Location": location}))

    summary = run(settings, tid)

    assert_not_archived(summary, archive_dir, tid, "unsupported URL")
    assert len(replica.seen("files")) == 1
    for path in archive_dir.rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path


def test_file_host_redirect_to_the_api_is_refused(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A file host redirecting to the API's origin is refused: the downloader never goes there."""
    tid = task_id(19)
    _, key = file_task(replica, tid)
    bounce = replica.api_url + QUERY_PREFIX + tid
    replica.fault("files", key, Fault(status=302, headers={"Location": bounce}))

    summary = run(settings, tid)

    assert_not_archived(summary, archive_dir, tid, "redirected to the API's origin")
    assert len(file_requests(replica, key)) == 1  # refused, not retried
    api = replica.seen("api")
    assert len(api) == 1
    assert api[0].headers.get("Authorization") == f"Bearer {replica.api_key}"


@pytest.mark.parametrize("status", [302, 307])
def test_api_redirect_is_not_followed(
    replica: Replica, settings: Settings, archive_dir: Path, status: int
) -> None:
    """The API redirecting to the file host fails the task; the key never reaches the host."""
    tid = task_id(20)
    _, key = file_task(replica, tid)
    location = replica.files_url + "/" + key
    replica.fault("api", tid, Fault(status=status, headers={"Location": location}))

    summary = run(settings, tid)

    assert_not_archived(summary, archive_dir, tid, "redirects are not followed")
    assert len(replica.seen("api")) == 1
    assert replica.seen("files") == []


# -- oversized bodies -----------------------------------------------------------------------


def _huge_answer(replica: Replica, tid: str) -> None:
    """A syntactically fine answer padded past the limit."""
    document = task_response(tid, files=[file_info(replica.files_url + "/x.png")])
    document["Response"]["Padding"] = "a" * MAX_RESPONSE_BYTES
    replica.set_task(tid, json.dumps(document).encode())


def _endless_answer(replica: Replica, tid: str) -> None:
    replica.set_task(tid, task_response(tid, files=[file_info(replica.files_url + "/x.png")]))
    replica.fault("api", tid, Fault(endless=True, headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_huge_answer, id="4-MiB-plus-json"),
        pytest.param(_endless_answer, id="endless-body"),
    ],
)
def test_oversized_api_answer_fails_with_a_reason(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    make: Callable[[Replica, str], None],
) -> None:
    """An API answer past 4 MiB fails that task with a clear reason; the run goes on."""
    tid = task_id(21)
    make(replica, tid)
    other, other_data = companion(replica)

    summary = run(settings, tid, other)

    assert_not_archived(summary, archive_dir, tid, f"response larger than {MAX_RESPONSE_BYTES}")
    assert replica.seen("files") == [r for r in replica.seen("files") if other in r.path]
    assert_archived(summary, archive_dir, other, other_data)


_HUGE_LENGTH = Fault(
    status=200,
    headers={"Content-Type": "video/mp4", "Content-Length": str(10**9)},
    drop_after=0,
    stall=3.0,
)


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        pytest.param(None, "5000 bytes is over the 1000-byte limit", id="content-length"),
        pytest.param(
            _HUGE_LENGTH,
            "1000000000 bytes is over the 1000-byte limit",
            id="content-length-checked-before-body",
        ),
        pytest.param(
            Fault(endless=True, headers={"Content-Type": "video/mp4"}),
            "body passes the 1000-byte limit",
            id="no-length-endless-body",
        ),
    ],
)
def test_file_over_max_file_size_is_refused(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    fault: Fault | None,
    needle: str,
) -> None:
    """A file over max_file_size fails at once, by header or mid-body; nothing becomes visible."""
    tid = task_id(22)
    _, key = file_task(replica, tid, size=5000)
    other, other_data = companion(replica)
    if fault is not None:
        replica.fault("files", key, fault)

    summary, elapsed = timed(tweak(settings, max_file_size=1000), tid, other)

    assert_not_archived(summary, archive_dir, tid, needle)
    assert len(file_requests(replica, key)) == 1
    # The huge Content-Length is refused on sight, not after the 3 s stall behind it.
    assert elapsed < 2.5
    assert_archived(summary, archive_dir, other, other_data)


# -- hostile API data -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        pytest.param("ftp://127.0.0.1/x.png", "scheme 'ftp'", id="ftp"),
        pytest.param("file:///etc/passwd", "scheme 'file'", id="file"),
        pytest.param("javascript:alert(1)", "scheme 'javascript'", id="javascript"),
        pytest.param("http:///x.png", "unusable FileUrl: URL has no host", id="no-host"),
        pytest.param("//127.0.0.1/x.png", "scheme 'none'", id="no-scheme"),
        pytest.param("http://[oops/x.png", "FileUrl", id="broken-ipv6-host"),
        pytest.param("http://127.0.0.1:99999/x.png", "FileUrl", id="port-out-of-range"),
        pytest.param("http://127.0.0.1:port/x.png", "FileUrl", id="port-not-a-number"),
        pytest.param("http://127.0.0.1/a\x00b.png", "FileUrl", id="nul-in-url"),
        pytest.param("http://" + "\u00fc" * 64 + ".de/x.png", "FileUrl", id="invalid-idna-host"),
        pytest.param("http://a..b/x.png", "not a valid name", id="empty-label"),
        pytest.param("http://a_b<c/x.png", "not a valid name", id="bad-host-character"),
    ],
)
def test_hostile_file_url_fails_the_task(
    replica: Replica, settings: Settings, archive_dir: Path, url: str, needle: str
) -> None:
    """A FileUrl that is not a usable http(s) URL fails that task with a reason, unrequested."""
    tid = task_id(23)
    replica.set_task(tid, task_response(tid, files=[file_info(url)]))
    other, other_data = companion(replica)

    summary = run(settings, tid, other)

    assert_not_archived(summary, archive_dir, tid, needle)
    assert [r.path for r in replica.seen("files")] == [f"/{other}/image_0.png"]
    assert_archived(summary, archive_dir, other, other_data)


@pytest.mark.parametrize(
    ("expire", "recorded"),
    [
        pytest.param("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z", id="year-9999"),
        pytest.param("9999-12-31T23:59:59-01:00", None, id="past-year-9999-in-utc"),
        pytest.param("0000-00-00T00:00:00Z", None, id="zero-sentinel"),
        pytest.param("not a date", None, id="garbage"),
        pytest.param(253402300799, None, id="number"),
        pytest.param(None, None, id="null"),
    ],
)
def test_absurd_expire_time_is_parsed_safely(
    replica: Replica, settings: Settings, archive_dir: Path, expire: object, recorded: str | None
) -> None:
    """A far-future, sentinel or unreadable ExpireTime does not stop the file being archived."""
    tid = task_id(24)
    data = pseudo_video(2000, seed=3)
    info = file_info(replica.add_file(f"{tid}/x.mp4", data, "video/mp4"), file_type="video")
    info["ExpireTime"] = expire
    replica.set_task(tid, task_response(tid, files=[info]))

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, data)
    entry = sidecar(archive_dir, str(outcome_of(summary, tid).folder))["files"][0]
    assert entry["expire_time"] == recorded


HOSTILE_LAYOUT = "{task_type}/{model_name}/{task_id}"


def assert_confined(tmp_path: Path, archive: Path) -> None:
    """Everything written is strictly inside ``archive``, visible names clean and not hidden."""
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]
    root = archive.resolve()
    for path in archive.rglob("*"):
        assert not path.is_symlink(), path
        assert path.resolve().is_relative_to(root), path
        assert path.resolve() != root
        parts = path.relative_to(archive).parts
        if parts[0] == ".fetcher":
            continue
        for part in parts:
            assert not part.startswith("."), path
            assert part.strip() == part, path
            assert part.isprintable(), path
            assert "\\" not in part, path


@pytest.mark.parametrize(
    ("task_type", "model", "prompt"),
    [
        pytest.param("../../../../../tmp", "../../etc", "../../x", id="dot-dot"),
        pytest.param("/etc/cron.d", "/", "/root/.ssh", id="absolute"),
        pytest.param("..", ".", ".", id="dots-only"),
        pytest.param(".hidden", ".fetcher", ".bashrc", id="leading-dot"),
        pytest.param("Aigc\x00Task", "GEM\x00../..", "nul\x00byte", id="nul"),
        pytest.param("Aigc\nTask", "GEM\r\n../", "line\nbreak\r\n", id="newlines"),
        pytest.param("\x1b[31mTask", "\x7f\x85\x9b", "\x1b]0;title\x07", id="control-chars"),
        pytest.param("..\\..\\Task", "C:\\Windows", "a\\b", id="backslashes"),
        pytest.param(
            "Aigc\u202eksaT", "GEM\u200b\u2028\u00a0", "zero\u200dwidth", id="bidi-and-invisible"
        ),
        pytest.param("  ", " / ", "   ", id="blank"),
        pytest.param("../" * 200 + "Task", "x" * 300, "p" * 5000, id="very-long"),
    ],
)
def test_hostile_names_stay_inside_the_archive(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    tmp_path: Path,
    task_type: str,
    model: str,
    prompt: str,
) -> None:
    """TaskType/ModelName/Prompt with ../, /, NUL, newlines or controls archive strictly inside."""
    tid = task_id(25)
    data = pseudo_video(1500, seed=4)
    url = replica.add_file(f"{tid}/x.mp4", data, "video/mp4")
    replica.set_task(
        tid,
        task_response(
            tid,
            task_type=task_type,
            files=[file_info(url, file_type="video")],
            model=(model, "1"),
            prompt=prompt,
        ),
    )

    summary = run(tweak(settings, layout=HOSTILE_LAYOUT), tid)

    assert_archived(summary, archive_dir, tid, data)
    folder = str(outcome_of(summary, tid).folder)
    assert folder.endswith("/" + tid) or folder == tid
    assert 1 <= len(Path(folder).parts) <= 3
    assert_confined(tmp_path, archive_dir)
    document = sidecar(archive_dir, folder)
    assert document["task_type"] == task_type
    assert document["prompt"] == prompt
    assert document["model_name"] == model


def _task(doc: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = doc["Response"]
    task: dict[str, Any] = response["AigcImageTask"]
    return task


def _first_file(doc: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = _task(doc)["Output"]["FileInfos"][0]
    return info


def _set_task(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(doc: dict[str, Any]) -> object:
        _task(doc)[key] = value
        return doc

    return change


def _set_output(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(doc: dict[str, Any]) -> object:
        _task(doc)["Output"][key] = value
        return doc

    return change


def _set_file(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(doc: dict[str, Any]) -> object:
        _first_file(doc)[key] = value
        return doc

    return change


def _set_response(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(doc: dict[str, Any]) -> object:
        doc["Response"][key] = value
        return doc

    return change


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        pytest.param(_set_output("FileInfos", "http://x/y.png"), "not a list", id="fileinfos-str"),
        pytest.param(_set_output("FileInfos", [1, 2]), "not an object", id="fileinfos-numbers"),
        pytest.param(lambda d: {"Response": [d["Response"]]}, "no 'Response'", id="response-list"),
        pytest.param(lambda d: [d], "not a JSON object", id="document-list"),
        pytest.param(lambda d: "FINISH", "not a JSON object", id="document-string"),
        pytest.param(_set_response("Status", 200), "unexpected task status '200'", id="status-int"),
        pytest.param(
            _set_response("Status", ["FINISH"]), "unexpected task status", id="status-list"
        ),
        pytest.param(_set_file("FileUrl", 42), "has no FileUrl", id="fileurl-number"),
        pytest.param(_set_file("FileUrl", ["http://x"]), "has no FileUrl", id="fileurl-list"),
        pytest.param(_set_task("Output", "done"), "without output files", id="output-string"),
        pytest.param(_set_response("AigcImageTask", []), "no task object", id="task-object-list"),
        pytest.param(lambda d: {"Response": {"Error": "boom"}}, "Error is not", id="error-string"),
        pytest.param(_set_file("MetaData", {"Md5": 12345, "Size": "big"}), None, id="md5-number"),
        pytest.param(_set_file("MetaData", [1, 2]), None, id="metadata-list"),
        pytest.param(_set_file("ExpireTime", {"at": 1}), None, id="expire-object"),
        pytest.param(_set_task("Input", "a prompt"), None, id="input-string"),
        pytest.param(_set_task("ErrCode", {"code": 1}), None, id="errcode-object"),
        pytest.param(_set_response("TaskType", 7), None, id="tasktype-number"),
        pytest.param(_set_response("CreateTime", 0), None, id="createtime-number"),
    ],
)
def test_wrong_json_types_never_crash_the_run(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    change: Callable[[dict[str, Any]], object],
    needle: str | None,
) -> None:
    """A field of the wrong JSON type fails its task with a reason, or is ignored if harmless."""
    tid = task_id(26)
    data = pseudo_video(1500, seed=5)
    url = replica.add_file(f"{tid}/x.mp4", data, "video/mp4")
    document = change(task_response(tid, files=[file_info(url, file_type="video")]))
    replica.set_task(tid, json.dumps(document).encode())
    other, other_data = companion(replica)

    summary = run(settings, tid, other)

    if needle is None:
        assert_archived(summary, archive_dir, tid, data)
        entry = sidecar(archive_dir, str(outcome_of(summary, tid).folder))["files"][0]
        assert entry["md5"] is None
    else:
        assert_not_archived(summary, archive_dir, tid, needle)
    assert_archived(summary, archive_dir, other, other_data)
    assert summary.counts[Outcome.ARCHIVED] == (2 if needle is None else 1)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"sidecar holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        pytest.param("prompt", "a fox \ud83e", id="prompt-cut-mid-emoji"),
        pytest.param("model", "GEM\udcff", id="model-lone-low-surrogate"),
        pytest.param("task_type", "Aigc\ud800Task", id="task-type-lone-surrogate"),
        pytest.param("url", "?v=\udcff", id="file-url-lone-surrogate"),
        pytest.param("seed", float("nan"), id="nan-in-input"),
        pytest.param("seed", float("inf"), id="infinity-in-input"),
    ],
)
def test_text_that_cannot_be_stored_is_made_safe(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    tmp_path: Path,
    where: str,
    value: Any,
) -> None:
    """Lone UTF-16 surrogates and NaN/Infinity from the API archive as valid UTF-8 and JSON."""
    tid = task_id(27)
    data = pseudo_video(1500, seed=6)
    url = replica.add_file(f"{tid}/x.mp4", data, "video/mp4")
    document = task_response(
        tid,
        task_type=value if where == "task_type" else "AigcImageTask",
        files=[file_info(url + (value if where == "url" else ""), file_type="video")],
        model=(value if where == "model" else "GEM", "1"),
        prompt=value if where == "prompt" else "a fox",
        extra_input={"Seed": value} if where == "seed" else None,
    )
    # json.dumps writes lone surrogates as \\udXXX escapes and NaN as NaN: as a gateway might.
    replica.set_task(tid, json.dumps(document).encode())
    other, other_data = companion(replica)

    summary = run(tweak(settings, layout=HOSTILE_LAYOUT), tid, other)

    assert_archived(summary, archive_dir, tid, data)
    assert_archived(summary, archive_dir, other, other_data)
    assert_confined(tmp_path, archive_dir)
    folder = archive_dir / str(outcome_of(summary, tid).folder)
    _strict_json((folder / "task.json").read_bytes().decode("utf-8"))


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(
            Fault(
                status=200,
                body=json.dumps(
                    error_response("FailedOperation", "x\n\x1b[2Jfetcher: ok\x00")
                ).encode(),
            ),
            id="tencent-error-message",
        ),
        pytest.param(
            Fault(
                status=400,
                body=json.dumps({"error": {"message": "bad\r\n\x1b]0;pwned\x07 \udcff"}}).encode(),
            ),
            id="gateway-error-message",
        ),
        pytest.param(None, id="failed-task-message"),
    ],
)
def test_reasons_from_the_api_are_one_printable_line(
    replica: Replica, settings: Settings, archive_dir: Path, fault: Fault | None
) -> None:
    """Messages the API sends back become one printable line: no newline, escape or NUL."""
    tid = task_id(28)
    if fault is None:
        replica.set_task(
            tid,
            task_response(
                tid,
                err_code=70000,
                err_code_ext="Model\x1b[1mFailed",
                message="line one\nfetcher: archived \x00 everything\u2028fine",
            ),
        )
    else:
        file_task(replica, tid)
        replica.fault("api", tid, fault)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    reason = str(got.reason)
    assert reason.isprintable(), repr(reason)
    assert "\n" not in reason and "\x1b" not in reason and "\x00" not in reason
    assert db_row(archive_dir, tid) is not None
