"""A replica of the gateway's query API and of the file host, on loopback, with faults on demand.

``fetcher demo`` runs against it, and so does the test suite: real HTTP over real
sockets, two servers on two ports (two origins, as in production), answering
the way the real services do, quirks included (an unknown task is HTTP 200 with
a Tencent ``Response.Error``; a failed task says ``FINISH``). Faults are queued
per task or per file and served once each, before the normal answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any, ClassVar, Self

QUERY_PREFIX = "/tencent-vod/v1/query/"
DEFAULT_KEY = "replica-secret-key"
#: An ``endless`` fault stops here even if the client never hangs up.
ENDLESS_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fault:
    """One answer served instead of the normal one.

    ``status``/``headers``/``body`` replace the answer when ``status`` is set;
    ``drop_after`` sends the headers and that many body bytes, then closes the
    connection (the fault's own body when ``status`` is set, else the real
    answer); ``delay`` waits before answering (a slow server); ``stall`` waits
    after what was sent and before closing (a body that stops arriving);
    ``hang_up`` closes the connection without any answer; ``endless`` sends the
    headers without a Content-Length and then filler bytes until the client
    hangs up (a body that keeps going, at most ``ENDLESS_LIMIT`` bytes).
    """

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    drop_after: int | None = None
    delay: float = 0.0
    stall: float = 0.0
    hang_up: bool = False
    endless: bool = False


@dataclass(frozen=True, slots=True)
class Seen:
    """A request the replica received."""

    server: str
    method: str
    path: str
    headers: Mapping[str, str]
    #: ``time.monotonic()`` when the request arrived: how long a client waited between tries.
    at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _File:
    data: bytes
    content_type: str
    etag: str


class Replica:
    """Both servers; ``with Replica() as r:`` starts them on free loopback ports."""

    def __init__(self, api_key: str = DEFAULT_KEY) -> None:
        self.api_key = api_key
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self._tasks: dict[str, list[Any]] = {}
        self._files: dict[str, _File] = {}
        self._faults: dict[tuple[str, str], list[Fault]] = {}
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.api_url = ""
        self.files_url = ""

    # -- lifetime -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        for name in ("api", "files"):
            handler = type(f"{name}_handler", (_Handler,), {"replica": self, "server_name": name})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name=f"replica-{name}", daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.api_url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.files_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()

    # -- content ------------------------------------------------------------------------

    def add_file(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve ``data`` at ``/name`` on the file host; returns its URL."""
        path = "/" + name.lstrip("/")
        with self.lock:
            self._files[path] = _File(data, content_type, '"' + hashlib.md5(data).hexdigest() + '"')  # noqa: S324
        return self.files_url + path

    def remove_file(self, name: str) -> None:
        with self.lock:
            self._files.pop("/" + name.lstrip("/"), None)

    def set_task(self, task_id: str, *answers: Mapping[str, Any] | bytes) -> None:
        """Answers to successive queries; the last one repeats (pending, then finished)."""
        with self.lock:
            self._tasks[task_id] = list(answers)

    def fault(self, server: str, key: str, *faults: Fault) -> None:
        """Queue faults for a task ID (``server="api"``) or a file name (``"files"``)."""
        path = key if server == "api" else "/" + key.lstrip("/")
        with self.lock:
            self._faults.setdefault((server, path), []).extend(faults)

    def seen(self, server: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.server == server]

    # -- serving (called from the handler threads) --------------------------------------

    def _next_fault(self, server: str, key: str) -> Fault | None:
        with self.lock:
            queue = self._faults.get((server, key))
            return queue.pop(0) if queue else None

    def _answer_for(self, task_id: str) -> Mapping[str, Any] | bytes | None:
        with self.lock:
            answers = self._tasks.get(task_id)
            if not answers:
                return None
            answer: Mapping[str, Any] | bytes = answers.pop(0) if len(answers) > 1 else answers[0]
            return answer

    def _file(self, path: str) -> _File | None:
        with self.lock:
            return self._files.get(path)


class _Handler(BaseHTTPRequestHandler):
    replica: ClassVar[Replica]
    server_name: ClassVar[str]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the demo read the request log instead."""

    def do_GET(self) -> None:
        with self.replica.lock:
            self.replica.requests.append(
                Seen(self.server_name, "GET", self.path, dict(self.headers.items()))
            )
        if self.server_name == "api":
            self._api()
        else:
            self._files()

    # -- the gateway --------------------------------------------------------------------

    def _api(self) -> None:
        if not self.path.startswith(QUERY_PREFIX):
            self._json(
                404,
                {"error": {"message": "Invalid URL", "type": "invalid_request_error", "code": ""}},
            )
            return
        task_id = self.path[len(QUERY_PREFIX) :]
        if self.headers.get("Authorization") != f"Bearer {self.replica.api_key}":
            self._json(
                401,
                {
                    "error": {
                        "message": "invalid api key",
                        "type": "authentication_error",
                        "code": "",
                    }
                },
            )
            return
        fault = self.replica._next_fault("api", task_id)
        if fault is not None and self._serve_fault(fault, lambda cut: self._answer(task_id, cut)):
            return
        self._answer(task_id, None)

    def _answer(self, task_id: str, drop_after: int | None) -> None:
        answer = self.replica._answer_for(task_id)
        if answer is None:
            answer = error_response("InvalidParameterValue.TaskId", "The task does not exist.")
        body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self._send(200, {"Content-Type": "application/json"}, body, drop_after=drop_after)

    # -- the file host ------------------------------------------------------------------

    def _files(self) -> None:
        path = self.path.split("?", 1)[0]
        stored = self.replica._file(path)
        fault = self.replica._next_fault("files", path)
        if fault is not None and self._serve_fault(
            fault, lambda cut: self._serve_file(stored, cut)
        ):
            return
        self._serve_file(stored, None)

    def _serve_file(self, stored: _File | None, drop_after: int | None) -> None:
        if stored is None:
            self._send(404, {"Content-Type": "text/plain"}, b"Not Found", drop_after=drop_after)
            return
        data, status = stored.data, 200
        headers = {
            "Content-Type": stored.content_type,
            "ETag": stored.etag,
            "Accept-Ranges": "bytes",
        }
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if wanted and (if_range is None or if_range == stored.etag):
            start = int(wanted.group(1))
            if start >= len(data):
                self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                return
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(status, headers, data, drop_after=drop_after)

    # -- shared -------------------------------------------------------------------------

    def _serve_fault(self, fault: Fault, normal: Callable[[int | None], None]) -> bool:
        """Serve ``fault``; False when it only delays and the normal answer should follow.

        ``normal(drop_after)`` serves the normal answer, cut after that many body bytes.
        """
        if fault.delay:
            time.sleep(fault.delay)
        if fault.hang_up:
            self.close_connection = True
            return True
        if fault.endless:
            self._send_endless(fault.status or 200, fault.headers, fault.body)
        elif fault.status is not None:
            self._send(fault.status, fault.headers, fault.body, drop_after=fault.drop_after)
        elif fault.drop_after is not None:
            normal(fault.drop_after)
        else:
            return False
        if fault.stall:
            time.sleep(fault.stall)
        return True

    def _json(self, status: int, document: Mapping[str, Any]) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(document).encode())

    def _send(
        self, status: int, headers: Mapping[str, str], body: bytes, *, drop_after: int | None = None
    ) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if not any(name.lower() == "content-length" for name in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if drop_after is not None:
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first (a timeout, a refused body): nothing to report.
            self.close_connection = True

    def _send_endless(self, status: int, headers: Mapping[str, str], filler: bytes) -> None:
        """Headers without a length, then filler until the client hangs up; the close ends it."""
        block = (filler or b"\0") * (65536 // max(1, len(filler)))
        self.close_connection = True
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0
            while sent < ENDLESS_LIMIT:
                self.wfile.write(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass


# -- realistic answers ----------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_response(code: str, message: str) -> dict[str, Any]:
    """A Tencent-style error, as the API sends it inside an HTTP 200."""
    return {
        "Response": {"Error": {"Code": code, "Message": message}, "RequestId": _request_id(code)}
    }


def task_response(
    task_id: str,
    *,
    task_type: str = "AigcImageTask",
    status: str = "FINISH",
    files: Sequence[Mapping[str, Any]] = (),
    prompt: str = "a lighthouse at dusk, oil painting",
    negative_prompt: str | None = "blur, distorted",
    model: tuple[str, str] = ("GEM", "2.5"),
    created: datetime | None = None,
    err_code: int = 0,
    err_code_ext: str = "",
    message: str = "",
    extra_input: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``DescribeTaskDetail`` body shaped like the real ones (sentinels included)."""
    created = created or datetime.now(UTC) - timedelta(minutes=5)
    running = status in ("WAITING", "PROCESSING")
    failed = err_code != 0
    task_input: dict[str, Any] = {
        "ModelName": model[0],
        "ModelVersion": model[1],
        "Prompt": prompt,
        "EnhancePrompt": "Enabled",
        "OutputConfig": {"StorageMode": "Temporary", "AspectRatio": "1:1"},
    }
    if negative_prompt is not None:
        task_input["NegativePrompt"] = negative_prompt
    task_input.update(extra_input or {})
    task_obj: dict[str, Any] = {
        "TaskId": task_id,
        "Status": "FAIL" if failed else status,
        "Progress": 50 if running else 100,
        "ErrCode": err_code,
        "ErrCodeExt": err_code_ext,
        "Message": message,
        "Input": task_input,
        "Output": {"FileInfos": [] if running or failed else list(files)},
        "SessionId": "",
        "SessionContext": "",
    }
    return {
        "Response": {
            "TaskType": task_type,
            "Status": status,
            "CreateTime": iso(created),
            "BeginProcessTime": iso(created + timedelta(seconds=1)),
            "FinishTime": "0001-01-01T00:00:00Z"
            if running
            else iso(created + timedelta(seconds=40)),
            "RequestId": _request_id(task_id),
            task_type: task_obj,
        }
    }


def file_info(
    url: str,
    *,
    expire: datetime | None = None,
    md5: str | None = None,
    size: int | None = None,
    file_type: str = "image",
) -> dict[str, Any]:
    """One ``Output.FileInfos`` entry; ``expire`` defaults to seven days from now."""
    meta: dict[str, Any] = {}
    if md5 is not None:
        meta["Md5"] = md5
    if size is not None:
        meta["Size"] = size
    info: dict[str, Any] = {
        "FileUrl": url,
        "ExpireTime": iso(expire or datetime.now(UTC) + timedelta(days=7)),
        "StorageMode": "Temporary",
        "FileType": file_type,
        "FileId": "",
        "MediaName": "",
    }
    if meta:
        info["MetaData"] = meta
    return info


def _request_id(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


# -- synthetic media ----------------------------------------------------------------------


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A real, viewable PNG: a colour gradient that differs by ``seed``."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(
                ((x * 255 // width + seed * 40) % 256, (y * 255 // height) % 256, (seed * 90) % 256)
            )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


def pseudo_video(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes with an MP4 ``ftyp`` box in front; stands in for a video file."""
    head = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isomiso2"
    block = hashlib.sha256(str(seed).encode()).digest() * 2048
    body = (block * (size // len(block) + 1))[: max(0, size - len(head))]
    return head + body


# -- the demo's world -------------------------------------------------------------------------


def load_demo(replica: Replica, task_ids: Iterable[str]) -> None:
    """Give every ID in ``sample_tasks.txt`` a plausible story: images, a video, pending, failed."""
    for number, task_id in enumerate(task_ids):
        _DEMO_STORIES[number % len(_DEMO_STORIES)](replica, task_id, number)


def _demo_single(replica: Replica, task_id: str, n: int) -> None:
    url = replica.add_file(f"vod/{n}/aigcImageGenFile.png", png(96, 96, n))
    replica.set_task(task_id, task_response(task_id, files=[file_info(url)], prompt="pig"))


def _demo_multi(replica: Replica, task_id: str, n: int) -> None:
    infos = []
    for k in range(3):
        data = png(128, 72, n + k)
        url = replica.add_file(f"vod/{n}/image_{k}.png", data)
        infos.append(file_info(url, md5=hashlib.md5(data).hexdigest(), size=len(data)))  # noqa: S324
    replica.set_task(
        task_id,
        task_response(
            task_id,
            files=infos,
            prompt="three studies of a red fox in snow, watercolour",
            model=("Hunyuan", "3.0"),
            extra_input={"OutputConfig": {"StorageMode": "Temporary", "OutputImageCount": 3}},
        ),
    )


def sample_video() -> bytes:
    """A real, playable clip (3 s of H.264 in MP4, 256x144, about 20 KB), shipped as package
    data: the demo's video task plays in a browser, and the gallery's tests play it."""
    return resources.files("fetcher").joinpath("sample_video.mp4").read_bytes()


def _demo_video(replica: Replica, task_id: str, n: int) -> None:
    data = sample_video()
    url = replica.add_file(f"vod/{n}/aigcVideoGenFile.mp4", data, "video/mp4")
    replica.set_task(
        task_id,
        task_response(
            task_id,
            task_type="AigcVideoTask",
            files=[file_info(url, file_type="video", size=len(data))],
            prompt="a paper boat drifting down a rainy street, slow motion",
            model=("Kling", "2.1"),
            extra_input={
                "OutputConfig": {"StorageMode": "Temporary", "Duration": 5, "Resolution": "720P"}
            },
        ),
    )


def _demo_pending(replica: Replica, task_id: str, n: int) -> None:
    replica.set_task(task_id, task_response(task_id, status="PROCESSING", prompt="a city of glass"))


def _demo_failed(replica: Replica, task_id: str, n: int) -> None:
    replica.set_task(
        task_id,
        task_response(
            task_id,
            err_code=70000,
            err_code_ext="ContentModerationFailed",
            message="The content did not pass moderation.",
        ),
    )


_DEMO_STORIES: tuple[Callable[[Replica, str, int], None], ...] = (
    _demo_single,
    _demo_multi,
    _demo_video,
    _demo_pending,
    _demo_failed,
)
