"""``fetcher status``: every count, lists that say what they left out, read-only archives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    add_image_task,
    on_each_state,
    process_env,
    run,
    run_cli,
    state_env,
    task_id,
)

from fetcher.config import Settings
from fetcher.replica import Replica, task_response

#: Every test here exercises the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)


def status_env(archive: Path, tmp_path: Path, settings: Settings | None = None) -> dict[str, str]:
    env = {"FETCHER_ARCHIVE": str(archive), "XDG_CONFIG_HOME": str(tmp_path / "no-config")}
    return env | (state_env(settings) if settings is not None else {})


@pytest.fixture
def many_pending(replica: Replica, settings: Settings) -> list[str]:
    """An archive after a run over 25 tasks the API still runs."""
    ids = [task_id(n) for n in range(25)]
    for tid in ids:
        replica.set_task(tid, task_response(tid, status="PROCESSING"))
    assert run(settings, *ids).exit_code == 0
    return ids


@pytest.mark.parametrize(
    ("flags", "shown", "more"),
    [
        pytest.param([], 20, 5, id="default-20"),
        pytest.param(["--limit", "3"], 3, 22, id="limit-3"),
        pytest.param(["--all"], 25, 0, id="all"),
    ],
)
def test_status_says_how_many_more_and_shows_them_on_request(
    many_pending: list[str],
    settings: Settings,
    tmp_path: Path,
    flags: list[str],
    shown: int,
    more: int,
) -> None:
    """A list cut at the limit ends in "… and N more"; --limit N and --all change the cut."""
    env = status_env(settings.archive, tmp_path, settings)

    text = run_cli(["status", *flags], env=env)
    document = json.loads(run_cli(["status", "--json", *flags], env=env).stdout)

    assert text.returncode == 0, text.stderr
    listed = [line for line in text.stdout.splitlines() if any(t in line for t in many_pending)]
    assert len(listed) == shown
    assert (f"… and {more} more (--limit N or --all shows them)" in text.stdout) == bool(more)
    assert len(document["pending"]) == shown
    assert document["more"] == {"pending": more, "expiring": 0, "failures": 0}


def test_status_limit_that_is_not_a_count_is_a_usage_error(tmp_path: Path) -> None:
    """``--limit -1`` and ``--limit`` with ``--all`` are refused with exit 2."""
    for flags in (["--limit", "-1"], ["--limit", "x"], ["--limit", "3", "--all"]):
        result = run_cli(["status", *flags], env=status_env(tmp_path / "a", tmp_path))
        assert result.returncode == 2, flags
        assert len(result.stderr.splitlines()) == 1


def test_status_json_carries_every_count_zeros_included(replica: Replica, tmp_path: Path) -> None:
    """``status --json`` names every task state in ``counts``, even those with no task."""
    tid = task_id(1)
    replica.set_task(tid, task_response(tid, status="PROCESSING"))
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path)
    assert run_cli(["fetch", "--id", tid], env=env).returncode == 0

    result = run_cli(["status", "--json"], env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {
        "archived": 0,
        "queued": 0,
        "pending": 1,
        "incomplete": 0,
        "failed": 0,
        "expired": 0,
    }


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (fetcher's own too) with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_read_only_archive_can_be_inspected(
    replica: Replica, settings: Settings, read_only_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a read-only mount, ``status`` and ``verify`` work, and nothing is written."""
    archive, mount = read_only_copy
    done, waiting = task_id(1), task_id(2)
    add_image_task(replica, done)
    replica.set_task(waiting, task_response(waiting, status="PROCESSING"))
    assert run(replace(settings, archive=archive), done, waiting).exit_code == 0
    before = snapshot(archive)

    status = run_cli(["status", "--json"], env=status_env(mount, tmp_path, settings))
    verify = run_cli(["verify", "--json"], env=status_env(mount, tmp_path, settings))

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["archived"] == 1
    assert [p["task_id"] for p in json.loads(status.stdout)["pending"]] == [waiting]
    assert verify.returncode == 0, verify.stderr
    assert (json.loads(verify.stdout)["checked"], json.loads(verify.stdout)["ok"]) == (1, 1)
    assert snapshot(archive) == before
