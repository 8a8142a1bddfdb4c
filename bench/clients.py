"""Time the HTTP clients fetcher could use on one loopback nginx, each in a fresh process.

Three workloads, served from a RAM-backed folder (/dev/shm) by the nginx of
``bench/run.py`` (:func:`run.serve`): 2,000 query-API JSON answers of about 3 KiB
(GETs with ``Authorization: Bearer``), 2,000 distinct 256 KiB files and one 1 GiB
file, the last two streamed in pieces and thrown away. Every client runs
``bench/clients_child.py`` in a new process with 16 requests in flight over at
most 16 connections; the child times the requests alone (after its imports and
building its client) and reports the byte count, which must match, as must the
lines nginx logged. Clients take turns, a different one first each round, and
the table gives each one's median.

fetcher's own client was deleted when the project moved to aiohttp; it is rebuilt
from git history (``--legacy-commit``) into a throwaway package. The httpx family
comes from a venv of its own, named by ``--httpx-python``::

    python3 -m venv /tmp/clients-venv
    /tmp/clients-venv/bin/pip install aiohttp httpx==0.28.1 httpx-aiohttp httpx2

httpx2 installs as its own package (``httpx2``, over ``httpcore2``), so it and
httpx share that venv. Run from the repository root with the project's venv::

    .venv/bin/python bench/clients.py [--runs 3] [--quick] [--httpx-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from run import (
    API_KEY,
    PARALLEL,
    REPO,
    SHM,
    AccessLogs,
    GiB,
    KiB,
    MiB,
    Server,
    child_env,
    host,
    rotated,
    say,
    serve,
    stop_nginx,
    task_id,
    tool_version,
    write_random,
)

CHILD = Path(__file__).resolve().parent / "clients_child.py"
DEFAULT_HTTPX_PYTHON = "/tmp/clients-venv/bin/python"  # noqa: S108 (a venv outside the repo)
VENV_LINES = (
    "python3 -m venv /tmp/clients-venv && "
    "/tmp/clients-venv/bin/pip install aiohttp httpx==0.28.1 httpx-aiohttp httpx2"
)
#: Table order; which interpreter runs each: the project's, or the httpx venv.
CLIENTS = ("legacy", "aiohttp", "httpx-aiohttp", "httpx2", "httpx")
HTTPX_FAMILY = frozenset({"httpx-aiohttp", "httpx2", "httpx"})
CHILD_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Load:
    """One workload: the URL list a child reads and what it must get back."""

    key: str
    title: str
    count: int
    file_size: int
    #: Query-API answers: read whole, with the bearer key, from the API origin.
    api: bool

    def urls(self, work: Path) -> Path:
        return work / f"{self.key}.urls"


def loads(quick: bool) -> list[Load]:
    count = 200 if quick else 2000
    large = 64 * MiB if quick else GiB
    large_title = f"1 x {large // MiB} MiB streamed" if quick else "1 x 1 GiB streamed"
    return [
        Load("json", f"{count:,} JSON GETs", count, 0, api=True),
        Load("small", f"{count:,} x 256 KiB streamed", count, 256 * KiB, api=False),
        Load("large", large_title, 1, large, api=False),
    ]


@dataclass(slots=True)
class Measure:
    """One child: one client on one workload."""

    client: str
    load: str
    run: int
    seconds: float | None
    note: str
    versions: dict[str, str]


# -- the files nginx serves -------------------------------------------------------------


def build_json(api: Path, count: int) -> tuple[list[str], int]:
    """``count`` DescribeTaskDetail answers in fetcher's replica's shape; (names, total bytes).

    Six output files bring an answer to about 2.5 KiB, in the range the real
    gateway sends.
    """
    from fetcher.replica import file_info, task_response

    names: list[str] = []
    total = 0
    for n in range(count):
        tid = task_id("clients", "AigcImageTask", n)
        infos = [
            file_info(f"http://127.0.0.1/files/{tid}-{k}.png", md5="0" * 32, size=256 * KiB)
            for k in range(6)
        ]
        body = json.dumps(task_response(tid, files=infos)).encode()
        (api / tid).write_bytes(body)
        names.append(tid)
        total += len(body)
    return names, total


def build_files(files: Path, load: Load) -> list[str]:
    """Distinct random files (no hard links: nothing may be served from a shared page)."""
    folder = files / load.key
    folder.mkdir()
    names = []
    for n in range(load.count):
        path = folder / f"{n:06d}.bin"
        write_random(path, load.file_size)
        names.append(f"{load.key}/{path.name}")
    return names


def write_url_lists(
    work: Path, server: Server, selected: list[Load], names: dict[str, list[str]]
) -> None:
    for load in selected:
        base = f"{server.api_url}/tencent-vod/v1/query" if load.api else server.files_url
        text = "".join(f"{base}/{name}\n" for name in names[load.key])
        load.urls(work).write_text(text, encoding="utf-8")


# -- fetcher's old client ---------------------------------------------------------------


def materialise_legacy(commit: str, root: Path) -> tuple[str, str]:
    """Write ``fetcher/httpclient.py`` and ``url.py`` at ``commit`` as ``root/legacyhttp``.

    Returns (short commit, "") or ("", why not). The client imports ``.url``, so the
    two go into one package of their own, apart from today's fetcher.
    """
    git = shutil.which("git")
    if git is None:
        return "", "git is not on PATH"
    rev = _git(git, "rev-parse", "--short", f"{commit}^{{commit}}")
    if rev.returncode != 0:
        return "", f"commit {commit} not found: {rev.stderr.strip()}"
    package = root / "legacyhttp"
    package.mkdir(parents=True)
    for name in ("httpclient.py", "url.py"):
        shown = _git(git, "show", f"{commit}:fetcher/{name}")
        if shown.returncode != 0:
            return "", f"`git show {commit}:fetcher/{name}` failed: {shown.stderr.strip()}"
        (package / name).write_text(shown.stdout, encoding="utf-8")
    short = rev.stdout.strip()
    (package / "__init__.py").write_text(f'"""fetcher/httpclient.py at {short}."""\n')
    return short, ""


def _git(git: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [git, "-C", str(REPO), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603


# -- running one child ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """What every child needs: interpreters, where lists live, the old client's package."""

    python: str
    httpx_python: str
    work: Path
    legacy_root: Path
    env: dict[str, str]


def measure(setup: Setup, logs: AccessLogs, client: str, load: Load, run: int) -> Measure:
    python = setup.httpx_python if client in HTTPX_FAMILY else setup.python
    argv = [python, str(CHILD), "--client", client, "--urls", str(load.urls(setup.work))]
    argv += ["--connections", str(PARALLEL)]
    if load.api:
        argv += ["--bearer", API_KEY, "--whole"]
    if client == "legacy":
        argv += ["--legacy-root", str(setup.legacy_root)]
    logs.mark()
    try:
        done = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, env=setup.env, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return Measure(client, load.key, run, None, f"killed after {CHILD_TIMEOUT:g} s", {})
    api, files = logs.added()
    logged = api if load.api else files
    if done.returncode != 0:
        tail = done.stderr.strip()[-300:]
        return Measure(client, load.key, run, None, f"exit {done.returncode}: {tail}", {})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    want = load_bytes(setup.work, load)
    got = (result["requests"], result["bytes"], len(logged))
    note = ""
    if got != (load.count, want, load.count):
        note = f"requests, bytes, nginx log lines {got}; wanted {(load.count, want, load.count)}"
    elif any(not line.startswith("200 ") for line in logged):
        note = "nginx logged an answer other than 200"
    return Measure(client, load.key, run, result["seconds"], note, result["versions"])


def load_bytes(work: Path, load: Load) -> int:
    """Body bytes a child must count: the files' sizes, or the JSON answers' total."""
    if load.api:
        return int((work / "json.bytes").read_text(encoding="utf-8"))
    return load.count * load.file_size


# -- report -----------------------------------------------------------------------------


def label(client: str, versions: dict[str, str], legacy: str) -> str:
    v = versions.get
    labels = {
        "legacy": f"fetcher's own client (`fetcher/httpclient.py` at {legacy or '?'})",
        "aiohttp": f"aiohttp {v('aiohttp')}",
        "httpx-aiohttp": f"httpx {v('httpx')} over httpx-aiohttp {v('httpx-aiohttp')} "
        f"(aiohttp {v('aiohttp')})",
        "httpx2": f"httpx2 {v('httpx2')} (httpcore2 {v('httpcore2')})",
        "httpx": f"httpx {v('httpx')} (httpcore {v('httpcore')})",
    }
    return labels[client]


def walls(results: list[Measure], load: str) -> list[float]:
    return [m.seconds for m in results if m.load == load and m.seconds is not None and not m.note]


def cell(walls: list[float], runs: int) -> str:
    if not walls:
        return "failed"
    text = f"{statistics.median(walls):.3f} s ({min(walls):.2f}-{max(walls):.2f})"
    return text if len(walls) == runs else f"{text}, {len(walls)}/{runs} ok"


def report(
    args: argparse.Namespace,
    selected: list[Load],
    results: list[Measure],
    notes: list[str],
    legacy: str,
) -> str:
    measured = [c for c in CLIENTS if any(m.client == c for m in results)]
    header = " | ".join(load.title for load in selected)
    lines = [
        "# HTTP clients on loopback nginx",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python bench/clients.py --runs {args.runs}"
        f"{' --quick' if args.quick else ''}`. Each cell: median wall seconds of the requests "
        "alone, timed inside a fresh process after its imports and after building its client "
        f"(min-max in brackets), {PARALLEL} requests in flight over at most {PARALLEL} "
        "connections, bodies counted and discarded; clients take turns, a different one "
        "first each round. nginx serves from /dev/shm over loopback.",
        "",
        f"| client | {header} |",
        "| --- |" + " ---: |" * len(selected),
    ]
    for client in measured:
        mine = [m for m in results if m.client == client]
        versions = next((m.versions for m in mine if m.versions), {})
        cells = [cell(walls(mine, w.key), args.runs) for w in selected]
        lines.append(f"| {label(client, versions, legacy)} | {' | '.join(cells)} |")
    info = {
        **host(),
        "nginx": nginx_version(args.nginx),
        "load average at end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    lines += ["", "| machine | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in info.items())]
    failed = [m for m in results if m.note]
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {m.client} on {m.load}, run {m.run + 1}: {m.note}" for m in failed]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, help="rounds; each client once per workload (3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 files, 64 MiB, 1 run")
    parser.add_argument(
        "--python", default=sys.executable, help="runs aiohttp and the old client (this one)"
    )
    parser.add_argument(
        "--httpx-python",
        default=DEFAULT_HTTPX_PYTHON,
        help=f"runs httpx, httpx2 and httpx-aiohttp (default {DEFAULT_HTTPX_PYTHON})",
    )
    parser.add_argument("--legacy-commit", default="e0551dd", help="where fetcher's client was")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="report folder")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.nginx = find_nginx()
    return args


def usable(python: str, modules: str) -> str:
    """Empty if ``python`` imports ``modules``, else why not."""
    try:
        done = subprocess.run(  # noqa: S603
            [python, "-c", f"import {modules}"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        return f"{python}: {exc.strerror}"
    return "" if done.returncode == 0 else f"{python} cannot import {modules}"


def clients_to_run(args: argparse.Namespace, legacy_note: str) -> tuple[list[str], list[str]]:
    """The clients that can run here, and a note for each row left out."""
    notes: list[str] = []
    skip: set[str] = set()
    if legacy_note:
        skip.add("legacy")
        notes.append(f"fetcher's own client not measured: {legacy_note}")
    if why := usable(args.python, "aiohttp"):
        skip.add("aiohttp")
        notes.append(f"aiohttp not measured: {why}")
    if why := usable(args.httpx_python, "httpx, httpx2, httpx_aiohttp"):
        skip |= HTTPX_FAMILY
        notes.append(f"httpx family not measured: {why} (make it with `{VENV_LINES}`)")
    return [c for c in CLIENTS if c not in skip], notes


def find_nginx() -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    nginx = shutil.which("nginx", path=search)
    if nginx is None:
        raise SystemExit("clients: nginx not found (apt-get install -y nginx)")
    return nginx


def nginx_version(nginx: str) -> str:
    return tool_version([nginx, "-v"], stderr=True).removeprefix("nginx version: ")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    selected = loads(args.quick)
    need = sum(w.count * w.file_size for w in selected) + 64 * MiB
    if shutil.disk_usage(SHM).free < need:
        raise SystemExit(f"clients: {SHM} needs {need / GiB:.1f} GiB free")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetcher-clients-", dir=SHM))
    work.chmod(0o755)  # nginx's worker may run as another user
    server: Server | None = None
    results: list[Measure] = []
    legacy_short = ""
    try:
        legacy_short, legacy_note = materialise_legacy(args.legacy_commit, work / "legacy")
        clients, notes = clients_to_run(args, legacy_note)
        say(f"clients: building in {work}")
        api, files = work / "api", work / "files"
        api.mkdir()
        files.mkdir()
        names, json_bytes = build_json(api, selected[0].count)
        (work / "json.bytes").write_text(str(json_bytes), encoding="utf-8")
        built = {"json": names, **{w.key: build_files(files, w) for w in selected[1:]}}
        server = serve(args.nginx, out, api, files)
        write_url_lists(work, server, selected, built)
        setup = Setup(args.python, args.httpx_python, work, work / "legacy", child_env(work))
        logs = AccessLogs(out)
        for run in range(args.runs):
            for load in selected:
                for client in rotated(clients, run):
                    m = measure(setup, logs, client, load, run)
                    results.append(m)
                    wall = "-" if m.seconds is None else f"{m.seconds:.3f} s"
                    say(f"  run {run + 1} {load.key:<5} {client:<13} {wall} {m.note}")
    finally:
        if server is not None:
            stop_nginx(server.proc)
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, selected, results, notes, legacy_short)
    (out / "clients.md").write_text(text, encoding="utf-8")
    runs = json.dumps([asdict(m) for m in results], indent=1)
    (out / "clients-runs.json").write_text(runs, encoding="utf-8")
    print(text)
    return 0 if all(not m.note for m in results) else 1


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    say(f"clients: {time.perf_counter() - started:.0f} s")
    sys.exit(code)
