"""``fetcher serve`` over real HTTP: the grid, the cards API, task pages, files, thumbnails,
and every hostile request the gallery must refuse, on an archive the replica filled."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from html import escape
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import ROOT
from gallery_world import (
    FAILED,
    HOSTILE,
    PENDING,
    VIDEO,
    build_archive,
    dated,
    hostile_id,
    image_id,
    newest_first,
    running,
)

from fetcher.errors import UsageError
from fetcher.gallery import GalleryOptions
from fetcher.replica import sample_video

TOKEN = "a-serve-token-of-some-length"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(tmp_path_factory.mktemp("gallery") / "archive")


@pytest.fixture(scope="module")
def url(archive: Path) -> Iterator[str]:
    with running(GalleryOptions(archive, port=0)) as address:
        yield address


def get(
    base: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET of ``target`` exactly as written (no client-side normalising)."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        skip_host = "Host" in (headers or {})
        connection.putrequest("GET", target, skip_host=skip_host, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


def page(base: str, target: str) -> str:
    status, _, body = get(base, target)
    assert status == 200, body
    return body.decode()


def cards(base: str, query: str = "") -> list[str]:
    """Every task ID ``/api/cards`` lists, following its cursor to the end."""
    ids: list[str] = []
    after = ""
    for _ in range(50):
        status, _, body = get(base, f"/api/cards?limit=3{query}{after}")
        assert status == 200, body
        document = json.loads(body)
        ids += [card["task_id"] for card in document["cards"]]
        if document["next"] is None:
            return ids
        after = f"&after={document['next']}"
    raise AssertionError("the cursor never ended")


def test_grid_shows_tasks_newest_first(url: str) -> None:
    """The grid's tiles are every task of the archive, newest first, with thumbnails."""
    html = page(url, "/")
    shown = re.findall(r'data-task="([^"]+)"', html.split('id="grid"', 1)[1])
    assert dated(shown) == newest_first()
    assert f'src="/thumb/{image_id(0)}/0"' in html
    assert f'src="/file/{VIDEO}/0#t=0.1" preload="metadata"' in html


def test_cards_page_through_with_a_keyset_cursor(url: str) -> None:
    """Three at a time, the cursor walks every task exactly once, newest first."""
    assert dated(cards(url)) == newest_first()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("&type=AigcVideoTask", [VIDEO], id="type"),
        pytest.param("&state=pending", [PENDING], id="pending"),
        pytest.param("&state=failed", [FAILED], id="failed"),
        pytest.param("&model=Kling", [VIDEO], id="model"),
        pytest.param("&since=2026-11-02&until=2026-11-03", [image_id(2), image_id(1)], id="dates"),
    ],
)
def test_filters_narrow_the_cards(url: str, query: str, expected: list[str]) -> None:
    """Task type, state, model and dates each narrow the list."""
    assert cards(url, query) == expected


def test_search_finds_a_prompt(url: str) -> None:
    """The search box's words find the tasks whose prompt holds them."""
    found = cards(url, "&q=lighthouse")
    assert found == [image_id(1)]
    html = page(url, "/?q=lighthouse")
    assert re.findall(r'<a href="/task/([^"?]+)', html) == [image_id(1)]


def test_a_script_in_a_prompt_is_shown_as_text(url: str) -> None:
    """A prompt holding <script> reaches the page escaped, never as markup."""
    for html in (page(url, "/"), page(url, f"/task/{hostile_id()}")):
        assert "<script>document" not in html
        assert "<b>bold</b>" not in html
        assert escape(HOSTILE) in html
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/gallery.js" defer>']
    document = json.loads(get(url, "/api/cards?q=pwned")[2])
    assert [card["prompt"] for card in document["cards"]] == [HOSTILE]


def test_task_page_shows_files_prompt_and_sidecar(url: str, archive: Path) -> None:
    """A task's page: its files with size and sha256, prompt, negative prompt, model, sidecar."""
    html = page(url, f"/task/{image_id(2)}")
    (sidecar_path,) = archive.rglob(f"{image_id(2)}/task.json")
    sidecar = json.loads(sidecar_path.read_text())
    for entry in sidecar["files"]:
        assert entry["sha256"] in html
        assert f"({entry['size']} bytes)" in html
    assert html.count(f'<img src="/file/{image_id(2)}/') == 2
    for text in ("three studies of a red fox in snow", "blur, distorted", "GEM 2.5"):
        assert escape(text) in html
    assert escape('"task_id": "' + image_id(2) + '"') in html
    status, headers, raw = get(url, f"/sidecar/{image_id(2)}")
    assert status == 200 and json.loads(raw) == sidecar
    assert headers["Content-Type"].startswith("application/json")


def _arrows(html: str) -> tuple[str | None, str | None]:
    """Where a task page's Previous and Next lead (None: hidden)."""
    found = []
    for side in ("prev", "next"):
        match = re.search(rf'<a id="{side}" href="([^"]*)"( hidden)?', html)
        assert match is not None
        found.append(None if match.group(2) else match.group(1).replace("&amp;", "&"))
    return found[0], found[1]


@pytest.mark.parametrize(
    "filters",
    [pytest.param("", id="all"), pytest.param("model=GEM", id="filtered")],
)
def test_a_task_page_opened_directly_has_its_neighbours(url: str, filters: str) -> None:
    """Opened from a link, not the grid, a task page still links the newer and older task
    of the grid's order, within the same filters; the ends have no arrow past them."""
    order = cards(url, f"&{filters}" if filters else "")
    suffix = f"?{filters}" if filters else ""
    for at, task_id in enumerate(order):
        prev, following = _arrows(page(url, f"/task/{task_id}{suffix}"))
        assert prev == (f"/task/{order[at - 1]}{suffix}" if at > 0 else None)
        assert following == (f"/task/{order[at + 1]}{suffix}" if at + 1 < len(order) else None)


def test_failed_task_page_gives_the_reason(url: str) -> None:
    """A failed task's page says why it failed."""
    html = page(url, f"/task/{FAILED}")
    assert "ContentModerationFailed" in html
    assert page(url, f"/task/{PENDING}").count("pending") >= 1


def test_video_is_served_in_ranges(url: str) -> None:
    """A video plays from the task page: preload=metadata, and Range requests get 206."""
    html = page(url, f"/task/{VIDEO}")
    assert f'<video src="/file/{VIDEO}/0" controls preload="metadata"' in html
    whole = sample_video()
    status, headers, body = get(url, f"/file/{VIDEO}/0", {"Range": "bytes=100-199"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
    assert body == whole[100:200]
    assert headers["Content-Type"] == "video/mp4"
    status, _, body = get(url, f"/file/{VIDEO}/0")
    assert status == 200 and body == whole


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("state.sqlite")
    }


def test_thumbnails_are_made_once_and_are_the_only_write(tmp_path: Path) -> None:
    """The first view writes a WebP into .fetcher/thumbs/; the next is served from there;
    nothing else in the archive changes, the state database included."""
    archive = build_archive(tmp_path / "archive")
    before = _tree(archive)
    state = archive / ".fetcher" / "state.sqlite"
    state_before = state.read_bytes()
    with running(GalleryOptions(archive, port=0)) as base:
        for target in ("/", f"/task/{image_id(3)}", "/api/cards", f"/file/{VIDEO}/0"):
            assert get(base, target)[0] == 200
        status, headers, first = get(base, f"/thumb/{image_id(3)}/0")
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert first[:4] == b"RIFF" and first[8:12] == b"WEBP"
        kept = list((archive / ".fetcher" / "thumbs").rglob("*.webp"))
        assert len(kept) == 1 and kept[0].read_bytes() == first
        stamp = kept[0].stat().st_mtime_ns
        assert get(base, f"/thumb/{image_id(3)}/0")[2] == first
        assert kept[0].stat().st_mtime_ns == stamp
    after = _tree(archive)
    new = {path for path in after if path not in before}
    assert new == {str(kept[0].relative_to(archive))}
    assert {p: h for p, h in after.items() if p in before} == before
    assert state.read_bytes() == state_before


HOSTILE_TARGETS = [
    pytest.param("/../.fetcher/state.sqlite", 400, id="dotdot"),
    pytest.param("/static/../../.fetcher/state.sqlite", 400, id="dotdot-static"),
    pytest.param(f"/file/{VIDEO}/..%2f..%2f.fetcher%2fstate.sqlite", 400, id="encoded-slash"),
    pytest.param(f"/file/{VIDEO}%2F0", 400, id="encoded-slash-upper"),
    pytest.param("/static/%2e%2e/guard.py", 400, id="encoded-dots"),
    pytest.param("/static/..\\guard.py", 400, id="backslash"),
    pytest.param("/.fetcher/state.sqlite", 404, id="state"),
    pytest.param("/.fetcher/lock", 404, id="lock"),
    pytest.param("/static/guard.py", 404, id="source"),
    pytest.param(f"/file/{VIDEO}/1", 404, id="no-such-file"),
    pytest.param(f"/file/{VIDEO}/99999999999999", 404, id="huge-index"),
    pytest.param("/task/not-a-task", 404, id="no-such-task"),
    pytest.param("/api/cards?after=not-a-cursor", 400, id="bad-cursor"),
    pytest.param("/?after=eyJ4IjogMX0", 400, id="forged-cursor"),
    pytest.param("/api/cards?limit=99999999999999999999999", 400, id="huge-limit"),
    pytest.param("/api/cards?limit=-1", 400, id="negative-limit"),
    pytest.param("/?since=yesterday", 400, id="bad-date"),
    pytest.param("/?state=deleted", 400, id="bad-state"),
]


@pytest.mark.parametrize(("target", "status"), HOSTILE_TARGETS)
def test_hostile_requests_are_refused(url: str, target: str, status: int) -> None:
    """`..`, encoded slashes, hidden folders, bad cursors and huge numbers: 400 or 404, never
    a 500 and never a byte of the state; the refusal carries the security headers too."""
    got, headers, body = get(url, target)
    assert got == status, body
    assert b"SQLite format" not in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in headers["Content-Security-Policy"]


def test_pages_carry_a_strict_policy(url: str) -> None:
    """Pages allow only their own script, style and media; files are sandboxed."""
    _, headers, _ = get(url, "/")
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy
    assert "default-src 'none'" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    _, headers, _ = get(url, f"/file/{image_id(0)}/0")
    assert "sandbox" in headers["Content-Security-Policy"]
    _, headers, body = get(url, "/static/gallery.js")
    assert headers["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in body


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param("outside", id="link-out"),
        pytest.param("state", id="link-to-state"),
        pytest.param("folder", id="folder-link"),
    ],
)
def test_symlinks_planted_in_the_archive_are_refused(tmp_path: Path, planted: str) -> None:
    """An archived file (or its folder) swapped for a link is not served, wherever it points."""
    archive = build_archive(tmp_path / "archive")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the gallery")
    (picture,) = archive.rglob(f"{image_id(0)}/00.png")
    if planted == "folder":
        folder = picture.parent
        moved = folder.with_name("moved")
        folder.rename(moved)
        folder.symlink_to(moved)
    else:
        picture.unlink()
        picture.symlink_to(secret if planted == "outside" else archive / ".fetcher/state.sqlite")
    with running(GalleryOptions(archive, port=0)) as base:
        for target in (f"/file/{image_id(0)}/0", f"/thumb/{image_id(0)}/0"):
            status, _, body = get(base, target)
            assert status == 404
            assert b"not for the gallery" not in body and b"SQLite" not in body
        assert get(base, f"/file/{image_id(1)}/0")[0] == 200


@pytest.mark.parametrize("encoding", ["br", "gzip"])
def test_a_compressed_sibling_planted_beside_a_file_is_never_served(
    tmp_path: Path, encoding: str
) -> None:
    """`00.png.br` or `00.png.gz` planted beside an archived file: a browser that accepts
    that encoding still gets the archived bytes, with no Content-Encoding."""
    archive = build_archive(tmp_path / "archive")
    (picture,) = archive.rglob(f"{image_id(0)}/00.png")
    (sidecar,) = archive.rglob(f"{image_id(0)}/task.json")
    suffix = ".br" if encoding == "br" else ".gz"
    for target in (picture, sidecar):
        target.with_name(target.name + suffix).write_bytes(b"planted, not archived")
    with running(GalleryOptions(archive, port=0)) as base:
        for target, original in (
            (f"/file/{image_id(0)}/0", picture),
            (f"/sidecar/{image_id(0)}", sidecar),
        ):
            status, headers, body = get(base, target, {"Accept-Encoding": encoding})
            assert status == 200
            assert body == original.read_bytes()
            assert "Content-Encoding" not in headers


def test_a_token_guards_every_request(archive: Path) -> None:
    """With a token: 401 without it, a bearer header or the cookie that ?token= sets."""
    with running(GalleryOptions(archive, port=0, token=TOKEN)) as base:
        for target in ("/", "/api/cards", f"/file/{VIDEO}/0", "/static/gallery.js"):
            assert get(base, target)[0] == 401
        assert get(base, "/", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert get(base, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert get(base, "/?token=wrong")[0] == 401
        status, headers, _ = get(base, f"/?q=pig&token={TOKEN}")
        assert status == 303 and headers["Location"] == "/?q=pig"
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert get(base, "/?q=pig", {"Cookie": cookie})[0] == 200
        assert get(base, "/", {"Host": "evil.example"})[0] == 401
        status, headers, _ = get(base, f"/task/%0d%0aSet-Cookie:x=1?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/task/%0d%0aSet-Cookie:x=1"


def test_loopback_without_token_answers_loopback_names_only(url: str) -> None:
    """A page elsewhere that points a DNS name at 127.0.0.1 gets 421, not the gallery."""
    port = urlsplit(url).port
    assert get(url, "/", {"Host": f"evil.example:{port}"})[0] == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert get(url, "/", {"Host": host})[0] == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"host": "0.0.0.0"}, "--token", id="off-loopback-no-token"),
        pytest.param({"token": "short"}, "16 characters", id="short-token"),
        pytest.param({"port": 70000}, "65535", id="port"),
    ],
)
def test_bad_options_are_usage_errors(
    archive: Path, options: dict[str, object], message: str
) -> None:
    """Off loopback without a token, a short token, a port out of range: refused up front."""
    with pytest.raises(UsageError, match=message):
        GalleryOptions(archive, **options)  # type: ignore[arg-type]


# -- the command ------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
    return env


def _serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``fetcher serve ARGS`` to its end (the cases that never get to listen)."""
    return subprocess.run(
        [sys.executable, "-m", "fetcher", "serve", *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=30,
        check=False,
    )


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    match = re.search(r"http://\S+", first)
    assert match, first + (process.stderr.read() if process.stderr else "")
    return process, match.group(0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_prints_its_address_and_stops_on_a_signal(
    archive: Path, tmp_path: Path, signum: int
) -> None:
    """`fetcher serve --port 0` prints where it listens, serves, and exits 0 on a signal."""
    process, address = _start(["--archive", str(archive), "--port", "0"], _env(tmp_path))
    try:
        assert get(address, "/")[0] == 200
    finally:
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_serve_reports_a_port_in_use(archive: Path, tmp_path: Path) -> None:
    """A port another program holds: one line naming it, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fetcher",
                "serve",
                "--archive",
                str(archive),
                "--port",
                f"{port}",
            ],
            capture_output=True,
            text=True,
            env=_env(tmp_path),
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fetcher: error: cannot listen on 127.0.0.1:{port}: the port is in use"
        " (try another --port)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--host", "0.0.0.0"], "give --token", id="no-token"),
        pytest.param(
            ["--host", "no-such-host.invalid", "--token", TOKEN], "unknown host", id="bad-host"
        ),
        pytest.param(["--host", "192.0.2.1", "--token", TOKEN], "no such address", id="not-ours"),
        pytest.param(["--port", "http"], "--port", id="bad-port"),
    ],
)
def test_serve_refuses_bad_places_in_one_line(
    archive: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """A non-loopback host without a token, a host that does not resolve or is not this
    machine's, a port that is not a number: one line, exit 2."""
    result = _serve(["--archive", str(archive), "--port", "0", *args], tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_serve_needs_an_archive(tmp_path: Path) -> None:
    """A folder with no archive in it: one line, exit 2."""
    result = _serve(["--archive", str(tmp_path), "--port", "0"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fetcher: error: no fetcher archive at {str(tmp_path)!r}"


def test_serve_token_from_the_environment_and_open(archive: Path, tmp_path: Path) -> None:
    """FETCHER_SERVE_TOKEN guards it; --open hands the browser the address with the token,
    and the token itself is never printed."""
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    browser.chmod(0o755)
    env = {**_env(tmp_path), "FETCHER_SERVE_TOKEN": TOKEN, "BROWSER": str(browser)}
    process, address = _start(["--archive", str(archive), "--port", "0", "--open"], env)
    try:
        assert get(address, "/")[0] == 401
        assert get(address, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        deadline = time.monotonic() + 10
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened.read_text() == f"{address}?token={TOKEN}"
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert TOKEN not in out + err
    assert process.returncode == 0


def test_serve_token_from_a_file(archive: Path, tmp_path: Path) -> None:
    """--token-file reads the token from a file's first line: it guards every request, and
    is in neither the process's arguments nor its output."""
    secret = tmp_path / "token"
    secret.write_text(f"{TOKEN}\n")
    secret.chmod(0o600)
    args = ["--archive", str(archive), "--port", "0", "--token-file", str(secret)]
    process, address = _start(args, _env(tmp_path))
    try:
        assert get(address, "/")[0] == 401
        assert get(address, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert TOKEN not in str(process.args)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert TOKEN not in out + err


@pytest.mark.parametrize(
    ("content", "mode", "extra", "message"),
    [
        pytest.param(None, 0o600, [], "cannot read token file", id="missing"),
        pytest.param("\n", 0o600, [], "is empty (the token goes on its first line)", id="empty"),
        pytest.param(TOKEN, 0o666, [], "writable by other users", id="others-write"),
        pytest.param("short\n", 0o600, [], "16 characters", id="short"),
        pytest.param(TOKEN, 0o600, ["--token", TOKEN], "not allowed with", id="both"),
    ],
)
def test_serve_refuses_a_bad_token_file_in_one_line(
    archive: Path, tmp_path: Path, content: str | None, mode: int, extra: list[str], message: str
) -> None:
    """A token file that is missing, empty, writable by others or too short, or given with
    --token: one line, exit 2, and the token never printed."""
    secret = tmp_path / "token"
    if content is not None:
        secret.write_text(content)
        secret.chmod(mode)
    args = ["--archive", str(archive), "--port", "0", "--token-file", str(secret), *extra]
    result = _serve(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_help_does_not_load_the_gallery() -> None:
    """`fetcher --help` stays light: neither aiohttp's server nor Pillow is imported."""
    code = (
        "import sys, contextlib, io\n"
        "from fetcher.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('PIL', 'fetcher.gallery'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


def test_a_read_only_archive_is_served_and_left_alone(
    read_only_copy: tuple[Path, Path],
) -> None:
    """On a read-only mount the gallery serves pages, files and thumbnails (made again for
    each view, as they cannot be kept) and writes nothing, not even SQLite's -shm file."""
    archive, mount = read_only_copy
    build_archive(archive)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in archive.rglob("*") if p.is_file()}
    with running(GalleryOptions(mount, port=0)) as base:
        for target in ("/", f"/task/{image_id(4)}", f"/file/{VIDEO}/0", "/api/cards?q=pig"):
            assert get(base, target)[0] == 200
        status, _, body = get(base, f"/thumb/{image_id(4)}/0")
        assert status == 200 and body[8:12] == b"WEBP"
        assert get(base, f"/thumb/{image_id(4)}/0")[2] == body
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in archive.rglob("*") if p.is_file()}
    assert after == before
