"""Durability: what a run creates, and what a resume builds on, is fsynced.

A power cut cannot be staged in a test, so these watch the system calls of a
real run under ``strace``: every folder the run made is fsynced with the folder
above it, and the partial bytes and resume record of a dropped download are
fsynced before the next attempt opens them to append.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import add_video_task, process_env, task_id

from fetcher.replica import Fault, Replica

#: strace is a test dependency (.ci/run installs it): without it these fail, never skip.
STRACE = shutil.which("strace") or "strace"

_FSYNC = re.compile(r"^\d+\s+(fsync|fdatasync)\(\d+<([^>]*)>\)")


def traced_fetch(
    replica: Replica, tmp_path: Path, archive: Path, tid: str
) -> list[tuple[str, str, str]]:
    """Run ``fetcher fetch --id tid`` under strace; (call, path, rest) of each fsync and open."""
    log = tmp_path / "strace.log"
    command = [
        STRACE, "-f", "-y", "-qq", "-o", str(log), "-e", "trace=fsync,fdatasync,openat",
        sys.executable, "-m", "fetcher", "fetch", "--id", tid,
    ]  # fmt: skip
    done = subprocess.run(
        command, env=process_env(replica, archive, tmp_path), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    calls = []
    for line in log.read_text().splitlines():
        if " openat(" in line and '"' in line:
            calls.append(("openat", line.split('"')[1], line))
        elif match := _FSYNC.match(line):
            calls.append((match.group(1), match.group(2), ""))
    return calls


def test_folders_a_run_creates_are_fsynced_with_their_parents(
    replica: Replica, tmp_path: Path
) -> None:
    """Each folder the run made (task folder up to the archive) and the one above are fsynced."""
    tid = task_id(1, "AigcVideoTask")
    add_video_task(replica, tid)
    archive = tmp_path / "deep" / "archive"
    (tmp_path / "deep").mkdir()

    calls = traced_fetch(replica, tmp_path, archive, tid)

    synced = {path for call, path, _ in calls if call in ("fsync", "fdatasync")}
    [video] = list(archive.rglob("*.mp4"))
    made = [p for p in video.parents if p.is_relative_to(archive)]
    made += [archive / ".fetcher", archive / ".fetcher" / "work"]
    missing = [str(p) for p in [*made, tmp_path / "deep"] if str(p) not in synced]
    assert missing == []


def test_partial_bytes_and_record_are_fsynced_before_a_resume(
    replica: Replica, tmp_path: Path
) -> None:
    """A dropped download's bytes and .part.json are fsynced before the retry reopens them."""
    tid = task_id(2, "AigcVideoTask")
    add_video_task(replica, tid, size=400_000)
    replica.fault("files", f"{tid}/video.mp4", Fault(drop_after=150_000))
    archive = tmp_path / "archive"

    calls = traced_fetch(replica, tmp_path, archive, tid)

    assert replica.seen("files")[-1].headers.get("Range") == "bytes=150000-"
    reopen = next(
        n
        for n, (call, path, rest) in enumerate(calls)
        if call == "openat" and path.endswith(".part") and "O_RDWR" in rest
    )
    before = {path for call, path, _ in calls[:reopen] if call in ("fsync", "fdatasync")}
    work = str(archive / ".fetcher" / "work")
    assert any(p.endswith(".part") for p in before), before
    assert any(p.endswith(".part.json") for p in before), before
    assert work in before
