"""Whose fault is it: one task's or file's, or the run's (the key, the base URL, a bug)?

Every failure belongs to its task or its file, except the documented run-level
ones; a 403 on one task is that task's, a wrong gateway is the run's at once.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from conftest import add_image_task, add_video_task, archived_files, run, run_cli, task_id
from test_cli import assert_one_error, cli_env
from test_fetch import db_row, outcome_of

from fetcher.cli import main
from fetcher.config import Settings
from fetcher.errors import GatewayError
from fetcher.replica import Fault, Replica, error_response, file_info, pseudo_video, task_response
from fetcher.summary import Outcome

# -- a header, a bug: one file's trouble --------------------------------------------------


@pytest.mark.parametrize(
    "validators",
    [
        pytest.param({"ETag": '"ab\x00cd"'}, id="nul"),
        pytest.param({"ETag": '"ab\x01cd"'}, id="control-character"),
        pytest.param({"ETag": '"ab\x7fcd"'}, id="del"),
        pytest.param({"ETag": '"ab\xe9cd"'}, id="non-ascii"),
        pytest.param(
            {"ETag": 'W/"weak"', "Last-Modified": "Tue, 01 Dec 2026\x01 10:00:00 GMT"},
            id="last-modified-control-character",
        ),
    ],
)
def test_malformed_etag_with_a_drop_never_stops_a_run(
    replica: Replica, settings: Settings, archive_dir: Path, validators: dict[str, str]
) -> None:
    """An ETag holding a NUL or another byte If-Range may not carry, then a drop mid-body:
    neither of two runs dies, the validator is never sent back, the file ends up archived."""
    tid, other = task_id(1, "AigcVideoTask"), task_id(2)
    data = pseudo_video(300_000, seed=1)
    url = replica.add_file(f"{tid}/v.mp4", data, "video/mp4")
    replica.set_task(tid, task_response(tid, files=[file_info(url, file_type="video")]))
    other_data = add_image_task(replica, other)[0]
    headers = {**validators, "Content-Type": "video/mp4"}
    drop = Fault(status=200, headers=headers, body=data, drop_after=100_000)
    replica.fault("files", f"{tid}/v.mp4", drop)

    first = run(settings, tid, other)
    second = run(settings, tid)

    assert outcome_of(first, other).outcome is Outcome.ARCHIVED
    archived = first.counts[Outcome.ARCHIVED] + second.counts[Outcome.ARCHIVED]
    assert archived == 2, (first.tasks, second.tasks)
    assert data in archived_files(archive_dir).values()
    assert other_data in archived_files(archive_dir).values()
    assert all("If-Range" not in seen.headers for seen in replica.seen("files"))


def test_stored_malformed_validator_is_not_sent_on_resume(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A work record an older run left with a control character in its ETag is not trusted:
    the file is fetched whole, and the run goes on (it used to die on it for 8 days)."""
    from fetcher.archive import Archive

    tid = task_id(3, "AigcVideoTask")
    data = pseudo_video(200_000, seed=3)
    url = replica.add_file(f"{tid}/v.mp4", data, "video/mp4")
    replica.set_task(tid, task_response(tid, files=[file_info(url, file_type="video")]))
    archive = Archive(archive_dir)
    archive.prepare()
    work = archive.work_path(tid, 0)
    work.write_bytes(data[:50_000])
    record = {"url": url, "validator": '"ab\x01cd"'}
    work.with_name(work.name + ".json").write_text(json.dumps(record), encoding="utf-8")

    summary = run(settings, tid)

    assert outcome_of(summary, tid).outcome is Outcome.ARCHIVED
    assert [v for k, v in archived_files(archive_dir).items() if k.endswith(".mp4")] == [data]
    (request,) = replica.seen("files")
    assert "Range" not in request.headers and "If-Range" not in request.headers


def test_a_bug_in_one_task_fails_that_task_and_the_run_goes_on(
    replica: Replica,
    archive_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug while one task's sidecar is built is that task's failure, with its traceback at -v;
    the other task is archived and the run exits 1."""
    import fetcher.pipeline

    bad, good = task_id(4), task_id(5)
    add_image_task(replica, bad)
    add_image_task(replica, good)
    real = fetcher.pipeline.build_sidecar

    def broken(task: object, *args: object, **kwargs: object) -> object:
        if getattr(task, "task_id", None) == bad:
            raise ZeroDivisionError("a bug")
        return real(task, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fetcher.pipeline, "build_sidecar", broken)
    for name, value in cli_env(replica, archive_dir).items():
        monkeypatch.setenv(name, value)

    code = main(["fetch", "--id", bad, "--id", good, "--json", "-v", "--no-progress"])

    out, err = capsys.readouterr()
    document = json.loads(out)
    assert code == 1
    assert document["error"] is None
    outcomes = {t["task_id"]: t for t in document["tasks"]}
    assert outcomes[good]["outcome"] == "archived"
    assert outcomes[bad]["outcome"] == "failed"
    assert "internal error: ZeroDivisionError: a bug" in outcomes[bad]["reason"]
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert db_row(archive_dir, bad) == ("failed", 0, outcomes[bad]["reason"])


def test_a_file_where_a_tasks_folder_should_be_fails_that_task_only(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """An OS error for one task's place (a file where its folder should go) fails that task,
    not the run: the other task is archived, and the next run archives it once mended."""
    video, image = task_id(7, "AigcVideoTask"), task_id(8)
    data = add_video_task(replica, video)
    add_image_task(replica, image)
    archive_dir.mkdir()
    blocker = archive_dir / "AigcVideoTask"
    blocker.write_text("in the way\n")

    first = run(settings, video, image)

    assert outcome_of(first, image).outcome is Outcome.ARCHIVED
    got = outcome_of(first, video)
    assert got.outcome is Outcome.FAILED
    assert "AigcVideoTask" in str(got.reason)
    assert first.exit_code == 1
    blocker.unlink()
    second = run(settings, video)
    assert outcome_of(second, video).outcome is Outcome.ARCHIVED
    assert data in archived_files(archive_dir).values()


@pytest.mark.parametrize(
    ("flags", "traceback"),
    [pytest.param([], False, id="one-line"), pytest.param(["-v"], True, id="verbose")],
)
def test_a_bug_outside_any_task_exits_70(
    replica: Replica,
    archive_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    traceback: bool,
) -> None:
    """A bug in the run's own bookkeeping exits 70: one line, the traceback only at -v,
    and --json still prints its object with error.code "internal"."""
    import fetcher.bookmarks

    def broken(self: object) -> object:
        raise ZeroDivisionError("a bug")

    tid = task_id(6)
    add_image_task(replica, tid)
    monkeypatch.setattr(fetcher.bookmarks.BookmarkTracker, "reached", broken)
    for name, value in cli_env(replica, archive_dir).items():
        monkeypatch.setenv(name, value)

    code = main(["fetch", "--id", tid, "--json", "--no-progress", *flags])

    out, err = capsys.readouterr()
    document = json.loads(out)
    assert code == 70
    assert document["exit_code"] == 70
    assert document["error"]["code"] == "internal"
    assert "ZeroDivisionError" in document["error"]["message"]
    assert "fetcher: error: internal error: ZeroDivisionError: a bug" in err
    assert ("Traceback" in err) is traceback


# -- a 403 is one task's, unless every first query gets it ----------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(Fault(status=403, body=b'{"error": {"message": "no"}}'), id="http-403"),
        pytest.param(
            Fault(
                status=200,
                body=json.dumps(error_response("UnauthorizedOperation", "not yours")).encode(),
            ),
            id="unauthorized-operation",
        ),
    ],
)
def test_refused_task_on_line_6_of_40_fails_alone(
    replica: Replica, archive_dir: Path, tmp_path: Path, refusal: Fault
) -> None:
    """A 403 or UnauthorizedOperation for line 6 of 40 fails that task (not for good): the
    other 39 are archived, exit 1, and the next run asks about it again."""
    tids = [task_id(100 + n) for n in range(40)]
    for tid in tids:
        add_image_task(replica, tid)
    refused = tids[5]
    replica.fault("api", refused, refusal)
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{tid}\n" for tid in tids))
    env = cli_env(replica, archive_dir)

    first = run_cli(["fetch", str(ids), "--json"], env=env)

    document = json.loads(first.stdout)
    assert first.returncode == 1, first.stderr
    assert document["archived"] == 39
    (failed,) = [t for t in document["tasks"] if t["outcome"] != "archived"]
    assert failed["task_id"] == refused
    assert "refused this task" in failed["reason"]
    assert db_row(archive_dir, refused) == ("failed", 0, failed["reason"])

    second = run_cli(["fetch", str(ids), "--json"], env=env)

    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["archived"] == 1


def test_every_first_query_refused_is_the_key(replica: Replica, archive_dir: Path) -> None:
    """When the first queries (here 2, the concurrency) all get 403, it is the key: exit 2
    before the other tasks are asked about."""
    tids = [task_id(200 + n) for n in range(6)]
    for tid in tids:
        add_image_task(replica, tid)
        replica.fault("api", tid, Fault(status=403, body=b"{}"))
    args = ["fetch", *(f"--id={tid}" for tid in tids), "--concurrency", "2"]

    result = run_cli(args, env=cli_env(replica, archive_dir))

    line = assert_one_error(result, 2, "rejected the key", "refused every first query")
    assert replica.api_key not in line
    assert len(replica.seen("api")) <= 3


# -- a wrong gateway is the run's, at once -------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (the OS picked it, then it was let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param("unreachable", id="unreachable"),
        pytest.param("/v2", id="base-url-with-a-path"),
    ],
)
def test_wrong_gateway_exits_two_at_once_naming_the_base_url(
    replica: Replica, archive_dir: Path, wrong: str
) -> None:
    """25 IDs against a base URL that refuses connections, or whose path 404s: exit 2 with
    one line naming the base URL (never the key), without 6 slow attempts a task."""
    tids = [task_id(300 + n) for n in range(25)]
    for tid in tids:
        add_image_task(replica, tid)
    base = (
        f"http://127.0.0.1:{_closed_port()}" if wrong == "unreachable" else replica.api_url + wrong
    )
    env = cli_env(replica, archive_dir, FETCHER_BASE_URL=base, FETCHER_RETRIES="5")
    env["FETCHER_RETRY_WAIT"] = "0.5"  # the default: 15 s of backoff a task if retried
    started = time.monotonic()

    result = run_cli(["fetch", *(f"--id={tid}" for tid in tids)], env=env)

    elapsed = time.monotonic() - started
    line = assert_one_error(result, 2, base, "check --base-url")
    assert replica.api_key not in line
    assert elapsed < 10
    assert archived_files(archive_dir) == {}


def test_first_queries_that_get_through_keep_a_bare_404_the_tasks(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A bare 404 for one task while the others' queries get through is that task's failure."""
    tids = [task_id(400 + n) for n in range(3)]
    for tid in tids:
        add_image_task(replica, tid)
    replica.fault("api", tids[0], Fault(status=404, body=b"{}"))

    summary = run(settings, *tids)

    assert outcome_of(summary, tids[0]).outcome is Outcome.FAILED
    assert summary.counts[Outcome.ARCHIVED] == 2


def test_gateway_error_names_no_key(replica: Replica, settings: Settings) -> None:
    """The gateway error is a UsageError whose text holds the base URL only."""
    from dataclasses import replace

    wrong = replace(settings, base_url=replica.api_url + "/nope")
    with pytest.raises(GatewayError) as caught:
        run(wrong, task_id(500))
    assert replica.api_url + "/nope" in str(caught.value)
    assert replica.api_key not in str(caught.value)
