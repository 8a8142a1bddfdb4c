"""The API key stays secret: server text that echoes it is redacted, plain http is warned of.

Every case runs the real CLI against the replica over loopback HTTP; the key is
looked for in everything a run prints and in every byte it leaves in the archive.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import process_env, run_cli, task_id

from fetcher.replica import Fault, Replica, error_response, task_response
from fetcher.url import Url

#: Characters that percent-encoding changes, so both spellings of the key are tried.
KEY = "sk-canary/Zq7+Xw=P3mLk9"
QUOTED = quote(KEY, safe="")


def _tencent_error(replica: Replica, tid: str) -> None:
    message = f"request with Authorization: Bearer {KEY} was refused"
    replica.set_task(tid, error_response("FailedOperation", message))


def _unknown_task(replica: Replica, tid: str) -> None:
    replica.set_task(tid, error_response("ResourceNotFound", f"no such task for key {KEY}"))


def _failed_task(replica: Replica, tid: str) -> None:
    answer = task_response(
        tid, err_code=70000, err_code_ext=f"Denied-{KEY}", message=f"moderation ({KEY})"
    )
    replica.set_task(tid, answer)


def _percent_encoded(replica: Replica, tid: str) -> None:
    replica.set_task(tid, error_response("FailedOperation", f"bad query ?key={QUOTED}"))


def _gateway_body(replica: Replica, tid: str) -> None:
    replica.set_task(tid, task_response(tid))
    body = json.dumps({"error": {"message": f"key {KEY} may not", "type": "x", "code": ""}})
    replica.fault("api", tid, Fault(status=400, body=body.encode()))


@pytest.mark.parametrize(
    "serve",
    [
        pytest.param(_tencent_error, id="tencent-error-message"),
        pytest.param(_unknown_task, id="unknown-task-message"),
        pytest.param(_failed_task, id="failed-task-message"),
        pytest.param(_percent_encoded, id="percent-encoded-key"),
        pytest.param(_gateway_body, id="gateway-error-body"),
    ],
)
def test_key_echoed_by_the_server_is_redacted(
    replica: Replica, tmp_path: Path, serve: Callable[[Replica, str], None]
) -> None:
    """Server text that echoes the key reaches no output, state or file; `***` stands for it."""
    replica.api_key = KEY
    tid = task_id(1)
    serve(replica, tid)
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path) | {"FETCHER_RETRIES": "0"}

    runs = [
        run_cli(["fetch", "-v", "--json", "--id", tid], env=env),
        run_cli(["fetch", "-v", "--retry-failed", "--id", tid], env=env),
        run_cli(["status", "--json"], env=env),
        run_cli(["status"], env=env),
    ]

    assert runs[0].returncode == 1, runs[0].stderr
    (reason,) = [task["reason"] for task in json.loads(runs[0].stdout)["tasks"]]
    assert "***" in reason
    for result in runs:
        for secret in (KEY, QUOTED):
            assert secret not in result.stdout + result.stderr
    stored = [path for path in archive.rglob("*") if path.is_file()]
    assert any(path.name == "state.sqlite" for path in stored)
    for path in stored:
        data = path.read_bytes()
        assert KEY.encode() not in data, path
        assert QUOTED.encode() not in data, path


@pytest.mark.parametrize(
    ("url", "in_clear"),
    [
        pytest.param("http://gw.example", True, id="http-remote"),
        pytest.param("http://192.0.2.1:8080", True, id="http-remote-ip"),
        pytest.param("https://gw.example", False, id="https"),
        pytest.param("http://localhost:8080", False, id="localhost"),
        pytest.param("http://127.5.0.1", False, id="loopback-v4"),
        pytest.param("http://[::1]:8080", False, id="loopback-v6"),
    ],
)
def test_plain_http_to_another_host_is_in_clear(url: str, in_clear: bool) -> None:
    """Only plain http to a host other than this machine counts as sending in clear."""
    assert Url.parse(url).in_clear is in_clear


@pytest.mark.parametrize(
    ("base_url", "warned"),
    [
        pytest.param("http://192.0.2.1:9", True, id="remote-http-warns"),
        pytest.param("https://192.0.2.1:9", False, id="remote-https-quiet"),
        pytest.param(None, False, id="loopback-http-quiet"),
    ],
)
def test_key_over_plain_http_draws_one_warning(
    replica: Replica, tmp_path: Path, base_url: str | None, warned: bool
) -> None:
    """A key about to go over plain http:// to another host draws one warning line per run."""
    env = process_env(replica, tmp_path / "archive", tmp_path) | {
        "FETCHER_RETRIES": "0",
        "FETCHER_TIMEOUT": "0.5",
    }
    if base_url is not None:
        env["FETCHER_BASE_URL"] = base_url
    ids = [task_id(n) for n in range(3)]

    result = run_cli(["fetch", "-q", *[arg for tid in ids for arg in ("--id", tid)]], env=env)

    warnings = [line for line in result.stderr.splitlines() if "plain http://" in line]
    assert len(warnings) == (1 if warned else 0), result.stderr
    for line in warnings:
        assert line.startswith("fetcher: warning: ")
        assert replica.api_key not in line
