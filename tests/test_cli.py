"""The ``fetcher`` command line as users and cron see it: exit codes, stdout, stderr.

Every test runs ``python -m fetcher`` as a subprocess; the replica runs in this
process and the subprocess reaches it over loopback HTTP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, add_image_task, add_video_task, archived_files, run_cli, task_id

from fetcher.archive import Archive
from fetcher.replica import Fault, Replica, error_response, file_info, png, task_response

#: A key distinctive enough that any echo of it anywhere is unmistakable.
CANARY_KEY = "sk-canary-Zq7XwP3mLk9Rt2Vb"

SUMMARY_INT_KEYS = (
    "archived",
    "already_archived",
    "pending",
    "failed",
    "files_downloaded",
    "bytes_downloaded",
)


# -- helpers --------------------------------------------------------------------------------


def cli_env(replica: Replica, archive: Path, **extra: str) -> dict[str, str]:
    """FETCHER_* variables for a run against ``replica`` into ``archive``."""
    return {
        "FETCHER_BASE_URL": replica.api_url,
        "FETCHER_API_KEY": replica.api_key,
        "FETCHER_ARCHIVE": str(archive),
        "FETCHER_RETRY_WAIT": "0.01",
        "FETCHER_RETRIES": "1",
        **extra,
    }


def assert_one_error(result: Any, code: int, *fragments: str) -> str:
    """``result`` exited ``code`` with exactly one ``fetcher: error:`` line and nothing else."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fetcher: error: "), lines[0]
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def failed_task(replica: Replica, tid: str) -> None:
    replica.set_task(
        tid, task_response(tid, err_code=70000, message="The content did not pass moderation.")
    )


def pending_task(replica: Replica, tid: str) -> None:
    replica.set_task(tid, task_response(tid, status="PROCESSING"))


def expired_task(replica: Replica, tid: str) -> None:
    """A file past its ExpireTime that the host no longer serves."""
    url = replica.add_file(f"{tid}/old.png", png(8, 8))
    replica.remove_file(f"{tid}/old.png")
    past = datetime.now(UTC) - timedelta(hours=1)
    replica.set_task(tid, task_response(tid, files=[file_info(url, expire=past)]))


def summary_json(result: Any) -> dict[str, Any]:
    """The whole of stdout as one JSON object."""
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def write_config(path: Path, mode: int = 0o600, **values: object) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    path.chmod(mode)
    return path


# -- exit status 0 and 1 --------------------------------------------------------------------


def test_exit_zero_when_tasks_archived_pending_or_already_archived(
    replica: Replica, archive_dir: Path
) -> None:
    """Archived and pending tasks exit 0, and so does a re-run that finds them archived."""
    done, waiting = task_id(1), task_id(2)
    add_image_task(replica, done)
    pending_task(replica, waiting)
    env = cli_env(replica, archive_dir)

    first = run_cli(["fetch", "--id", done, "--id", waiting], env=env)
    again = run_cli(["fetch", "--id", done], env=env)

    assert first.returncode == 0, first.stderr
    assert "1 archived, 1 pending" in first.stdout
    assert first.stdout.rstrip().endswith("ok")
    assert again.returncode == 0, again.stderr
    assert "1 already archived" in again.stdout


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(failed_task, id="failed-at-api"),
        pytest.param(lambda replica, tid: None, id="unknown-task"),
        pytest.param(expired_task, id="file-expired"),
    ],
)
def test_exit_one_when_a_task_is_not_archived(
    replica: Replica,
    archive_dir: Path,
    make_bad: Callable[[Replica, str], None],
) -> None:
    """A task that cannot be archived makes the run exit 1; the good task is still archived."""
    good, bad = task_id(1), task_id(2)
    add_image_task(replica, good)
    make_bad(replica, bad)

    result = run_cli(["fetch", "--id", good, "--id", bad], env=cli_env(replica, archive_dir))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "with problems" in result.stdout
    assert any(bad in line and "fetcher: " in line for line in result.stderr.splitlines())
    assert any(p.endswith(f"{good}/00.png") for p in archived_files(archive_dir))


def test_exit_one_for_an_invalid_id_line(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """An invalid line in a task-ID file makes the run exit 1 after archiving the rest."""
    good = task_id(1)
    add_image_task(replica, good)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{good}\nbad/id\n")

    result = run_cli(["fetch", str(ids)], env=cli_env(replica, archive_dir))

    assert result.returncode == 1, result.stderr
    assert f"{ids}:2: invalid task ID 'bad/id'" in result.stderr
    assert any(p.endswith(f"{good}/00.png") for p in archived_files(archive_dir))


# -- exit status 2 and 75: one line on stderr -----------------------------------------------


@dataclass
class UsageCase:
    """A command line that must be refused with exit 2 and one line naming the problem."""

    args: Callable[[Path], list[str]]
    env: Callable[[Replica, Path], dict[str, str]] = field(
        default=lambda replica, tmp: cli_env(replica, tmp / "archive")
    )
    expect: tuple[str, ...] = ()
    setup: Callable[[Path], None] = field(default=lambda tmp: None)


def _ids_file(tmp: Path) -> list[str]:
    (tmp / "ids.txt").write_text(task_id(1) + "\n")
    return ["fetch", str(tmp / "ids.txt")]


USAGE_CASES = [
    pytest.param(
        UsageCase(
            args=_ids_file,
            env=lambda r, tmp: {"FETCHER_API_KEY": r.api_key, "FETCHER_ARCHIVE": str(tmp / "a")},
            expect=("no API base URL",),
        ),
        id="missing-base-url",
    ),
    pytest.param(
        UsageCase(
            args=_ids_file,
            env=lambda r, tmp: {"FETCHER_BASE_URL": r.api_url, "FETCHER_ARCHIVE": str(tmp / "a")},
            expect=("no API key",),
        ),
        id="missing-api-key",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", str(tmp / "no-such-file.txt")],
            expect=("cannot read task-ID file", "no-such-file.txt"),
        ),
        id="missing-file",
    ),
    pytest.param(
        UsageCase(args=lambda tmp: ["fetch", str(tmp)], expect=("cannot read task-ID file",)),
        id="file-is-a-directory",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--config", str(tmp / "cfg.toml"), "--id", task_id(1)],
            setup=lambda tmp: write_config(tmp / "cfg.toml", colour="blue"),
            expect=("unknown setting 'colour'", "cfg.toml"),
        ),
        id="unknown-config-key",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--config", str(tmp / "cfg.toml"), "--id", task_id(1)],
            setup=lambda tmp: (tmp / "cfg.toml").write_text("archive = \n"),
            expect=("not valid TOML",),
        ),
        id="config-not-toml",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--config", str(tmp / "absent.toml"), "--id", task_id(1)],
            expect=("cannot read config file",),
        ),
        id="config-missing",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--layout", "{task_type}/{created:%Y}", "--id", task_id(1)],
            expect=("{task_id}",),
        ),
        id="layout-without-task-id",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--layout", "{prompt}/{task_id}", "--id", task_id(1)],
            expect=("{prompt}",),
        ),
        id="layout-unknown-field",
    ),
    pytest.param(
        UsageCase(args=lambda tmp: ["fetch", "--id", task_id(1), "--bogus"], expect=("--bogus",)),
        id="unknown-flag",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--id", task_id(1), "--concurrency", "many"],
            expect=("--concurrency", "many"),
        ),
        id="flag-not-a-number",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--id", task_id(1), "--retries", "-1"],
            expect=("retries",),
        ),
        id="flag-out-of-range",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--id", task_id(1)],
            env=lambda r, tmp: cli_env(r, tmp / "a", FETCHER_TIMEOUT="soon"),
            expect=("timeout", "soon"),
        ),
        id="env-not-a-number",
    ),
    pytest.param(
        UsageCase(
            args=lambda tmp: ["fetch", "--id", task_id(1), "--base-url", "ftp://example.com"],
            expect=("ftp://example.com",),
        ),
        id="base-url-not-http",
    ),
    pytest.param(UsageCase(args=lambda tmp: ["fetch"], expect=("nothing to fetch",)), id="no-ids"),
    pytest.param(UsageCase(args=lambda tmp: [], expect=("COMMAND",)), id="no-command"),
    pytest.param(
        UsageCase(args=lambda tmp: ["fetch", "--id", task_id(1)], env=lambda r, tmp: {}),
        id="no-settings-at-all",
    ),
]


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_errors_exit_two_with_one_line(
    replica: Replica, tmp_path: Path, case: UsageCase
) -> None:
    """Bad settings, flags and files exit 2 with one 'fetcher: error:' line, before any query."""
    case.setup(tmp_path)

    result = run_cli(case.args(tmp_path), env=case.env(replica, tmp_path))

    assert_one_error(result, 2, *case.expect)
    assert replica.seen("api") == []


@pytest.mark.parametrize(
    ("answer", "expect"),
    [
        pytest.param(None, "HTTP 401", id="wrong-key-401"),
        pytest.param(Fault(status=403, body=b"{}"), "HTTP 403", id="forbidden-403"),
        pytest.param(
            Fault(
                status=200,
                body=json.dumps(error_response("AuthFailure.SecretIdNotFound", "no key")).encode(),
            ),
            "AuthFailure",
            id="tencent-auth-failure",
        ),
    ],
)
def test_rejected_key_exits_two_naming_the_rejection(
    replica: Replica, archive_dir: Path, answer: Fault | None, expect: str
) -> None:
    """A rejected key stops the run with exit 2 and one line saying the key was rejected."""
    tid = task_id(1)
    add_image_task(replica, tid)
    key = "not-the-right-key"
    if answer is None:
        env = cli_env(replica, archive_dir, FETCHER_API_KEY=key)
    else:
        key = replica.api_key
        replica.fault("api", tid, answer)
        env = cli_env(replica, archive_dir)

    result = run_cli(["fetch", "--id", tid], env=env)

    line = assert_one_error(result, 2, "rejected the key", expect)
    assert key not in line
    assert len(replica.seen("api")) == 1
    assert replica.seen("files") == []


def test_rejected_key_stops_at_once_while_stdin_stays_open(
    replica: Replica, archive_dir: Path
) -> None:
    """A generator still writing to stdin does not keep a run with a rejected key alive."""
    tid = task_id(1)
    env = cli_env(replica, archive_dir, FETCHER_API_KEY="not-the-right-key")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    with subprocess.Popen(
        [sys.executable, "-m", "fetcher", "fetch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**base, **env},
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(f"{tid}\n".encode())
        proc.stdin.flush()  # and the pipe stays open, as a slow generator's would
        try:
            code = proc.wait(timeout=10)
        finally:
            proc.kill()
            proc.stdin.close()
        stderr = proc.stderr.read().decode() if proc.stderr else ""

    assert code == 2, stderr
    assert "rejected the key" in stderr


def test_unwritable_archive_exits_three_with_one_line(replica: Replica, tmp_path: Path) -> None:
    """An archive path that cannot be a folder is one error line and exit 3, not a traceback."""
    tid = task_id(1)
    add_image_task(replica, tid)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")

    result = run_cli(["fetch", "--id", tid], env=cli_env(replica, blocker / "archive"))

    assert_one_error(result, 3, "cannot create archive", str(blocker))
    assert replica.seen("api") == []


def test_locked_archive_exits_75(replica: Replica, archive_dir: Path) -> None:
    """While another run holds the archive's lock, fetch exits 75 with one line and no query."""
    tid = task_id(1)
    add_image_task(replica, tid)
    Archive(archive_dir).prepare()

    with Archive(archive_dir).lock():
        result = run_cli(["fetch", "--id", tid], env=cli_env(replica, archive_dir))

    assert_one_error(result, 75, "lock")
    assert replica.seen("api") == []
    assert archived_files(archive_dir) == {}


@pytest.mark.parametrize(
    "make_archive",
    [
        pytest.param(lambda tmp: tmp / "nowhere", id="missing-folder"),
        pytest.param(lambda tmp: tmp, id="folder-without-archive"),
    ],
)
def test_status_without_archive_exits_two(
    tmp_path: Path, make_archive: Callable[[Path], Path]
) -> None:
    """``status`` on a folder that holds no archive exits 2 with one line naming the folder."""
    folder = make_archive(tmp_path)

    result = run_cli(["status", "--archive", str(folder)])

    assert_one_error(result, 2, "no fetcher archive", str(folder))
    assert not (folder / ".fetcher").exists()


# -- --json ---------------------------------------------------------------------------------


def test_json_summary_is_one_object_with_counts_and_reasons(
    replica: Replica, archive_dir: Path
) -> None:
    """``--json`` prints one JSON object: integer counts and a task list with reasons."""
    done, waiting, bad = task_id(1), task_id(2), task_id(3)
    add_image_task(replica, done, count=2)
    pending_task(replica, waiting)
    failed_task(replica, bad)

    result = run_cli(
        ["fetch", "--json", "--id", done, "--id", waiting, "--id", bad, "--id", "x/y"],
        env=cli_env(replica, archive_dir),
    )

    assert result.returncode == 1, result.stderr
    summary = summary_json(result)
    for key in SUMMARY_INT_KEYS:
        assert type(summary[key]) is int, key
    assert (summary["archived"], summary["already_archived"]) == (1, 0)
    assert (summary["pending"], summary["failed"], summary["invalid"]) == (
        1,
        2,
        1,
    )
    assert summary["files_downloaded"] == 2
    assert summary["bytes_downloaded"] == sum(
        len(b) for p, b in archived_files(archive_dir).items() if p.endswith(".png")
    )
    assert summary["exit_code"] == 1
    tasks = {t["task_id"]: t for t in summary["tasks"]}
    assert tasks[done]["outcome"] == "archived"
    assert tasks[done]["files"] == 2
    assert tasks[waiting]["outcome"] == "pending"
    assert "PROCESSING" in tasks[waiting]["reason"]
    assert tasks[bad]["outcome"] == "failed"
    assert "did not pass moderation" in tasks[bad]["reason"]
    assert tasks["x/y"]["outcome"] == "invalid"
    assert "--id:4" in tasks["x/y"]["reason"]


# -- input parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "via", [pytest.param("file", id="file"), pytest.param("stdin", id="stdin")]
)
def test_input_lines_are_tolerant_and_invalid_lines_reported(
    replica: Replica, archive_dir: Path, tmp_path: Path, via: str
) -> None:
    """BOM, CRLF, blanks, comments, padding tolerated; duplicates run once; bad lines named."""
    t1, t2, t3 = task_id(1), task_id(2), task_id(3)
    for tid in (t1, t2, t3):
        add_image_task(replica, tid)
    long_id = "a" * 257
    lines = [
        "\ufeff# exported task IDs",  # 1: BOM and a comment
        "",  # 2
        f"  {t1}  ",  # 3
        f"\t{t2}",  # 4
        "   # an indented comment",  # 5
        t1,  # 6: duplicate
        "bad/id",  # 7
        "..",  # 8
        long_id,  # 9
        "   ",  # 10
        t3,  # 11, no newline after it
    ]
    text = "\r\n".join(lines)
    if via == "file":
        path = tmp_path / "ids.txt"
        path.write_bytes(text.encode("utf-8"))
        args, stdin, name = ["fetch", "--json", str(path), "--id", t2], None, str(path)
    else:
        args, stdin, name = ["fetch", "--json", "-", "--id", t2], text, "<stdin>"

    result = run_cli(args, env=cli_env(replica, archive_dir), stdin=stdin)

    assert result.returncode == 1, result.stderr
    summary = summary_json(result)
    assert (summary["archived"], summary["invalid"], summary["failed"]) == (
        3,
        3,
        3,
    )
    assert sorted(r.path.rsplit("/", 1)[1] for r in replica.seen("api")) == sorted([t1, t2, t3])
    assert f"{name}:7: invalid task ID 'bad/id'" in result.stderr
    assert f"{name}:8: invalid task ID '..'" in result.stderr
    assert f"{name}:9: invalid task ID 'aaaa" in result.stderr
    assert "longer than 256 characters" in result.stderr
    assert re.search(r":(1|2|3|4|5|6|10|11): invalid", result.stderr) is None
    folders = {Path(p).parent.name for p in archived_files(archive_dir)}
    assert folders == {t1, t2, t3}


def test_undecodable_line_is_reported_not_fatal(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A line that is not UTF-8 is an invalid line with its number; the rest is archived."""
    tid = task_id(1)
    add_image_task(replica, tid)
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"-latin1-\xe9\xff\xfe\n" + tid.encode() + b"\n")

    result = run_cli(["fetch", str(ids)], env=cli_env(replica, archive_dir))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{ids}:1: invalid task ID" in result.stderr
    assert any(p.endswith(f"{tid}/00.png") for p in archived_files(archive_dir))


# -- re-runs --------------------------------------------------------------------------------


def test_rerun_over_same_file_makes_no_requests(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """A second fetch over the same list asks nothing of the API or the file host."""
    image, video = task_id(1), task_id(2, "AigcVideoTask")
    add_image_task(replica, image, count=2)
    add_video_task(replica, video)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{image}\n{video}\n")
    env = cli_env(replica, archive_dir)

    first = run_cli(["fetch", str(ids)], env=env)
    assert first.returncode == 0, first.stderr
    api, files = len(replica.seen("api")), len(replica.seen("files"))
    before = archived_files(archive_dir)
    assert (api, files) == (2, 3)

    again = run_cli(["fetch", "--json", str(ids)], env=env)

    assert again.returncode == 0, again.stderr
    assert (len(replica.seen("api")), len(replica.seen("files"))) == (api, files)
    summary = summary_json(again)
    # The list has not changed and all of it was settled: it is not even read again.
    assert (summary["unchanged"], summary["already_archived"], summary["archived"]) == (2, 2, 0)
    assert (summary["files_downloaded"], summary["bytes_downloaded"], summary["requests"]) == (
        0,
        0,
        0,
    )
    assert summary["tasks"] == []
    assert archived_files(archive_dir) == before


# -- the API key stays secret ----------------------------------------------------------------


def test_api_key_never_printed_or_stored(
    replica: Replica, archive_dir: Path, tmp_path: Path
) -> None:
    """The key shows in no output (-v, --json, a 401) and in no byte under the archive."""
    replica.api_key = CANARY_KEY
    good, bad, waiting, rejected = task_id(1), task_id(2), task_id(3), task_id(4)
    add_image_task(replica, good, count=2)
    failed_task(replica, bad)
    pending_task(replica, waiting)
    add_image_task(replica, rejected)
    # A gateway that echoes the key it refused, as some do.
    echo = {"error": {"message": f"invalid api key {CANARY_KEY}", "type": "auth", "code": ""}}
    replica.fault("api", rejected, Fault(status=401, body=json.dumps(echo).encode()))
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{good}\n{bad}\n{waiting}\nnot/valid\n{task_id(5)}\n")
    env = cli_env(replica, archive_dir)
    flag_env = {k: v for k, v in env.items() if k != "FETCHER_API_KEY"}

    runs = [
        run_cli(["fetch", "-v", str(ids)], env=env),
        run_cli(["fetch", "-v", "--json", "--retry-failed", str(ids)], env=env),
        run_cli(["fetch", "-v", "--pending", "--api-key", CANARY_KEY], env=flag_env),
        run_cli(["fetch", "-v", "--json", "--id", rejected], env=env),
        run_cli(["status"], env=env),
        run_cli(["status", "--json"], env=env),
    ]

    assert [r.returncode for r in runs] == [1, 1, 0, 2, 0, 0]
    assert "rejected the key" in runs[3].stderr
    assert "invalid api key ***" in runs[3].stderr
    for result in runs:
        assert CANARY_KEY not in result.stdout
        assert CANARY_KEY not in result.stderr
    stored = [p for p in archive_dir.rglob("*") if p.is_file()]
    assert any(p.name == "state.sqlite" for p in stored)
    assert any(p.name == "task.json" for p in stored)
    for path in stored:
        assert CANARY_KEY.encode() not in path.read_bytes(), path


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "winner"),
    [
        pytest.param({"file"}, "file", id="file-only"),
        pytest.param({"file", "env"}, "env", id="env-beats-file"),
        pytest.param({"file", "env", "flag"}, "flag", id="flag-beats-env-and-file"),
        pytest.param({"file", "flag"}, "flag", id="flag-beats-file"),
    ],
)
def test_settings_precedence(
    replica: Replica, tmp_path: Path, layers: set[str], winner: str
) -> None:
    """Archive folder and layout come from flag, else FETCHER_<NAME>, else the config file."""
    tid = task_id(1)
    add_image_task(replica, tid)
    archives = {layer: tmp_path / f"archive-{layer}" for layer in ("file", "env", "flag")}
    config = write_config(
        tmp_path / "config.toml",
        base_url=replica.api_url,
        api_key=replica.api_key,
        archive=str(archives["file"]),
        layout="by-file/{task_id}",
        retry_wait=0.01,
    )
    env = {"FETCHER_CONFIG": str(config)}
    args = ["fetch", "--id", tid]
    if "env" in layers:
        env.update(FETCHER_ARCHIVE=str(archives["env"]), FETCHER_LAYOUT="by-env/{task_id}")
    if "flag" in layers:
        args += ["--archive", str(archives["flag"]), "--layout", "by-flag/{task_id}"]

    result = run_cli(args, env=env)

    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert set(archived_files(archives[winner])) == {
        f"by-{winner}/{tid}/00.png",
        f"by-{winner}/{tid}/task.json",
    }
    for layer, folder in archives.items():
        if layer != winner:
            assert not folder.exists(), layer


def test_config_file_found_in_user_config_dir(replica: Replica, tmp_path: Path) -> None:
    """Without --config, the config file in the user's config folder is read."""
    tid = task_id(1)
    add_image_task(replica, tid)
    (tmp_path / "xdg" / "fetcher").mkdir(parents=True)
    write_config(
        tmp_path / "xdg" / "fetcher" / "config.toml",
        base_url=replica.api_url,
        api_key=replica.api_key,
        archive=str(tmp_path / "from-default-config"),
    )

    result = run_cli(["fetch", "--id", tid], env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})

    assert result.returncode == 0, result.stderr
    archived = archived_files(tmp_path / "from-default-config")
    assert any(p.endswith(f"{tid}/00.png") for p in archived)


@pytest.mark.parametrize(
    ("mode", "warned"),
    [
        pytest.param(0o644, True, id="world-readable-warns"),
        pytest.param(0o640, True, id="group-readable-warns"),
        pytest.param(0o600, False, id="private-is-quiet"),
    ],
)
def test_config_file_with_key_readable_by_others_warns(
    replica: Replica, tmp_path: Path, mode: int, warned: bool
) -> None:
    """A config file holding the key and readable by others draws one warning line; 0600 none."""
    tid = task_id(1)
    add_image_task(replica, tid)
    config = write_config(
        tmp_path / "config.toml",
        mode,
        base_url=replica.api_url,
        api_key=CANARY_KEY,
        archive=str(tmp_path / "archive"),
    )
    replica.api_key = CANARY_KEY

    result = run_cli(["fetch", "--config", str(config), "--id", tid])

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    if warned:
        assert len(warnings) == 1, result.stderr
        assert warnings[0].startswith("fetcher: warning: ")
        assert "config.toml" in warnings[0]
        assert "chmod 600" in warnings[0]
    else:
        assert warnings == []
    assert CANARY_KEY not in result.stderr + result.stdout


def test_config_file_without_key_does_not_warn(replica: Replica, tmp_path: Path) -> None:
    """A world-readable config file that holds no key is fine: the key comes from the env."""
    tid = task_id(1)
    add_image_task(replica, tid)
    config = write_config(tmp_path / "config.toml", 0o644, base_url=replica.api_url)
    env = {"FETCHER_API_KEY": replica.api_key, "FETCHER_ARCHIVE": str(tmp_path / "archive")}

    result = run_cli(["fetch", "--config", str(config), "--id", tid], env=env)

    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


# -- run modes ------------------------------------------------------------------------------


def test_dry_run_downloads_nothing(replica: Replica, archive_dir: Path) -> None:
    """``--dry-run`` queries and reports but downloads and records nothing."""
    image, video = task_id(1), task_id(2, "AigcVideoTask")
    add_image_task(replica, image, count=2)
    add_video_task(replica, video)
    env = cli_env(replica, archive_dir)

    dry = run_cli(["fetch", "--dry-run", "--json", "--id", image, "--id", video], env=env)

    assert dry.returncode == 0, dry.stderr
    summary = summary_json(dry)
    assert summary["ready"] == 2
    assert (summary["archived"], summary["files_downloaded"], summary["bytes_downloaded"]) == (
        0,
        0,
        0,
    )
    assert replica.seen("files") == []
    assert archived_files(archive_dir) == {}

    real = run_cli(["fetch", "--json", "--id", image, "--id", video], env=env)

    assert summary_json(real)["archived"] == 2, real.stderr


def test_pending_flag_requeries_pending_task(replica: Replica, archive_dir: Path) -> None:
    """``--pending`` asks again about a task an earlier run left pending, and archives it."""
    tid, other = task_id(1), task_id(2)
    url = replica.add_file(f"{tid}/late.png", png(16, 16, seed=7))
    replica.set_task(
        tid,
        task_response(tid, status="PROCESSING"),
        task_response(tid, files=[file_info(url)]),
    )
    add_image_task(replica, other)
    env = cli_env(replica, archive_dir)

    first = run_cli(["fetch", "--id", tid], env=env)
    assert first.returncode == 0, first.stderr
    assert archived_files(archive_dir) == {}
    unrelated = run_cli(["fetch", "--id", other], env=env)
    assert unrelated.returncode == 0, unrelated.stderr
    assert len(replica.seen("api")) == 2  # a run without --pending leaves it alone

    again = run_cli(["fetch", "--pending", "--json"], env=env)

    assert again.returncode == 0, again.stderr
    summary = summary_json(again)
    assert summary["archived"] == 1
    assert [t["task_id"] for t in summary["tasks"]] == [tid]
    assert [r.path.rsplit("/", 1)[1] for r in replica.seen("api")] == [tid, other, tid]
    assert any(p.endswith(f"{tid}/00.png") for p in archived_files(archive_dir))


# -- output ---------------------------------------------------------------------------------


def test_plain_log_lines_when_stderr_is_not_a_terminal(replica: Replica, archive_dir: Path) -> None:
    """Captured stderr gets one plain line per task and no progress-bar output."""
    image, video, waiting = task_id(1), task_id(2, "AigcVideoTask"), task_id(3)
    add_image_task(replica, image)
    add_video_task(replica, video, size=300_000)
    pending_task(replica, waiting)

    result = run_cli(
        ["fetch", "--id", image, "--id", video, "--id", waiting], env=cli_env(replica, archive_dir)
    )

    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream
        assert "\x1b[" not in stream
        assert "█" not in stream
        assert "it/s" not in stream
        assert "%|" not in stream
    lines = result.stderr.splitlines()
    assert all(line.startswith("fetcher: ") for line in lines), lines
    assert len(lines) == 3, lines
    assert sum(line.startswith("fetcher: archived") and image in line for line in lines) == 1
    assert sum(line.startswith("fetcher: archived") and video in line for line in lines) == 1
    assert sum(line.startswith("fetcher: pending") and waiting in line for line in lines) == 1
    assert len(result.stdout.splitlines()) == 1  # the summary line


def test_verbose_lists_already_archived_tasks(replica: Replica, archive_dir: Path) -> None:
    """``-v`` adds a line for each task that was already archived; the default does not."""
    tid = task_id(1)
    add_image_task(replica, tid)
    env = cli_env(replica, archive_dir)
    assert run_cli(["fetch", "--id", tid], env=env).returncode == 0

    plain = run_cli(["fetch", "--id", tid], env=env)
    verbose = run_cli(["fetch", "-v", "--id", tid], env=env)

    assert plain.stderr == ""
    assert verbose.stderr.splitlines() == [f"fetcher: already_archived {tid}"]


def test_quiet_prints_nothing_on_success(replica: Replica, archive_dir: Path) -> None:
    """``-q`` on a clean run writes nothing at all, to stdout or stderr."""
    tid = task_id(1)
    add_image_task(replica, tid)

    result = run_cli(["fetch", "-q", "--id", tid], env=cli_env(replica, archive_dir))

    assert result.returncode == 0
    assert (result.stdout, result.stderr) == ("", "")
    assert any(p.endswith(f"{tid}/00.png") for p in archived_files(archive_dir))


def test_quiet_still_reports_problems(replica: Replica, archive_dir: Path) -> None:
    """``-q`` keeps the lines about tasks that failed and drops the ones that worked."""
    good, bad = task_id(1), task_id(2)
    add_image_task(replica, good)
    failed_task(replica, bad)

    result = run_cli(["fetch", "-q", "--id", good, "--id", bad], env=cli_env(replica, archive_dir))

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert bad in lines[0]
    assert "moderation" in lines[0]


# -- status ---------------------------------------------------------------------------------


@pytest.fixture
def mixed_archive(replica: Replica, archive_dir: Path) -> dict[str, str]:
    """An archive after one run: one task archived, one pending, one failed."""
    ids = {"archived": task_id(1), "pending": task_id(2), "failed": task_id(3)}
    add_image_task(replica, ids["archived"], count=2)
    pending_task(replica, ids["pending"])
    failed_task(replica, ids["failed"])
    args = ["fetch", *(f"--id={tid}" for tid in ids.values())]
    assert run_cli(args, env=cli_env(replica, archive_dir)).returncode == 1
    return ids


def test_status_reports_counts_pending_and_failures(
    archive_dir: Path, mixed_archive: dict[str, str]
) -> None:
    """``status`` counts tasks by state, lists pending with time left to query, and failures."""
    result = run_cli(["status", "--archive", str(archive_dir)])

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert str(archive_dir) in out
    assert "1 archived, 1 pending, 0 incomplete, 1 failed, 0 expired" in out
    assert "2 files" in out
    pending_line = next(line for line in out.splitlines() if mixed_archive["pending"] in line)
    assert re.search(r"queryable for 7[01]h\d\dm", pending_line), pending_line
    failed_line = next(line for line in out.splitlines() if mixed_archive["failed"] in line)
    assert "failed" in failed_line
    assert "did not pass moderation" in failed_line
    assert mixed_archive["archived"] not in out


def test_status_json_reports_counts_pending_and_failures(
    archive_dir: Path, mixed_archive: dict[str, str]
) -> None:
    """``status --json`` is one JSON object with counts, pending (seconds left) and failures."""
    result = run_cli(["status", "--json"], env={"FETCHER_ARCHIVE": str(archive_dir)})

    assert result.returncode == 0, result.stderr
    report = summary_json(result)
    assert report["counts"] == {
        "archived": 1,
        "queued": 0,
        "pending": 1,
        "incomplete": 0,
        "failed": 1,
        "expired": 0,
    }
    assert report["files_archived"] == 2
    assert report["bytes_archived"] == sum(
        len(b) for p, b in archived_files(archive_dir).items() if p.endswith(".png")
    )
    [pending] = report["pending"]
    assert pending["task_id"] == mixed_archive["pending"]
    # Created five minutes ago; queryable for about three days from creation.
    assert 3 * 86400 - 3600 < pending["queryable_for_seconds"] <= 3 * 86400
    [failure] = report["failures"]
    assert failure["task_id"] == mixed_archive["failed"]
    assert failure["state"] == "failed"
    assert "did not pass moderation" in failure["reason"]


def test_status_shows_remembered_lists(replica: Replica, archive_dir: Path, tmp_path: Path) -> None:
    """After a run over a list file, ``status`` says how much of it the next run skips."""
    ids = [task_id(n) for n in range(3)]
    for tid in ids:
        add_image_task(replica, tid)
    listing = tmp_path / "ids.txt"
    listing.write_text("# cron list\n" + "".join(f"{t}\n" for t in ids))
    env = cli_env(replica, archive_dir)
    assert run_cli(["fetch", str(listing)], env=env).returncode == 0

    text = run_cli(["status"], env=env)
    report = summary_json(run_cli(["status", "--json"], env=env))

    assert text.returncode == 0, text.stderr
    assert f"{listing.resolve()}  first 4 lines (3 IDs) settled" in text.stdout
    [remembered] = report["lists"]
    assert remembered["path"] == str(listing.resolve())
    assert (remembered["lines"], remembered["ids"]) == (4, 3)
    assert remembered["settled_bytes"] == listing.stat().st_size


def test_status_of_an_archive_from_before_lists_were_remembered(
    archive_dir: Path, mixed_archive: dict[str, str]
) -> None:
    """An archive whose database has no ``lists`` table yet still gets a status."""
    import sqlite3

    with sqlite3.connect(archive_dir / ".fetcher" / "state.sqlite") as conn:
        conn.execute("DROP TABLE lists")
    result = run_cli(["status", "--json", "--archive", str(archive_dir)])

    assert result.returncode == 0, result.stderr
    assert summary_json(result)["lists"] == []


def test_status_works_while_a_run_holds_the_lock(
    archive_dir: Path, mixed_archive: dict[str, str]
) -> None:
    """``status`` reads the archive while a fetch run holds its lock."""
    with Archive(archive_dir).lock():
        result = run_cli(["status", "--json", "--archive", str(archive_dir)])

    assert result.returncode == 0, result.stderr
    assert summary_json(result)["counts"]["archived"] == 1


# -- demo and help --------------------------------------------------------------------------


def test_demo_runs_without_settings(tmp_path: Path) -> None:
    """``fetcher demo --archive DIR`` needs no FETCHER_* env and shows the tree and a sidecar."""
    target = tmp_path / "demo"

    result = run_cli(["demo", "--archive", str(target)], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "\r" not in result.stderr
    assert f"{target}/" in result.stdout
    assert "├── " in result.stdout or "└── " in result.stdout
    assert "task.json" in result.stdout
    assert '"task_id"' in result.stdout
    assert "archived" in result.stdout
    sidecars = list(target.rglob("task.json"))
    assert sidecars
    assert all(json.loads(p.read_text())["task_id"] in str(p) for p in sidecars)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        pytest.param(["--help"], ("fetch", "status", "demo"), id="top"),
        pytest.param(
            ["fetch", "--help"],
            (
                "FILE",
                "--id",
                "--archive",
                "--base-url",
                "--api-key",
                "--config",
                "--concurrency",
                "--downloads",
                "--timeout",
                "--retries",
                "--retry-wait",
                "--rate",
                "--max-file-size",
                "--layout",
                "--dry-run",
                "--pending",
                "--retry-failed",
                "--json",
                "--quiet",
                "--verbose",
                "--no-progress",
            ),
            id="fetch",
        ),
        pytest.param(["status", "--help"], ("--json", "--archive"), id="status"),
        pytest.param(["demo", "--help"], ("--archive",), id="demo"),
    ],
)
def test_help_exits_zero(args: list[str], expect: tuple[str, ...]) -> None:
    """``--help`` prints usage on stdout and exits 0."""
    result = run_cli(args)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fetcher")
    assert result.stderr == ""
    for word in expect:
        assert word in result.stdout, word


def test_version_flag() -> None:
    """``--version`` names the program and its version and exits 0."""
    result = run_cli(["--version"])

    assert result.returncode == 0
    assert re.fullmatch(r"fetcher \d+\.\d+\.\d+\n", result.stdout)


def test_output_closed_early_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """``fetcher status --json | head -0``: a reader that goes away gets one line, exit 1."""
    from fetcher.state import StateDB

    archive = Archive(tmp_path / "archive")
    archive.prepare()
    with StateDB(archive.db_path):
        pass
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env.update(FETCHER_ARCHIVE=str(tmp_path / "archive"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fetcher", "status", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1, done.stderr
    assert done.stderr == "fetcher: error: output closed early (broken pipe)\n"


@pytest.mark.parametrize(
    "command", ["fetch", "status", "verify", "search", "enqueue", "work", "serve"]
)
def test_archive_help_names_a_bucket_too(command: str) -> None:
    """Each command's --archive help says it takes a folder or s3://BUCKET/PREFIX."""
    shown = run_cli([command, "--help"], env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "--archive DIR|s3://BUCKET/PREFIX" in shown.stdout
    assert "archive folder, or a bucket and prefix (s3://BUCKET/PREFIX)" in shown.stdout
