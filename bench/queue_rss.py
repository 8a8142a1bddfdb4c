"""Peak RSS of a run whose download queue holds many files: flat, whatever its length.

Builds two archives whose state databases queue ``--files`` and 1,000 files (one
per incomplete task, ExpireTime spread over a week, one in ten with none), written
straight with sqlite3 in fetcher's own schema, then runs ``fetcher fetch`` over an
empty list on each (no task named: the run only drains the queue) with
``--downloads 1`` against a file host on loopback that answers every file after
``--delay`` seconds. Each run is stopped with SIGINT once the host has served
``--served`` files, so both runs do the same work and differ only in the queue's
length. Peak RSS is the child's own ``ru_maxrss`` from ``os.wait4``: each state is
built by a process of its own, and the run is forked by a small ``sh`` and reaped
by this one as its subreaper, as ``run.py`` does, so neither the builder's memory
nor this script's is folded into the figure.

    python bench/queue_rss.py [--files 1000000] [--served 200] [--delay 0.01]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SH = "/bin/sh"
#: ``prctl(PR_SET_CHILD_SUBREAPER, 1)``: orphans of our children become our children.
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Let this process ``wait4`` the run once the ``sh`` that started it has exited."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


BODY = b"\x89PNG\r\n\x1a\n" + b"\0" * 2040


class Host(ThreadingHTTPServer):
    """Serves :data:`BODY` at every path, after ``delay`` seconds; counts what it served."""

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.served = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: Host

    def do_GET(self) -> None:
        time.sleep(self.server.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        except OSError:  # the run was stopped in the middle of this answer
            return
        with self.server.lock:
            self.server.served += 1

    def log_message(self, format: str, *args: object) -> None:
        pass


def build(archive: Path, files: int, host: str) -> None:
    """An archive whose queue holds ``files`` files, one per incomplete task."""
    from fetcher.state import StateDB

    meta = archive / ".fetcher"
    (meta / "work").mkdir(parents=True)
    with StateDB(meta / "state.sqlite"):
        pass
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    rng = random.Random(files)
    detail = json.dumps({"status": "FINISH", "input": {"Prompt": "a lighthouse at dusk"}})
    conn = sqlite3.connect(meta / "state.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        ids = sorted(
            f"1392336703-AigcImageTask-{hashlib.md5(str(n).encode()).hexdigest()}t"  # noqa: S324
            for n in range(files)
        )
        conn.executemany(
            "INSERT INTO tasks (task_id, state, task_type, dir, detail, first_seen, updated_at) "
            "VALUES (?, 'incomplete', 'AigcImageTask', ?, ?, ?, ?)",
            ((tid, f"q/{tid}", detail, stamp, stamp) for tid in ids),
        )

        def expiry() -> str | None:
            if rng.random() < 0.1:
                return None
            moment = now + timedelta(seconds=rng.randrange(7 * 86400))
            return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

        conn.executemany(
            "INSERT INTO files (task_id, idx, url, expire_time, state) "
            "VALUES (?, 0, ?, ?, 'wanted')",
            ((tid, f"{host}/{tid}.png", expiry()) for tid in ids),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def measure(archive: Path, api: str, served: int, host: Host, empty: Path) -> tuple[float, int]:
    """Peak RSS (MiB) and files served of one run over ``archive``, stopped after ``served``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env["XDG_CONFIG_HOME"] = str(archive.parent / "no-config")
    argv = [sys.executable, "-m", "fetcher", "fetch", str(empty), "--archive", str(archive)]
    argv += ["--base-url", api, "--api-key", "k", "--downloads", "1", "--no-progress", "-q"]
    start = host.served
    read_end, write_end = os.pipe()
    script = f'"$@" {write_end}>&- & echo $! >&{write_end}'
    shell = subprocess.Popen(  # noqa: S603
        [SH, "-c", script, "sh", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pid = int(pipe.read())
    shell.wait()
    deadline = time.monotonic() + 600
    while host.served - start < served and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGINT)
    _, _, usage = os.wait4(pid, 0)
    return usage.ru_maxrss / 1024, host.served - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--served", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.01)
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)  # ARCHIVE FILES HOST
    args = parser.parse_args(argv)
    if args.build:
        build(Path(args.build[0]), int(args.build[1]), args.build[2])
        return 0
    become_subreaper()
    host = Host(args.delay)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
        empty = Path(work) / "empty.txt"
        empty.write_text("", encoding="utf-8")
        for files in (1_000, args.files):
            archive = Path(work) / f"queued-{files}"
            started = time.perf_counter()
            builder = [sys.executable, __file__, "--build", str(archive), str(files), url]
            subprocess.run(builder, check=True)  # noqa: S603
            built = time.perf_counter() - started
            rss, done = measure(archive, "http://127.0.0.1:9", args.served, host, empty)
            print(f"{files:>9,} queued: peak RSS {rss:6.1f} MiB, {done} files served "
                  f"(state built in {built:.1f} s)")  # fmt: skip
    host.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
