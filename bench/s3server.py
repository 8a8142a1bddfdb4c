"""An S3-compatible server on loopback for the benchmarks: moto's server mode in a child process.

As a module (standard library only), :func:`start` runs this file with an interpreter
that has ``moto[server]`` installed and returns the server's URL once it listens; the
server takes a free port (port 0) on 127.0.0.1 and logs one line per request, which
:func:`count_requests` reads, as ``run.py`` reads nginx's access logs. As a script
it is that child::

    python bench/s3server.py        # prints the port, serves until stdin closes

moto keeps every object in its own process (in memory, large ones spooled to a
temporary file), so one server's cost is the same for every client measured
against it; :func:`reset` empties it between runs so memory does not pile up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: moto answers any key pair; these only have to look like one.
ACCESS_KEY = "AKIABENCHNOTASECRET0"
SECRET_KEY = "bench-secret-not-a-secret"  # noqa: S105 (moto checks no signature)
REGION = "us-east-1"
INSTALL_LINE = "pip install 'moto[server]'"
START_TIMEOUT = 60.0
#: werkzeug's request line: ``"PUT /bucket/key HTTP/1.1" 200 -``; a 4xx's in colour.
_REQUEST = re.compile(rb'"(?:\x1b\[[0-9;]*m)?([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[0m)?" (\d{3}) ')


@dataclass
class S3Server:
    """A running moto server: its URL, its process and the log its requests go to."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the child's signal to stop
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def has_moto(python: str) -> bool:
    """Whether ``python`` can run the server (moto and its server extra)."""
    probe = [python, "-c", "import moto.server, flask, werkzeug"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0  # noqa: S603


def start(python: str, log: Path, tmp: Path | None = None) -> S3Server:
    """Start moto under ``python`` on 127.0.0.1, port 0; returns once it answers.

    moto spools an object over 5 MiB to a temporary file: in ``tmp`` if given (a
    tmpfs, so no disk is measured), else in the system's temporary folder.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    handle = log.open("wb")
    process = subprocess.Popen(  # noqa: S603
        [python, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=handle,
        env=env,
    )
    handle.close()
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line.isdigit():
        process.kill()
        process.wait()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto server did not start under {python}: {tail}")
    return S3Server(f"http://127.0.0.1:{line}", process, log)


def create_bucket(server: S3Server, bucket: str) -> None:
    """An unsigned ``PUT /bucket``: moto's server takes it, which saves a client here."""
    request = urllib.request.Request(f"{server.url}/{bucket}", method="PUT")  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (loopback)
        answer.read()


def reset(server: S3Server) -> None:
    """Drop every bucket and object (moto's own reset endpoint)."""
    request = urllib.request.Request(f"{server.url}/moto-api/reset", method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310 (loopback)
        answer.read()


def log_size(server: S3Server) -> int:
    return server.log.stat().st_size


def count_requests(server: S3Server, since: int) -> dict[str, int]:
    """Requests logged after byte ``since`` of the log, by method (``"5xx"``/``"4xx"`` too)."""
    with server.log.open("rb") as handle:
        handle.seek(since)
        text = handle.read()
    counts: dict[str, int] = {}
    for method, path, status in _REQUEST.findall(text):
        if path.startswith(b"/moto-api/"):
            continue
        name = method.decode()
        counts[name] = counts.get(name, 0) + 1
        if status[:1] in (b"4", b"5"):
            key = f"{status[:1].decode()}xx"
            counts[key] = counts.get(key, 0) + 1
    return counts


def serve() -> None:
    """The child: moto on a free loopback port, the port on stdout, until stdin closes."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    sys.stdout.write(f"{server.get_host_and_port()[1]}\n")
    sys.stdout.flush()
    sys.stdin.buffer.read()  # returns at EOF: the parent closed its end, or died
    server.stop()


if __name__ == "__main__":
    serve()
