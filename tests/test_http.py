"""HTTP as users meet it: hostile file hosts, framing, request headers, proxies, TLS, IPv6
and redirects, each through a whole fetch run.

The replica answers the queries; the task's ``FileUrl`` points at a server of the
test's own from :mod:`servers` (run on a loop in a background thread, since a fetch
run is synchronous), which says exactly what the test wants on the wire and records
what it received. Each test checks the run's summary, the archive, and what the
servers saw. TLS certificates come from a throwaway ``trustme`` CA made per test and
trusted through ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from conftest import add_image_task, archived_files, run, task_id, tweak
from servers import LoopThread, Proxy, Reply, Scripted, basic, chunked, moved, ok
from test_fetch import outcome_of

from fetcher.config import Settings, load_settings
from fetcher.errors import ConfigError
from fetcher.replica import QUERY_PREFIX, Replica, file_info, png, task_response
from fetcher.summary import Outcome, RunSummary

MiB = 1024 * 1024

# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    """A loop in a background thread for this test's own servers; stopped after the test."""
    with LoopThread() as loop:
        yield loop


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A throwaway CA that runs in this test trust through ``SSL_CERT_FILE``, and only it."""
    ca = trustme.CA()
    path = tmp_path / "trusted-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return ca


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for ``names``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def image(n: int) -> bytes:
    """A small real PNG, different for each ``n``."""
    return png(16, 16, seed=n)


def png_ok(data: bytes, *fields: str) -> bytes:
    """A 200 answer carrying ``data`` as a PNG, with a Content-Length."""
    return ok(data, "Content-Type: image/png", *fields)


def set_file_task(
    replica: Replica, tid: str, url: str, *, size: int | None = None, md5: str | None = None
) -> None:
    """A finished task whose one file is at ``url``."""
    replica.set_task(tid, task_response(tid, files=[file_info(url, size=size, md5=md5)]))


def companion(replica: Replica) -> tuple[str, bytes]:
    """A healthy task on the replica's file host, to run beside a hostile one."""
    tid = task_id(900)
    (data,) = add_image_task(replica, tid)
    return tid, data


def assert_archived(summary: RunSummary, archive: Path, tid: str, data: bytes) -> None:
    """``tid`` is archived with exactly ``data`` as its one file."""
    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.ARCHIVED, summary.to_json()
    folder = f"{got.folder}/"
    files = {
        p: b
        for p, b in archived_files(archive).items()
        if p.startswith(folder) and p != folder + "task.json"
    }
    assert list(files.values()) == [data], sorted(files)


def assert_failed(summary: RunSummary, archive: Path, tid: str, *needles: str) -> str:
    """``tid`` failed with every needle in its one-line reason; none of its files is visible."""
    got = outcome_of(summary, tid)
    assert got.outcome is Outcome.FAILED, summary.to_json()
    reason = str(got.reason)
    for needle in needles:
        assert needle in reason, reason
    assert "\n" not in reason
    assert not any(tid in p for p in archived_files(archive)), archived_files(archive)
    return reason


@contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so a connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def require_ipv6_loopback() -> None:
    """Fail (never skip) when ::1 cannot be bound: these tests are meant to run everywhere."""
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError as exc:
            pytest.fail(f"this machine has no IPv6 loopback (::1) to test on: {exc}")


# -- refusals that a retry cannot change ----------------------------------------------------

_PNG = image(1)
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            _HEAD + b"Content-Length: 10\r\nContent-Length: 20\r\n\r\n" + bytes(20),
            id="two-content-lengths",
        ),
        pytest.param(
            _HEAD
            + b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(200))
            + b"Content-Length: %d\r\n\r\n" % len(_PNG)
            + _PNG,
            id="200-header-lines",
        ),
        pytest.param(
            _HEAD
            + b"X-Big: "
            + b"a" * 100_000
            + b"\r\nContent-Length: %d\r\n\r\n" % len(_PNG)
            + _PNG,
            id="100-kB-header-line",
        ),
    ],
)
def test_malformed_answer_fails_the_file_without_a_retry(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread, answer: bytes
) -> None:
    """A head no retry can mend (two lengths, a header flood) fails its file after one request."""
    tid = task_id(1)
    other, other_data = companion(replica)
    attempts = settings.retries + 1
    with servers.serving(Scripted(*[Reply(answer, close=True)] * attempts)) as host:
        set_file_task(replica, tid, host.url("/x.png"))
        summary = run(settings, tid, other)

    assert_failed(summary, archive_dir, tid, "malformed")
    reason = str(outcome_of(summary, tid).reason)
    assert "b'" not in reason, reason  # aiohttp's quoted bytes stay out of the one line
    assert len(host.requests) == 1
    assert_archived(summary, archive_dir, other, other_data)


@pytest.mark.parametrize(
    ("size", "max_file_size", "needle", "retried"),
    [
        pytest.param(50_000, None, "MetaData.Size", True, id="past-metadata-size"),
        pytest.param(None, 100_000, "limit", False, id="past-max-file-size"),
    ],
)
def test_endless_body_is_cut_off_at_once(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    size: int | None,
    max_file_size: int | None,
    needle: str,
    retried: bool,
) -> None:
    """A body that never ends is dropped as soon as it passes the promised size or the limit;
    past MetaData.Size it is an integrity failure, tried again from scratch."""
    tid = task_id(2)
    other, other_data = companion(replica)
    if max_file_size is not None:
        settings = tweak(settings, max_file_size=max_file_size)
    # About 13 MB/s: a client that reads on passes 8 MiB well within the 2 s allowed.
    endless = Reply(_HEAD + b"Connection: close\r\n\r\n", endless=True, pace=0.005)
    started = time.monotonic()
    with servers.serving(Scripted(*[endless] * (settings.retries + 1))) as host:
        set_file_task(replica, tid, host.url("/x.png"), size=size)
        summary = run(settings, tid, other)
    elapsed = time.monotonic() - started

    assert_failed(summary, archive_dir, tid, needle)
    requests = len(host.requests)
    assert requests == (settings.retries + 1 if retried else 1)
    # Cut off at once on each attempt: no reading on.
    assert host.sent < 8 * MiB * requests
    assert elapsed < 2.0 * requests
    assert_archived(summary, archive_dir, other, other_data)


@pytest.mark.parametrize(
    "signed_by",
    [
        pytest.param("untrusted-ca", id="untrusted-ca"),
        pytest.param("wrong-host", id="certificate-for-another-host"),
    ],
)
def test_certificate_that_does_not_verify_fails_without_a_retry(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    trusted_ca: trustme.CA,
    signed_by: str,
) -> None:
    """An https host whose certificate fails verification is left after one connection."""
    tid = task_id(3)
    other, other_data = companion(replica)
    if signed_by == "untrusted-ca":
        tls = server_tls(trustme.CA(), *LOOPBACK_NAMES)
    else:
        tls = server_tls(trusted_ca, "wrong.example")
    with servers.serving(Scripted(*[png_ok(_PNG)] * (settings.retries + 1), tls=tls)) as host:
        set_file_task(replica, tid, host.url("/x.png"))
        summary = run(settings, tid, other)

    assert_failed(summary, archive_dir, tid, "certificate")
    assert host.connections == 1
    assert host.requests == []
    assert_archived(summary, archive_dir, other, other_data)


# -- retried: a body cut short --------------------------------------------------------------


def _cut(*fields: str) -> Reply:
    """Promises 1000 bytes, sends the first 10 of ``_LONG``, closes."""
    extra = "".join(f"{f}\r\n" for f in fields)
    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n{extra}\r\n"
    return Reply(head.encode() + _LONG[:10], close=True)


_LONG = hashlib.sha256(b"long").digest() * 31 + b"12345678"  # 1000 bytes
assert len(_LONG) == 1000


def test_body_cut_short_every_time_fails_after_every_attempt(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread
) -> None:
    """A host that always closes mid-body is asked ``retries + 1`` times, then the file fails."""
    tid = task_id(4)
    attempts = settings.retries + 1
    with servers.serving(Scripted(*[_cut()] * (attempts + 1))) as host:
        set_file_task(replica, tid, host.url("/x.png"))
        summary = run(settings, tid)

    assert_failed(summary, archive_dir, tid, f"after {attempts} attempts")
    assert len(host.requests) == attempts


@pytest.mark.parametrize(
    ("validator", "resumed"),
    [
        pytest.param('ETag: "v1"', True, id="strong-etag"),
        pytest.param('ETag: W/"v1"', False, id="weak-etag"),
        pytest.param(None, False, id="no-validator"),
    ],
)
def test_body_cut_short_once_is_completed_by_the_next_attempt(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    validator: str | None,
    resumed: bool,
) -> None:
    """After a cut, a strong ETag is resumed with Range + If-Range; otherwise the whole is asked."""
    tid = task_id(5)
    fields = [validator] if validator else []
    if resumed:
        rest = _LONG[10:]
        second = ok(
            rest,
            "Content-Type: image/png",
            "Content-Range: bytes 10-999/1000",
            *fields,
            status="HTTP/1.1 206 Partial Content",
        )
    else:
        second = png_ok(_LONG, *fields)
    with servers.serving(Scripted(_cut(*fields), second)) as host:
        set_file_task(replica, tid, host.url("/x.png"))
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _LONG)
    first, again = (r.headers for r in host.requests)
    assert "range" not in first
    if resumed:
        assert again.get("range") == "bytes=10-"
        assert again.get("if-range") == '"v1"'
    else:
        assert "range" not in again
        assert "if-range" not in again


# -- bodies without a Content-Length --------------------------------------------------------


def _without_length(framing: str, data: bytes) -> Reply:
    if framing == "chunked":
        return Reply(_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(data, 2000))
    return Reply(_HEAD + b"Connection: close\r\n\r\n" + data, close=True)


_BIG = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(600))  # 19,200 bytes


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
@pytest.mark.parametrize("promise", ["size", "md5"])
def test_body_without_a_length_is_archived_whole(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    framing: str,
    promise: str,
) -> None:
    """A close-delimited or chunked body matching MetaData.Size or Md5 is archived byte for byte."""
    tid = task_id(6)
    with servers.serving(Scripted(_without_length(framing, _BIG))) as host:
        if promise == "size":
            set_file_task(replica, tid, host.url("/x.png"), size=len(_BIG))
        else:
            set_file_task(replica, tid, host.url("/x.png"), md5=hashlib.md5(_BIG).hexdigest())
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _BIG)
    assert len(host.requests) == 1


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_body_without_a_length_short_of_metadata_size_is_not_archived(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread, framing: str
) -> None:
    """A body that ends cleanly but short of MetaData.Size fails the file, whatever its framing."""
    tid = task_id(7)
    short = [_without_length(framing, _BIG[:-1])] * (settings.retries + 1)
    with servers.serving(Scripted(*short)) as host:
        set_file_task(replica, tid, host.url("/x.png"), size=len(_BIG))
        summary = run(settings, tid)

    reason = assert_failed(summary, archive_dir, tid)
    assert "size" in reason.lower(), reason


# -- request headers ------------------------------------------------------------------------


def test_file_request_asks_for_identity_and_carries_no_key(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """A file is asked for uncompressed, by fetcher's User-Agent, without the API key."""
    tid = task_id(8)
    (data,) = add_image_task(replica, tid)

    summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, data)
    (seen,) = replica.seen("files")
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers.get("accept-encoding") == "identity"
    assert headers.get("user-agent", "").startswith("fetcher/")
    assert "authorization" not in headers
    assert all(replica.api_key not in value for value in headers.values())


def test_query_carries_the_key_and_accepts_compression(
    replica: Replica, settings: Settings
) -> None:
    """A query sends ``Authorization: Bearer <key>`` and accepts gzip and deflate answers."""
    tid = task_id(9)
    add_image_task(replica, tid)

    run(settings, tid)

    (seen,) = replica.seen("api")
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers.get("authorization") == f"Bearer {replica.api_key}"
    codings = {c.strip().lower() for c in headers.get("accept-encoding", "").split(",")}
    assert codings == {"gzip", "deflate"}
    assert headers.get("user-agent", "").startswith("fetcher/")


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        pytest.param("gzip", gzip.compress, id="gzip"),
        pytest.param("deflate", zlib.compress, id="deflate"),
    ],
)
def test_compressed_query_answer_is_decoded(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    coding: str,
    encode: Callable[[bytes], bytes],
) -> None:
    """A query answer sent with Content-Encoding gzip or deflate is decoded; the task archives."""
    tid = task_id(10)
    data = image(10)
    url = replica.add_file(f"{tid}/x.png", data)
    document = json.dumps(task_response(tid, files=[file_info(url)])).encode()
    answer = ok(encode(document), "Content-Type: application/json", f"Content-Encoding: {coding}")
    with servers.serving(Scripted(answer)) as api:
        summary = run(tweak(settings, base_url=api.origin), tid)

    assert_archived(summary, archive_dir, tid, data)
    (query,) = api.requests
    assert query.line == f"GET {QUERY_PREFIX}{tid} HTTP/1.1"
    assert query.headers.get("authorization") == f"Bearer {replica.api_key}"


# -- URLs on the wire -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        pytest.param(
            "/vod/a%2Fb/x.png?t=65f0&sign=ab%2Bcd%3D%3D",
            "/vod/a%2Fb/x.png?t=65f0&sign=ab%2Bcd%3D%3D",
            id="signed-url-kept-byte-for-byte",
        ),
        pytest.param("/dir with space/\u00fc.png", "/dir%20with%20space/%C3%BC.png", id="encoded"),
    ],
)
def test_file_url_reaches_the_host_as_written(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    path: str,
    target: str,
) -> None:
    """A FileUrl's escapes reach the host unchanged; spaces and non-ASCII go percent-encoded."""
    tid = task_id(11)
    with servers.serving(Scripted(png_ok(_PNG))) as host:
        set_file_task(replica, tid, host.url(path))
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    assert [r.line for r in host.requests] == [f"GET {target} HTTP/1.1"]


def test_file_host_on_ipv6_loopback_is_archived(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread
) -> None:
    """A FileUrl with an IPv6 literal host (``http://[::1]:port/``) is fetched over IPv6."""
    require_ipv6_loopback()
    tid = task_id(12)
    with servers.serving(Scripted(png_ok(_PNG), host="::1")) as host:
        set_file_task(replica, tid, f"http://[::1]:{host.port}/x.png")
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    (request,) = host.requests
    assert request.line == "GET /x.png HTTP/1.1"
    assert request.headers.get("host") == f"[::1]:{host.port}"


# -- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "url_host"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", id="ipv4"),
        pytest.param("127.0.0.1", "localhost", id="localhost"),
        pytest.param("::1", "[::1]", id="ipv6"),
    ],
)
def test_https_file_host_with_a_trusted_certificate_is_archived(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    trusted_ca: trustme.CA,
    listen: str,
    url_host: str,
) -> None:
    """An https host whose certificate chains to a CA in SSL_CERT_FILE is trusted and archived."""
    if listen == "::1":
        require_ipv6_loopback()
    tid = task_id(13)
    tls = server_tls(trusted_ca, *LOOPBACK_NAMES)
    with servers.serving(Scripted(png_ok(_PNG), tls=tls, host=listen)) as host:
        set_file_task(replica, tid, host.url("/x.png", host=url_host))
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    assert [r.line for r in host.requests] == ["GET /x.png HTTP/1.1"]


# -- redirects ------------------------------------------------------------------------------


def test_redirect_to_another_origin_is_followed_without_the_key(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread
) -> None:
    """A 302 to another loopback origin is followed; neither host sees the API key."""
    tid = task_id(14)
    with (
        servers.serving(Scripted(png_ok(_PNG))) as there,
        servers.serving(Scripted(moved(there.url("/moved.png")))) as here,
    ):
        set_file_task(replica, tid, here.url("/x.png"))
        summary = run(settings, tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    assert [r.line for r in here.requests] == ["GET /x.png HTTP/1.1"]
    (hop,) = there.requests
    assert hop.line == "GET /moved.png HTTP/1.1"
    assert hop.headers.get("host") == f"127.0.0.1:{there.port}"
    for request in here.requests + there.requests:
        assert "authorization" not in request.headers
        assert replica.api_key.encode() not in request.raw


@pytest.mark.parametrize("target", ["ftp", "api-origin"])
def test_redirect_off_http_or_to_the_api_is_refused(
    replica: Replica, settings: Settings, archive_dir: Path, servers: LoopThread, target: str
) -> None:
    """A redirect to ftp:// or to the API's own origin is not followed; the file fails."""
    tid = task_id(15)
    other, other_data = companion(replica)
    attempts = settings.retries + 1
    with servers.serving(Scripted(*[png_ok(_PNG)] * attempts)) as trap:
        if target == "ftp":
            location = f"ftp://127.0.0.1:{trap.port}/x.png"
        else:
            location = replica.api_url + QUERY_PREFIX + tid
        with servers.serving(Scripted(*[moved(location)] * attempts)) as here:
            set_file_task(replica, tid, here.url("/x.png"))
            summary = run(settings, tid, other)

    assert_failed(summary, archive_dir, tid)
    # Refused outright, not retried: one request, the file's own; the redirect not followed.
    assert "redirected to" in str(outcome_of(summary, tid).reason)
    assert len(here.requests) == 1
    assert {r.line for r in here.requests} == {"GET /x.png HTTP/1.1"}
    assert trap.connections == 0
    queries = sorted(r.path for r in replica.seen("api"))
    assert queries == sorted([QUERY_PREFIX + tid, QUERY_PREFIX + other])
    assert_archived(summary, archive_dir, other, other_data)


# -- proxies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("userinfo", "authorization"),
    [
        pytest.param("user:p%40ss@", basic("user", "p@ss"), id="with-credentials"),
        pytest.param("", None, id="without-credentials"),
    ],
)
def test_http_proxy_carries_queries_and_files_in_absolute_form(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    userinfo: str,
    authorization: str | None,
) -> None:
    """With an http proxy, the query and the file go through it as absolute-form GETs."""
    tid = task_id(16)
    (data,) = add_image_task(replica, tid)
    file_url = f"{replica.files_url}/{tid}/image_0.png"
    with servers.serving(Proxy()) as proxy:
        proxies = (("http", proxy.proxy_url(userinfo)),)
        summary = run(tweak(settings, proxies=proxies), tid)

    assert_archived(summary, archive_dir, tid, data)
    assert [r.line for r in proxy.requests] == [
        f"GET {replica.api_url}{QUERY_PREFIX}{tid} HTTP/1.1",
        f"GET {file_url} HTTP/1.1",
    ]
    for request in proxy.requests:
        assert request.headers.get("proxy-authorization") == authorization
    # The API's key goes only with the query, even on the proxy's connection.
    assert "authorization" not in proxy.requests[1].headers
    assert [r.path for r in replica.seen("api")] == [QUERY_PREFIX + tid]
    assert [r.path for r in replica.seen("files")] == [f"/{tid}/image_0.png"]


def test_https_file_goes_through_a_connect_tunnel(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    trusted_ca: trustme.CA,
) -> None:
    """An https file via the proxy: CONNECT with the proxy's credentials, then TLS inside."""
    tid = task_id(17)
    tls = server_tls(trusted_ca, *LOOPBACK_NAMES)
    with (
        servers.serving(Scripted(png_ok(_PNG), tls=tls)) as origin,
        servers.serving(Proxy()) as proxy,
    ):
        set_file_task(replica, tid, origin.url("/secret-path.png"))
        proxies = (("https", proxy.proxy_url("user:p%40ss@")),)
        summary = run(tweak(settings, proxies=proxies), tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    authority = f"127.0.0.1:{origin.port}"
    (connect,) = proxy.requests
    assert connect.line == f"CONNECT {authority} HTTP/1.1"
    assert connect.headers.get("proxy-authorization") == basic("user", "p@ss")
    (request,) = origin.requests
    assert request.line == "GET /secret-path.png HTTP/1.1"
    assert "proxy-authorization" not in request.headers
    assert proxy.tunneled  # the handshake and the request went through the tunnel...
    assert b"secret-path" not in proxy.tunneled  # ...encrypted
    assert b"p@ss" not in proxy.tunneled
    # The http query is not an https URL: it went straight to the API.
    assert len(replica.seen("api")) == 1


@pytest.mark.parametrize(
    ("userinfo", "authorization"),
    [
        pytest.param("user:p%40ss@", basic("user", "p@ss"), id="with-credentials"),
        pytest.param("", None, id="without-credentials"),
    ],
)
def test_api_key_stays_inside_the_tunnel_to_an_https_api(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    trusted_ca: trustme.CA,
    userinfo: str,
    authorization: str | None,
) -> None:
    """Querying an https API via a proxy, the key goes only inside TLS, never in the CONNECT."""
    tid = task_id(23)
    data = image(23)
    url = replica.add_file(f"{tid}/x.png", data)
    document = json.dumps(task_response(tid, files=[file_info(url)])).encode()
    tls = server_tls(trusted_ca, *LOOPBACK_NAMES)
    with (
        servers.serving(Scripted(ok(document, "Content-Type: application/json"), tls=tls)) as api,
        servers.serving(Proxy()) as proxy,
    ):
        proxies = (("https", proxy.proxy_url(userinfo)),)
        summary = run(tweak(settings, base_url=api.origin, proxies=proxies), tid)

    assert_archived(summary, archive_dir, tid, data)
    (connect,) = proxy.requests
    assert connect.line == f"CONNECT 127.0.0.1:{api.port} HTTP/1.1"
    assert connect.headers.get("proxy-authorization") == authorization
    assert "authorization" not in connect.headers
    assert replica.api_key.encode() not in connect.raw
    (query,) = api.requests
    assert query.headers.get("authorization") == f"Bearer {replica.api_key}"
    assert "proxy-authorization" not in query.headers


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", True, id="exact-ip"),
        pytest.param("localhost", "localhost", True, id="exact-name"),
        pytest.param("localhost", "LOCALHOST", True, id="exact-other-case"),
        pytest.param("localhost", ".localhost", True, id="dot-domain"),
        pytest.param("localhost", "*", True, id="star"),
        pytest.param("127.0.0.1", "other.example, 127.0.0.1", True, id="in-a-list"),
        pytest.param("127.0.0.1", "127.0.0.1:{port}", True, id="host-and-port"),
        pytest.param("127.0.0.1", "127.0.0.1:1", False, id="other-port"),
        pytest.param("localhost", "host", False, id="not-a-label-suffix"),
        pytest.param("localhost", "other.example", False, id="other-host"),
    ],
)
def test_no_proxy_hosts_are_fetched_directly(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    host: str,
    no_proxy: str,
    bypassed: bool,
) -> None:
    """A file host covered by the ``no`` proxy setting is fetched directly; others via the proxy."""
    tid = task_id(18)
    with servers.serving(Scripted(png_ok(_PNG))) as origin, servers.serving(Proxy()) as proxy:
        set_file_task(replica, tid, origin.url("/x.png", host=host))
        proxies = (("http", proxy.proxy_url()), ("no", no_proxy.format(port=origin.port)))
        summary = run(tweak(settings, proxies=proxies), tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    via_proxy = [r.line for r in proxy.requests if f":{origin.port}/" in r.line]
    assert via_proxy == ([] if bypassed else [f"GET http://{host}:{origin.port}/x.png HTTP/1.1"])
    assert [r.line for r in origin.requests] == ["GET /x.png HTTP/1.1"]


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        pytest.param("cdn.example.invalid", ".example.invalid", True, id="dot-domain-subdomain"),
        pytest.param("cdn.example.invalid", "example.invalid", True, id="domain-subdomain"),
        pytest.param("a.b.example.invalid", "example.invalid", True, id="deeper-subdomain"),
        pytest.param("badexample.invalid", "example.invalid", False, id="not-a-label-suffix"),
        pytest.param("example.invalid.evil", "example.invalid", False, id="prefix-only"),
    ],
)
def test_no_proxy_domain_covers_its_subdomains(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    host: str,
    no_proxy: str,
    bypassed: bool,
) -> None:
    """A ``no`` domain covers the names under it, on label boundaries only."""
    tid = task_id(19)
    url = f"http://{host}/x.png"
    set_file_task(replica, tid, url)
    # Names that never resolve: only the proxy can fetch them, so a bypass fails the file.
    with servers.serving(Proxy(answer=png_ok(_PNG))) as proxy:
        proxies = (("http", proxy.proxy_url()), ("no", f"127.0.0.1,{no_proxy}"))
        summary = run(tweak(settings, proxies=proxies, retries=0), tid)

    assert [r.line for r in proxy.requests] == ([] if bypassed else [f"GET {url} HTTP/1.1"])
    assert outcome_of(summary, tid).outcome is (Outcome.FAILED if bypassed else Outcome.ARCHIVED)


@pytest.mark.parametrize(
    ("url", "line", "host_field"),
    [
        pytest.param(
            "http://b\u00fccher.example:80/x.png",
            "GET http://xn--bcher-kva.example/x.png HTTP/1.1",
            "xn--bcher-kva.example",
            id="idna-default-port",
        ),
        pytest.param(
            "http://Files.Example:8080/x.png",
            "GET http://files.example:8080/x.png HTTP/1.1",
            "files.example:8080",
            id="port-kept",
        ),
        pytest.param(
            "http://[::1]:1/x.png", "GET http://[::1]:1/x.png HTTP/1.1", "[::1]:1", id="ipv6"
        ),
    ],
)
def test_proxied_request_names_the_host_as_the_wire_wants(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    url: str,
    line: str,
    host_field: str,
) -> None:
    """Via a proxy, the request line and Host carry IDNA as punycode, IPv6 brackets, no :80."""
    tid = task_id(20)
    set_file_task(replica, tid, url)
    with servers.serving(Proxy(answer=png_ok(_PNG))) as proxy:
        proxies = (("http", proxy.proxy_url()), ("no", "127.0.0.1"))
        summary = run(tweak(settings, proxies=proxies), tid)

    assert_archived(summary, archive_dir, tid, _PNG)
    (request,) = proxy.requests
    assert request.line == line
    assert request.headers.get("host") == host_field


_407 = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_proxy_refusing_the_tunnel_fails_the_file_without_its_password(
    replica: Replica,
    settings: Settings,
    archive_dir: Path,
    servers: LoopThread,
    trusted_ca: trustme.CA,
) -> None:
    """A 407 to CONNECT fails the file with a reason naming it; the password shows nowhere."""
    tid = task_id(21)
    other, other_data = companion(replica)
    tls = server_tls(trusted_ca, *LOOPBACK_NAMES)
    with (
        servers.serving(Scripted(png_ok(_PNG), tls=tls)) as origin,
        servers.serving(Proxy(answer=_407)) as proxy,
    ):
        set_file_task(replica, tid, origin.url("/x.png"))
        proxies = (("https", proxy.proxy_url("bob:hunter2@")),)
        summary = run(tweak(settings, proxies=proxies), tid, other)

    reason = assert_failed(summary, archive_dir, tid, "407")
    assert "hunter2" not in reason
    assert "hunter2" not in json.dumps(summary.to_json())
    assert proxy.requests[0].line == f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1"
    assert origin.connections == 0
    assert_archived(summary, archive_dir, other, other_data)


def test_unreachable_proxy_is_named_without_its_password(
    replica: Replica, settings: Settings, archive_dir: Path
) -> None:
    """When the proxy cannot be reached the reason names the proxy, never its password."""
    tid = task_id(22)
    set_file_task(replica, tid, "http://files.example.invalid/x.png")
    with dead_port() as port:
        proxies = (("http", f"http://bob:hunter2@127.0.0.1:{port}"), ("no", "127.0.0.1"))
        summary = run(tweak(settings, proxies=proxies, retries=0), tid)

    reason = assert_failed(summary, archive_dir, tid, f"127.0.0.1:{port}")
    assert "hunter2" not in reason
    assert "hunter2" not in json.dumps(summary.to_json())


# -- proxy settings from the environment ----------------------------------------------------


@pytest.fixture
def empty_config(tmp_path: Path) -> dict[str, str]:
    """An environment whose config file is empty, so no user setting leaks in."""
    path = tmp_path / "config.toml"
    path.write_text("")
    return {"FETCHER_CONFIG": str(path)}


@pytest.mark.parametrize(
    ("env", "proxies"),
    [
        pytest.param(
            {"HTTPS_PROXY": "host:3128"}, (("https", "http://host:3128"),), id="no-scheme"
        ),
        pytest.param(
            {"http_proxy": "http://a:1", "HTTP_PROXY": "http://b:2"},
            (("http", "http://a:1"),),
            id="lower-case-first",
        ),
        pytest.param(
            {"ALL_PROXY": "p:8080", "NO_PROXY": "localhost,.corp"},
            (("all", "http://p:8080"), ("no", "localhost,.corp")),
            id="all-and-no",
        ),
        pytest.param({"HTTP_PROXY": "  "}, (), id="blank"),
    ],
)
def test_proxy_settings_come_from_the_environment(
    empty_config: dict[str, str], env: dict[str, str], proxies: tuple[tuple[str, str], ...]
) -> None:
    """load_settings reads curl's proxy variables; a proxy without a scheme is http://."""
    assert load_settings({}, {**empty_config, **env}).settings.proxies == proxies


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"HTTPS_PROXY": "https://bob:hunter2@proxy:3128"},
            "HTTPS_PROXY: only http:// proxies are supported",
            id="https-proxy",
        ),
        pytest.param(
            {"all_proxy": "socks5://bob:hunter2@proxy:1080"},
            "all_proxy: only http:// proxies are supported",
            id="socks",
        ),
        pytest.param(
            {"HTTP_PROXY": "http://bob:hunter2@proxy:99999"},
            "HTTP_PROXY is not a usable proxy URL",
            id="bad-port",
        ),
        pytest.param(
            {"HTTP_PROXY": "http://bob:hunter2@proxy:0"},
            "HTTP_PROXY is not a usable proxy URL",
            id="port-zero",
        ),
        pytest.param(
            {"http_proxy": "http://bob:hunter2@pro<xy:3128"},
            "http_proxy is not a usable proxy URL",
            id="bad-host",
        ),
    ],
)
def test_unusable_proxy_is_a_one_line_config_error(
    empty_config: dict[str, str], env: dict[str, str], message: str
) -> None:
    """An unusable proxy is a one-line ConfigError naming the variable, never the password."""
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {**empty_config, **env})
    assert str(caught.value) == message
    assert "hunter2" not in str(caught.value)


def test_proxy_password_with_a_hash_is_not_echoed(empty_config: dict[str, str]) -> None:
    """A password with an unescaped '#' does not appear in the ConfigError it causes."""
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {**empty_config, "HTTP_PROXY": "http://bob:hunter2#x@proxy:3128"})
    assert "hunter2" not in str(caught.value)


def test_proxy_password_is_not_in_the_settings_repr(empty_config: dict[str, str]) -> None:
    """repr() of the settings (and of what load_settings returns) never shows a proxy password."""
    loaded = load_settings({}, {**empty_config, "HTTP_PROXY": "http://bob:hunter2@proxy:3128"})
    assert loaded.settings.proxies == (("http", "http://bob:hunter2@proxy:3128"),)
    assert "hunter2" not in repr(loaded.settings)
    assert "hunter2" not in repr(loaded)
