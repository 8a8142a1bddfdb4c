"""Papercuts a new user meets: flags, lists, layouts, units, the README's commands, pins.

Each is a one-line usage error where it used to be a surprise, or a text that now
says what the user can actually type.
"""

from __future__ import annotations

import io
import re
import shlex
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT, add_image_task, process_env, run_cli, task_id

from fetcher.console import BarProgress, summary_line
from fetcher.errors import InputError, UsageError
from fetcher.ids import IdSource, iter_entries
from fetcher.layout import Layout
from fetcher.replica import Replica
from fetcher.summary import RunSummary

README = (ROOT / "README.md").read_text(encoding="utf-8")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# -- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["fetch", "-q", "-v", "--pending"], id="fetch-short"),
        pytest.param(["fetch", "--quiet", "--verbose", "--pending"], id="fetch-long"),
        pytest.param(["demo", "-v", "-q"], id="demo"),
    ],
)
def test_quiet_with_verbose_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """-q with -v is one usage line and exit 2."""
    result = run_cli(args, env={"FETCHER_ARCHIVE": str(tmp_path / "a")})
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "not allowed with" in lines[0]


@pytest.mark.parametrize(
    ("args", "token"),
    [
        pytest.param(["fetch", "--pend"], "--pend", id="fetch-pend"),
        pytest.param(["fetch", "--pending", "--dry"], "--dry", id="fetch-dry"),
        pytest.param(["fetch", "--pending", "--retry-f"], "--retry-f", id="fetch-retry-f"),
        pytest.param(["fetch", "--pending", "--no-prog"], "--no-prog", id="fetch-no-prog"),
        pytest.param(["status", "--js"], "--js", id="status-js"),
        pytest.param(["verify", "--rep"], "--rep", id="verify-rep"),
        pytest.param(["demo", "--ser"], "--ser", id="demo-ser"),
        pytest.param(["--vers", "status"], "--vers", id="top-vers"),
    ],
)
def test_abbreviated_flags_are_refused(
    replica: Replica, tmp_path: Path, args: list[str], token: str
) -> None:
    """A flag abbreviation (--pend for --pending) is a usage error naming it, never a guess."""
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path)
    assert run_cli(["fetch", "--id", task_id(1)], env=env).returncode == 1  # the archive exists

    result = run_cli(args, env=env, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fetcher: error: ")
    assert token in lines[0]
    assert len(replica.seen("api")) == 1  # only the set-up run's query


def test_version_is_in_the_readme() -> None:
    """`fetcher --version` is documented."""
    assert re.search(r"fetcher --version(?![\w-])", README)


# -- lists -------------------------------------------------------------------------------------


def _utf16(text: str, kind: str) -> bytes:
    """``text`` as Notepad's "Unicode" (LE) or big-endian UTF-16, BOM first."""
    if kind == "UTF-16 LE":
        return b"\xff\xfe" + text.encode("utf-16-le")
    return b"\xfe\xff" + text.encode("utf-16-be")


@pytest.mark.parametrize("kind", ["UTF-16 LE", "UTF-16 BE"], ids=["le", "be"])
def test_utf16_list_file_is_refused_in_one_line(
    replica: Replica, tmp_path: Path, kind: str
) -> None:
    """A UTF-16 list file is one line naming it and saying UTF-16 and UTF-8; no query is sent."""
    tid = task_id(1)
    add_image_task(replica, tid)
    ids = tmp_path / "ids.txt"
    ids.write_bytes(_utf16(f"{tid}\r\n", kind))
    env = process_env(replica, tmp_path / "archive", tmp_path)

    result = run_cli(["fetch", str(ids)], env=env)

    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert kind in lines[0]
    assert "UTF-8" in lines[0]
    assert str(ids) in lines[0]
    assert replica.seen("api") == []


@pytest.mark.parametrize("kind", ["UTF-16 LE", "UTF-16 BE"], ids=["le", "be"])
@pytest.mark.parametrize("split", [1, 2, 4096], ids=lambda n: f"reads-of-{n}")
def test_utf16_stream_is_refused(kind: str, split: int) -> None:
    """Standard input in UTF-16 is refused too, however its bytes arrive."""
    data = _utf16(f"{task_id(1)}\n{task_id(2)}\n", kind)

    class Trickle(io.BytesIO):
        def read1(self, size: int = -1) -> bytes:
            return super().read1(min(split, size if size >= 0 else split))

    with pytest.raises(InputError, match=kind):
        list(iter_entries([IdSource.from_stream("<stdin>", Trickle(data))]))


def test_utf8_bom_list_is_accepted(replica: Replica, tmp_path: Path) -> None:
    """A UTF-8 BOM (PowerShell's `Out-File -Encoding utf8`) is fine."""
    tid = task_id(1)
    add_image_task(replica, tid)
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbf" + f"{tid}\r\n".encode())

    result = run_cli(["fetch", str(ids)], env=process_env(replica, tmp_path / "a", tmp_path))

    assert result.returncode == 0, result.stderr


# -- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{created:%Q}/{task_id}", id="unknown-code"),
        pytest.param("{created:%Y-%}/{task_id}", id="lone-percent"),
        pytest.param("{finished:%Y/%k}/{task_id}", id="glibc-only-code"),
        pytest.param("{created:%-}/{task_id}", id="flag-without-code"),
    ],
)
def test_layout_with_unknown_strftime_code_is_refused(template: str) -> None:
    """A date field with a strftime code platforms disagree on is a UsageError naming it."""
    with pytest.raises(UsageError, match="unknown strftime code"):
        Layout(template)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{created:%Y}/{created:%m}/{task_id}", id="default-style"),
        pytest.param("{created:%Y-%m-%dT%H%M%S.%f}/{task_id}", id="many-codes"),
        pytest.param("{created:%-d %%}/{task_id}", id="glibc-flag-and-percent"),
        pytest.param("{created}/{task_id}", id="no-spec"),
    ],
)
def test_layout_with_known_strftime_codes_is_accepted(template: str) -> None:
    """C99 codes, %f, glibc's padding flags and %% are accepted."""
    Layout(template)


def test_layout_flag_with_unknown_code_is_one_line(tmp_path: Path) -> None:
    """`--layout '{created:%Q}/{task_id}'` is one usage line and exit 2."""
    env = {"FETCHER_BASE_URL": "http://127.0.0.1:9", "FETCHER_API_KEY": "k"}
    args = ["fetch", "--archive", str(tmp_path / "a"), "--layout", "{created:%Q}/{task_id}"]

    result = run_cli([*args, "--id", task_id(1)], env=env)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "%Q" in lines[0]


# -- units ------------------------------------------------------------------------------------


def test_byte_bar_uses_the_summary_units() -> None:
    """The bytes bar says MiB, as the summary does, never tqdm's kB/MB."""
    out = io.StringIO()
    with BarProgress(out) as progress:
        progress.bytes_received(3 * 1024 * 1024 + 512 * 1024)
    bars = out.getvalue()
    assert "3.5 MiB" in bars
    assert not re.search(r"\d(k|M|G)B", bars)
    summary = RunSummary()
    summary.bytes_downloaded = 3 * 1024 * 1024 + 512 * 1024
    assert "3.5 MiB downloaded" in summary_line(summary)


# -- what the user can type ------------------------------------------------------------------------


def test_readme_commands_run_fetcher_from_the_venv() -> None:
    """Every command line in the README's sh and cron blocks runs fetcher by a path it has."""
    blocks = re.findall(r"```(?:sh|cron)\n(.*?)```", README, re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    calls = [
        line for line in lines if re.search(r"(?<![\w./-])fetcher (fetch|status|verify|demo)", line)
    ]
    assert calls == []
    assert any(".venv/bin/fetcher fetch" in line for line in lines)


def test_demo_hints_name_a_runnable_fetcher(tmp_path: Path) -> None:
    """The demo's hint shows how to run this very fetcher, not a bare `fetcher` off PATH."""
    result = run_cli(["demo", "--no-progress", "--archive", str(tmp_path / "demo")], timeout=120)

    assert result.returncode == 0, result.stderr
    (hint,) = [line for line in result.stdout.splitlines() if " fetch task_ids.txt" in line]
    command = shlex.split(hint)
    assert command[0] != "fetcher"
    assert command[:3] == [sys.executable, "-m", "fetcher"]


def test_mypy_and_ruff_are_pinned_to_what_is_installed() -> None:
    """The test extra pins mypy and ruff exactly, to the versions this suite runs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = project["project"]["optional-dependencies"]["test"]
    for tool in ("mypy", "ruff"):
        (spec,) = [line for line in extra if re.match(rf"{tool}\b", line)]
        assert spec == f"{tool}=={version(tool)}", spec
