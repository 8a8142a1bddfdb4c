"""Settings are refused where they are wrong, and say where they came from.

A config file's values keep their TOML types, text from the environment and
flags is parsed, ``Settings(...)`` made in Python checks itself, and a config
or key file that another user controls is refused, as ssh refuses such a config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import add_image_task, archived_files, process_env, run_cli, task_id

from fetcher.config import Settings, load_settings
from fetcher.errors import ConfigError, UsageError
from fetcher.replica import Replica
from fetcher.sizes import format_size, parse_size

SECRET = "sk-settings-canary-5f1e"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# -- types: a config file keeps its TOML types ------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "name"),
    [
        pytest.param("archive = 5\n", "archive", id="archive-number"),
        pytest.param('archive = ""\n', "archive", id="archive-empty"),
        pytest.param("archive = true\n", "archive", id="archive-bool"),
        pytest.param('downloads = "8"\n', "downloads", id="downloads-string"),
        pytest.param('concurrency = "2"\n', "concurrency", id="concurrency-string"),
        pytest.param('timeout = "3"\n', "timeout", id="timeout-string"),
        pytest.param('rate = "50"\n', "rate", id="rate-string"),
        pytest.param('max_file_size = "lots"\n', "max_file_size", id="max-file-size-word"),
        pytest.param("max_file_size = true\n", "max_file_size", id="max-file-size-bool"),
        pytest.param("api_key_file = 7\n", "api_key_file", id="key-file-number"),
    ],
)
def test_wrong_type_in_config_file_names_file_and_key(tmp_path: Path, toml: str, name: str) -> None:
    """A value of the wrong TOML type is a ConfigError naming the config file and the key."""
    path = write(tmp_path / "conf.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, path)
    message = str(caught.value)
    assert "conf.toml" in message
    assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        pytest.param("FETCHER_DOWNLOADS", "eight", id="downloads-word"),
        pytest.param("FETCHER_CONCURRENCY", "0", id="concurrency-zero"),
        pytest.param("FETCHER_TIMEOUT", "soon", id="timeout-word"),
        pytest.param("FETCHER_MAX_FILE_SIZE", "16 GB!", id="max-file-size-junk"),
        pytest.param("FETCHER_LAYOUT", "{task_type}", id="layout-without-task-id"),
    ],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    """A bad FETCHER_* value is a ConfigError that names that variable."""
    empty = write(tmp_path / "empty.toml", "")
    with pytest.raises(ConfigError, match=variable):
        load_settings({}, {variable: value}, empty)


def test_wrong_type_refused_by_the_cli_creates_nothing(tmp_path: Path) -> None:
    """`archive = 5` in a config file is one error line and exit 2, and no ./5 appears."""
    config = write(
        tmp_path / "conf" / "config.toml", 'base_url = "http://127.0.0.1:9"\narchive = 5\n'
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    result = run_cli(["status", "--config", str(config)], cwd=cwd)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "config.toml" in lines[0]
    assert "'archive'" in lines[0]
    assert not (cwd / "5").exists()
    assert not (tmp_path / "conf" / "5").exists()


def test_relative_archive_in_config_file_is_beside_the_file(
    replica: Replica, tmp_path: Path
) -> None:
    """A relative `archive` in a config file is relative to that file's folder, not the cwd."""
    tid = task_id(1)
    add_image_task(replica, tid)
    config = write(
        tmp_path / "conf" / "config.toml",
        f'base_url = {json.dumps(replica.api_url)}\narchive = "archive"\nretry_wait = 0.01\n',
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = process_env(replica, tmp_path / "unused", tmp_path)
    del env["FETCHER_ARCHIVE"]

    result = run_cli(["fetch", "--config", str(config), "--id", tid], env=env, cwd=cwd)

    assert result.returncode == 0, result.stderr
    assert f"{tid}/00.png" in "\n".join(archived_files(tmp_path / "conf" / "archive"))
    assert not (cwd / "archive").exists()


@pytest.mark.parametrize("command", ["fetch", "status", "verify"], ids=str)
def test_empty_archive_flag_is_an_error(tmp_path: Path, command: str) -> None:
    """`--archive ''` is one usage line and exit 2, not the current folder."""
    args = [command, "--archive", ""] + (["--id", task_id(1)] if command == "fetch" else [])
    env = {"FETCHER_BASE_URL": "http://127.0.0.1:9", "FETCHER_API_KEY": "k"}

    result = run_cli(args, env=env, cwd=tmp_path)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "--archive" in lines[0]
    assert "empty" in lines[0]
    assert list(tmp_path.iterdir()) == []


# -- Settings(...) from Python ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        pytest.param({"downloads": 0}, "downloads", id="downloads-zero"),
        pytest.param({"concurrency": -1}, "concurrency", id="concurrency-negative"),
        pytest.param({"downloads": "8"}, "downloads", id="downloads-string"),
        pytest.param({"retries": True}, "retries", id="retries-bool"),
        pytest.param({"max_file_size": 1.5}, "max_file_size", id="max-file-size-float"),
        pytest.param({"timeout": 0}, "timeout", id="timeout-zero"),
        pytest.param({"rate": float("inf")}, "rate", id="rate-infinite"),
        pytest.param({"archive": 5}, "archive", id="archive-number"),
        pytest.param({"archive": ""}, "archive", id="archive-empty"),
        pytest.param({"base_url": "ftp://x"}, "base_url", id="base-url-ftp"),
        pytest.param({"api_key": 12345}, "api_key", id="api-key-number"),
        pytest.param({"layout": "{task_type}"}, "layout", id="layout-without-task-id"),
    ],
)
def test_settings_from_python_are_validated(changes: dict[str, Any], name: str) -> None:
    """Settings(...) refuses what the CLI refuses, with one ConfigError line naming the setting."""
    with pytest.raises(ConfigError, match=name) as caught:
        Settings(**changes)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, UsageError)
    assert "12345" not in str(caught.value)  # a key of the wrong type is not echoed


@pytest.mark.parametrize(
    "archive",
    [pytest.param("some/folder", id="str"), pytest.param(Path("some/folder"), id="path")],
)
def test_settings_archive_may_be_a_string(archive: str | Path) -> None:
    """Settings(archive="x") keeps a Path, so a run can use it."""
    settings = Settings(archive=archive, timeout=3)
    assert settings.archive == Path("some/folder")
    assert isinstance(settings.archive, Path)
    assert isinstance(settings.timeout, float)


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("16GiB", 16 * 1024**3, id="gib"),
        pytest.param("16 gib", 16 * 1024**3, id="lower-with-space"),
        pytest.param("500MB", 500 * 1000**2, id="mb-decimal"),
        pytest.param("1.5KiB", 1536, id="fraction"),
        pytest.param("2TB", 2 * 1000**4, id="tb"),
        pytest.param("1TiB", 1024**4, id="tib"),
        pytest.param("1048576", 1048576, id="bare-bytes"),
        pytest.param("10B", 10, id="bytes-unit"),
    ],
)
def test_parse_size_accepts_units(text: str, expected: int) -> None:
    """Sizes take decimal and binary units, any case, with or without a space."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("GiB", id="unit-only"),
        pytest.param("16 GB!", id="junk"),
        pytest.param("16XB", id="unknown-unit"),
        pytest.param("1.5", id="fraction-of-a-byte"),
        pytest.param("-1GiB", id="negative"),
        pytest.param("1e9", id="exponent"),
    ],
)
def test_parse_size_refuses_junk(text: str) -> None:
    """Anything that is not a size is a ValueError, never a guess."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        pytest.param("flag", 16 * 1024**3, id="flag"),
        pytest.param("env", 16 * 1024**3, id="env"),
        pytest.param("file", 4 * 1024**3, id="file"),
    ],
)
def test_max_file_size_takes_units_everywhere(tmp_path: Path, layer: str, expected: int) -> None:
    """--max-file-size 16GiB, FETCHER_MAX_FILE_SIZE=16GiB and max_file_size = "4GiB" are sizes."""
    empty = write(tmp_path / "empty.toml", "")
    if layer == "flag":
        loaded = load_settings({"max_file_size": "16GiB"}, {}, empty)
    elif layer == "env":
        loaded = load_settings({}, {"FETCHER_MAX_FILE_SIZE": "16GiB"}, empty)
    else:
        loaded = load_settings({}, {}, write(tmp_path / "c.toml", 'max_file_size = "4GiB"\n'))
    assert loaded.settings.max_file_size == expected


@pytest.mark.parametrize(
    ("value", "code"),
    [pytest.param("16GiB", 0, id="as-the-readme-writes-it"), pytest.param("16 GB!", 2, id="junk")],
)
def test_max_file_size_flag_with_unit(
    replica: Replica, tmp_path: Path, value: str, code: int
) -> None:
    """The CLI takes `--max-file-size 16GiB`; a bad size is one line and exit 2."""
    tid = task_id(1)
    add_image_task(replica, tid)
    env = process_env(replica, tmp_path / "archive", tmp_path)

    result = run_cli(["fetch", "--max-file-size", value, "--id", tid], env=env)

    assert result.returncode == code, result.stderr
    if code:
        lines = error_lines(result.stderr)
        assert len(lines) == 1
        assert "--max-file-size" in lines[0]


def test_sizes_print_in_binary_units() -> None:
    """Printed sizes use KiB/MiB/GiB, one unit system."""
    assert [format_size(n) for n in (512, 1536, 3 * 1024**2, 5 * 1024**3)] == [
        "512 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 GiB",
    ]


# -- files others control are refused -----------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o620, id="group-writable"),
        pytest.param(0o602, id="world-writable"),
        pytest.param(0o666, id="everyone-writes"),
    ],
)
def test_config_file_others_can_write_is_refused(
    replica: Replica, tmp_path: Path, mode: int
) -> None:
    """A config file others can write is refused with one line, before any request."""
    config = write(tmp_path / "config.toml", f"base_url = {json.dumps(replica.api_url)}\n", mode)
    env = process_env(replica, tmp_path / "archive", tmp_path)

    result = run_cli(["fetch", "--config", str(config), "--id", task_id(1)], env=env)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "config.toml" in lines[0]
    assert "writable by other users" in lines[0]
    assert replica.seen("api") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
@pytest.mark.parametrize("what", ["config", "key"], ids=str)
def test_file_owned_by_another_user_is_refused(tmp_path: Path, what: str) -> None:
    """A config or key file owned by another user (not root) is refused with one line."""
    path = write(tmp_path / f"{what}.txt", "" if what == "config" else SECRET + "\n")
    os.chown(path, 4242, 4242)
    if what == "config":
        call: dict[str, Any] = {"flags": {}, "env": {}, "config_path": path}
    else:
        empty = write(tmp_path / "empty.toml", "")
        call = {"flags": {"api_key_file": str(path)}, "env": {}, "config_path": empty}
    with pytest.raises(ConfigError, match="owned by another user") as caught:
        load_settings(**call)
    assert SECRET not in str(caught.value)


# -- the key from a file --------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["flag", "env", "config"], ids=str)
def test_api_key_file_supplies_the_key(replica: Replica, tmp_path: Path, layer: str) -> None:
    """--api-key-file, FETCHER_API_KEY_FILE and api_key_file read the key from a file."""
    tid = task_id(1)
    add_image_task(replica, tid)
    write(tmp_path / "secrets" / "key", f"\ufeff  {replica.api_key}  \nsecond line ignored\n")
    env = process_env(replica, tmp_path / "archive", tmp_path)
    del env["FETCHER_API_KEY"]
    args = ["fetch", "--id", tid]
    if layer == "flag":
        args += ["--api-key-file", str(tmp_path / "secrets" / "key")]
    elif layer == "env":
        env["FETCHER_API_KEY_FILE"] = str(tmp_path / "secrets" / "key")
    else:  # relative to the config file's folder
        config = write(tmp_path / "secrets" / "config.toml", 'api_key_file = "key"\n')
        args += ["--config", str(config)]

    result = run_cli(args, env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert replica.api_key not in result.stdout + result.stderr
    assert f"{tid}/00.png" in "\n".join(archived_files(tmp_path / "archive"))


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        pytest.param(None, 0o600, "cannot read API key file", id="missing"),
        pytest.param("", 0o600, "is empty", id="empty"),
        pytest.param("\n\n", 0o600, "is empty", id="blank-first-line"),
        pytest.param("<dir>", 0o700, "cannot read API key file", id="a-folder"),
        pytest.param(SECRET, 0o620, "writable by other users", id="group-writable"),
    ],
)
def test_bad_api_key_file_is_one_line(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    """A missing, empty, unreadable or exposed key file is one line, exit 2, no key echoed."""
    key = tmp_path / "key"
    if content == "<dir>":
        key.mkdir(mode=mode)
    elif content is not None:
        write(key, content, mode)
    env = {"FETCHER_BASE_URL": "http://127.0.0.1:9", "FETCHER_ARCHIVE": str(tmp_path / "a")}

    result = run_cli(["fetch", "--api-key-file", str(key), "--id", task_id(1)], env=env)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert str(key) in lines[0]
    assert SECRET not in result.stderr


def test_api_key_and_key_file_in_one_layer_conflict(tmp_path: Path) -> None:
    """--api-key with --api-key-file is an error; a higher layer's key file beats a lower key."""
    key = write(tmp_path / "key", "from-file\n")
    empty = write(tmp_path / "empty.toml", "")
    with pytest.raises(ConfigError, match="--api-key-file"):
        load_settings({"api_key": "x", "api_key_file": str(key)}, {}, empty)
    loaded = load_settings({"api_key_file": str(key)}, {"FETCHER_API_KEY": "from-env"}, empty)
    assert loaded.settings.api_key == "from-file"
    loaded = load_settings({}, {"FETCHER_API_KEY_FILE": str(key)}, empty)
    assert loaded.settings.api_key == "from-file"
    lower = load_settings({"api_key": "from-flag"}, {"FETCHER_API_KEY_FILE": str(key)}, empty)
    assert lower.settings.api_key == "from-flag"
