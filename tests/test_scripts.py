"""What scripts and cron lines rely on: exit codes, --json and --json-lines, the lock wait,
and a --dry-run that touches nothing."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest
from conftest import add_image_task, process_env, run_cli, task_id
from test_cli import cli_env

from fetcher.archive import Archive
from fetcher.replica import Replica, task_response


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """The lines of ``stream`` as they come, read by a thread (a readline may block)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], needle: str, timeout: float = 15) -> list[str]:
    """Lines up to the first holding ``needle``; fails if the stream ends or time runs out."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert line, f"stream ended before {needle!r}: {seen}"
        seen.append(line)
        if needle in line:
            return seen


# -- the lock ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
        pytest.param(signal.SIGINT, 130, id="sigint"),
    ],
)
def test_signal_while_waiting_for_the_lock_ends_the_wait_at_once(
    replica: Replica, tmp_path: Path, signum: int, code: int
) -> None:
    """SIGTERM or SIGINT during --wait-lock: the wait ends at once, the summary says
    interrupted, exit 143/130, and nothing is asked."""
    tid = task_id(1)
    add_image_task(replica, tid)
    archive = tmp_path / "archive"
    Archive(archive).prepare()
    env = process_env(replica, archive, tmp_path)
    command = [sys.executable, "-m", "fetcher", "fetch", "--wait-lock", "--id", tid, "--json"]
    # The lock is let go first, so a run that kept waiting still ends.
    with (
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc,
        Archive(archive).lock(),
    ):
        assert proc.stderr is not None and proc.stdout is not None
        _wait_for(_lines(proc.stderr), "waiting for another run's lock")
        signalled = time.monotonic()
        proc.send_signal(signum)
        out = proc.stdout.read()
        proc.wait(timeout=10)
        elapsed = time.monotonic() - signalled

    assert proc.returncode == code
    document = json.loads(out)
    assert document["interrupted"] is True
    assert document["exit_code"] == code
    assert elapsed < 5
    assert replica.seen("api") == []


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--wait-lock"], id="no-seconds"),
        pytest.param(["--wait-lock", "30"], id="seconds"),
    ],
)
def test_wait_lock_then_a_file_reads_the_file(
    replica: Replica, archive_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    """`fetch --wait-lock ids.txt` waits (forever if need be) and reads ids.txt; a number
    after --wait-lock is still its seconds."""
    tid = task_id(2)
    add_image_task(replica, tid)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{tid}\n")

    result = run_cli(["fetch", *flags, str(ids), "--json"], env=cli_env(replica, archive_dir))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["archived"] == 1


# -- --json, --json-lines and the exit codes --------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code", "error_code"),
    [
        pytest.param("wrong-key", 2, "auth", id="key-rejected"),
        pytest.param("locked", 75, "locked", id="locked"),
        pytest.param("unwritable", 3, "archive", id="archive-unwritable"),
    ],
)
def test_json_prints_its_object_when_a_run_stops_on_a_fatal_error(
    replica: Replica, tmp_path: Path, case: str, code: int, error_code: str
) -> None:
    """--json prints one object with error {code, message}, schema, archive and exit_code
    also when the run stops on a fatal error; stderr keeps its one line."""
    tid = task_id(3)
    add_image_task(replica, tid)
    archive = tmp_path / "archive"
    env = cli_env(replica, archive)
    if case == "wrong-key":
        env["FETCHER_API_KEY"] = "not-the-key"
    if case == "unwritable":
        (tmp_path / "file").write_text("not a folder\n")
        archive = tmp_path / "file" / "archive"
        env["FETCHER_ARCHIVE"] = str(archive)
    if case == "locked":
        Archive(archive).prepare()
        with Archive(archive).lock():
            result = run_cli(["fetch", "--id", tid, "--json"], env=env)
    else:
        result = run_cli(["fetch", "--id", tid, "--json"], env=env)

    assert result.returncode == code, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == 1
    assert document["exit_code"] == code
    assert document["error"]["code"] == error_code
    assert document["error"]["message"] in result.stderr
    assert document["archive"] == str(archive)
    assert "not-the-key" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_json_lines_streams_each_outcome_then_the_summary(
    replica: Replica, archive_dir: Path
) -> None:
    """--json-lines prints one compact object per task outcome, then the summary object last."""
    done, waiting, unknown = task_id(4), task_id(5), task_id(6)
    add_image_task(replica, done)
    replica.set_task(waiting, task_response(waiting, status="PROCESSING"))
    args = ["fetch", "--id", done, "--id", waiting, "--id", unknown, "--json-lines"]

    result = run_cli(args, env=cli_env(replica, archive_dir))

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert lines == [json.dumps(o, separators=(",", ":"), ensure_ascii=False) for o in objects]
    *tasks, summary = objects
    assert {t["task_id"]: t["outcome"] for t in tasks} == {
        done: "archived",
        waiting: "pending",
        unknown: "failed",
    }
    assert summary["schema"] == 1
    assert summary["exit_code"] == 1
    assert summary["error"] is None
    assert summary["tasks"] == tasks


def test_json_and_json_lines_together_is_a_usage_error(replica: Replica, archive_dir: Path) -> None:
    """--json with --json-lines is refused, exit 2."""
    result = run_cli(
        ["fetch", "--id", task_id(7), "--json", "--json-lines"], env=cli_env(replica, archive_dir)
    )

    assert result.returncode == 2
    assert "--json-lines" in result.stderr


# -- --dry-run touches nothing --------------------------------------------------------------


def test_dry_run_on_a_folder_that_does_not_exist_creates_nothing(
    replica: Replica, tmp_path: Path
) -> None:
    """--dry-run on an archive folder that does not exist queries and reports, and creates
    neither the folder nor a database nor a lock."""
    tid = task_id(8)
    add_image_task(replica, tid)
    archive = tmp_path / "not-yet" / "archive"

    result = run_cli(["fetch", "--id", tid, "--dry-run", "--json"], env=cli_env(replica, archive))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] == 1
    assert not (tmp_path / "not-yet").exists()


def test_dry_run_reads_the_state_without_the_lock_or_a_write(
    replica: Replica, archive_dir: Path
) -> None:
    """--dry-run on an archive another run holds: no lock taken (no exit 75), the state read
    read-only (archived tasks known, nothing written)."""
    old, new = task_id(9), task_id(10)
    add_image_task(replica, old)
    add_image_task(replica, new)
    env = cli_env(replica, archive_dir)
    assert run_cli(["fetch", "--id", old], env=env).returncode == 0
    state = archive_dir / ".fetcher" / "state.sqlite"
    before = state.read_bytes()

    with Archive(archive_dir).lock():
        result = run_cli(["fetch", "--id", old, "--id", new, "--dry-run", "--json"], env=env)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["already_archived"], document["ready"]) == (1, 1)
    # SQLite may leave its WAL index beside a read-only reader; the database is untouched.
    assert state.read_bytes() == before


# -- the summary ----------------------------------------------------------------------------


def test_summary_names_the_archive_by_its_absolute_path(replica: Replica, tmp_path: Path) -> None:
    """A relative --archive is named absolute in the human line and in --json's archive."""
    tid = task_id(11)
    add_image_task(replica, tid)
    env = cli_env(replica, tmp_path / "unused")
    del env["FETCHER_ARCHIVE"]

    human = run_cli(["fetch", "--id", tid, "--archive", "rel"], env=env, cwd=tmp_path)
    machine = run_cli(["fetch", "--id", tid, "--archive", "rel", "--json"], env=env, cwd=tmp_path)

    assert human.returncode == 0, human.stderr
    assert str(tmp_path / "rel") in human.stdout
    assert json.loads(machine.stdout)["archive"] == str(tmp_path / "rel")
