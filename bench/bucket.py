"""Bench row (h): the server, the clients' settings and the check of what a run stored.

``run.py`` measures fetcher archiving (a)'s and (c)'s files into a bucket against
curl's download to /dev/shm followed by ``rclone copy`` of the same files into the
same bucket; this module holds what is particular to the bucket: moto's server
(``s3server.py``), emptied before every run so its memory does not pile up, the
environment each client reads its endpoint and keys from, and a listing, by
rclone after the run, of the objects it made.

rclone's remote is defined by ``RCLONE_CONFIG_<NAME>_*`` variables alone, and
``RCLONE_CONFIG`` names a file that is never made: nothing is written, and this
user's own remotes are not read. Neither client inherits this machine's ``AWS_*``
variables (a CA bundle there breaks rclone on plain HTTP). The keys are moto's
placeholders; the report prints none of them.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import s3server

#: The row's letter: (f) is the pending list's row, (g) is kept for the PostgreSQL state.
ROW = "h"
BUCKET = "bench"
#: rclone's name for the server (``RCLONE_CONFIG_BENCH_*``).
REMOTE = "bench"
#: What fetcher does with a file over 16 MiB: 8 MiB parts, three in flight. rclone is
#: given the same, so the two differ in how they work, not in how they are tuned.
PART_FLAGS = ("--s3-upload-cutoff", "16M", "--s3-chunk-size", "8M", "--s3-upload-concurrency", "3")
#: The files a run archives, as opposed to sidecars and fetcher's own objects.
MEDIA = (".png", ".mp4")


@dataclass
class Store:
    """moto's server for the row, and the environments its two clients run in."""

    server: s3server.S3Server
    fetcher_env: dict[str, str]
    rclone_env: dict[str, str]
    rclone: str

    @property
    def url(self) -> str:
        return self.server.url

    def fresh(self) -> int:
        """An empty server holding an empty bucket; where its request log now ends."""
        s3server.reset(self.server)
        s3server.create_bucket(self.server, BUCKET)
        return s3server.log_size(self.server)

    def requests(self, since: int) -> int:
        """Requests the server logged after byte ``since`` of its log, once it stops growing.

        The server logs a request after answering it: the last few may come a moment
        after the client has exited.
        """
        size = -1
        for _ in range(40):
            if size == (size := s3server.log_size(self.server)):
                break
            time.sleep(0.05)
        counts = s3server.count_requests(self.server, since)
        return sum(n for method, n in counts.items() if method not in ("4xx", "5xx"))

    def media(self, prefix: str) -> tuple[int, int]:
        """How many media objects are under ``prefix``, and their bytes (rclone's listing)."""
        # No modification times or MIME types: those would cost a HEAD per object.
        listing = ["lsjson", "-R", "--files-only", "--no-modtime", "--no-mimetype"]
        argv = [self.rclone, *listing, f"{REMOTE}:{BUCKET}/{prefix}"]
        done = subprocess.run(  # noqa: S603
            argv, env=self.rclone_env, capture_output=True, text=True, check=False, timeout=300
        )
        if done.returncode != 0:
            return -1, -1
        found = [e for e in json.loads(done.stdout) if str(e.get("Name", "")).endswith(MEDIA)]
        return len(found), sum(int(e.get("Size", 0)) for e in found)

    def stop(self) -> None:
        self.server.stop()


def start(python: str, rclone: str, env: dict[str, str], work: Path, log: Path) -> Store:
    """moto's server under ``python``, spooling to ``work`` (tmpfs), and both clients' env."""
    tmp = work / "s3-tmp"
    tmp.mkdir(exist_ok=True)
    server = s3server.start(python, log, tmp=tmp)
    base = {k: v for k, v in env.items() if not k.startswith(("AWS_", "RCLONE_"))}
    fetcher_env = {
        **base,
        "AWS_ACCESS_KEY_ID": s3server.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": s3server.SECRET_KEY,
        "AWS_DEFAULT_REGION": s3server.REGION,
    }
    name = f"RCLONE_CONFIG_{REMOTE.upper()}_"
    rclone_env = {
        **base,
        "RCLONE_CONFIG": str(work / "rclone-unused.conf"),
        f"{name}TYPE": "s3",
        f"{name}PROVIDER": "Other",
        f"{name}ENDPOINT": server.url,
        f"{name}ACCESS_KEY_ID": s3server.ACCESS_KEY,
        f"{name}SECRET_ACCESS_KEY": s3server.SECRET_KEY,
        f"{name}REGION": s3server.REGION,
        f"{name}FORCE_PATH_STYLE": "true",
    }
    return Store(server, fetcher_env, rclone_env, rclone)


def copy_argv(rclone: str, source: Path, prefix: str, transfers: int) -> list[str]:
    """``rclone copy`` of a folder's files into the bucket under ``prefix``."""
    target = f"{REMOTE}:{BUCKET}/{prefix}"
    return [rclone, "copy", str(source), target, "--transfers", str(transfers), *PART_FLAGS, "-q"]
