"""Shared fixtures: the project's replica on loopback, an archive folder, settings, helpers.

Every test that touches the network talks real HTTP to :class:`fetcher.replica.Replica`
on 127.0.0.1 with ports picked by the OS.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fetcher.config import Settings
from fetcher.ids import IdSource
from fetcher.pipeline import FetchOptions, fetch_sync
from fetcher.replica import Replica, file_info, png, pseudo_video, task_response
from fetcher.state import DatabaseUrl, open_state
from fetcher.stores import open_store
from fetcher.summary import RunSummary
from tests.pgserver import PostgresServer
from tests.s3server import AWS_USER_VARIABLES, MotoServer, aws_credentials

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def private_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The user's data and cache folders (a bucket's state and work folder, thumbnails) in
    a folder of the session's own, for the tests and every process they start: the suite
    leaves nothing in the home of whoever runs it."""
    base = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(base / "data"))
        patch.setenv("XDG_CACHE_HOME", str(base / "cache"))
        yield


@pytest.fixture
def replica() -> Iterator[Replica]:
    """A running replica of the gateway and the file host."""
    with Replica() as running:
        yield running


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One moto S3 server for the session; each test has buckets of its own."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials as the AWS CLI takes them, and none of the user's own files."""
    env = aws_credentials(tmp_path)
    for name in AWS_USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    return tmp_path / "archive"


@pytest.fixture
def settings(replica: Replica, archive_dir: Path) -> Settings:
    """Settings for a run against the replica: fast retries, no rate limit to speak of."""
    return Settings(
        archive=archive_dir,
        base_url=replica.api_url,
        api_key=replica.api_key,
        retries=2,
        retry_wait=0.01,
        timeout=5.0,
        rate=10_000.0,
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session; each test makes its own database."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> DatabaseUrl:
    """A new, empty PostgreSQL database of this test's own."""
    return DatabaseUrl.parse(postgres.database())


#: The state's implementations, for the tests that run against each of them.
STATE_KINDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


@pytest.fixture(params=STATE_KINDS)
def state(request: pytest.FixtureRequest) -> DatabaseUrl | None:
    """The ``state`` setting, once per implementation: None (SQLite's file inside the
    archive) and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: DatabaseUrl = request.getfixturevalue("postgres_url")
    return url


def on_each_state(settings: Settings, state: DatabaseUrl | None) -> Settings:
    """``settings`` on each state implementation; a module whose tests exercise the state
    runs all of them on both with ``settings = pytest.fixture(name="settings")(on_each_state)``.
    """
    return tweak(settings, state=state)


@pytest.fixture
def read_only_copy(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(archive, the same folder on a read-only bind mount); the suite runs as root (CI does)."""
    archive, mount = tmp_path / "archive", tmp_path / "ro"
    archive.mkdir()
    mount.mkdir()
    bound = subprocess.run(["mount", "--bind", str(archive), str(mount)], check=False)
    assert bound.returncode == 0, "a read-only bind mount needs root (CAP_SYS_ADMIN)"
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
        yield archive, mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def run(settings: Settings, *task_ids: str, **options: Any) -> RunSummary:
    """One fetch run over ``task_ids`` through the public Python API."""
    return fetch_sync(settings, [IdSource.from_values("test", task_ids)], FetchOptions(**options))


def tweak(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


def task_id(n: int, kind: str = "AigcImageTask") -> str:
    """A task ID in the real format, different for each ``n``."""
    return f"1392336703-{kind}-{hashlib.md5(f'{kind}{n}'.encode()).hexdigest()}t"


def add_image_task(
    replica: Replica,
    tid: str,
    count: int = 1,
    *,
    with_md5: bool = False,
    **response: Any,
) -> list[bytes]:
    """A finished image task with ``count`` PNG files; returns the files' bytes in order."""
    datas, infos = [], []
    for k in range(count):
        data = png(16, 16, seed=int(hashlib.md5(tid.encode()).hexdigest()[:4], 16) + k)
        url = replica.add_file(f"{tid}/image_{k}.png", data)
        md5 = hashlib.md5(data).hexdigest() if with_md5 else None
        infos.append(file_info(url, md5=md5))
        datas.append(data)
    replica.set_task(tid, task_response(tid, files=infos, **response))
    return datas


def add_running_task(replica: Replica, tid: str) -> None:
    """A task the API still runs at the first query, finished with one PNG at the next."""
    url = replica.add_file(f"{tid}/image.png", png(16, 16))
    replica.set_task(
        tid,
        task_response(tid, status="PROCESSING"),
        task_response(tid, files=[file_info(url)]),
    )


def add_video_task(replica: Replica, tid: str, size: int = 200_000) -> bytes:
    data = pseudo_video(size, seed=size)
    url = replica.add_file(f"{tid}/video.mp4", data, "video/mp4")
    replica.set_task(
        tid,
        task_response(
            tid,
            task_type="AigcVideoTask",
            files=[file_info(url, file_type="video")],
            model=("Kling", "2.1"),
        ),
    )
    return data


def archived_files(archive: Path) -> dict[str, bytes]:
    """Every visible file in the archive (not fetcher's own folder), by relative path."""
    return {
        str(p.relative_to(archive)): p.read_bytes()
        for p in sorted(archive.rglob("*"))
        if p.is_file() and ".fetcher" not in p.relative_to(archive).parts
    }


def state_rows(
    settings: Settings, sql: str, params: Sequence[object] = ()
) -> list[tuple[Any, ...]]:
    """Rows a read of the settings' state gives, whichever implementation holds it."""
    with open_state(open_store(settings.archive, settings), readonly=True) as db:
        return db.query(sql, params)


def state_write(settings: Settings, sql: str, params: Sequence[object] = ()) -> int:
    """One statement in a step of the settings' state; how many rows it touched."""
    with open_state(open_store(settings.archive, settings)) as db, db.atomic() as conn:
        return int(conn.execute(sql, params).rowcount)


def state_env(settings: Settings) -> dict[str, str]:
    """``FETCHER_STATE`` for a CLI subprocess on the settings' PostgreSQL state; none for
    SQLite's file inside the archive."""
    state = settings.state
    return {"FETCHER_STATE": state.dsn} if isinstance(state, DatabaseUrl) else {}


def process_env(replica: Replica, archive: Path, tmp_path: Path) -> dict[str, str]:
    """A whole environment for a CLI subprocess against ``replica``, free of the user's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env.update(
        FETCHER_BASE_URL=replica.api_url,
        FETCHER_API_KEY=replica.api_key,
        FETCHER_ARCHIVE=str(archive),
        XDG_CONFIG_HOME=str(tmp_path / "no-config"),
    )
    return env


def run_cli(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``python -m fetcher ARGS`` as a subprocess, with a clean FETCHER_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    # Keep the user's real config out of the test: point the config dir somewhere empty.
    # A subfolder, not cwd itself: a "fetcher/" config folder in cwd would shadow the package.
    base["XDG_CONFIG_HOME"] = str((cwd or ROOT / "tests") / ".no-config")
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fetcher", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=base,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def start_cli(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m fetcher ARGS`` in the background, stdout and stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "fetcher", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``predicate()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
