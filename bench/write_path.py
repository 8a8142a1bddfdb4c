"""Write and hash downloads with aiofiles, against fetcher's own thread hand-off (WorkSink).

aiofiles was named as the way to keep file writes off the event loop. fetcher
already does that in ``fetcher/sink.py``: received chunks are collected on the
loop and each block of about 1 MiB goes to two worker threads, one writing and
feeding SHA-256, one feeding MD5, with a file under 1 MiB taking exactly one
hand-off. This measures both on the write path alone: blocks come from random
bytes made in memory beforehand (no network), the files go to /dev/shm (no disk),
and every file gets SHA-256 and MD5, synced and closed as ``fetcher/download.py``
leaves it. The methods:

- ``worksink``: ``fetcher.sink.WorkSink`` as it is;
- ``aiofiles-loop``: ``await f.write(block)``, both hashes updated on the loop;
- ``aiofiles-threads``: ``await f.write(block)`` beside one ``asyncio.to_thread``
  per hash, the three awaited together for each block.

Two shapes: one 1 GiB file in 1 MiB blocks, and 2,000 files of 256 KiB (one block
each) written 16 at a time, as downloads are. Each measurement is a fresh process;
methods take turns, a different one first each round. Besides wall and CPU time,
a ticker task on the loop records how late it wakes (:class:`LagTicker`): the time
the loop was busy and could not have served a socket.

    .venv/bin/python bench/write_path.py [--runs 5] [--quick]

Needs aiofiles in the same venv (``pip install aiofiles``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from run import REPO, SHM, GiB, KiB, MiB, host, rotated, say

#: Writes one file from its blocks; returns its SHA-256 hex digest followed by its MD5's.
Writer = Callable[[Path, Iterator[bytes]], Awaitable[str]]

METHODS = ("worksink", "aiofiles-loop", "aiofiles-threads")
TITLES = {
    "worksink": "WorkSink (fetcher.sink): thread lanes, one hand-off per file under 1 MiB",
    "aiofiles-loop": "aiofiles, SHA-256 and MD5 on the loop",
    "aiofiles-threads": "aiofiles, SHA-256 and MD5 each in asyncio.to_thread beside the write",
}
#: Random bytes the blocks are cut from: too many to sit in a CPU cache.
POOL_BYTES = 64 * MiB
#: The ticker's period; a wake later than this by more than LATE counts as a stall.
TICK = 0.001
LATE = 0.002
CHILD_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Shape:
    """What is written: ``files`` files of ``size`` bytes, ``parallel`` at a time."""

    key: str
    title: str
    files: int
    size: int
    parallel: int

    @property
    def block(self) -> int:
        from fetcher.sink import BLOCK

        return min(BLOCK, self.size)


def shapes(quick: bool) -> list[Shape]:
    large = 128 * MiB if quick else GiB
    count = 200 if quick else 2000
    large_title = f"1 file x {large // MiB} MiB" if quick else "1 file x 1 GiB"
    return [
        Shape("large", f"{large_title}, 1 MiB blocks", 1, large, 1),
        Shape("small", f"{count:,} files x 256 KiB, 16 at a time", count, 256 * KiB, 16),
    ]


# -- the writers (in the child) ---------------------------------------------------------


async def write_worksink(path: Path, blocks: Iterator[bytes]) -> str:
    """As ``fetcher/download.py`` streams a body: write every chunk, then sync inside the block."""
    from fetcher.sink import WorkSink

    async with WorkSink(path, 0, md5=True) as sink:
        for block in blocks:
            await sink.write(block)
        await sink.sync()
    return sink.sha256 + (sink.md5 or "")


async def write_aiofiles_loop(path: Path, blocks: Iterator[bytes]) -> str:
    import aiofiles
    import aiofiles.os

    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    fsync = aiofiles.os.wrap(os.fsync)
    async with aiofiles.open(path, "wb") as handle:
        for block in blocks:
            sha256.update(block)
            md5.update(block)
            await handle.write(block)
        await handle.flush()
        await fsync(handle.fileno())
    return sha256.hexdigest() + md5.hexdigest()


async def write_aiofiles_threads(path: Path, blocks: Iterator[bytes]) -> str:
    """The fair aiofiles rival: like WorkSink, write and both hashes run on three threads."""
    import aiofiles
    import aiofiles.os

    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    fsync = aiofiles.os.wrap(os.fsync)
    async with aiofiles.open(path, "wb") as handle:
        for block in blocks:
            await asyncio.gather(
                handle.write(block),
                asyncio.to_thread(sha256.update, block),
                asyncio.to_thread(md5.update, block),
            )
        await handle.flush()
        await fsync(handle.fileno())
    return sha256.hexdigest() + md5.hexdigest()


WRITERS: dict[str, Writer] = {
    "worksink": write_worksink,
    "aiofiles-loop": write_aiofiles_loop,
    "aiofiles-threads": write_aiofiles_threads,
}


class LagTicker:
    """Sleeps ``TICK`` again and again and records how late each wake-up is.

    A late wake means the loop was running something else: while it is, no socket
    is read, which is what would slow concurrent downloads.
    """

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            self.lags.append(time.perf_counter() - before - TICK)

    def summary(self) -> dict[str, float]:
        lags = self.lags or [0.0]
        stalls = [lag for lag in lags if lag > LATE]
        return {"lag_max": max(lags), "lag_total": sum(stalls), "stalls": len(stalls)}


def blocks_of(pool: list[bytes], shape: Shape, index: int) -> Iterator[bytes]:
    """File ``index``'s blocks, cut in turn from the pool (so neighbouring files differ)."""
    per_file = shape.size // shape.block
    for k in range(per_file):
        yield pool[(index * per_file + k) % len(pool)]


async def write_all(method: str, shape: Shape, folder: Path) -> dict[str, float | str]:
    # Seeded, so every method writes the same bytes and must report the same digests.
    data = random.Random(shape.key).randbytes(POOL_BYTES)
    pool = [data[at : at + shape.block] for at in range(0, POOL_BYTES, shape.block)]
    writer = WRITERS[method]
    digests = [""] * shape.files
    indices = iter(range(shape.files))

    async def worker() -> None:
        for index in indices:
            path = folder / f"{index:06d}.bin"
            digests[index] = await writer(path, blocks_of(pool, shape, index))

    ticker = LagTicker()
    ticking = asyncio.create_task(ticker.run())
    await asyncio.sleep(0.05)  # the ticker is settled before the clock starts
    ticker.lags.clear()
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(shape.parallel)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    ticking.cancel()
    written = sum(entry.stat().st_size for entry in folder.iterdir())
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return {"wall": wall, "cpu": cpu, "bytes": written, "digest": digest, **ticker.summary()}


# -- the parent -------------------------------------------------------------------------


@dataclass(slots=True)
class Measure:
    """One child: one method on one shape."""

    method: str
    shape: str
    run: int
    wall: float
    cpu: float
    lag_max: float
    lag_total: float
    stalls: int
    note: str


def measure(args: argparse.Namespace, work: Path, method: str, shape: Shape, run: int) -> Measure:
    folder = work / f"{shape.key}-{method}-{run}"
    folder.mkdir()
    argv = [sys.executable, __file__, "--child", method, "--shape", shape.key, "--dir", str(folder)]
    argv += ["--quick"] if args.quick else []
    try:
        done = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        tail = done.stderr.strip()[-300:]
        return Measure(method, shape.key, run, 0, 0, 0, 0, 0, f"exit {done.returncode}: {tail}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    note = ""
    if r["bytes"] != shape.files * shape.size:
        note = f"wrote {r['bytes']} bytes, wanted {shape.files * shape.size}"
    elif args.digests.setdefault(shape.key, r["digest"]) != r["digest"]:
        note = "digests differ from the first run on this shape"
    lags = (r["lag_max"], r["lag_total"], int(r["stalls"]))
    return Measure(method, shape.key, run, r["wall"], r["cpu"], *lags, note)


def table(shape: Shape, results: list[Measure]) -> list[str]:
    lines = [
        f"### {shape.title}",
        "",
        "| method | wall s | min-max | MB/s | vs WorkSink | CPU s | loop lag max ms | "
        "stalls > 2 ms | stalled ms in all | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians: dict[str, float] = {}
    for method in METHODS:
        mine = [m for m in results if m.shape == shape.key and m.method == method]
        good = [m for m in mine if not m.note]
        if not good:
            lines.append(f"| {TITLES[method]} | failed | | | | | | | | 0/{len(mine)} |")
            continue
        wall = medians[method] = statistics.median(m.wall for m in good)
        base = medians.get("worksink")
        ratio = f"{wall / base:.2f}x" if base else "-"
        lines.append(
            f"| {TITLES[method]} | {wall:.3f} | {min(m.wall for m in good):.3f}-"
            f"{max(m.wall for m in good):.3f} | {shape.files * shape.size / wall / 1e6:,.0f} | "
            f"{ratio} | {statistics.median(m.cpu for m in good):.2f} | "
            f"{1000 * statistics.median(m.lag_max for m in good):.1f} | "
            f"{statistics.median(m.stalls for m in good):.0f} | "
            f"{1000 * statistics.median(m.lag_total for m in good):.0f} | "
            f"{len(good)}/{len(mine)} |"
        )
    return [*lines, ""]


def report(args: argparse.Namespace, results: list[Measure]) -> str:
    lines = [
        "# Write path: WorkSink against aiofiles",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python bench/write_path.py --runs {args.runs}"
        f"{' --quick' if args.quick else ''}`. Medians; each run is a fresh process; methods "
        "take turns. Blocks come from random bytes in memory, files go to /dev/shm, every "
        "file gets SHA-256 and MD5, then flush, fsync and close. MB = 10^6 bytes. CPU s is "
        "the process's user + system time, all threads. Loop lag: a task sleeping 1 ms at a "
        "time on the loop records how late it wakes; a wake more than 2 ms late is a stall, "
        "and *stalled ms in all* adds up those stalls' lateness.",
        "",
    ]
    for shape in shapes(args.quick):
        lines += table(shape, results)
    info = {
        **host(),
        "aiofiles": _version("aiofiles"),
        "load average at end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    lines += ["| machine | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in info.items())]
    failed = [m for m in results if m.note]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {m.method} on {m.shape}, run {m.run + 1}: {m.note}" for m in failed]
    return "\n".join(lines) + "\n"


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, help="rounds, each method once per shape (5)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 128 MiB, 200 files")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="report folder")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 5)
    args.digests = {}  # shape -> the digest every run on it must give
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        shape = next(s for s in shapes(args.quick) if s.key == args.shape)
        print(json.dumps(asyncio.run(write_all(args.child, shape, args.dir))))
        return 0
    if _version("aiofiles") == "not installed":
        raise SystemExit(f"write_path: {sys.executable} -m pip install aiofiles")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fetcher-write-", dir=SHM))
    results: list[Measure] = []
    try:
        for run in range(args.runs):
            for shape in shapes(args.quick):
                for method in rotated(METHODS, run):
                    m = measure(args, work, method, shape, run)
                    results.append(m)
                    lag = f"lag max {1000 * m.lag_max:.1f} ms"
                    say(
                        f"  run {run + 1} {shape.key:<5} {method:<16} {m.wall:.3f} s {lag} {m.note}"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, results)
    (out / "write_path.md").write_text(text, encoding="utf-8")
    runs = json.dumps([asdict(m) for m in results], indent=1)
    (out / "write_path-runs.json").write_text(runs, encoding="utf-8")
    print(text)
    return 0 if all(not m.note for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
