"""``fetcher serve`` and ``fetcher search`` on an archive in a bucket: moto's S3 server over
loopback, behind the recording proxy, filled by a real fetch of the gallery's world.

The gallery streams every file through itself (Range passed on to the store), keeps its
thumbnails in the user cache dir and writes nothing to the bucket; a store that refuses
at start stops ``serve`` with one line, one that fails a request later answers 502.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from gallery_world import (
    VIDEO,
    build_archive,
    dated,
    image_id,
    newest_first,
    running,
)
from test_gallery import TOKEN, get, page
from test_gallery_browser import chromium, play

from fetcher.config import Settings
from fetcher.gallery import GalleryOptions
from fetcher.replica import sample_video
from fetcher.stores import BucketUrl
from tests.s3server import (
    AWS_USER_VARIABLES,
    SECRET,
    Fault,
    MotoServer,
    StoreProxy,
    aws_credentials,
    store_proxy,
)

PREFIX = "arch"


@dataclass
class Shelf:
    """A bucket holding the gallery's world under PREFIX, its proxy, and serve's settings."""

    bucket: str
    proxy: StoreProxy
    client: Any
    #: How serve reaches the bucket: through the proxy, with a state of its own.
    settings: Settings
    env: dict[str, str]
    tmp: Path

    @property
    def url(self) -> BucketUrl:
        return BucketUrl(self.bucket, PREFIX)

    def objects(self) -> dict[str, str]:
        """Every object in the bucket: its key and ETag."""
        listed = self.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {item["Key"]: item["ETag"] for item in listed}

    def fresh(self, name: str) -> Settings:
        """Serve's settings with a state file this host does not have yet."""
        return replace(self.settings, state=self.tmp / name / "state.sqlite")


@pytest.fixture(scope="module")
def shelf(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shelf]:
    tmp = tmp_path_factory.mktemp("bucket-gallery")
    env = {**aws_credentials(tmp), "XDG_CACHE_HOME": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for name in AWS_USER_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        bucket = f"gallery-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=moto.url)
        client.create_bucket(Bucket=bucket)
        build_archive(BucketUrl(bucket, PREFIX), s3_endpoint=moto.url, state=tmp / "fetched.sqlite")
        with store_proxy(moto.url) as proxy:
            settings = Settings(
                archive=BucketUrl(bucket, PREFIX),
                s3_endpoint=proxy.url,
                state=tmp / "served" / "state.sqlite",
                retries=1,
                retry_wait=0.01,
            )
            yield Shelf(bucket, proxy, client, settings, env, tmp)
        client.close()


@pytest.fixture(scope="module")
def url(shelf: Shelf) -> Iterator[str]:
    with running(GalleryOptions(shelf.url, port=0, settings=shelf.settings)) as address:
        yield address


def _folder_of(shelf: Shelf, task_id: str) -> str:
    (key,) = [k for k in shelf.objects() if k.endswith(f"{task_id}/task.json")]
    return key.rsplit("/", 1)[0]


def test_a_bucket_grid_starts_from_the_snapshot(shelf: Shelf, url: str) -> None:
    """A host with no state for the bucket serves its grid from the bucket's snapshot."""
    assert (shelf.tmp / "served" / "state.sqlite").is_file()
    html = page(url, "/")
    shown = re.findall(r'data-task="([^"]+)"', html.split('id="grid"', 1)[1])
    assert dated(shown) == newest_first()
    assert re.findall(r'<a href="/task/([^"?]+)', page(url, "/?q=lighthouse")) == [image_id(1)]


def test_a_bucket_video_is_streamed_in_ranges(shelf: Shelf, url: str) -> None:
    """Range goes to the store and back: 206 with Content-Range and Content-Length, the
    object's type, a suffix range, the whole file, 416 past the end, a HEAD; never a
    redirect."""
    whole = sample_video()
    shelf.proxy.clear()
    status, headers, body = get(url, f"/file/{VIDEO}/0", {"Range": "bytes=100-199"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
    assert headers["Content-Length"] == "100"
    assert headers["Content-Type"] == "video/mp4"
    assert headers["Accept-Ranges"] == "bytes"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert body == whole[100:200]
    status, headers, body = get(url, f"/file/{VIDEO}/0", {"Range": "bytes=-10"})
    assert (status, body) == (206, whole[-10:])
    status, headers, body = get(url, f"/file/{VIDEO}/0")
    assert (status, headers["Content-Length"], body) == (200, str(len(whole)), whole)
    status, headers, _ = get(url, f"/file/{VIDEO}/0", {"Range": f"bytes={len(whole)}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(whole)}"
    gets = [path for method, path in shelf.proxy.requests() if method == "GET"]
    assert gets and all(f"/{shelf.bucket}/{PREFIX}/" in path for path in gets)
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("HEAD", f"/file/{VIDEO}/0")
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == (200, b"")
        assert answer.headers["Content-Length"] == str(len(whole))
    finally:
        connection.close()


def test_a_bucket_task_page_shows_its_files_and_sidecar(shelf: Shelf, url: str) -> None:
    """A task's page and its sidecar come from the bucket's objects."""
    folder = _folder_of(shelf, image_id(2))
    sidecar = json.loads(
        shelf.client.get_object(Bucket=shelf.bucket, Key=f"{folder}/task.json")["Body"].read()
    )
    html = page(url, f"/task/{image_id(2)}")
    for entry in sidecar["files"]:
        assert entry["sha256"] in html
    assert "three studies of a red fox in snow" in html
    assert '"task_id": "' + image_id(2) in html.replace("&quot;", '"')
    status, headers, raw = get(url, f"/sidecar/{image_id(2)}")
    assert status == 200 and json.loads(raw) == sidecar
    assert headers["Content-Type"].startswith("application/json")
    status, _, picture = get(url, f"/file/{image_id(2)}/1")
    stored = shelf.client.get_object(Bucket=shelf.bucket, Key=f"{folder}/01.png")
    assert status == 200 and picture == stored["Body"].read()


def test_bucket_thumbnails_are_cached_locally_and_nothing_is_written_to_the_bucket(
    shelf: Shelf, url: str
) -> None:
    """A thumbnail is made once into the user cache dir; serving sends the store no write."""
    before = shelf.objects()
    shelf.proxy.clear()
    status, headers, first = get(url, f"/thumb/{image_id(3)}/0")
    assert status == 200 and headers["Content-Type"] == "image/webp"
    assert first[8:12] == b"WEBP"
    kept = list((shelf.tmp / "cache").rglob("*.webp"))
    assert len(kept) == 1 and kept[0].read_bytes() == first
    reads = len(shelf.proxy.requests())
    assert get(url, f"/thumb/{image_id(3)}/0")[2] == first
    assert len(shelf.proxy.requests()) == reads  # from the cache: no request to the store
    for target in ("/", f"/task/{VIDEO}", f"/file/{VIDEO}/0", f"/sidecar/{VIDEO}"):
        assert get(url, target)[0] == 200
    assert {method for method, _ in shelf.proxy.requests()} <= {"GET", "HEAD"}
    assert shelf.objects() == before


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param(".fetcher/state.sqlite", id="state"),
        pytest.param("../other/00.png", id="dotdot"),
        pytest.param("/arch/00.png", id="absolute"),
        pytest.param("a//00.png", id="empty-segment"),
    ],
)
def test_a_bucket_serves_no_key_outside_the_prefix(shelf: Shelf, planted: str) -> None:
    """A state naming a hidden object or a path out of the prefix gets 404, and the store
    is never asked for it."""
    settings = shelf.fresh(f"planted-{uuid.uuid4().hex[:6]}")
    options = GalleryOptions(shelf.url, port=0, settings=settings)
    with running(options) as base:
        assert get(base, f"/file/{image_id(4)}/0")[0] == 200
    with sqlite3.connect(settings.state or "") as db:
        db.execute("UPDATE files SET path = ? WHERE task_id = ?", (planted, image_id(4)))
    db.close()
    shelf.proxy.clear()
    with running(options) as base:
        for target in (f"/file/{image_id(4)}/0", f"/thumb/{image_id(4)}/0"):
            status, _, body = get(base, target)
            assert status == 404 and b"SQLite" not in body
    assert [p for _, p in shelf.proxy.requests() if "state.sqlite" in p or "other" in p] == []


def test_a_store_failing_later_answers_502_without_the_secret(shelf: Shelf, url: str) -> None:
    """A request the store keeps failing (a 5xx, then the key refused) is a 502 that names
    the bucket and the error, never the secret."""
    target = f"/file/{image_id(5)}/0"
    shelf.proxy.faults.append(Fault("GET", "/00.png", status=500, code="InternalError", times=2))
    status, _, body = get(url, target)
    assert status == 502
    assert shelf.bucket.encode() in body and b"InternalError" in body
    shelf.proxy.faults.append(Fault("GET", "/00.png", status=403, code="InvalidAccessKeyId"))
    status, _, body = get(url, target)
    assert status == 502 and b"InvalidAccessKeyId" in body
    assert SECRET.encode() not in body
    assert get(url, target)[0] == 200


def test_a_bucket_task_page_plays_its_video_in_a_browser(
    shelf: Shelf, url: str, tmp_path: Path
) -> None:
    """In headless chromium the bucket's grid draws its thumbnails, and a video's task page
    plays the clip streamed from the store in ranges; the page's policy blocks nothing."""
    blocked: list[str] = []
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        try:
            tab = context.new_page()
            tab.on("pageerror", lambda exc: blocked.append(str(exc)))
            tab.on(
                "console",
                lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
            )
            tab.goto(url)
            tab.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth)"
            )
            tab.goto(url + "task/" + VIDEO)
            play(tab)
            tab.screenshot(path=tmp_path / "bucket-video.png")
        finally:
            context.close()
    assert blocked == []


# -- the commands -----------------------------------------------------------------------


def _cli(shelf: Shelf, *args: str, state: str, endpoint: str | None = None) -> Any:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")},
        **shelf.env,
        "XDG_CONFIG_HOME": str(shelf.tmp / "no-config"),
        "FETCHER_STATE": str(shelf.tmp / state / "state.sqlite"),
        "FETCHER_S3_ENDPOINT": endpoint or shelf.proxy.url,
        "FETCHER_RETRY_WAIT": "0.01",
    }
    return subprocess.run(
        [sys.executable, "-m", "fetcher", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_search_on_a_bucket_reads_its_snapshot(shelf: Shelf) -> None:
    """`fetcher search pig --archive s3://B/P` on a host with no state: restored, found."""
    result = _cli(shelf, "search", "pig", "--archive", str(shelf.url), "--json", state="search")
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [card["task_id"] for card in found] == [image_id(10), image_id(0)]
    assert result.stderr == ""
    again = _cli(shelf, "search", "lighthouse", "--archive", str(shelf.url), state="search")
    assert again.returncode == 0 and again.stdout.startswith(image_id(1))


@pytest.mark.parametrize(
    ("archive", "fault", "message"),
    [
        pytest.param("s3://no-such-bucket-here/arch", None, "does not exist", id="no-bucket"),
        # A HEAD's refusal has no body: a wrong key reads as access denied.
        pytest.param(None, "InvalidAccessKeyId", "access denied to bucket", id="refused"),
        pytest.param("{bucket}/elsewhere", None, "no fetcher archive at", id="no-archive"),
    ],
)
def test_serve_refuses_a_bucket_it_cannot_use_in_one_line(
    shelf: Shelf, archive: str | None, fault: str | None, message: str
) -> None:
    """A missing bucket, a refused key, a prefix with no archive: exit 2, one line,
    no secret, before anything is served."""
    where = (archive or str(shelf.url)).replace("{bucket}", f"s3://{shelf.bucket}")
    if fault is not None:
        shelf.proxy.faults.append(Fault("HEAD", f"/{shelf.bucket}", status=403, code=fault))
    result = _cli(
        shelf, "serve", "--archive", where, "--port", "0", state=f"refused-{uuid.uuid4().hex}"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert SECRET not in result.stdout + result.stderr


@contextmanager
def _serving(shelf: Shelf, state: str, **env: str) -> Iterator[tuple[str, list[str]]]:
    """`fetcher serve --archive s3://B/P` as a process; yields its address, and after the
    block has the process's stdout and stderr in the list, once it stopped on SIGINT."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "serve", "--archive", str(shelf.url), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")},
            **shelf.env,
            "FETCHER_S3_ENDPOINT": shelf.proxy.url,
            "FETCHER_STATE": str(shelf.tmp / state / "state.sqlite"),
            **env,
        },
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(f"serving {shelf.url} at http://"), first
        yield first.split(" at ", 1)[1].strip(), output
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        output += [first + out, err]
    assert process.returncode == 0, err


def test_serve_on_a_bucket_with_a_token(shelf: Shelf) -> None:
    """`fetcher serve --archive s3://B/P` prints where it serves and answers with the token."""
    with _serving(shelf, "cli-serve", FETCHER_SERVE_TOKEN=TOKEN) as (address, output):
        assert get(address, "/")[0] == 401
        status, _, body = get(address, f"/file/{VIDEO}/0", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and body == sample_video()
    assert not [text for text in output if SECRET in text or TOKEN in text]


def test_a_browser_leaving_midway_is_no_error(shelf: Shelf) -> None:
    """A download the browser drops halfway (a seek, a closed tab) ends quietly: no
    traceback, and the gallery goes on serving."""
    key = f"{_folder_of(shelf, image_id(7))}/00.png"
    kept = shelf.client.get_object(Bucket=shelf.bucket, Key=key)
    original, kind = kept["Body"].read(), kept["ContentType"]
    shelf.client.put_object(Bucket=shelf.bucket, Key=key, Body=b"\0" * (16 << 20))
    try:
        with _serving(shelf, "left-midway") as (address, output):
            where = urlsplit(address)
            asked = f"GET /file/{image_id(7)}/0 HTTP/1.1\r\nHost: {where.netloc}\r\n\r\n"
            for _ in range(3):
                with socket.create_connection((where.hostname or "", where.port or 0)) as sock:
                    sock.sendall(asked.encode())
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)
            assert get(address, f"/file/{VIDEO}/0")[2] == sample_video()
    finally:
        shelf.client.put_object(Bucket=shelf.bucket, Key=key, Body=original, ContentType=kind)
    assert "Traceback" not in output[1] and "Error handling request" not in output[1]


def test_a_store_failing_midway_through_a_file_cuts_it_short(shelf: Shelf) -> None:
    """A body the store stops sending halfway: the browser gets a short body (never a
    complete-looking one), serve logs one line and no traceback, and goes on serving."""
    with _serving(shelf, "cut") as (address, output):
        shelf.proxy.faults.append(Fault("GET", f"{VIDEO}/00.mp4", cut=1000))
        where = urlsplit(address)
        connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
        try:
            connection.request("GET", f"/file/{VIDEO}/0")
            answer = connection.getresponse()
            assert answer.status == 200
            assert answer.headers["Content-Length"] == str(len(sample_video()))
            with pytest.raises(http.client.IncompleteRead):
                answer.read()
        finally:
            connection.close()
        assert get(address, f"/file/{VIDEO}/0")[2] == sample_video()
    (line,) = output[1].strip().splitlines()[:-1]  # the last is the SIGINT's
    assert line == (
        f"fetcher: reading {PREFIX}/{_folder_of(shelf, VIDEO).split('/', 1)[1]}/00.mp4"
        " from the store failed midway (ClientPayloadError)"
    )


@pytest.mark.parametrize("command", ["serve", "search"])
def test_a_bucket_without_the_s3_extra_is_one_line(command: str, tmp_path: Path) -> None:
    """Without aiobotocore installed, serve and search on a bucket say what to install."""
    code = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('aiobotocore', 'botocore'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from fetcher.cli import main\n"
        f"sys.exit(main([{command!r}, '--archive', 's3://some-bucket/arch']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fetcher: error: archiving into s3://some-bucket/arch needs aiobotocore:"
        " pip install 'fetcher[s3]'"
    ]
