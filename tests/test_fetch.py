"""Behaviour of a fetch run, end to end: real HTTP to the replica, real archives on disk."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    add_image_task,
    add_video_task,
    archived_files,
    on_each_state,
    run,
    state_rows,
    task_id,
    tweak,
)

from fetcher import pipeline
from fetcher.archive import Archive
from fetcher.config import Settings
from fetcher.errors import AuthError, LockedError
from fetcher.replica import (
    Fault,
    Replica,
    error_response,
    file_info,
    iso,
    png,
    task_response,
)
from fetcher.summary import Outcome, RunSummary, TaskOutcome

#: Every test here exercises the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)

CREATED = datetime(2024, 3, 7, 12, 30, 5, tzinfo=UTC)
SIDECAR_KEYS = {
    "task_id",
    "task_type",
    "prompt",
    "negative_prompt",
    "model_name",
    "model_version",
    "created_at",
    "finished_at",
    "input",
    "files",
    "schema",
    "fetcher_version",
}
FILE_KEYS = {"path", "url", "expire_time", "size", "sha256", "content_type"}


# -- helpers --------------------------------------------------------------------------------


def outcome_of(summary: RunSummary, tid: str) -> TaskOutcome:
    """The one listed outcome for ``tid``."""
    found = [t for t in summary.tasks if t.task_id == tid]
    assert len(found) == 1, summary.to_json()
    return found[0]


def db_row(where: Settings | Path, tid: str) -> tuple[str, int, str | None] | None:
    """(state, final, reason) of a task in the state the settings name (a folder: its own)."""
    settings = where if isinstance(where, Settings) else Settings(archive=where)
    rows = state_rows(settings, "SELECT state, final, reason FROM tasks WHERE task_id = ?", (tid,))
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


def sidecar(archive: Path, folder: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((archive / folder / "task.json").read_text("utf-8"))
    return document


def image_file(replica: Replica, tid: str) -> tuple[bytes, str]:
    """Serve one PNG for ``tid`` (not yet named by any task); returns its bytes and URL."""
    data = png(24, 24, seed=len(tid))
    return data, replica.add_file(f"{tid}/image_0.png", data)


# -- happy paths ----------------------------------------------------------------------------


def test_image_task_is_archived(replica: Replica, settings: Settings, archive_dir: Path) -> None:
    """A finished image task ends up as its file plus a sidecar, recorded as archived."""
    tid = task_id(1)
    (data,) = add_image_task(replica, tid)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert got.files == 1
    assert summary.counts[Outcome.ARCHIVED] == 1
    assert summary.files_downloaded == 1
    assert summary.bytes_downloaded == len(data)
    assert summary.exit_code == 0
    files = archived_files(archive_dir)
    assert set(files) == {f"{got.folder}/00.png", f"{got.folder}/task.json"}
    assert files[f"{got.folder}/00.png"] == data
    assert db_row(settings, tid) == ("archived", 1, None)


def test_video_task_is_archived(replica: Replica, settings: Settings, archive_dir: Path) -> None:
    """A finished AigcVideoTask lands under its own type with the MP4's bytes intact."""
    tid = task_id(2, "AigcVideoTask")
    data = add_video_task(replica, tid)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert got.folder is not None
    assert got.folder.startswith("AigcVideoTask/")
    assert (archive_dir / got.folder / "00.mp4").read_bytes() == data
    document = sidecar(archive_dir, got.folder)
    assert document["task_type"] == "AigcVideoTask"
    assert document["model_name"] == "Kling"
    assert document["files"][0]["content_type"] == "video/mp4"
    assert document["files"][0]["size"] == len(data)


def test_multi_file_task_keeps_every_file_in_order(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A three-output task yields 00.png, 01.png, 02.png, byte-identical to what was served."""
    tid = task_id(3)
    datas = add_image_task(replica, tid, count=3)
    assert len(set(datas)) == 3

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert got.files == 3
    folder = archive_dir / str(got.folder)
    for k, data in enumerate(datas):
        assert (folder / f"{k:02d}.png").read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "02.png", "task.json"]
    assert len(replica.seen("files")) == 3


def test_md5_from_metadata_is_checked_and_accepted(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A file whose bytes match MetaData.Md5 is archived, and the MD5 is kept in the sidecar."""
    tid = task_id(4)
    datas = add_image_task(replica, tid, count=2, with_md5=True)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    entries = sidecar(archive_dir, str(got.folder))["files"]
    assert [e["md5"] for e in entries] == [hashlib.md5(d).hexdigest() for d in datas]
    # One request per file: a matching checksum is not re-downloaded.
    assert len(replica.seen("files")) == 2


# -- the sidecar ----------------------------------------------------------------------------


def test_sidecar_records_task_and_files(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """task.json carries the prompt, model, times, verbatim Input and each file's checksum."""
    tid = task_id(5)
    datas, infos = [], []
    for k in range(2):
        data = png(20, 10, seed=k)
        url = replica.add_file(f"{tid}/out_{k}.png", data)
        infos.append(file_info(url, expire=CREATED + timedelta(days=3650 + k)))
        datas.append(data)
    response = task_response(
        tid,
        files=infos,
        prompt="a heron in fog, ink wash",
        negative_prompt="text, watermark",
        model=("Hunyuan", "3.0"),
        created=CREATED,
        extra_input={"Seed": 42, "FileInfos": [{"Type": "Url", "Url": "http://ref/x.png"}]},
    )
    replica.set_task(tid, response)

    summary = run(settings, tid)

    folder = str(outcome_of(summary, tid).folder)
    document = sidecar(archive_dir, folder)
    assert set(document) >= SIDECAR_KEYS
    assert document["task_id"] == tid
    assert document["task_type"] == "AigcImageTask"
    assert document["prompt"] == "a heron in fog, ink wash"
    assert document["negative_prompt"] == "text, watermark"
    assert document["model_name"] == "Hunyuan"
    assert document["model_version"] == "3.0"
    assert document["created_at"] == "2024-03-07T12:30:05Z"
    assert document["finished_at"] == iso(CREATED + timedelta(seconds=40))
    assert document["input"] == response["Response"]["AigcImageTask"]["Input"]
    assert isinstance(document["schema"], int)
    assert isinstance(document["fetcher_version"], str)
    assert document["fetcher_version"]
    assert len(document["files"]) == 2
    for k, (entry, info, data) in enumerate(zip(document["files"], infos, datas, strict=True)):
        assert set(entry) >= FILE_KEYS
        assert entry["path"] == f"{k:02d}.png"
        on_disk = (archive_dir / folder / entry["path"]).read_bytes()
        assert on_disk == data
        assert entry["sha256"] == hashlib.sha256(on_disk).hexdigest()
        assert entry["size"] == len(data)
        assert entry["url"] == info["FileUrl"]
        assert entry["expire_time"] == info["ExpireTime"]
        assert entry["content_type"] == "image/png"


# -- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        pytest.param(None, "AigcImageTask/2024/03/07/{tid}", id="default"),
        pytest.param("{model_name}/{model_version}/{task_id}", "GEM/2.5/{tid}", id="by-model"),
        pytest.param("{created:%Y-%m}/{task_id}", "2024-03/{tid}", id="by-month"),
    ],
)
def test_layout_decides_the_task_folder(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    layout: str | None,
    expected: str,
) -> None:
    """A task's folder follows the layout template, the default being type/year/month/day/id."""
    tid = task_id(6)
    (data,) = add_image_task(replica, tid, created=CREATED)
    if layout is not None:
        settings = tweak(settings, layout=layout)

    summary = run(settings, tid)

    folder = expected.format(tid=tid)
    assert outcome_of(summary, tid).folder == folder
    assert (archive_dir / folder / "00.png").read_bytes() == data
    assert (archive_dir / folder / "task.json").is_file()


# -- pending --------------------------------------------------------------------------------


def test_tasks_never_share_a_folder(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A layout that maps two IDs to one folder still gives each task its own files."""
    first, second = task_id(80), task_id(81)
    data_first = add_image_task(replica, first)
    data_second = add_image_task(replica, second)
    narrow = tweak(settings, layout="{task_id:.10}")  # both IDs start with 1392336703

    summary = run(narrow, first, second)

    folders = {outcome_of(summary, t).folder for t in (first, second)}
    assert len(folders) == 2
    for tid, data in ((first, data_first), (second, data_second)):
        folder = archive_dir / str(outcome_of(summary, tid).folder)
        assert (folder / "00.png").read_bytes() == data[0]
        assert json.loads((folder / "task.json").read_text())["task_id"] == tid


def test_pending_task_is_archived_on_a_later_run(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A task still processing is recorded as pending, then archived once it has finished."""
    tid = task_id(7)
    data, url = image_file(replica, tid)
    replica.set_task(
        tid,
        task_response(tid, status="PROCESSING"),
        task_response(tid, files=[file_info(url)]),
    )

    first = run(settings, tid)

    assert outcome_of(first, tid).outcome is Outcome.PENDING
    assert "PROCESSING" in str(outcome_of(first, tid).reason)
    assert db_row(settings, tid) == ("pending", 0, "status PROCESSING")
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}

    second = run(settings, tid)

    got = outcome_of(second, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data
    assert db_row(settings, tid) == ("archived", 1, None)


def test_pending_option_requeries_pending_tasks_without_naming_them(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """``pending=True`` re-queries every task the database holds as pending, and only those."""
    waiting, done = task_id(8), task_id(9)
    data, url = image_file(replica, waiting)
    replica.set_task(
        waiting,
        task_response(waiting, status="WAITING"),
        task_response(waiting, files=[file_info(url)]),
    )
    add_image_task(replica, done)
    run(settings, waiting, done)
    assert db_row(settings, waiting) == ("pending", 0, "status WAITING")
    api_before = len(replica.seen("api"))

    summary = run(settings, pending=True)

    assert [t.task_id for t in summary.tasks] == [waiting]
    got = outcome_of(summary, waiting)
    assert got.outcome is Outcome.ARCHIVED
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data
    queried = [r.path for r in replica.seen("api")[api_before:]]
    assert queried == [f"/tencent-vod/v1/query/{waiting}"]
    assert summary.requests == 1


# -- failed tasks ---------------------------------------------------------------------------


def _failed_finish(tid: str) -> dict[str, Any]:
    return task_response(tid, err_code=70000, err_code_ext="ContentModerationFailed")


def _aborted(tid: str) -> dict[str, Any]:
    return task_response(tid, status="ABORTED", err_code_ext="TaskTimeout")


def _inner_fail(tid: str) -> dict[str, Any]:
    response = task_response(tid, files=[])
    task = response["Response"]["AigcImageTask"]
    task.update(Status="FAIL", ErrCodeExt="ModelGenerateFailed", Message="generation failed")
    return response


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        pytest.param(_failed_finish, "ContentModerationFailed", id="finish-with-errcode"),
        pytest.param(_aborted, "TaskTimeout", id="aborted"),
        pytest.param(_inner_fail, "ModelGenerateFailed", id="inner-status-fail"),
    ],
)
def test_failed_task_is_final_and_skipped_until_retry_failed(
    replica: Replica, settings: Settings, archive_dir: Path, answer: Any, code: str
) -> None:
    """A task the API reports failed is final: later runs skip it unless retry_failed is set."""
    tid = task_id(10)
    data, url = image_file(replica, tid)
    replica.set_task(tid, answer(tid), task_response(tid, files=[file_info(url)]))

    first = run(settings, tid)

    got = outcome_of(first, tid)
    assert got.outcome is Outcome.FAILED
    assert code in str(got.reason)
    assert first.exit_code == 1
    state, final, reason = db_row(settings, tid) or ("", 0, None)
    assert (state, final) == ("failed", 1)
    assert code in str(reason)
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}

    api_before = len(replica.seen("api"))
    second = run(settings, tid)

    assert outcome_of(second, tid).outcome is Outcome.SKIPPED
    assert code in str(outcome_of(second, tid).reason)
    assert second.requests == 0
    assert len(replica.seen("api")) == api_before

    third = run(settings, tid, retry_failed=True)

    assert third.requests == 1
    got = outcome_of(third, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        pytest.param(None, "InvalidParameterValue.TaskId", id="tencent-error-in-200"),
        pytest.param(
            Fault(status=404, body=json.dumps(error_response("ResourceNotFound", "gone")).encode()),
            "ResourceNotFound",
            id="tencent-error-in-404",
        ),
    ],
)
def test_unknown_task_fails_with_a_reason(
    replica: Replica, settings: Settings, archive_dir: Path, fault: Fault | None, needle: str
) -> None:
    """An ID the API does not know is a failed task with a reason, and final."""
    tid = task_id(11)
    if fault is not None:
        add_image_task(replica, tid)
        replica.fault("api", tid, fault)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert "unknown task" in str(got.reason)
    assert needle in str(got.reason)
    assert db_row(settings, tid) == ("failed", 1, got.reason)
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}


def test_bare_404_from_the_api_is_not_final(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A 404 without the upstream's own error, while other queries get through, is retried
    by the next run."""
    tid, other = task_id(12), task_id(13)
    data = add_image_task(replica, tid)
    add_image_task(replica, other)
    gateway_404 = json.dumps({"error": {"message": "Invalid URL", "type": "x", "code": ""}})
    replica.fault("api", tid, Fault(status=404, body=gateway_404.encode()))

    first = run(settings, tid, other)

    got = outcome_of(first, tid)
    assert got.outcome is Outcome.FAILED
    assert "404" in str(got.reason) and "base URL" in str(got.reason)
    assert db_row(settings, tid) == ("failed", 0, got.reason)
    second = run(settings, tid)
    assert outcome_of(second, tid).outcome is Outcome.ARCHIVED
    assert data[0] in archived_files(archive_dir).values()


# -- re-runs and input ----------------------------------------------------------------------


def test_rerun_sends_no_requests(replica: Replica, settings: Settings, archive_dir: Path) -> None:
    """A second run over archived IDs settles them from the database with zero requests."""
    tids = [task_id(20 + n) for n in range(3)]
    for tid in tids:
        add_image_task(replica, tid, count=2)
    first = run(settings, *tids)
    assert first.counts[Outcome.ARCHIVED] == 3
    before = archived_files(archive_dir)
    api_before, files_before = len(replica.seen("api")), len(replica.seen("files"))
    assert (api_before, files_before) == (3, 6)

    second = run(settings, *tids)

    assert second.requests == 0
    assert len(replica.seen("api")) == api_before
    assert len(replica.seen("files")) == files_before
    assert second.counts[Outcome.ALREADY_ARCHIVED] == 3
    assert second.counts[Outcome.ARCHIVED] == 0
    assert second.files_downloaded == 0
    assert archived_files(archive_dir) == before


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(None, id="one-batch"),
        pytest.param(1, id="across-batches"),
    ],
)
def test_duplicate_ids_are_processed_once(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch: int | None,
) -> None:
    """An ID given several times in one run is queried and downloaded once."""
    if batch is not None:
        monkeypatch.setattr(pipeline, "FEED_BATCH", batch)
    tid, other = task_id(30), task_id(31)
    add_image_task(replica, tid)
    add_image_task(replica, other)

    summary = run(settings, tid, other, tid, tid, other)

    assert summary.counts[Outcome.ARCHIVED] == 2
    assert sorted(t.task_id for t in summary.tasks) == sorted([tid, other])
    assert summary.requests == 2
    assert len(replica.seen("api")) == 2
    assert len(replica.seen("files")) == 2


def test_named_pending_id_is_queried_once_with_pending_option(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A pending task named in the input and also picked up by ``pending=True`` is asked once."""
    tid = task_id(32)
    replica.set_task(tid, task_response(tid, status="PROCESSING"))
    run(settings, tid)
    api_before = len(replica.seen("api"))

    summary = run(settings, tid, pending=True)

    assert summary.requests == 1
    assert len(replica.seen("api")) == api_before + 1
    assert [t.outcome for t in summary.tasks] == [Outcome.PENDING]


def test_longest_valid_id_is_archived_in_a_short_folder(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A 256-character ID archives; its folder name is cut with a hash to fit 255 bytes."""
    prefix = "1392336703-AigcImageTask-"
    tid = prefix + "a1b2c3d4" * ((256 - len(prefix)) // 8) + "x" * ((256 - len(prefix)) % 8)
    assert len(tid) == 256
    (data,) = add_image_task(replica, tid)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    segment = Path(str(got.folder)).name
    assert len(segment.encode()) <= 255
    assert segment != tid
    assert segment.startswith(tid[:100])
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data
    assert sidecar(archive_dir, str(got.folder))["task_id"] == tid


# -- the API key ----------------------------------------------------------------------------


def test_api_key_never_leaves_the_api_client(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """The key reaches only the API: not the file host, sidecars, database or summary."""
    key = replica.api_key
    good, resumed, echoed = task_id(40), task_id(41), task_id(42)
    add_image_task(replica, good, count=2)
    (big,) = add_image_task(replica, resumed)
    replica.fault("files", f"{resumed}/image_0.png", Fault(drop_after=len(big) // 2))
    # A gateway error that quotes the key back must not carry it into the reason.
    body = json.dumps({"error": {"message": f"bad request for key {key}", "type": "x"}}).encode()
    replica.fault("api", echoed, Fault(status=400, body=body))

    summary = run(settings, good, resumed, echoed)

    assert outcome_of(summary, good).outcome is Outcome.ARCHIVED
    assert outcome_of(summary, resumed).outcome is Outcome.ARCHIVED
    assert outcome_of(summary, echoed).outcome is Outcome.FAILED
    file_requests = replica.seen("files")
    assert len(file_requests) == 4
    for request in file_requests:
        assert "authorization" not in {h.lower() for h in request.headers}
        assert all(key not in v for v in request.headers.values())
    assert all(r.headers.get("Authorization") == f"Bearer {key}" for r in replica.seen("api"))
    for path in archive_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    assert key not in json.dumps(summary.to_json())


def test_rejected_key_stops_the_run(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """HTTP 401 from the API raises AuthError at once: no retry, no further query."""
    tids = [task_id(50 + n) for n in range(3)]
    for tid in tids:
        add_image_task(replica, tid)
    settings = tweak(settings, api_key="wrong", concurrency=1)

    with pytest.raises(AuthError, match="401"):
        run(settings, *tids)

    assert len(replica.seen("api")) == 1
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}


def test_second_run_while_locked_is_refused(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A run on an archive whose lock another holder has raises LockedError and sends
    nothing; on a shared (PostgreSQL) state there is no lock, and the run goes on."""
    tid = task_id(55)
    add_image_task(replica, tid)
    archive = Archive(settings.archive)
    archive.prepare()

    if settings.state is not None:
        with archive.lock():
            assert run(settings, tid).counts[Outcome.ARCHIVED] == 1
        return
    with archive.lock(), pytest.raises(LockedError):
        run(settings, tid)

    assert replica.seen("api") == []
    assert run(settings, tid).counts[Outcome.ARCHIVED] == 1


# -- retries --------------------------------------------------------------------------------


def _limit_exceeded() -> Fault:
    body = json.dumps(error_response("RequestLimitExceeded", "too many requests")).encode()
    return Fault(status=200, headers={"Content-Type": "application/json"}, body=body)


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([Fault(status=503), Fault(status=503)], id="503-twice"),
        pytest.param([Fault(status=429, headers={"Retry-After": "0"})], id="429-retry-after"),
        pytest.param([_limit_exceeded()], id="tencent-request-limit"),
        pytest.param([Fault(status=502), _limit_exceeded()], id="mixed"),
    ],
)
def test_transient_query_errors_are_retried(
    replica: Replica, settings: Settings, archive_dir: Path, faults: list[Fault]
) -> None:
    """Throttling and 5xx answers are retried, and the task is archived once the API answers."""
    tid = task_id(60)
    (data,) = add_image_task(replica, tid)
    replica.fault("api", tid, *faults)

    summary = run(settings, tid)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED
    assert (archive_dir / str(got.folder) / "00.png").read_bytes() == data
    assert len(replica.seen("api")) == len(faults) + 1
    assert summary.requests == len(faults) + 1


def test_retry_after_overrides_the_backoff(
    replica: Replica, settings: Settings, archive_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429's ``Retry-After: 0`` is obeyed instead of the (here very long) computed backoff."""
    from fetcher import retry

    waits: list[float] = []
    original = retry.RetryPolicy.delay

    def recording(self: retry.RetryPolicy, attempt: int, retry_after: float | None = None) -> float:
        waits.append(original(self, attempt, retry_after))
        return waits[-1]

    monkeypatch.setattr(retry.RetryPolicy, "delay", recording)
    tid = task_id(61)
    add_image_task(replica, tid)
    replica.fault("api", tid, Fault(status=429, headers={"Retry-After": "0"}))

    summary = run(tweak(settings, retry_wait=30.0), tid)

    assert outcome_of(summary, tid).outcome is Outcome.ARCHIVED
    assert waits == [0.0]


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        pytest.param("api", "query failed after 3 attempts: HTTP 503", id="api"),
        pytest.param("files", "HTTP 503 (after 3 attempts)", id="file-host"),
    ],
)
def test_persistent_server_errors_fail_the_task(
    replica: Replica, settings: Settings, archive_dir: Path, server: str, needle: str
) -> None:
    """More 5xx answers than retries fail the task with a reason; the run itself goes on."""
    tid, other = task_id(62), task_id(63)
    add_image_task(replica, tid)
    (other_data,) = add_image_task(replica, other)
    key = tid if server == "api" else f"{tid}/image_0.png"
    replica.fault(server, key, *[Fault(status=503)] * (settings.retries + 1))

    summary = run(settings, tid, other)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    assert needle in str(got.reason)
    state, final, _ = db_row(settings, tid) or ("", 1, None)
    assert (state, final) == ("failed", 0)
    assert outcome_of(summary, other).outcome is Outcome.ARCHIVED
    other_folder = str(outcome_of(summary, other).folder)
    assert (archive_dir / other_folder / "00.png").read_bytes() == other_data


# -- dry run and malformed answers ----------------------------------------------------------


def test_dry_run_queries_but_downloads_nothing(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """dry_run queries each task and reports it ready, touching neither file host nor archive."""
    tid, waiting = task_id(80), task_id(81)
    add_image_task(replica, tid, count=2)
    replica.set_task(waiting, task_response(waiting, status="PROCESSING"))

    summary = run(settings, tid, waiting, dry_run=True)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.READY
    assert got.files == 2
    assert outcome_of(summary, waiting).outcome is Outcome.PENDING
    assert summary.requests == 2
    assert replica.seen("files") == []
    assert not archive_dir.exists()


def test_malformed_api_answer_fails_with_a_clear_reason(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """An answer that is not JSON fails that task with a one-line reason; others go on."""
    tid, other = task_id(82), task_id(83)
    replica.set_task(tid, b"{not json")
    add_image_task(replica, other)

    summary = run(settings, tid, other)

    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED
    reason = str(got.reason)
    assert "not valid JSON" in reason
    assert "Traceback" not in reason
    assert "\n" not in reason
    assert outcome_of(summary, other).outcome is Outcome.ARCHIVED
