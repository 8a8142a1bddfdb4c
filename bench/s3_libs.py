"""Choose the S3 library by measurement: aiobotocore against obstore on one loopback moto server.

Three jobs against moto's server mode (``bench/s3server.py``) on 127.0.0.1: 2,000
distinct 256 KiB objects put 16 at a time, one 1 GiB object put in 16 MiB parts
(4 in flight) and read back, and the cost of importing the library and building a
client. Each measurement runs ``bench/s3_libs_child.py`` in a new process; the
libraries take turns, a different one first each round, and the table gives each
one's median. The requests each child sent are the lines moto's server logged.
A last child per library checks what the archive needs from it (checksums on
uploads, conditional writes, listing and aborting multipart uploads, AWS_PROFILE,
path and virtual-hosted addressing) and the report lists what it found.

Both libraries and the server live in a venv of their own, outside the repository;
this script installs nothing and needs only the standard library::

    python3 -m venv /tmp/s3libs-venv
    /tmp/s3libs-venv/bin/pip install aiobotocore obstore 'moto[server]'
    python3 bench/s3_libs.py [--runs 3] [--quick] [--python /tmp/s3libs-venv/bin/python]
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

import s3server

BENCH = Path(__file__).resolve().parent
CHILD = BENCH / "s3_libs_child.py"
SHM = Path("/dev/shm")  # noqa: S108 (RAM-backed on purpose: no disk is measured)
MiB, GiB = 1024**2, 1024**3
DEFAULT_PYTHON = "/tmp/s3libs-venv/bin/python"  # noqa: S108 (a venv outside the repo)
VENV_LINES = (
    "python3 -m venv /tmp/s3libs-venv && "
    "/tmp/s3libs-venv/bin/pip install aiobotocore obstore 'moto[server]'"
)
LIBS = ("aiobotocore", "obstore")
BUCKET = "bench"
PART = 16 * MiB
PART_PARALLEL = 4
PARALLEL = 16
IMPORT_RUNS = 5
CHILD_TIMEOUT = 900.0


def big_name(size: int) -> str:
    return "1 GiB" if size == GiB else f"{size // MiB} MiB"


def job_titles(count: int, size: int) -> dict[str, str]:
    big = big_name(size)
    return {
        "small": f"{count:,} x 256 KiB put, {PARALLEL} in flight",
        "large": f"{big} put in {PART // MiB} MiB parts, {PART_PARALLEL} in flight",
        "get": f"the same {big} read back, streamed",
    }


@dataclass(slots=True)
class Measure:
    """One child: one library on one job."""

    lib: str
    job: str
    run: int
    seconds: float | None
    import_s: float | None
    client_s: float | None
    bytes: int
    requests: dict[str, int]
    vmhwm_kib: int
    exit_code: int
    note: str


def child_env() -> dict[str, str]:
    """The caller's environment without its AWS_* (a CA bundle, a profile), and the bench's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=s3server.ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=s3server.SECRET_KEY,
        AWS_REGION=s3server.REGION,
        AWS_DEFAULT_REGION=s3server.REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def build(work: Path, count: int, large: int) -> tuple[Path, Path]:
    small = work / "small"
    small.mkdir()
    for n in range(count):
        (small / f"{n:06d}.png").write_bytes(os.urandom(256 * 1024))
    big = work / "large.bin"
    with big.open("wb") as handle:
        for _ in range(large // (16 * MiB)):
            handle.write(os.urandom(16 * MiB))
    return small, big


def run_child(
    python: str, server: s3server.S3Server, lib: str, job: str, extra: list[str], run: int
) -> Measure:
    argv = [python, str(CHILD), "--lib", lib, "--job", job, "--endpoint", server.url]
    argv += ["--bucket", BUCKET, "--parallel", str(PARALLEL)]
    argv += ["--part-size", str(PART), "--part-parallel", str(PART_PARALLEL), *extra]
    since = s3server.log_size(server)
    done = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, env=child_env(), timeout=CHILD_TIMEOUT, check=False
    )
    requests = s3server.count_requests(server, since)
    lines = done.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else {}
    except ValueError:
        out = {}
    note = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-300:]!r}"
    if out and done.returncode != 0:
        note = f"exit {done.returncode} after printing its result"
    return Measure(
        lib,
        job,
        run,
        out.get("seconds"),
        out.get("import_s"),
        out.get("client_s"),
        int(out.get("bytes", 0)),
        requests,
        int(out.get("vmhwm_kib", 0)),
        done.returncode,
        note,
    )


def caps(python: str, server: s3server.S3Server, lib: str) -> dict[str, str]:
    argv = [python, str(CHILD), "--lib", lib, "--job", "caps", "--endpoint", server.url]
    argv += ["--bucket", BUCKET]
    done = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, env=child_env(), timeout=300, check=False
    )
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    found: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])["caps"]
    return found


def versions(python: str) -> dict[str, str]:
    code = (
        "import json; from importlib import metadata as m; print(json.dumps({d: m.version(d) "
        "for d in ('aiobotocore', 'botocore', 'aiohttp', 'obstore', 'moto')}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)  # noqa: S603
    return json.loads(done.stdout) if done.returncode == 0 else {}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(
    args: argparse.Namespace,
    results: list[Measure],
    found: dict[str, dict[str, str]],
    info: dict[str, str],
    size: int,
    count: int,
) -> str:
    lines = [
        "# S3 libraries: aiobotocore and obstore on moto's server (loopback)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python3 bench/s3_libs.py --runs {args.runs}"
        f"{' --quick' if args.quick else ''}`. Each figure is the median over the runs of a "
        "fresh process; the libraries alternate, a different one first each round.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"Objects: {count:,} x 256 KiB; one {big_name(size)} file, parts of {PART // MiB} MiB, "
        f"{PART_PARALLEL} in flight. aiobotocore sends Content-MD5 on every put and part "
        "(its own CRC32 off); obstore sends x-amz-checksum-sha256. Both sign the payload "
        "(plain HTTP). Seconds cover the requests only, after import and client.",
        "",
        "| job | library | wall s (median) | min-max s | MB/s | requests | peak RSS MiB "
        "| runs ok |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    titles = job_titles(count, size)
    for job in ("small", "large", "get"):
        for lib in LIBS:
            mine = [m for m in results if m.lib == lib and m.job == job]
            good = [m for m in mine if m.seconds is not None and m.exit_code == 0]
            walls = [m.seconds for m in good if m.seconds is not None]
            mid = median(walls)
            moved = good[0].bytes if good else 0
            mbps = f"{moved / mid / 1e6:.1f}" if mid else "-"
            reqs = (
                " ".join(f"{k} {v}" for k, v in sorted(good[-1].requests.items())) if good else ""
            )
            rss = median([m.vmhwm_kib / 1024 for m in good])
            spread = f"{min(walls):.3f}-{max(walls):.3f}" if walls else "-"
            lines.append(
                f"| {titles[job]} | {lib} | {fmt(mid)} | {spread} | {mbps} | {reqs} | "
                f"{fmt(rss, 1)} | {len(good)}/{len(mine)} |"
            )
    lines += [
        "",
        f"| import, then build a client (median of {IMPORT_RUNS * args.runs}) | import s | "
        "client s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for lib in LIBS:
        mine = [m for m in results if m.lib == lib and m.job == "import" and m.import_s]
        lines.append(
            f"| {lib} | {fmt(median([m.import_s for m in mine if m.import_s]))} | "
            f"{fmt(median([m.client_s for m in mine if m.client_s is not None]))} | "
            f"{fmt(median([m.vmhwm_kib / 1024 for m in mine]), 1)} |"
        )
    keys = sorted({k for f in found.values() for k in f})
    lines += ["", "## What the archive needs", "", "| need | " + " | ".join(LIBS) + " |"]
    lines.append("| --- |" + " --- |" * len(LIBS))
    for key in keys:
        cells = [found.get(lib, {}).get(key, "-").replace("|", "/") for lib in LIBS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    failed = [m for m in results if m.note]
    if failed:
        lines += ["", "## Runs with a note", ""]
        lines += [f"- {m.lib} {m.job} run {m.run}: {m.note}" for m in failed]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines += ["", f"Load average at the end: {load}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 objects, 64 MiB")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the venv with both libraries")
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="report folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.python).is_file() or not s3server.has_moto(args.python):
        print(f"bench: no venv with the libraries and moto at {args.python}; make it with:")
        print(f"  {VENV_LINES}")
        return 2
    count, size = (200, 64 * MiB) if args.quick else (2000, GiB)
    if args.quick:
        args.runs = 1
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetcher-s3libs-", dir=SHM))
    info = {
        "nproc": str(os.cpu_count()),
        "Python": sys.version.split()[0],
        **versions(args.python),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    results: list[Measure] = []
    found: dict[str, dict[str, str]] = {}
    server = s3server.start(args.python, work / "moto.log")
    started = time.perf_counter()
    try:
        small, big = build(work, count, size)
        for run in range(args.runs):
            order = LIBS if run % 2 == 0 else LIBS[::-1]
            for lib in order:
                for _ in range(IMPORT_RUNS):
                    results.append(run_child(args.python, server, lib, "import", [], run))
            for lib in order:
                s3server.reset(server)
                s3server.create_bucket(server, BUCKET)
                results.append(
                    run_child(args.python, server, lib, "small", ["--files", str(small)], run)
                )
                results.append(
                    run_child(args.python, server, lib, "large", ["--file", str(big)], run)
                )
                results.append(
                    run_child(args.python, server, lib, "get", ["--file", str(big)], run)
                )
                last = results[-3:]
                print(
                    f"bench: run {run} {lib}: "
                    + ", ".join(f"{m.job} {fmt(m.seconds)} s" for m in last),
                    file=sys.stderr,
                )
        s3server.reset(server)
        s3server.create_bucket(server, BUCKET)
        for lib in LIBS:
            found[lib] = caps(args.python, server, lib)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, results, found, info, size, count)
    (args.out / "s3_libs.md").write_text(text, encoding="utf-8")
    runs = [asdict(m) for m in results]
    (args.out / "s3_libs-runs.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(text)
    print(f"bench: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0 if all(not m.note for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
