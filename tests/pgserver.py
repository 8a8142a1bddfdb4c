"""A PostgreSQL server for the tests: a throwaway cluster of Debian's ``postgresql``
package, made by ``initdb`` in a temporary folder and run by ``pg_ctl`` on a free
loopback port, its unix socket in that folder.

PostgreSQL refuses to run as root, and CI runs as root: the server then runs as the
``postgres`` user the package creates, owning the folder. Connections over TCP need
a password (scram-sha-256), so a wrong one is refused as on a real server; each test
gets a database of its own (:meth:`PostgresServer.database`).
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Self

import psycopg

#: The superuser of the throwaway cluster.
USER = "postgres"
#: Waits for the test process ($1) to end, then runs the rest (the server's stop) and
#: removes the cluster's folder ($2).
_WATCH = (
    'pid=$1 dir=$2; shift 2; while kill -0 "$pid" 2>/dev/null; do sleep 1; done; '
    '"$@"; rm -rf "$dir"'
)


def bindir() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them off ``PATH``)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    assert found, "PostgreSQL's server is not installed: apt-get install postgresql"
    return found[-1].parent


def free_port() -> int:
    """A loopback port the OS picks (port 0); PostgreSQL itself cannot be given port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One cluster for the test session; started by ``with``, stopped and removed after."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fetcher-pg-"))
        self.data = self.folder / "data"
        self.password = secrets.token_hex(12)
        self.port = 0
        self._names = itertools.count(1)
        self._as: list[str] = []
        self._watch: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        secret = self.folder / "pw"
        secret.write_text(self.password)
        if self._as:
            shutil.chown(secret, "postgres")
        bin_ = bindir()
        self._run(
            str(bin_ / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={secret}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        secret.unlink()
        self.port = free_port()
        self.start()
        # A session killed before its teardown (a timeout's SIGTERM) leaves no server behind.
        stop = [*self._as, str(bin_ / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
        self._watch = subprocess.Popen(
            ["sh", "-c", _WATCH, "watch", str(os.getpid()), str(self.folder), *stop],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._watch is not None:
            self._watch.terminate()
            self._watch.wait()

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`) on its port; returns once it takes
        connections."""
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            str(bindir() / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop the server at once (``immediate``: a crash, as far as clients can tell)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def restart(self, mode: str = "immediate") -> None:
        """Stop the server and start it again: every connection to it is lost. ``fast``
        ends each session with an administrator's shutdown (57P01), ``immediate`` as a
        crash does, without a word."""
        self._run(
            str(bindir() / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "log"),
            "-m",
            mode,
            "-w",
            "restart",
        )

    def url(self, database: str, *, password: str | None = None) -> str:
        """A ``postgresql://`` URL to ``database`` over TCP, with the password in it."""
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; returns the URL to it."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as, *command], check=True, capture_output=True, cwd=self.folder, timeout=120
        )
