"""``fetcher serve`` on a PostgreSQL state: the gallery reads its catalog from the database
several hosts share, for an archive folder and for a bucket, over real HTTP (and once in
headless chromium); a server that restarts under it is reconnected to, and one that stays
away answers 503 until it is back."""

from __future__ import annotations

import hashlib
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from gallery_world import FAILED, VIDEO, build_archive, dated, image_id, newest_first, running
from test_gallery import _env, _serve, _start, cards, get, page
from test_gallery_browser import chromium

from fetcher.config import Settings
from fetcher.gallery import GalleryOptions
from fetcher.replica import sample_video
from fetcher.state import DatabaseUrl
from fetcher.stores import BucketUrl
from fetcher.stores.s3 import state_path
from tests.pgserver import PostgresServer
from tests.s3server import MotoServer


@pytest.fixture(scope="module")
def shared_state(postgres: PostgresServer) -> DatabaseUrl:
    """The module's own PostgreSQL database."""
    return DatabaseUrl.parse(postgres.database())


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, shared_state: DatabaseUrl) -> Path:
    return build_archive(tmp_path_factory.mktemp("pg-gallery") / "archive", state=shared_state)


@pytest.fixture(scope="module")
def url(archive: Path, shared_state: DatabaseUrl) -> Iterator[str]:
    settings = Settings(archive=archive, state=shared_state)
    with running(GalleryOptions(archive, port=0, settings=settings)) as address:
        yield address


def test_grid_lists_the_database_tasks_newest_first(url: str, archive: Path) -> None:
    """The grid and the cards API's cursor list every task the database holds, newest
    first; the archive folder has no SQLite state, so the rows can only come from there."""
    assert not (archive / ".fetcher" / "state.sqlite").exists()
    html = page(url, "/")
    assert f'data-task="{image_id(0)}"' in html
    assert dated(cards(url)) == newest_first()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("&q=lighthouse", [image_id(1)], id="search"),
        pytest.param("&q=FOX%20snow", [image_id(2)], id="search-words"),
        pytest.param("&model=Kling", [VIDEO], id="model"),
        pytest.param("&state=failed", [FAILED], id="state"),
        pytest.param("&since=2026-11-02&until=2026-11-03", [image_id(2), image_id(1)], id="dates"),
    ],
)
def test_search_and_filters_read_the_database(url: str, query: str, expected: list[str]) -> None:
    """The search box (pg_trgm) and each filter narrow the cards as on SQLite."""
    assert cards(url, query) == expected


def test_task_page_files_and_sidecar(url: str, archive: Path) -> None:
    """A task's page shows its files' checksums and its sidecar; its file, thumbnail and
    video (in ranges) are served from the folder."""
    (sidecar_path,) = archive.rglob(f"{image_id(2)}/task.json")
    sidecar = json.loads(sidecar_path.read_text())
    html = page(url, f"/task/{image_id(2)}")
    for entry in sidecar["files"]:
        assert entry["sha256"] in html
    status, _, body = get(url, f"/file/{image_id(2)}/0")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == sidecar["files"][0]["sha256"]
    status, headers, thumb = get(url, f"/thumb/{image_id(2)}/0")
    assert status == 200 and headers["Content-Type"] == "image/webp" and thumb[:4] == b"RIFF"
    status, headers, body = get(url, f"/file/{VIDEO}/0", {"Range": "bytes=100-199"})
    assert (status, body) == (206, sample_video()[100:200])


def test_a_restarted_server_is_reconnected_and_an_absent_one_is_a_503(
    archive: Path, shared_state: DatabaseUrl, postgres: PostgresServer
) -> None:
    """The server restarts: the next request is answered on a new connection. Down for
    longer than --state-reconnect, a request gets 503 with one line naming it (no
    password), and the gallery stays up for when it is back."""
    settings = Settings(archive=archive, state=shared_state, state_reconnect=1.0)
    with running(GalleryOptions(archive, port=0, settings=settings)) as base:
        assert cards(base, "&q=lighthouse") == [image_id(1)]
        postgres.restart()
        assert cards(base, "&q=lighthouse") == [image_id(1)]
        postgres.stop()
        try:
            status, _, body = get(base, "/")
        finally:
            postgres.start()
        assert status == 503
        text = body.decode()
        assert (
            text.startswith("503: cannot connect to the state database") and text.count("\n") == 1
        )
        assert postgres.password not in text
        assert cards(base, "&q=lighthouse") == [image_id(1)]


def test_serve_command_takes_a_postgresql_state(
    archive: Path, shared_state: DatabaseUrl, postgres: PostgresServer, tmp_path: Path
) -> None:
    """`fetcher serve --state postgresql://...` serves the folder from the database, prints
    no password, and exits 0 on SIGTERM; a wrong password is one line, exit 2."""
    process, address = _start(
        ["--archive", str(archive), "--port", "0", "--state", shared_state.dsn], _env(tmp_path)
    )
    try:
        assert cards(address, "&q=lighthouse") == [image_id(1)]
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert postgres.password not in out + err and "Traceback" not in err
    wrong = postgres.url(shared_state.dsn.rsplit("/", 1)[1], password="not-the-password")
    result = _serve(["--archive", str(archive), "--port", "0", "--state", wrong], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("fetcher: error: cannot connect to the state database")
    assert "not-the-password" not in result.stderr + result.stdout


def test_a_bucket_archive_on_postgresql_is_served(
    moto: MotoServer,
    aws_env: dict[str, str],
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """A bucket archive whose state is PostgreSQL: the grid comes from the database, files
    from the bucket, no SQLite state is restored on this host; chromium draws the grid's
    thumbnails and finds a prompt with the search box."""
    bucket = f"pg-gallery-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket=bucket)
    client.close()
    state = DatabaseUrl.parse(postgres.database())
    where = BucketUrl(bucket, "arch")
    build_archive(where, s3_endpoint=moto.url, state=state)
    settings = Settings(archive=where, s3_endpoint=moto.url, state=state, retry_wait=0.01)
    with running(GalleryOptions(where, port=0, settings=settings)) as base:
        assert dated(cards(base)) == newest_first()
        status, _, body = get(base, f"/file/{VIDEO}/0")
        assert (status, body) == (200, sample_video())
        with chromium() as browser:
            tab = browser.new_page(viewport={"width": 1200, "height": 800})
            tab.goto(base)
            tab.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth)"
            )
            tab.get_by_label("Search").fill("lighthouse")
            tab.get_by_label("Search").press("Enter")
            tab.wait_for_url("**q=lighthouse**")
            tiles = tab.locator("#grid li.card")
            tiles.first.wait_for()
            assert tiles.count() == 1
            tab.screenshot(path=tmp_path / "bucket-postgres.png")
    assert not state_path(where).exists()
