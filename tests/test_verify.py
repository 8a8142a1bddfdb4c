"""``fetcher verify``: re-hash the archive against its database, and ``--repair`` what it can.

Every archive here is made by a real fetch run against the replica; damage is done
to the files on disk (or, for expiry, to the database row) the way it happens in life.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    add_image_task,
    add_video_task,
    archived_files,
    on_each_state,
    process_env,
    run,
    run_cli,
    state_env,
    state_rows,
    state_write,
    task_id,
)

from fetcher.archive import Archive
from fetcher.config import Settings
from fetcher.errors import LockedError, UsageError
from fetcher.replica import Fault, Replica, png
from fetcher.verify import VerifyReport, verify_archive

#: Every test here exercises the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)

REPORT_KEYS = {
    "archive",
    "repair",
    "accept_changed",
    "interrupted",
    "checked",
    "ok",
    "missing",
    "corrupt",
    "repaired",
    "unrepairable",
    "exit_code",
    "problems",
}
PROBLEM_KEYS = {"task_id", "index", "path", "problem", "found", "detail", "quarantined"}


# -- helpers --------------------------------------------------------------------------------


def fill(replica: Replica, settings: Settings) -> list[Path]:
    """Archive a two-image task and a video task; returns the three files, in DB order."""
    images, video = task_id(1), task_id(2, "AigcVideoTask")
    add_image_task(replica, images, count=2)
    add_video_task(replica, video)
    assert run(settings, images, video).exit_code == 0
    return [settings.archive / row["path"] for row in file_rows(settings)]


def file_rows(settings: Settings) -> list[dict[str, Any]]:
    """The done file rows, ordered the way verify reads them."""
    names = ("task_id", "idx", "path", "size", "sha256", "expire_time")
    rows = state_rows(
        settings,
        f"SELECT {', '.join(names)} FROM files WHERE state = 'done' ORDER BY task_id, idx",
    )
    return [dict(zip(names, r, strict=True)) for r in rows]


def expire_in_db(settings: Settings, file: Path) -> None:
    """Move a file row's ExpireTime into the past, as if the run were eight days ago."""
    relative = str(file.relative_to(settings.archive))
    changed = state_write(
        settings,
        "UPDATE files SET expire_time = '2020-01-01T00:00:00Z' WHERE path = ?",
        (relative,),
    )
    assert changed == 1


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def verify(
    settings: Settings, *, repair: bool = False, accept_changed: bool = False
) -> VerifyReport:
    return verify_archive(
        settings.archive, repair=repair, settings=settings, accept_changed=accept_changed
    )


def only_problem(report: VerifyReport) -> dict[str, Any]:
    problems = report.to_json()["problems"]
    assert len(problems) == 1, problems
    entry: dict[str, Any] = problems[0]
    return entry


# -- checking -------------------------------------------------------------------------------


def test_clean_archive_verifies_ok(replica: Replica, settings: Settings) -> None:
    """A freshly archived folder: every file checked, all ok, exit 0."""
    files = fill(replica, settings)

    report = verify(settings)

    assert (report.checked, report.ok, report.missing, report.corrupt) == (3, 3, 0, 0)
    assert report.problems == []
    assert report.exit_code == 0
    assert len(files) == 3


def test_deleted_file_is_missing(replica: Replica, settings: Settings) -> None:
    """A file removed from disk is reported missing, with its task, index and path; exit 1."""
    files = fill(replica, settings)
    files[1].unlink()
    row = file_rows(settings)[1]

    report = verify(settings)

    assert (report.checked, report.ok, report.missing, report.corrupt) == (3, 2, 1, 0)
    assert only_problem(report) == {
        "task_id": row["task_id"],
        "index": row["idx"],
        "path": row["path"],
        "problem": "missing",
        "found": "missing",
        "detail": "not on disk",
        "quarantined": None,
    }
    assert report.exit_code == 1
    assert not files[1].exists()


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        pytest.param(flip_byte, "sha256 ", id="one-byte-flipped"),
        pytest.param(truncate, " bytes, recorded ", id="truncated"),
    ],
)
def test_damaged_file_is_corrupt(
    replica: Replica, settings: Settings, damage: Any, detail: str
) -> None:
    """A file whose bytes or length changed is corrupt; a plain verify leaves it as it is."""
    files = fill(replica, settings)
    damage(files[0])
    damaged = files[0].read_bytes()

    report = verify(settings)

    assert (report.ok, report.missing, report.corrupt) == (2, 0, 1)
    entry = only_problem(report)
    assert (entry["problem"], entry["found"]) == ("corrupt", "corrupt")
    assert detail in entry["detail"]
    assert report.exit_code == 1
    assert files[0].read_bytes() == damaged


def test_plain_verify_takes_no_lock_and_sends_nothing(replica: Replica, settings: Settings) -> None:
    """Without --repair verify reads beside a run holding the lock, and sends no request."""
    files = fill(replica, settings)
    files[2].unlink()
    sent = len(replica.requests)

    with Archive(settings.archive).lock():
        report = verify(settings)

    assert report.missing == 1
    assert len(replica.requests) == sent


# -- repairing ------------------------------------------------------------------------------


def test_repair_restores_byte_identical_files(replica: Replica, settings: Settings) -> None:
    """--repair downloads missing, flipped and truncated files again; the next verify is clean."""
    files = fill(replica, settings)
    before, rows_before = archived_files(settings.archive), file_rows(settings)
    files[0].unlink()
    flip_byte(files[1])
    truncate(files[2])

    report = verify(settings, repair=True)

    assert (report.missing, report.corrupt, report.repaired, report.unrepairable) == (1, 2, 3, 0)
    assert [p["problem"] for p in report.to_json()["problems"]] == ["repaired"] * 3
    assert [p["found"] for p in report.to_json()["problems"]] == ["missing", "corrupt", "corrupt"]
    assert report.exit_code == 0
    assert archived_files(settings.archive) == before
    assert file_rows(settings) == rows_before
    again = verify(settings)
    assert (again.checked, again.ok, again.exit_code) == (3, 3, 0)


def test_repair_of_an_expired_url_is_unrepairable(replica: Replica, settings: Settings) -> None:
    """A corrupt file whose URL has expired is not requested, stays as it is; exit 1."""
    files = fill(replica, settings)
    flip_byte(files[0])
    damaged = files[0].read_bytes()
    expire_in_db(settings, files[0])
    sent = len(replica.seen("files"))

    report = verify(settings, repair=True)

    assert (report.corrupt, report.repaired, report.unrepairable) == (1, 0, 1)
    entry = only_problem(report)
    assert (entry["problem"], entry["found"]) == ("unrepairable", "corrupt")
    assert "expired at 2020-01-01T00:00:00Z" in entry["detail"]
    assert report.exit_code == 1
    assert len(replica.seen("files")) == sent
    assert files[0].read_bytes() == damaged


def test_repair_of_a_file_the_host_dropped_is_unrepairable(
    replica: Replica, settings: Settings
) -> None:
    """A 404 from the file host before ExpireTime leaves the file unrepairable, with the reason."""
    files = fill(replica, settings)
    files[0].unlink()
    replica.remove_file(f"{task_id(1)}/image_0.png")

    report = verify(settings, repair=True)

    entry = only_problem(report)
    assert entry["problem"] == "unrepairable"
    assert "HTTP 404" in entry["detail"]
    assert report.exit_code == 1


def test_repair_never_sends_the_api_key(replica: Replica, settings: Settings) -> None:
    """Repairs go to the file host only, without Authorization, though settings hold a key."""
    files = fill(replica, settings)
    for file in files:
        file.unlink()
    api_before, files_before = len(replica.seen("api")), len(replica.seen("files"))

    assert verify(settings, repair=True).repaired == 3

    assert len(replica.seen("api")) == api_before
    requests = replica.seen("files")[files_before:]
    assert len(requests) == 3
    for request in requests:
        assert "authorization" not in {h.lower() for h in request.headers}
        assert all(replica.api_key not in v for v in request.headers.values())


def test_repair_with_different_bytes_is_changed_at_host_and_left_alone(
    replica: Replica, settings: Settings
) -> None:
    """When the host now serves other bytes, plain --repair reports it and changes nothing."""
    files = fill(replica, settings)
    flip_byte(files[0])
    damaged, rows_before = files[0].read_bytes(), file_rows(settings)
    sidecar_before = (files[0].parent / "task.json").read_bytes()
    new = png(20, 20, seed=99)
    replica.add_file(f"{task_id(1)}/image_0.png", new)

    report = verify(settings, repair=True)

    entry = only_problem(report)
    assert (entry["problem"], entry["found"]) == ("changed-at-host", "corrupt")
    assert hashlib.sha256(new).hexdigest() in entry["detail"]
    assert report.exit_code == 1
    assert files[0].read_bytes() == damaged
    assert file_rows(settings) == rows_before
    assert (files[0].parent / "task.json").read_bytes() == sidecar_before
    assert "--accept-changed" in "\n".join(report.lines())


def test_repair_accepting_changes_replaces_and_keeps_the_original_sha256(
    replica: Replica, settings: Settings
) -> None:
    """accept_changed: new bytes replace file, row and sidecar; the first sha256 stays."""
    files = fill(replica, settings)
    first_sha = file_rows(settings)[0]["sha256"]
    damaged = bytearray(files[0].read_bytes())
    damaged[0] ^= 0xFF
    files[0].write_bytes(bytes(damaged))
    sidecar = files[0].parent / "task.json"
    for seed in (99, 100):  # two changes in a row: the original is the first one still
        new = png(20, 20, seed=seed)
        replica.add_file(f"{task_id(1)}/image_0.png", new)
        new_sha = hashlib.sha256(new).hexdigest()
        if seed == 100:
            files[0].unlink()

        report = verify(settings, repair=True, accept_changed=True)

        entry = only_problem(report)
        assert entry["problem"] == "replaced-different"
        assert new_sha in entry["detail"]
        assert report.exit_code == 0
        assert files[0].read_bytes() == new
        assert file_rows(settings)[0]["sha256"] == new_sha
        document = json.loads(sidecar.read_text("utf-8"))["files"][0]
        assert (document["sha256"], document["size"]) == (new_sha, len(new))
        assert document["original_sha256"] == first_sha
    assert verify(settings).exit_code == 0


def test_repair_moves_a_corrupt_file_to_quarantine(replica: Replica, settings: Settings) -> None:
    """A damaged copy is moved under .fetcher/quarantine/ at its relative path, never lost."""
    files = fill(replica, settings)
    relative = files[0].relative_to(settings.archive)
    kept = settings.archive / ".fetcher" / "quarantine" / relative
    damages = []
    for _ in range(2):  # a second damage of the same file gets a name of its own
        flip_byte(files[0])
        damages.append(files[0].read_bytes())

        entry = only_problem(verify(settings, repair=True))

        assert entry["problem"] == "repaired"
        assert verify(settings).exit_code == 0
    assert kept.read_bytes() == damages[0]
    assert kept.with_name(kept.name + ".1").read_bytes() == damages[1]
    assert entry["quarantined"] == f".fetcher/quarantine/{relative}.1"


def test_repair_checks_without_the_lock_and_takes_it_only_to_repair(
    replica: Replica, settings: Settings
) -> None:
    """--repair over a clean archive works while a run holds the lock: nothing to repair."""
    fill(replica, settings)

    with Archive(settings.archive).lock():
        report = verify(settings, repair=True)

    assert (report.checked, report.ok, report.exit_code) == (3, 3, 0)


def test_repair_while_locked_is_refused(replica: Replica, settings: Settings) -> None:
    """--repair needs the archive's lock; another holder means LockedError and no request."""
    files = fill(replica, settings)
    files[0].unlink()
    sent = len(replica.requests)

    with Archive(settings.archive).lock(), pytest.raises(LockedError):
        verify(settings, repair=True)

    assert len(replica.requests) == sent
    assert not files[0].exists()


@pytest.mark.parametrize("state", [None], ids=["sqlite"])  # a shared state is not in a folder
def test_verify_without_an_archive_is_a_usage_error(tmp_path: Path, settings: Settings) -> None:
    """A folder with no state database is a usage error, and verify creates nothing there."""
    with pytest.raises(UsageError, match="no fetcher archive"):
        verify_archive(tmp_path / "empty", repair=True, settings=settings)
    assert not (tmp_path / "empty").exists()


def test_verify_json_shape(replica: Replica, settings: Settings) -> None:
    """to_json: integer counts, repair flag, exit code and one entry per problem file."""
    files = fill(replica, settings)
    files[0].unlink()

    document = verify(settings).to_json()

    assert set(document) == REPORT_KEYS
    for key in ("checked", "ok", "missing", "corrupt", "repaired", "unrepairable", "exit_code"):
        assert isinstance(document[key], int), key
    assert document["repair"] is False
    assert (document["accept_changed"], document["interrupted"]) == (False, False)
    assert document["archive"] == str(settings.archive)
    assert [set(p) for p in document["problems"]] == [PROBLEM_KEYS]
    assert isinstance(document["problems"][0]["index"], int)
    json.dumps(document)


# -- the command line -----------------------------------------------------------------------


def test_cli_verify_exits_0_when_clean_and_1_when_not(replica: Replica, settings: Settings) -> None:
    """`fetcher verify` exits 0 on a clean archive, 1 with a missing file; --json parses."""
    files = fill(replica, settings)
    archive = str(settings.archive)

    clean = run_cli(["verify", "--archive", archive], env=state_env(settings))
    assert clean.returncode == 0, clean.stderr
    assert "3 files checked: 3 ok, 0 missing, 0 corrupt" in clean.stdout
    quiet = run_cli(["verify", "--archive", archive, "-q"], env=state_env(settings))
    assert (quiet.returncode, quiet.stdout) == (0, "")

    files[0].unlink()
    broken = run_cli(["verify", "--archive", archive, "--json"], env=state_env(settings))
    assert broken.returncode == 1, broken.stderr
    document = json.loads(broken.stdout)
    assert (document["missing"], document["exit_code"]) == (1, 1)


def test_cli_verify_repair_exits_0_once_repaired(replica: Replica, settings: Settings) -> None:
    """`fetcher verify --repair` restores the file over loopback and exits 0."""
    files = fill(replica, settings)
    data = files[0].read_bytes()
    files[0].unlink()

    result = run_cli(
        ["verify", "--repair", "--no-progress", "--archive", str(settings.archive)],
        env=state_env(settings),
    )

    assert result.returncode == 0, result.stderr
    assert "1 repaired, 0 unrepairable" in result.stdout
    assert files[0].read_bytes() == data


def test_cli_verify_without_an_archive_is_one_error_line(tmp_path: Path) -> None:
    """A folder without an archive: exit 2, one `fetcher: error:` line, nothing on stdout."""
    result = run_cli(["verify", "--archive", str(tmp_path / "nothing-here")])

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fetcher: error: no fetcher archive at "), lines[0]


def test_cli_accept_changed_without_repair_is_a_usage_error(
    replica: Replica, settings: Settings
) -> None:
    """``verify --accept-changed`` alone changes nothing, so it is refused: exit 2, one line."""
    fill(replica, settings)

    result = run_cli(["verify", "--accept-changed", "--archive", str(settings.archive)])

    assert result.returncode == 2
    assert result.stderr == "fetcher: error: --accept-changed needs --repair\n"


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
        pytest.param(signal.SIGINT, 130, id="sigint"),
    ],
)
def test_cli_verify_repair_winds_down_on_a_signal(
    replica: Replica, settings: Settings, tmp_path: Path, signum: int, code: int
) -> None:
    """A signal during a repair's download exits 130/143 at once, with the report printed."""
    (video,) = [f for f in fill(replica, settings) if f.suffix == ".mp4"]
    video.unlink()
    replica.fault(
        "files", f"{task_id(2, 'AigcVideoTask')}/video.mp4", Fault(drop_after=1000, stall=60)
    )
    sent = len(replica.seen("files"))
    command = [sys.executable, "-m", "fetcher", "verify", "--repair", "--json"]
    env = process_env(replica, settings.archive, tmp_path) | state_env(settings)
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + 15
        while len(replica.seen("files")) == sent and time.monotonic() < deadline:
            time.sleep(0.02)  # polls for the request to arrive; the host then stalls
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=15)

    assert proc.returncode == code, err
    document = json.loads(out)
    assert (document["interrupted"], document["exit_code"]) == (True, code)
    assert [p["problem"] for p in document["problems"]] == ["missing"]
    assert signal.Signals(signum).name in err
