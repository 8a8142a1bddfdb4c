"""Benchmark ``fetcher fetch`` against curl and aria2c over a loopback nginx.

Workloads are built in a RAM-backed folder (/dev/shm) one at a time and served
by an nginx this script starts as a foreground child: the query API (JSON files,
401 without the right bearer key) on one port, the files (sendfile) on another,
so the key never reaches the file origin. Every run gets a fresh output folder
on the same filesystem, tools alternate run by run, and each run is measured
for wall time (perf_counter around the child), peak RSS (``os.wait4``'s
``ru_maxrss`` of the tool; see :func:`become_subreaper`) and requests (lines nginx
added to its access logs). Two rows are yardsticks rather than rivals: curl making
fetcher's queries as well as its downloads, in (a), and ``md5sum`` over (c)'s file,
the hashing that curl does not do. Row (h) archives (a)'s and (c)'s files into a
bucket on moto's server over loopback, beside curl's download followed by ``rclone
copy`` (``bench/bucket.py``); it runs only when named. So does row (g): (a)'s files
served slowly, archived by one run and by four runs at once sharing a PostgreSQL
state (``bench/fleet.py``).

    python bench/run.py [--runs N] [--workloads a,b,c,d,e,f,g,h,i] [--out bench/out] [--quick]
    python bench/run.py --profile --workloads a,b    # fetcher under py-spy instead

Needs nginx, aria2c, curl and md5sum on PATH (``apt-get install -y nginx aria2 curl``)
and is run with the Python that has fetcher installed. It installs nothing. Row (h)
also needs rclone (``apt-get install -y rclone``) and fetcher's ``test`` extra
(aiobotocore, ``moto[server]``) in that Python; row (g) PostgreSQL's server
(``apt-get install -y postgresql``) and psycopg (fetcher's ``postgres`` extra).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import bucket
import fleet
import s3server
from catalog import CatalogRow
from catalog import measure as catalog_row
from gallery import add_http as add_gallery_http

KiB, MiB, GiB = 1024, 1024**2, 1024**3
SHM = Path("/dev/shm")  # noqa: S108 (RAM-backed on purpose: the disk must not be measured)
REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-key-not-a-secret"
QUERY_PATH = "/tencent-vod/v1/query/"
APPID = "1392336703"
SH = "/bin/sh"
INSTALL_LINE = "apt-get update && apt-get install -y nginx aria2 curl"
FETCHER_FLAGS = ("--concurrency", "16", "--downloads", "16", "--rate", "100000")
FETCHER_OUTPUT = ("--no-progress", "-q", "--json")
PARALLEL = 16
RUN_TIMEOUT = 900.0
HELP_RUNS = 10
TOOLS = ("fetcher", "curl", "aria2c")
#: The workload measured in-process by bench/catalog.py: search and listing, no downloads.
CATALOG = "i"
#: curl doing fetcher's whole job in (a): the 2,000 keyed queries, then the 2,000 files.
CURL_QF = "curl (queries + files)"
#: (c)'s file hashed where it lies: the MD5 work fetcher does and curl does not.
MD5SUM = "md5sum"
C64 = "fetcher (64 MiB file)"
#: (e) again, over an archive that has run over the list once: the cron case proper.
RERUN = "fetcher (cron re-run)"
#: In (h): curl's download to /dev/shm, then rclone's copy into the bucket; their walls summed.
RCLONE = "rclone copy"
CURL_RCLONE = "curl + rclone"


# -- what is measured -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """One workload: what it holds and which tools run it."""

    key: str
    title: str
    tasks: int
    file_size: int
    tools: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.tasks * self.file_size


@dataclass(slots=True)
class Measure:
    """One run of one tool on one workload."""

    workload: str
    tool: str
    run: int
    wall: float
    rss_kib: int
    exit_code: int
    api_requests: int
    file_requests: int
    bytes: int
    tasks: int
    ok: bool
    note: str = ""
    #: fetcher's ``already_archived`` from its --json summary; None for the other tools.
    already_archived: int | None = None
    #: In (h): the requests moto's server logged; None where no bucket is involved.
    store_requests: int | None = None


@dataclass(frozen=True, slots=True)
class Tools:
    """Absolute paths of the programs the benchmark runs."""

    fetcher: str
    curl: str
    aria2c: str
    nginx: str
    md5sum: str
    #: Only row (h) needs it.
    rclone: str | None = None


@dataclass(frozen=True, slots=True)
class Served:
    """What nginx serves for one list, for checking what a tool wrote."""

    query_bytes: int  # every task's query answer, summed
    first_file: Path  # in /dev/shm: (c)'s only file, which md5sum reads in place
    first_md5: str


@dataclass(slots=True)
class Bench:
    """Everything one benchmark session owns."""

    args: argparse.Namespace
    tools: Tools
    work: Path
    out: Path
    api_url: str = ""
    files_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    results: list[Measure] = field(default_factory=list)
    d_base: Path | None = None
    served: dict[str, Served] = field(default_factory=dict)
    #: Row (i), when measured: the catalog's queries over 100,000 tasks.
    catalog: CatalogRow | None = None
    #: Row (g), when measured: each process of each measure, and what they left.
    fleet: fleet.FleetRow | None = None

    @property
    def api_dir(self) -> Path:
        return self.work / "api"

    @property
    def files_dir(self) -> Path:
        return self.work / "files"

    @property
    def lists_dir(self) -> Path:
        return self.work / "lists"


def workloads(quick: bool) -> dict[str, Workload]:
    c_size = 256 * MiB if quick else GiB
    c_title = f"1 task x one {c_size // MiB} MiB file" if quick else "1 task x one 1 GiB file"
    return {
        "a": Workload("a", "2,000 tasks x one 256 KiB file", 2000, 256 * KiB, (*TOOLS, CURL_QF)),
        "b": Workload("b", "40 tasks x one 64 MiB file", 40, 64 * MiB, TOOLS),
        "c": Workload("c", c_title, 1, c_size, (*TOOLS, MD5SUM, C64)),
        "d": Workload("d", "re-run of (a) over the finished archive", 2000, 0, ("fetcher",)),
        "e": Workload("e", "1,000,000 IDs, all already archived", 1_000_000, 0, ("fetcher", RERUN)),
        "f": Workload("f", "100,000 new IDs, every one pending", 100_000, 0, ("fetcher",)),
        fleet.ROW: fleet_workload(quick),
        bucket.ROW: Workload(bucket.ROW, "(a) and (c) into a bucket", 0, 0, ()),
    }


def fleet_workload(quick: bool) -> Workload:
    """Row (g): (a)'s kind of tasks (fewer in ``--quick``), by one run and by four at once."""
    tasks = fleet.QUICK_TASKS if quick else 2000
    title = (
        f"{tasks:,} tasks x one 256 KiB file at {fleet.RATE} per connection, state in "
        f"PostgreSQL: 1 run with --downloads {fleet.SINGLE_DOWNLOADS}, {fleet.RUNS} runs at "
        f"once with --downloads {fleet.SHARED_DOWNLOADS} each"
    )
    return Workload(fleet.ROW, title, tasks, 256 * KiB, (fleet.SINGLE, fleet.SHARED))


def bucket_parts(quick: bool) -> list[Workload]:
    """Row (h)'s two parts: (a)'s and (c)'s files archived into a bucket, each its own table."""
    tools = ("fetcher", "curl", RCLONE, CURL_RCLONE)
    parts = []
    for key in ("a", "c"):
        w = workloads(quick)[key]
        title = f"{w.title}, into a bucket"
        parts.append(dataclasses.replace(w, key=f"{bucket.ROW}-{key}", title=title, tools=tools))
    return parts


def tabled(quick: bool, keys: Sequence[str]) -> list[Workload]:
    """The workloads that get a table: (h) stands for its two parts."""
    all_w = workloads(quick)
    out: list[Workload] = []
    for key in keys:
        if key == bucket.ROW:
            out += bucket_parts(quick)
        elif key in all_w:
            out.append(all_w[key])
    return out


# -- prerequisites ----------------------------------------------------------------------


def find_tools() -> tuple[Tools | None, list[str]]:
    """Locate every program; say what is missing instead of installing it."""
    missing: list[str] = []
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    packages = {"nginx": "nginx", "curl": "curl", "aria2c": "aria2", "md5sum": "coreutils"}
    found = {name: shutil.which(name, path=search) for name in packages}
    for name, path in found.items():
        if path is None:
            missing.append(f"{name} (Debian package {packages[name]!r})")
    sibling = Path(sys.executable).parent / "fetcher"
    fetcher = str(sibling) if sibling.is_file() else shutil.which("fetcher")
    if fetcher is None:
        missing.append("the fetcher command (pip install -e . into this Python's venv)")
    if importlib.util.find_spec("fetcher") is None:
        missing.append(f"the fetcher package importable by {sys.executable} (run with its venv)")
    if not SHM.is_dir():
        missing.append(f"{SHM} (a RAM-backed tmpfs)")
    if missing or fetcher is None:
        return None, missing
    paths = [str(found[name]) for name in ("curl", "aria2c", "nginx", "md5sum")]
    return Tools(fetcher, *paths, rclone=shutil.which("rclone", path=search)), []


def missing_for_bucket(tools: Tools) -> list[str]:
    """What row (h) needs beyond the rest: rclone, and aiobotocore and moto in this Python."""
    missing = [] if tools.rclone else ["rclone (Debian package 'rclone')"]
    if importlib.util.find_spec("aiobotocore") is None or not s3server.has_moto(sys.executable):
        missing.append(
            f"aiobotocore and moto[server] in {sys.executable} (pip install -e '.[test]')"
        )
    return missing


def shm_needed(selected: Sequence[Workload]) -> int:
    """Peak bytes in /dev/shm: one workload's data and one output copy, plus (d)'s archive."""
    kept = 600 * MiB if any(w.key == "d" for w in selected) else 0
    peak = 0
    for w in selected:
        if w.key in ("d", "e"):  # an archive of about 500 MB, (e)'s re-run base, a run's copy
            peak = max(peak, 3 * 600 * MiB)
        elif w.key == "f":  # 100,000 query answers of about 1.3 KB, and a run's archive
            peak = max(peak, 300 * MiB)
        elif w.key == bucket.ROW:  # served, curl's copy, moto's parts and the object they make
            peak = max(peak, 5 * workloads(False)["c"].file_size)
        elif w.key == fleet.ROW:  # distinct files, served and archived once (one measure at a time)
            peak = max(peak, 2 * w.total_bytes + 128 * MiB)
        else:  # only (a)'s files are distinct; (b) hard-links one file; (c) adds a 64 MiB twin
            data = w.total_bytes if w.key == "a" else w.file_size
            peak = max(peak, data + w.total_bytes + 128 * MiB + kept)
    return peak


# -- building workloads -----------------------------------------------------------------


def task_id(workload: str, task_type: str, n: int) -> str:
    digest = hashlib.md5(f"{workload}-{n}".encode(), usedforsecurity=False).hexdigest()
    return f"{APPID}-{task_type}-{digest}t"


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its MD5."""
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 * MiB))
            md5.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return md5.hexdigest()


def build_files(bench: Bench, w: Workload, name: str, *, distinct: bool) -> list[tuple[str, str]]:
    """Serve ``w.tasks`` files under ``/<name>/``; returns (url, md5) per task.

    With ``distinct`` off every file is a hard link to the first: the transfer is the
    same, and /dev/shm holds one copy.
    """
    folder = bench.files_dir / name
    folder.mkdir(parents=True)
    ext = "png" if w.key == "a" else "mp4"
    first_md5 = ""
    out: list[tuple[str, str]] = []
    for n in range(w.tasks):
        path = folder / f"{n:06d}.{ext}"
        if distinct or n == 0:
            md5 = write_random(path, w.file_size)
            first_md5 = first_md5 or md5
        else:
            path.hardlink_to(folder / f"000000.{ext}")
            md5 = first_md5
        out.append((f"{bench.files_url}/{name}/{path.name}", md5))
    return out


def build_tasks(bench: Bench, w: Workload, name: str, files: list[tuple[str, str]]) -> None:
    """Query JSON per task (the replica's own shape), the tools' input lists, and what is served."""
    from fetcher.replica import file_info, task_response

    image = w.key == "a"
    task_type = "AigcImageTask" if image else "AigcVideoTask"
    ids: list[str] = []
    query_bytes = 0
    for n, (url, md5) in enumerate(files):
        tid = task_id(name, task_type, n)
        info = file_info(url, md5=md5, size=w.file_size, file_type="image" if image else "video")
        model = ("GEM", "2.5") if image else ("Kling", "2.1")
        body = task_response(tid, task_type=task_type, files=[info], model=model)
        query_bytes += (bench.api_dir / tid).write_bytes(json.dumps(body).encode())
        ids.append(tid)
    lists = bench.lists_dir
    (lists / f"{name}.ids").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (lists / f"{name}.urls").write_text("".join(f"{u}\n" for u, _ in files), encoding="utf-8")
    names = [u.rsplit("/", 1)[1] for u, _ in files]
    write_curl_list(lists / f"{name}.curl", [u for u, _ in files], names)
    query_urls = [f"{bench.api_url}{QUERY_PATH}{i}" for i in ids]
    write_curl_list(lists / f"{name}.queries.curl", query_urls, [f"{i}.json" for i in ids])
    first_file = bench.files_dir / name / names[0]
    bench.served[name] = Served(query_bytes, first_file, files[0][1])


def write_curl_list(path: Path, urls: list[str], outputs: list[str]) -> None:
    """A curl config of ``url``/``output`` pairs (read with ``-K``)."""
    pairs = zip(urls, outputs, strict=True)
    path.write_text("".join(f'url = "{u}"\noutput = "{o}"\n' for u, o in pairs), encoding="utf-8")


def prepare_download(bench: Bench, w: Workload) -> list[str]:
    """Files, JSON and lists for a, b or c (and c's 64 MiB twin); returns names built."""
    names = [w.key]
    build_tasks(bench, w, w.key, build_files(bench, w, w.key, distinct=w.key == "a"))
    if w.key == "c":
        twin = dataclasses.replace(w, file_size=64 * MiB)
        build_tasks(bench, twin, "c64", build_files(bench, twin, "c64", distinct=True))
        names.append("c64")
    return names


def drop_download(bench: Bench, names: list[str]) -> None:
    for name in names:
        shutil.rmtree(bench.files_dir / name, ignore_errors=True)
        ids = (bench.lists_dir / f"{name}.ids").read_text(encoding="utf-8").split()
        for tid in ids:
            (bench.api_dir / tid).unlink(missing_ok=True)


def build_pending(bench: Bench, w: Workload) -> None:
    """(f): a query answer per task that says ``PROCESSING``, and the list of their IDs."""
    from fetcher.replica import task_response

    ids = [task_id("f", "AigcVideoTask", n) for n in range(w.tasks)]
    for tid in ids:
        body = task_response(tid, task_type="AigcVideoTask", status="PROCESSING")
        (bench.api_dir / tid).write_bytes(json.dumps(body).encode())
    (bench.lists_dir / "f.ids").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def drop_pending(bench: Bench) -> None:
    for tid in (bench.lists_dir / "f.ids").read_text(encoding="utf-8").split():
        (bench.api_dir / tid).unlink(missing_ok=True)


def create_state(path: Path) -> None:
    """An empty state database in fetcher's current schema, made by fetcher itself."""
    from fetcher.state import StateDB

    with StateDB(path):
        pass


def build_archived_state(bench: Bench, w: Workload) -> Path:
    """An archive whose state DB says every one of ``w.tasks`` IDs is archived, and the list.

    Written straight with sqlite3 in fetcher's own schema: downloading a million
    tasks first would measure nothing the workload is about.
    """
    base = bench.work / "e-base"
    meta = base / ".fetcher"
    (meta / "work").mkdir(parents=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    day = stamp[:10].replace("-", "/")
    ids = [task_id("e", "AigcImageTask", n) for n in range(w.tasks)]
    create_state(meta / "state.sqlite")
    conn = sqlite3.connect(meta / "state.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO tasks (task_id, state, final, task_type, created_at, finished_at, dir, "
            "first_seen, updated_at) VALUES (?, 'archived', 1, 'AigcImageTask', ?, ?, ?, ?, ?)",
            # Sorted, so the B-trees grow by appends: seconds instead of half a minute.
            ((i, stamp, stamp, f"AigcImageTask/{day}/{i}", stamp, stamp) for i in sorted(ids)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # as fetcher leaves it
    finally:
        conn.close()
    # The list keeps submission order, which is random against the index, as in real use.
    with (bench.lists_dir / "e.ids").open("w", encoding="utf-8") as handle:
        handle.writelines(f"{i}\n" for i in ids)
    return base


# -- nginx ------------------------------------------------------------------------------

NGINX_CONF = """\
# Generated by bench/run.py: the query API and the file host on two loopback ports.
worker_processes 1;
pid {out}/nginx.pid;
error_log {out}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ image/png png; video/mp4 mp4; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server_tokens off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_authorization $has_auth {{ default auth; "" -; }}
    log_format bench '$status $request_method $request_uri $body_bytes_sent $has_auth';

    server {{  # the gateway's query API
        listen 127.0.0.1:{api_port};
        access_log {out}/access-api.log bench;
        location {query_path} {{
            default_type application/json;
            if ($http_authorization != "Bearer {key}") {{
                return 401 '{{"error": {{"message": "invalid key", "type": "auth", "code": ""}}}}';
            }}
            alias {api}/;
        }}
        location / {{ return 404; }}
    }}

    server {{  # the file host: another origin, never sent the key
        listen 127.0.0.1:{files_port};
        access_log {out}/access-files.log bench;
        root {files};
        # Row (g): its files at a fixed rate per request, as a slow host serves them.
        location /{fleet_row}/ {{ limit_rate {fleet_rate}; sendfile_max_chunk {fleet_chunk}; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Server:
    """A running nginx and the two origins it serves."""

    proc: subprocess.Popen[bytes]
    api_url: str
    files_url: str


def serve(nginx: str, out: Path, api: Path, files: Path) -> Server:
    """Start nginx with :data:`NGINX_CONF` on two free loopback ports; logs and config in ``out``.

    Apart from :class:`Bench` so that the other scripts in ``bench/`` serve their
    files the same way.
    """
    api_port, files_port = free_port(), free_port()
    while files_port == api_port:
        files_port = free_port()
    tmp = out / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    for log in ("access-api.log", "access-files.log", "nginx-error.log"):
        (out / log).write_bytes(b"")
    conf = out / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            out=out,
            tmp=tmp,
            api=api,
            files=files,
            api_port=api_port,
            files_port=files_port,
            key=API_KEY,
            query_path=QUERY_PATH,
            fleet_row=fleet.ROW,
            fleet_rate=fleet.RATE,
            fleet_chunk=fleet.CHUNK,
        ),
        encoding="utf-8",
    )
    argv = [nginx, "-p", f"{out}/", "-e", str(out / "nginx-error.log")]
    argv += ["-c", str(conf), "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603
    deadline = time.monotonic() + 10
    while not all(_listening(p) for p in (api_port, files_port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_nginx(proc)
            log = (out / "nginx-error.log").read_text(encoding="utf-8", errors="replace")
            raise SystemExit(f"bench: nginx did not start (see {conf}):\n{log[-2000:]}")
        time.sleep(0.05)
    return Server(proc, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{files_port}")


def start_nginx(bench: Bench) -> subprocess.Popen[bytes]:
    server = serve(bench.tools.nginx, bench.out, bench.api_dir, bench.files_dir)
    bench.api_url, bench.files_url = server.api_url, server.files_url
    return server.proc


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def stop_nginx(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class AccessLogs:
    """Counts the lines nginx adds to its two access logs during a run."""

    def __init__(self, out: Path) -> None:
        self.paths = (out / "access-api.log", out / "access-files.log")
        self.marks: tuple[int, ...] = (0, 0)

    def mark(self) -> None:
        self.marks = tuple(p.stat().st_size for p in self.paths)

    def added(self) -> tuple[list[str], list[str]]:
        """Lines since :meth:`mark`, once nginx has stopped writing them."""
        previous: tuple[int, ...] = ()
        for _ in range(40):  # nginx logs after the last byte is sent: let it catch up
            sizes = tuple(p.stat().st_size for p in self.paths)
            if sizes == previous:
                break
            previous = sizes
            time.sleep(0.05)
        api, files = (self._read(p, m) for p, m in zip(self.paths, self.marks, strict=True))
        return api, files

    @staticmethod
    def _read(path: Path, mark: int) -> list[str]:
        with path.open("rb") as handle:
            handle.seek(mark)
            return handle.read().decode("utf-8", errors="replace").splitlines()


# -- running one tool -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Child:
    """How a measured child ended."""

    exit_code: int
    wall: float
    rss_kib: int
    timed_out: bool


#: ``prctl(PR_SET_CHILD_SUBREAPER, 1)``: orphans of our children become our children.
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Let :func:`run_child` ``wait4`` a grandchild once its launching shell has exited.

    Why not a direct child: at ``exec`` Linux folds the old address space's peak RSS
    into the process's ``ru_maxrss`` (``exec_mmap``), and the old address space of a
    child of this process is ours (vfork) or a copy of it (fork). A direct child would
    never report less than this script's own peak (60 MiB and more once workloads are
    built). The tool is therefore forked by a ``sh`` of about 1 MiB, and reaped here.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"bench: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def launch(argv: Sequence[str], env: dict[str, str], log_dir: Path) -> int:
    """Start ``argv`` with stdout/stderr to files in ``log_dir``; its pid, now our child.

    ``sh`` starts the tool in the background, writes its pid to a pipe and exits; the
    tool, now our child (we are its subreaper), is waited for with ``wait4``, whose
    ``ru_maxrss`` (KiB) is then the tool's own peak. The shell costs about a millisecond.
    """
    read_end, write_end = os.pipe()
    script = f'"$@" {write_end}>&- & echo $! >&{write_end}'
    with (log_dir / "stdout").open("wb") as out, (log_dir / "stderr").open("wb") as err:
        try:
            shell = subprocess.Popen(  # noqa: S603
                [SH, "-c", script, "sh", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                pass_fds=(write_end,),
            )
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            pid = int(pipe.read())
        shell.wait()
    return pid


def run_child(argv: Sequence[str], env: dict[str, str], log_dir: Path, timeout: float) -> Child:
    """Run ``argv`` (see :func:`launch`); wall time and peak RSS from ``wait4``."""
    start = time.perf_counter()
    pid = launch(argv, env, log_dir)
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.wait4(pid, 0)
        raise
    finally:
        timer.cancel()
    wall = time.perf_counter() - start
    return Child(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss, fired.is_set())


def run_together(
    argvs: Sequence[Sequence[str]], env: dict[str, str], log_dirs: Sequence[Path], timeout: float
) -> tuple[float, list[Child]]:
    """Start every ``argv`` at once (see :func:`launch`); the set's wall, from the first
    start to the last exit, and how each child ended (its wall from its own start).

    Each child is reaped by its own pid every 10 ms (``WNOHANG``), never by waiting
    for any child, so nginx or another server of the harness is not reaped here.
    """
    first = time.perf_counter()
    running: dict[int, tuple[int, float]] = {}  # pid: its index, when it started
    ended: dict[int, Child] = {}
    killed: set[int] = set()
    try:
        for n, (argv, log_dir) in enumerate(zip(argvs, log_dirs, strict=True)):
            start = time.perf_counter()
            running[launch(argv, env, log_dir)] = (n, start)
        while running:
            time.sleep(0.01)
            for pid in list(running):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    n, start = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    wall = time.perf_counter() - start
                    ended[n] = Child(code, wall, usage.ru_maxrss, pid in killed)
            if time.perf_counter() - first > timeout:
                for pid in set(running) - killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
    except BaseException:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.wait4(pid, 0)
        raise
    return time.perf_counter() - first, [ended[n] for n in range(len(argvs))]


def command(bench: Bench, tool: str, name: str, outdir: Path) -> list[str]:
    """The argv that runs ``tool`` over list ``name``, writing into ``outdir``."""
    lists, t, jobs = bench.lists_dir, bench.tools, str(PARALLEL)
    curl = [t.curl, "--parallel", "--parallel-max", jobs, "-s", "-Z"]
    files = ["--output-dir", str(outdir), "-K", str(lists / f"{name}.curl")]
    if tool == "curl":
        return [*curl, *files]
    if tool == CURL_QF:
        # ``--next`` ends the option group the key is in: the file host never gets it.
        auth = ["-H", f"Authorization: Bearer {API_KEY}"]
        queries = ["--output-dir", str(outdir), *auth, "-K", str(lists / f"{name}.queries.curl")]
        return [*curl, *queries, "--next", *files]
    if tool == "aria2c":
        urls = str(lists / f"{name}.urls")
        aria2c = [t.aria2c, "-i", urls, "-j", jobs, "-d", str(outdir)]
        return [*aria2c, "--allow-overwrite=true", "--auto-file-renaming=false", "-q"]
    if tool == MD5SUM:
        return [t.md5sum, str(bench.served[name].first_file)]
    return fetcher_command(bench, name, str(outdir))


def fetcher_command(bench: Bench, name: str, archive: str) -> list[str]:
    """``fetcher fetch`` over list ``name`` into ``archive`` (a folder or an ``s3://`` URL)."""
    ids = str(bench.lists_dir / f"{name}.ids")
    fetcher = [bench.tools.fetcher, "fetch", ids, "--archive", archive, "--base-url", bench.api_url]
    return [*fetcher, "--api-key", API_KEY, *FETCHER_FLAGS, *FETCHER_OUTPUT]


def dir_totals(folder: Path) -> tuple[int, int]:
    count = size = 0
    for entry in folder.iterdir():
        if entry.is_file():
            count += 1
            size += entry.stat().st_size
    return count, size


def check_run(
    w: Workload,
    tool: str,
    child: Child,
    log_dir: Path,
    outdir: Path,
    *,
    served: Served | None,
    summary: dict[str, object] | None,
) -> str:
    """Empty when the run did what it should, else what went wrong."""
    ended = check_exit(child, log_dir)
    if ended:
        return ended
    if tool in ("curl", "aria2c"):
        return check_files(outdir, w.tasks, w.total_bytes)
    if tool == CURL_QF:  # a query answer per task, beside the files
        assert served is not None  # both run only over lists built in this session
        return check_files(outdir, 2 * w.tasks, w.total_bytes + served.query_bytes)
    if tool == MD5SUM:
        assert served is not None
        said = (log_dir / "stdout").read_text(encoding="utf-8").split()[:1]
        if said != [served.first_md5]:
            return f"md5sum printed {said}, not {served.first_md5}"
        return ""
    return check_summary(w, tool, summary)


def check_exit(child: Child, log_dir: Path) -> str:
    """Empty when the child exited 0 in time, else how it ended and its stderr's tail."""
    if child.timed_out:
        return f"killed after {RUN_TIMEOUT:g} s"
    if child.exit_code != 0:
        tail = (log_dir / "stderr").read_text(encoding="utf-8", errors="replace")[-300:]
        return f"exit {child.exit_code}: {tail.strip()}"
    return ""


def check_files(outdir: Path, count: int, size: int) -> str:
    """A file tool's output: ``count`` files of ``size`` bytes in all (a 401 answer differs)."""
    got_count, got_size = dir_totals(outdir)
    if (got_count, got_size) != (count, size):
        return f"got {got_count} files / {got_size} bytes, wanted {count} / {size}"
    return ""


def fetcher_summary(log_dir: Path) -> dict[str, object] | None:
    """fetcher's --json summary, or None; under --profile py-spy's lines come before and after."""
    text = (log_dir / "stdout").read_text(encoding="utf-8", errors="replace")
    try:
        summary, _ = json.JSONDecoder().raw_decode(text, max(text.find("{"), 0))
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def check_summary(w: Workload, tool: str, summary: dict[str, object] | None) -> str:
    """What fetcher's summary says it did, against what the workload asks of it."""
    if summary is None:
        return "no JSON summary on stdout"
    if w.key == "f":
        pending, sent = summary.get("pending"), summary.get("requests")
        if pending != w.tasks or sent != w.tasks:
            return f"pending={pending} requests={sent}"
        return ""
    if w.key in ("d", "e"):
        # ``already_archived`` counts the IDs of a settled list that were not read again.
        settled = summary.get("already_archived")
        sent = summary.get("requests")
        if settled != w.tasks or sent != 0:
            return f"already_archived={settled} requests={sent}"
        return ""
    want = w.total_bytes if tool == "fetcher" else 64 * MiB
    if summary.get("archived") != w.tasks or summary.get("bytes_downloaded") != want:
        return f"archived={summary.get('archived')} bytes={summary.get('bytes_downloaded')}"
    return ""


def measure(bench: Bench, logs: AccessLogs, w: Workload, tool: str, run: int) -> Measure:
    """One fresh output folder, one child, its numbers; the folder goes afterwards.

    With ``--profile`` the fetcher runs under ``py-spy record`` (and its numbers say
    little, since the sampler shares the machine).
    """
    name = {"d": "a"}.get(w.key, "c64" if tool == C64 else w.key)  # (d) re-reads (a)'s list
    slug = {C64: "fetcher-64m", CURL_QF: "curl-queries"}.get(tool, tool)
    outdir = bench.work / "runs" / f"{w.key}-{slug}-{run}"
    log_dir = bench.work / "runs" / f"{w.key}-{slug}-{run}.log"
    log_dir.mkdir(parents=True)
    if w.key == "d":
        assert bench.d_base is not None
        shutil.copytree(bench.d_base, outdir, symlinks=True)
    elif w.key == "e":
        base = "e-warm" if tool == RERUN else "e-base"
        shutil.copytree(bench.work / base, outdir, symlinks=True)
    else:
        outdir.mkdir()
    tool_name = "fetcher" if tool in (C64, RERUN) else tool
    logs.mark()
    argv = command(bench, tool_name, name, outdir)
    if bench.args.profile and tool_name == "fetcher" and run >= 0:
        argv = [*py_spy_record(bench, w), "--", *argv]
    child = run_child(argv, bench.env, log_dir, RUN_TIMEOUT)
    api, files = logs.added()
    summary = fetcher_summary(log_dir) if tool_name == "fetcher" else None
    served = bench.served.get(name)
    note = check_run(w, tool, child, log_dir, outdir, served=served, summary=summary)
    if any(line.endswith(" auth") for line in files):  # the key is for the API origin only
        note = (note + "; " if note else "") + "the file host was sent an Authorization header"
    settled = summary.get("already_archived") if summary else None
    tasks = 1 if tool == C64 else w.tasks
    size = 64 * MiB if tool == C64 else w.total_bytes
    result = Measure(
        w.key, tool, run, child.wall, child.rss_kib, child.exit_code, len(api), len(files),
        size, tasks, not note, note, settled if isinstance(settled, int) else None,
    )  # fmt: skip
    keep_for_d = w.key == "a" and tool == "fetcher" and bench.d_base is None and not note
    if keep_for_d and "d" in bench.args.workloads:
        bench.d_base = bench.work / "d-base"
        outdir.rename(bench.d_base)
    shutil.rmtree(outdir, ignore_errors=True)
    drop_log(bench, log_dir, note)
    return result


def drop_log(bench: Bench, log_dir: Path, note: str) -> None:
    """A run's logs go, but a failed run's are kept in ``OUT/failed/``."""
    if note:
        keep = bench.out / "failed" / log_dir.name
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(log_dir, keep)
    shutil.rmtree(log_dir, ignore_errors=True)


def rotated(tools: Sequence[str], run: int) -> list[str]:
    k = run % len(tools)
    return [*tools[k:], *tools[:k]]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def describe(m: Measure) -> str:
    status = "ok" if m.ok else f"FAILED ({m.note})"
    return (
        f"  {m.workload} run {m.run + 1} {m.tool:<22} {m.wall:8.3f} s  {m.rss_kib / 1024:7.1f} MiB"
        f"  requests {m.api_requests} API + {m.file_requests} files"
        f"{'' if m.store_requests is None else f' + {m.store_requests} store'}  {status}"
    )


def run_workload(bench: Bench, logs: AccessLogs, w: Workload, runs: int) -> None:
    if w.key == bucket.ROW:
        run_bucket(bench, logs, runs)
        return
    if w.key == fleet.ROW:
        run_fleet(bench, logs, w, runs)
        return
    say(f"({w.key}) {w.title}: building in {bench.work}")
    started = time.perf_counter()
    names: list[str] = []
    if w.key in ("a", "b", "c"):
        names = prepare_download(bench, w)
    elif w.key == "e":
        build_archived_state(bench, w)
        say("  one unmeasured fetcher run over the list makes the re-run's archive")
        warm = bench.work / "e-warm"
        shutil.copytree(bench.work / "e-base", warm, symlinks=True)
        log_dir = bench.work / "runs" / "e-warm.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        first = run_child(command(bench, "fetcher", "e", warm), bench.env, log_dir, RUN_TIMEOUT)
        if first.exit_code != 0:
            raise SystemExit(f"bench: the first fetcher run over (e) exited {first.exit_code}")
    elif w.key == "f":
        build_pending(bench, w)
    elif w.key == "d" and bench.d_base is None:
        say("  no (a) archive yet: one unmeasured fetcher run over (a) makes it")
        a = workloads(bench.args.quick)["a"]
        a_names = prepare_download(bench, a)
        measure(bench, logs, a, "fetcher", -1)
        drop_download(bench, a_names)
        if bench.d_base is None:
            raise SystemExit("bench: could not build the (a) archive that (d) re-runs over")
    say(f"  built in {time.perf_counter() - started:.1f} s")
    for run in range(runs):
        for tool in ["fetcher"] if bench.args.profile else rotated(w.tools, run):
            m = measure(bench, logs, w, tool, run)
            bench.results.append(m)
            say(describe(m))
    drop_download(bench, names)
    if w.key == "f":
        drop_pending(bench)
    if w.key == "e":
        shutil.rmtree(bench.work / "e-base", ignore_errors=True)
        shutil.rmtree(bench.work / "e-warm", ignore_errors=True)
    if w.key == "d" and bench.d_base is not None:
        shutil.rmtree(bench.d_base, ignore_errors=True)


# -- profiling (--profile) --------------------------------------------------------------


def py_spy_record(bench: Bench, w: Workload) -> list[str]:
    py_spy = Path(sys.executable).parent / "py-spy"
    found = str(py_spy) if py_spy.is_file() else shutil.which("py-spy")
    if found is None:
        raise SystemExit(f"bench: --profile needs py-spy: {sys.executable} -m pip install py-spy")
    raw = bench.out / f"profile-{w.key}.txt"
    return [found, "record", "--format", "raw", "--rate", "250", "--nonblocking", "-o", str(raw)]


def frame_name(frame: str) -> str:
    """``func (pkg/mod.py:123)`` (py-spy already shortens paths) -> ``func (pkg/mod.py)``."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit(':', 1)[0]})"


def area(frame: str) -> str:
    """The library a frame belongs to: ``httpx``, ``asyncio (stdlib)``, ``fetcher.download``."""
    parts = frame.partition(" (")[2].rsplit(":", 1)[0].removesuffix(".py").split("/")
    if parts[0] == "fetcher" and len(parts) > 1:
        return "fetcher." + parts[-1]
    return f"{parts[0]} (stdlib)" if parts[0] in sys.stdlib_module_names else parts[0]


def summarize_profile(raw: Path, top: int = 15) -> str:
    """Where the samples went: by library of the innermost frame, by function (self, total)."""
    self_time: dict[str, int] = {}
    total_time: dict[str, int] = {}
    areas: dict[str, int] = {}
    samples = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack.strip() or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        leaf = frames[-1]
        self_time[frame_name(leaf)] = self_time.get(frame_name(leaf), 0) + count
        areas[area(leaf)] = areas.get(area(leaf), 0) + count
        for name in {frame_name(f) for f in frames}:
            total_time[name] = total_time.get(name, 0) + count
    if not samples:
        return f"{raw.name}: no samples\n"

    def table(title: str, counts: dict[str, int]) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [f"| {title} | % of samples |", "| --- | ---: |"] + [
            f"| `{name}` | {100 * n / samples:.1f} |" for name, n in ranked
        ]

    lines = [f"{samples} samples (250 Hz, busy threads only) in `{raw.name}`", ""]
    lines += [*table("innermost frame's library", areas), ""]
    lines += [*table("function, self", self_time), ""]
    lines += table("function, total (inclusive)", total_time)
    return "\n".join(lines) + "\n"


def time_help(bench: Bench) -> list[float]:
    walls = []
    log_dir = bench.work / "help"
    log_dir.mkdir()
    for _ in range(HELP_RUNS):
        child = run_child([bench.tools.fetcher, "--help"], bench.env, log_dir, 60)
        walls.append(child.wall)
    return walls


def child_env(work: Path) -> dict[str, str]:
    """The environment every tool runs in: no proxies, no fetcher config from this user."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FETCHER_") and "proxy" not in k.lower()
    }
    env["XDG_CONFIG_HOME"] = str(work / "xdg-config")
    env["XDG_DATA_HOME"] = str(work / "xdg-data")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# -- report -----------------------------------------------------------------------------


def host() -> dict[str, str]:
    """CPU, cores, memory, kernel and Python: the lines every report in ``bench/`` starts with."""
    meminfo = Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
    total_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")), 0)
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    return {
        "CPU": model,
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": f"{total_kib / 1024**2:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
    }


def machine(tools: Tools, bucketed: bool = False) -> dict[str, str]:
    return {
        **host(),
        "fetcher commit": fetcher_commit(),
        "nginx": tool_version([tools.nginx, "-v"], stderr=True).removeprefix("nginx version: "),
        "curl": tool_version([tools.curl, "--version"]),
        "aria2c": tool_version([tools.aria2c, "--version"]),
        **(
            {
                "rclone": tool_version([tools.rclone, "version"]),
                "moto": importlib.metadata.version("moto"),
            }
            if bucketed and tools.rclone
            else {}
        ),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def fetcher_commit() -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown (no git)"
    head = _output([git, "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _output([git, "-C", str(REPO), "status", "--porcelain", "--", "fetcher"])
    return f"{head} (+ uncommitted changes in fetcher/)" if dirty else head


def tool_version(argv: list[str], *, stderr: bool = False) -> str:
    text = _output(argv, stderr=stderr)
    return " ".join(text.split()[:3]) if text else "?"


def _output(argv: list[str], *, stderr: bool = False) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)  # noqa: S603
    except OSError:
        return ""
    return (done.stderr if stderr else done.stdout).strip()


@dataclass(frozen=True, slots=True)
class Row:
    """Medians of one tool on one workload, over its successful runs."""

    tool: str
    wall: float
    wall_min: float
    wall_max: float
    rss_mib: float
    api: int
    files: int
    bytes: int
    tasks: int
    ok: int
    total: int
    already_archived: int | None  # the fewest of its runs; None for tools other than fetcher
    store: int | None = None  # requests the bucket's server logged, in (h)

    @property
    def mbps(self) -> float:
        return self.bytes / self.wall / 1e6

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.wall


def rows(results: list[Measure], w: Workload) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for tool in w.tools:
        mine = [m for m in results if m.workload == w.key and m.tool == tool and m.run >= 0]
        good = [m for m in mine if m.ok]
        if not good:
            continue
        walls = [m.wall for m in good]
        settled = [m.already_archived for m in good if m.already_archived is not None]
        stored = [m.store_requests for m in good if m.store_requests is not None]
        out[tool] = Row(
            tool,
            statistics.median(walls),
            min(walls),
            max(walls),
            statistics.median(m.rss_kib for m in good) / 1024,
            max(m.api_requests for m in good),
            max(m.file_requests for m in good),
            good[0].bytes,
            good[0].tasks,
            len(good),
            len(mine),
            min(settled) if settled else None,
            max(stored) if stored else None,
        )
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def workload_table(w: Workload, table: dict[str, Row]) -> list[str]:
    bucketed = any(r.store is not None for r in table.values())
    requests = "requests API + files + store" if bucketed else "requests API + files"
    lines = [
        f"### ({w.key}) {w.title}",
        "",
        "| tool | wall s (median) | min-max s | MB/s | tasks/s | peak RSS MiB | "
        f"{requests} | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table.values():
        mbps = f"{r.mbps:.1f}" if r.bytes else "-"
        rate = f"{r.tasks_per_s:,.0f}" if r.tasks_per_s >= 10 else f"{r.tasks_per_s:.2f}"
        sent = f"{r.api} + {r.files}" + (f" + {r.store or 0}" if bucketed else "")
        lines.append(
            f"| {r.tool} | {r.wall:.3f} | {r.wall_min:.3f}-{r.wall_max:.3f} | {mbps} | "
            f"{rate} | {r.rss_mib:.1f} | {sent} | {r.ok}/{r.total} |"
        )
    fetcher = table.get("fetcher")
    pairs = [(other, r) for other, r in table.items() if not other.startswith("fetcher")]
    if fetcher and pairs:
        lines += ["", "| ratio | wall | peak RSS |", "| --- | ---: | ---: |"]
        for other, r in pairs:
            lines.append(
                f"| fetcher/{other} | {ratio(fetcher.wall, r.wall)} | "
                f"{ratio(fetcher.rss_mib, r.rss_mib)} |"
            )
    return [*lines, ""]


@dataclass(frozen=True, slots=True)
class Target:
    """One target, what was measured, its limit, and whether it is met (None: not measured)."""

    workload: str
    goal: str
    measured: str
    limit: str
    met: bool | None


def figure(value: float, unit: str) -> str:
    """``3.85 s``, ``64 MiB``, ``2,000 IDs``: whole numbers in full, the rest to 3 digits."""
    return f"{value:,.0f} {unit}" if value.is_integer() else f"{value:.3g} {unit}"


def targets(tables: dict[str, dict[str, Row]], help_wall: float | None) -> list[Target]:
    """Each target against the medians, one row per condition."""
    out: list[Target] = []

    def add(
        key: str,
        goal: str,
        value: float | None,
        limit: float | None,
        unit: str,
        exact: bool = False,
    ) -> None:
        if key not in tables:
            return
        if value is None or limit is None:
            out.append(Target(key, goal, "not measured (a run failed)", "-", None))
        else:
            met = value == limit if exact else value <= limit
            out.append(Target(key, goal, figure(value, unit), figure(limit, unit), met))

    def row(key: str, tool: str) -> Row | None:
        return tables.get(key, {}).get(tool)

    def wall(key: str, tool: str, factor: float = 1.0) -> float | None:
        r = row(key, tool)
        return None if r is None else r.wall * factor

    def rss(key: str, tool: str) -> float | None:
        r = row(key, tool)
        return None if r is None else r.rss_mib

    def requests(key: str) -> float | None:
        r = row(key, "fetcher")
        return None if r is None else float(r.api + r.files)

    def settled(key: str) -> float | None:
        r = row(key, "fetcher")
        return None if r is None or r.already_archived is None else float(r.already_archived)

    add("a", "fetcher wall <= aria2c's", wall("a", "fetcher"), wall("a", "aria2c"), "s")
    goal = "fetcher wall <= 2x curl's (queries + files)"
    add("a", goal, wall("a", "fetcher"), wall("a", CURL_QF, 2), "s")
    add("b", "fetcher wall <= 1.1x curl's", wall("b", "fetcher"), wall("b", "curl", 1.1), "s")
    c_curl, c_md5 = wall("c", "curl"), wall("c", MD5SUM)
    c_limit = None if c_curl is None or c_md5 is None else 1.25 * max(c_curl, c_md5)
    goal = "fetcher wall <= 1.25x the larger of curl's and md5sum's"
    add("c", goal, wall("c", "fetcher"), c_limit, "s")
    c_rss, c64_rss = rss("c", "fetcher"), rss("c", C64)
    add("c", "fetcher peak RSS <= 64 MiB", c_rss, 64.0, "MiB")
    spread = None if c_rss is None or c64_rss is None else 100 * abs(c_rss - c64_rss) / c64_rss
    add("c", "peak RSS within 10% of the 64 MiB-file run", spread, 10.0, "%")
    add("d", "fetcher wall <= 0.5 s", wall("d", "fetcher"), 0.5, "s")
    add("d", "zero requests", requests("d"), 0.0, "requests")
    add("d", "already_archived = 2,000 (--json summary)", settled("d"), 2000.0, "IDs", exact=True)
    add("e", "fetcher wall <= 10 s (first run over the list)", wall("e", "fetcher"), 10.0, "s")
    add("e", "fetcher peak RSS <= 100 MiB", rss("e", "fetcher"), 100.0, "MiB")
    add("e", "cron re-run wall <= 10 s", wall("e", RERUN), 10.0, "s")
    add("e", "cron re-run peak RSS <= 100 MiB", rss("e", RERUN), 100.0, "MiB")
    add("f", "fetcher peak RSS <= 100 MiB (first run)", rss("f", "fetcher"), 100.0, "MiB")
    for key in ("h-a", "h-c"):
        goal = "fetcher wall <= curl's + rclone's"
        add(key, goal, wall(key, "fetcher"), wall(key, CURL_RCLONE), "s")
    if help_wall is not None:
        met = help_wall < 0.3
        out.append(Target("help", "fetcher --help < 0.3 s", f"{help_wall:.3f} s", "0.3 s", met))
    return out


def report(bench: Bench, info: dict[str, str], help_walls: list[float]) -> str:
    selected = tabled(bench.args.quick, bench.args.workloads)
    tables = {w.key: rows(bench.results, w) for w in selected}
    help_wall = statistics.median(help_walls) if help_walls else None
    lines = [
        "# fetcher benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python bench/run.py "
        f"--runs {bench.args.runs} --workloads {','.join(bench.args.workloads)}"
        f"{' --quick' if bench.args.quick else ''}`. Medians over each tool's successful runs; "
        "tools alternate run by run; every run writes into a fresh folder in /dev/shm, served "
        "by nginx on loopback (sendfile), so this measures the tools, not a disk or a network.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"fetcher: `fetcher fetch IDS --archive DIR {' '.join(FETCHER_FLAGS)} "
        f"{' '.join(FETCHER_OUTPUT)}`  ",
        f"curl: `curl --parallel --parallel-max {PARALLEL} -s -Z --output-dir DIR -K LIST` "
        "(`url`/`output` pairs)  ",
        f"{CURL_QF}, in (a): `curl --parallel --parallel-max {PARALLEL} -s -Z --output-dir DIR "
        '-H "Authorization: Bearer KEY" -K QUERIES --next --output-dir DIR -K LIST` '
        "(the key in the queries' option group only)  ",
        f"aria2c: `aria2c -i URLS -j {PARALLEL} -d DIR --allow-overwrite=true "
        "--auto-file-renaming=false -q`  ",
        "md5sum, in (c): `md5sum FILE` (the file nginx serves, read where it lies in /dev/shm)",
        *(bucket_commands() if bucket.ROW in bench.args.workloads else []),
        *(fleet_commands() if fleet.ROW in bench.args.workloads else []),
        "",
        "MB = 10^6 bytes. Requests are the lines nginx's access logs gained during the run "
        "(API + files). Peak RSS is the tool's own `ru_maxrss` from `wait4` (forked by a "
        "small `sh`, so it does not inherit the harness's RSS). MB/s and tasks/s are "
        "bytes and tasks over the median wall."
        + (
            " In (h) the store's requests are the lines moto's server logged, and curl + "
            "rclone's wall is the sum of the two, its peak RSS the larger."
            if bucket.ROW in bench.args.workloads
            else ""
        ),
        "",
        *([f"**Note:** {bench.args.note}", ""] if bench.args.note else []),
        "## Targets",
        "",
        "| workload | target | measured (median) | limit | met |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    found = targets(tables, help_wall)
    if bench.fleet is not None:
        found += [Target(*t) for t in bench.fleet.targets()]
    for t in found:
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.workload} | {t.goal} | {t.measured} | {t.limit} | {met} |")
    lines += ["", "## Workloads", ""]
    for w in selected:
        lines += workload_table(w, tables[w.key])
        if w.key == fleet.ROW and bench.fleet is not None:
            lines += bench.fleet.lines()
    if bench.catalog is not None:
        lines += bench.catalog.lines()
    if help_walls:
        lines += [
            f"### fetcher --help: median {help_wall:.3f} s of {len(help_walls)} "
            f"(min {min(help_walls):.3f}, max {max(help_walls):.3f})",
            "",
        ]
    failed = [m for m in bench.results if not m.ok]
    if failed:
        lines += ["## Failed runs", "", *(f"- {describe(m).strip()}" for m in failed), ""]
    lines.append(
        f"Load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    return "\n".join(lines) + "\n"


def bucket_commands() -> list[str]:
    """How (h) runs fetcher and rclone, for the report's header (no key in it)."""
    rclone = " ".join(bucket.copy_argv("rclone", Path("DIR"), "PREFIX", PARALLEL))
    return [
        "  ",
        f"fetcher, in (h): `fetcher fetch IDS --archive s3://{bucket.BUCKET}/PREFIX "
        "--s3-endpoint URL --state FILE` and the flags above, keys in `AWS_*`  ",
        f"curl + rclone, in (h): curl as above into DIR, then `{rclone}`, the remote "
        f"defined by `RCLONE_CONFIG_{bucket.REMOTE.upper()}_*` (type s3, provider Other, "
        "the endpoint, path style)",
    ]


# -- (i): the catalog ---------------------------------------------------------------------


def measure_catalog(bench: Bench) -> CatalogRow:
    """Row (i): ``bench/catalog.py``'s measures, on a state built in the work folder."""
    say("bench: (i) building a state of 100,000 archived tasks, then timing the catalog")
    row = catalog_row(bench.work)
    say("bench: (i) the same archive through fetcher serve, over HTTP")
    add_gallery_http(row, bench.work / "catalog-archive")
    for name in row.timings:
        say(f"  {name}: {row.median(name) * 1000:.1f} ms")
    return row


# -- (h): into a bucket -----------------------------------------------------------------


def run_bucket(bench: Bench, logs: AccessLogs, runs: int) -> None:
    """Row (h): each part's files built and served, then fetcher and curl + rclone in turn."""
    assert bench.tools.rclone is not None  # preflight checked it
    say(f"({bucket.ROW}) starting moto's server")
    log = bench.out / "s3server.log"
    store = bucket.start(sys.executable, bench.tools.rclone, bench.env, bench.work, log)
    try:
        say(f"  moto at {store.url}")
        for w in bucket_parts(bench.args.quick):
            say(f"({w.key}) {w.title}: building in {bench.work}")
            base = workloads(bench.args.quick)[w.key[-1]]  # (a)'s or (c)'s kind of file
            build_tasks(
                bench, base, w.key, build_files(bench, base, w.key, distinct=base.key == "a")
            )
            for run in range(runs):
                for tool in rotated(("fetcher", CURL_RCLONE), run):
                    measured = (
                        [measure_bucket_fetcher(bench, logs, store, w, run)]
                        if tool == "fetcher"
                        else measure_curl_rclone(bench, logs, store, w, run)
                    )
                    for m in measured:
                        bench.results.append(m)
                        say(describe(m))
            drop_download(bench, [w.key])
    finally:
        store.stop()


def check_stored(store: bucket.Store, w: Workload, prefix: str) -> str:
    """Empty when the bucket holds every file of ``w`` under ``prefix``, else what it holds."""
    count, size = store.media(prefix)
    if (count, size) != (w.tasks, w.total_bytes):
        return f"the bucket holds {count} files / {size} bytes, wanted {w.tasks} / {w.total_bytes}"
    return ""


def measure_bucket_fetcher(
    bench: Bench, logs: AccessLogs, store: bucket.Store, w: Workload, run: int
) -> Measure:
    """fetcher archiving list ``w.key`` into a fresh prefix; its state and work folder in RAM."""
    prefix = f"{w.key}-fetcher-{run}"
    local = bench.work / "runs" / prefix
    log_dir = bench.work / "runs" / f"{prefix}.log"
    log_dir.mkdir(parents=True)
    local.mkdir()
    since = store.fresh()
    logs.mark()
    argv = fetcher_command(bench, w.key, f"s3://{bucket.BUCKET}/{prefix}")
    argv += ["--s3-endpoint", store.url, "--state", str(local / "state.sqlite")]
    child = run_child(argv, store.fetcher_env, log_dir, RUN_TIMEOUT)
    sent = store.requests(since)  # before the check, whose listing is not the tool's
    api, files = logs.added()
    summary = fetcher_summary(log_dir)
    note = check_run(w, "fetcher", child, log_dir, local, served=None, summary=summary)
    note = note or check_stored(store, w, prefix)
    if any(line.endswith(" auth") for line in files):
        note = (note + "; " if note else "") + "the file host was sent an Authorization header"
    result = Measure(
        w.key, "fetcher", run, child.wall, child.rss_kib, child.exit_code, len(api), len(files),
        w.total_bytes, w.tasks, not note, note, store_requests=sent,
    )  # fmt: skip
    shutil.rmtree(local, ignore_errors=True)
    drop_log(bench, log_dir, note)
    return result


def measure_curl_rclone(
    bench: Bench, logs: AccessLogs, store: bucket.Store, w: Workload, run: int
) -> list[Measure]:
    """curl's download into /dev/shm, then ``rclone copy`` of that folder: each, and the two."""
    prefix = f"{w.key}-rclone-{run}"
    outdir = bench.work / "runs" / f"{w.key}-curl-{run}"
    log_dir = bench.work / "runs" / f"{prefix}.log"
    (log_dir / "curl").mkdir(parents=True)
    (log_dir / "rclone").mkdir()
    outdir.mkdir()
    since = store.fresh()
    logs.mark()
    argv = command(bench, "curl", w.key, outdir)
    curl = run_child(argv, bench.env, log_dir / "curl", RUN_TIMEOUT)
    _, files = logs.added()
    curl_note = check_run(w, "curl", curl, log_dir / "curl", outdir, served=None, summary=None)
    if any(line.endswith(" auth") for line in files):
        curl_note = (curl_note + "; " if curl_note else "") + "the file host was sent a key"
    argv = bucket.copy_argv(store.rclone, outdir, prefix, PARALLEL)
    rclone = run_child(argv, store.rclone_env, log_dir / "rclone", RUN_TIMEOUT)
    sent = store.requests(since)
    rclone_note = "curl failed" if curl_note else check_exit(rclone, log_dir / "rclone")
    rclone_note = rclone_note or check_stored(store, w, prefix)
    common = (w.total_bytes, w.tasks)
    out = [
        Measure(w.key, "curl", run, curl.wall, curl.rss_kib, curl.exit_code, 0, len(files),
                *common, not curl_note, curl_note),
        Measure(w.key, RCLONE, run, rclone.wall, rclone.rss_kib, rclone.exit_code, 0, 0,
                *common, not rclone_note, rclone_note, store_requests=sent),
    ]  # fmt: skip
    both = "; ".join(n for n in (curl_note, rclone_note) if n)
    pair = Measure(
        w.key, CURL_RCLONE, run, curl.wall + rclone.wall, max(curl.rss_kib, rclone.rss_kib),
        curl.exit_code or rclone.exit_code, 0, len(files), *common, not both, both,
        store_requests=sent,
    )  # fmt: skip
    out.append(pair)
    shutil.rmtree(outdir, ignore_errors=True)
    drop_log(bench, log_dir, both)
    return out


# -- (g): runs sharing a PostgreSQL state ------------------------------------------------


def run_fleet(bench: Bench, logs: AccessLogs, w: Workload, runs: int) -> None:
    """Row (g): (a)'s kind of files, served slowly; one run, then four sharing a state."""
    say(f"({w.key}) {w.title}: building in {bench.work}")
    a = dataclasses.replace(workloads(bench.args.quick)["a"], tasks=w.tasks)
    files = build_files(bench, a, w.key, distinct=True)
    build_tasks(bench, a, w.key, files)
    ids = (bench.lists_dir / f"{w.key}.ids").read_text(encoding="utf-8").split()
    hashes = fleet.expected_hashes(ids, sorted((bench.files_dir / w.key).iterdir()))
    paths = [url.removeprefix(bench.files_url) for url, _ in files]
    bench.fleet = fleet.FleetRow(w.tasks)
    say("  starting PostgreSQL")
    with fleet.Cluster() as cluster:
        for run in range(runs):
            for part in rotated(w.tools, run):
                m = measure_fleet(bench, logs, cluster, w, part, run, hashes, paths)
                bench.results.append(m)
                say(describe(m))
    drop_download(bench, [w.key])


def fleet_command(bench: Bench, name: str, archive: Path, state: str, downloads: int) -> list[str]:
    """``fetcher fetch`` as in (a), with ``--downloads`` and the state in PostgreSQL."""
    argv = fetcher_command(bench, name, str(archive))
    argv[argv.index("--downloads") + 1] = str(downloads)
    return [*argv, "--state", state]


def measure_fleet(
    bench: Bench,
    logs: AccessLogs,
    cluster: fleet.Cluster,
    w: Workload,
    part: str,
    run: int,
    hashes: dict[str, str],
    paths: list[str],
) -> Measure:
    """One run, or four at once, over a fresh database and archive; then what they left."""
    assert bench.fleet is not None
    count = 1 if part == fleet.SINGLE else fleet.RUNS
    downloads = fleet.SINGLE_DOWNLOADS if count == 1 else fleet.SHARED_DOWNLOADS
    archive = bench.work / "runs" / f"{w.key}-{count}-{run}"
    log_root = bench.work / "runs" / f"{w.key}-{count}-{run}.log"
    log_dirs = [log_root / str(n) for n in range(1, count + 1)]
    for folder in (archive, *log_dirs):
        folder.mkdir(parents=True)
    state = cluster.database()
    argv = fleet_command(bench, w.key, archive, state, downloads)
    logs.mark()
    wall, children = run_together([argv] * count, cluster.env(bench.env), log_dirs, RUN_TIMEOUT)
    api, files = logs.added()
    processes = [
        fleet.Process.of(c.wall, c.rss_kib, c.exit_code, fetcher_summary(d))
        for c, d in zip(children, log_dirs, strict=True)
    ]
    archived, done, left = cluster.counts(state)
    stored = fleet.check_archive(archive, hashes)
    served = fleet.count_gets(files, paths)
    notes = [
        *(f"process {n}: {e}" for n, (c, d) in enumerate(zip(children, log_dirs, strict=True), 1)
          if (e := check_exit(c, d))),
        *(f"process {n}: its summary counts {p.accounted} of {w.tasks} tasks"
          for n, p in enumerate(processes, 1) if p.accounted != w.tasks),
        *([f"the state holds {archived} archived tasks and {done} files done"]
          if (archived, done) != (w.tasks, w.tasks) else []),
        stored.problem(w.tasks),
        served.problem(),
        *(["the file host was sent an Authorization header"]
          if any(line.endswith(" auth") for line in files) else []),
    ]  # fmt: skip
    note = "; ".join(n for n in notes if n)
    bench.fleet.parts.append(
        fleet.Part(part, run, wall, processes, archived, done, left, stored, served, note)
    )
    result = Measure(
        w.key, part, run, wall, max(c.rss_kib for c in children),
        next((c.exit_code for c in children if c.exit_code), 0), len(api), len(files),
        w.total_bytes, w.tasks, not note, note,
    )  # fmt: skip
    shutil.rmtree(archive, ignore_errors=True)
    drop_log(bench, log_root, note)
    return result


def fleet_commands() -> list[str]:
    """How (g) runs fetcher, for the report's header (no password in it)."""
    return [
        "  ",
        f"fetcher, in (g): `fetcher fetch IDS --archive DIR --state postgresql://postgres@"
        f"127.0.0.1:PORT/DB` and the flags above, the password in `PGPASSWORD`: one run with "
        f"`--downloads {fleet.SINGLE_DOWNLOADS}`, or {fleet.RUNS} started at once, each with "
        f"`--downloads {fleet.SHARED_DOWNLOADS}` and the whole list, sharing the database "
        f"and the archive folder; a fresh database and folder for every measure. nginx "
        f"serves (g)'s files with `limit_rate {fleet.RATE}`",
    ]


# -- main -------------------------------------------------------------------------------


def write_profiles(bench: Bench) -> int:
    for key in bench.args.workloads:
        raw = bench.out / f"profile-{key}.txt"
        if raw.is_file():
            text = f"## ({key}) fetcher under py-spy\n\n" + summarize_profile(raw)
            (bench.out / f"profile-{key}.md").write_text(text, encoding="utf-8")
            print(text)
    return 0 if all(m.ok for m in bench.results) else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, help="runs per tool and workload (default 5)")
    parser.add_argument(
        "--workloads",
        default="a,b,c,d,e,f,i",
        type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
        help="comma-separated subset of a,b,c,d,e,f,g,h,i (g, runs sharing a PostgreSQL "
        "state, and h, the bucket, only when named)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="report folder")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 run, (c) 256 MiB")
    parser.add_argument("--keep-work", action="store_true", help="leave the /dev/shm folder")
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine busy)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of measuring, run fetcher once per workload under py-spy record "
        "and summarise where its samples go (OUT/profile-W.txt and .md)",
    )
    args = parser.parse_args(argv)
    known = "abcdef" + fleet.ROW + bucket.ROW + CATALOG
    unknown = [k for k in args.workloads if k not in known or len(k) != 1]
    if unknown or not args.workloads:
        parser.error(f"unknown workloads {unknown}: choose from {','.join(known)}")
    args.workloads = sorted(set(args.workloads))
    args.runs = args.runs or (1 if args.quick or args.profile else 5)
    return args


def preflight(args: argparse.Namespace) -> Tools:
    tools, missing = find_tools()
    if tools is not None and bucket.ROW in args.workloads:
        missing = missing_for_bucket(tools)
        tools = None if missing else tools
    if tools is not None and fleet.ROW in args.workloads:
        missing = fleet.missing()
        tools = None if missing else tools
    if tools is None:
        say("bench: missing, install and run again:")
        for item in missing:
            say(f"  - {item}")
        say(f"on Debian/Ubuntu: {INSTALL_LINE}")
        raise SystemExit(2)
    all_w = workloads(args.quick)
    need = shm_needed([all_w[k] for k in args.workloads if k in all_w])
    free = shutil.disk_usage(SHM).free
    if free < need:
        raise SystemExit(
            f"bench: {SHM} has {free / GiB:.1f} GiB free; these workloads need about "
            f"{need / GiB:.1f} GiB (the file, one output copy, the archives kept)"
        )
    return tools


@dataclass
class Session:
    """The session's two owned resources: the /dev/shm folder and nginx."""

    bench: Bench
    nginx: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.nginx is not None:
            stop_nginx(self.nginx)
        if not self.bench.args.keep_work:
            shutil.rmtree(self.bench.work, ignore_errors=True)


def open_session(args: argparse.Namespace, tools: Tools) -> Session:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "failed", ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="fetcher-bench-", dir=SHM))
    work.chmod(0o755)  # nginx's worker may run as another user
    bench = Bench(args, tools, work, out, env=child_env(work))
    for folder in (bench.api_dir, bench.files_dir, bench.lists_dir, work / "runs"):
        folder.mkdir()
    return Session(bench)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = preflight(args)
    become_subreaper()
    session = open_session(args, tools)
    bench = session.bench
    started = time.perf_counter()
    try:
        info = machine(tools, bucket.ROW in args.workloads)
        session.nginx = start_nginx(bench)
        say(f"bench: nginx API {bench.api_url}, files {bench.files_url}; work in {bench.work}")
        logs = AccessLogs(bench.out)
        help_walls = [] if args.profile else time_help(bench)
        if help_walls:
            say(f"fetcher --help: median {statistics.median(help_walls):.3f} s")
        for key in args.workloads:
            if key == CATALOG:
                bench.catalog = measure_catalog(bench)
                continue
            run_workload(bench, logs, workloads(args.quick)[key], args.runs)
    finally:
        session.close()
    if args.profile:
        return write_profiles(bench)
    text = report(bench, info, help_walls)
    (bench.out / "results.md").write_text(text, encoding="utf-8")
    runs = [dataclasses.asdict(m) for m in bench.results]
    (bench.out / "runs.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(text)
    say(f"bench: {time.perf_counter() - started:.0f} s; wrote {bench.out / 'results.md'}")
    return 0 if all(m.ok for m in bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
