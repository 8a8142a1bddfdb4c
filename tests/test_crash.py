"""Crash safety: SIGKILL at each step of a commit, a full disk, an unwritable archive.

The real CLI runs in a subprocess through a small wrapper that installs an audit
hook (``sys.addaudithook``) and sends its own process SIGKILL at the Nth matching
audit event, so the product carries no test hooks. After each kill nothing partial
may be visible in the archive, and a plain re-run must finish the job without
asking again for anything an earlier run had committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
from conftest import ROOT, add_image_task, add_video_task, archived_files, task_id

from fetcher.archive import Archive
from fetcher.replica import Fault, Replica
from fetcher.sink import BLOCK as WRITE_BLOCK

#: The wrapper: ``CRASH_AT="event|path suffix|N|mode"`` picks the Nth audit event
#: named ``event`` whose first argument ends with the suffix. Modes: ``before``
#: kills at that event (before the operation runs); ``after`` (an ``os.rename``)
#: kills at the next ``open`` of the rename target's folder, i.e. the fsync of the
#: directory right after the rename; ``body`` (an ``open``) kills once the file has
#: bytes on disk; ``devfull`` makes the path a symlink to /dev/full just before
#: it is opened (a disk that fills up at that moment) and kills nothing.
HOOK = r"""
import os
import runpy
import signal
import sys
import threading
import time

EVENT, SUFFIX, NTH, MODE = os.environ["CRASH_AT"].split("|")
NTH = int(NTH)
count = 0
armed = None
lock = threading.Lock()


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def path_of(args):
    first = args[0] if args else None
    return os.fsdecode(first) if isinstance(first, (str, bytes, os.PathLike)) else ""


def kill_once_written(path):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_size > 0:
                die()
        except OSError:
            pass
        time.sleep(0.005)


def hook(event, args):
    global count, armed
    if armed is not None:
        if event == "open" and path_of(args) == armed:
            die()
        return
    if event != EVENT or not path_of(args).endswith(SUFFIX):
        return
    with lock:
        count += 1
        hit = count == NTH
    if not hit:
        return
    if MODE == "before":
        die()
    elif MODE == "after":
        armed = os.path.dirname(os.fsdecode(args[1]))
    elif MODE == "body":
        threading.Thread(target=kill_once_written, args=(path_of(args),), daemon=True).start()
    elif MODE == "devfull":
        os.symlink("/dev/full", path_of(args))


sys.addaudithook(hook)
sys.argv = ["fetcher", *sys.argv[1:]]
runpy.run_module("fetcher", run_name="__main__", alter_sys=True)
"""

VIDEO_SIZE = 1_500_000
#: The host sends this much of the video, then stalls: past the first write block.
STALL_AFTER = WRITE_BLOCK + 150_000


@dataclass
class World:
    """Two tasks on the replica and an archive for them, driven through the CLI."""

    replica: Replica
    tmp: Path
    archive: Path
    multi: str  # an image task with three files
    video: str  # a video task with one 1.5 MB file
    datas: dict[str, list[bytes]]
    extension: dict[str, str]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
        env.update(
            FETCHER_BASE_URL=self.replica.api_url,
            FETCHER_API_KEY=self.replica.api_key,
            FETCHER_ARCHIVE=str(self.archive),
            FETCHER_RETRY_WAIT="0.01",
            FETCHER_RETRIES="2",
            FETCHER_TIMEOUT="10",
            # One query and one download at a time: the event order is deterministic.
            FETCHER_CONCURRENCY="1",
            FETCHER_DOWNLOADS="1",
            XDG_CONFIG_HOME=str(self.tmp / "no-config"),
            PYTHONPATH=str(ROOT),
        )
        return env

    def fetch(
        self,
        *ids: str,
        crash_at: str | None = None,
        prefix: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """``fetcher fetch --id ... --json``; through the audit-hook wrapper with ``crash_at``."""
        env = self.env()
        if crash_at is None:
            program = [sys.executable, "-m", "fetcher"]
        else:
            hook = self.tmp / "crash_hook.py"
            hook.write_text(HOOK, encoding="utf-8")
            program = [sys.executable, str(hook)]
            env["CRASH_AT"] = crash_at
        named = [a for tid in ids for a in ("--id", tid)]
        return subprocess.run(
            [*prefix, *program, "fetch", *named, *args, "--json"],
            env=env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    @property
    def db_path(self) -> Path:
        return self.archive / ".fetcher" / "state.sqlite"

    @property
    def work_dir(self) -> Path:
        return self.archive / ".fetcher" / "work"


@pytest.fixture
def world(replica: Replica, tmp_path: Path) -> World:
    multi, video = task_id(1), task_id(2, "AigcVideoTask")
    datas = {
        multi: add_image_task(replica, multi, 3),
        video: [add_video_task(replica, video, size=VIDEO_SIZE)],
    }
    return World(
        replica,
        tmp_path,
        tmp_path / "archive",
        multi,
        video,
        datas,
        {multi: ".png", video: ".mp4"},
    )


# -- what must hold ------------------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    """What the state database had committed when a run died."""

    archived: frozenset[str]
    done_urls: frozenset[str]  # file-host paths of file rows that were ``done``


def read_only(db: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True))


def committed(world: World) -> Committed:
    """The state database as the killed run left it; each ``done`` row's file is in place."""
    if not world.db_path.exists():
        return Committed(frozenset(), frozenset())
    with read_only(world.db_path) as conn:
        archived = {
            r[0] for r in conn.execute("SELECT task_id FROM tasks WHERE state = 'archived'")
        }
        done = conn.execute("SELECT url, path, sha256 FROM files WHERE state = 'done'").fetchall()
        dirs = dict(conn.execute("SELECT task_id, dir FROM tasks"))
        assert_searchable(conn)
    for _url, path, sha256 in done:
        assert sha256_of(world.archive / path) == sha256, f"{path}: row done, file not in place"
    for tid in archived:
        json.loads((world.archive / dirs[tid] / "task.json").read_text(encoding="utf-8"))
    return Committed(frozenset(archived), frozenset(urlsplit(r[0]).path for r in done))


def assert_searchable(conn: sqlite3.Connection) -> None:
    """Each task recorded with its answer has its words in the search index: same commit."""
    answered = [r[0] for r in conn.execute("SELECT task_id FROM tasks WHERE detail IS NOT NULL")]
    for tid in answered:
        found = conn.execute(
            "SELECT x.task_id FROM task_search s JOIN task_text x ON x.id = s.rowid "
            "WHERE task_search MATCH ?",
            (f'task_id : "{tid}"',),
        ).fetchall()
        assert found == [(tid,)], f"{tid}: recorded, not in the search index"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_partial(world: World) -> None:
    """Outside ``.fetcher/`` only whole files: each data file is the host's bytes exactly."""
    for rel, data in archived_files(world.archive).items():
        path = PurePosixPath(rel)
        assert not path.name.endswith((".part", ".tmp", ".part.json")), rel
        tid = path.parent.name  # the default layout ends in the task ID
        assert tid in world.datas, f"unexpected file {rel}"
        if path.name == "task.json":
            assert json.loads(data)["task_id"] == tid
        else:
            assert data == world.datas[tid][int(path.stem)], f"{rel} differs from the host's file"
    leftovers = [
        p
        for p in world.archive.rglob("*")
        if ".fetcher" not in p.relative_to(world.archive).parts and not (p.is_dir() or p.is_file())
    ]
    assert leftovers == []


def assert_integrity(world: World) -> None:
    with read_only(world.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def assert_complete(world: World, *ids: str) -> None:
    """Every task archived, each file row done and matching its file, the archive exactly so."""
    assert_integrity(world)
    with read_only(world.db_path) as conn:
        states = dict(conn.execute("SELECT task_id, state FROM tasks"))
        dirs = dict(conn.execute("SELECT task_id, dir FROM tasks"))
        rows = conn.execute("SELECT task_id, idx, state, path, size, sha256 FROM files").fetchall()
    assert states == dict.fromkeys(ids, "archived")
    expected: dict[str, bytes] = {}
    for tid in ids:
        assert dirs[tid].endswith(tid)
        for k, data in enumerate(world.datas[tid]):
            expected[f"{dirs[tid]}/{k:02d}{world.extension[tid]}"] = data
    assert len(rows) == len(expected)
    for tid, idx, state, path, size, sha256 in rows:
        assert (state, path) == ("done", f"{dirs[tid]}/{idx:02d}{world.extension[tid]}")
        assert (size, sha256) == (len(expected[path]), hashlib.sha256(expected[path]).hexdigest())
    visible = archived_files(world.archive)
    sidecars = {f"{dirs[tid]}/task.json" for tid in ids}
    assert set(visible) == set(expected) | sidecars
    assert {k: v for k, v in visible.items() if k not in sidecars} == expected
    for name in sidecars:
        document = json.loads(visible[name])
        assert [f["sha256"] for f in document["files"]] == [
            hashlib.sha256(expected[f"{PurePosixPath(name).parent}/{f['path']}"]).hexdigest()
            for f in document["files"]
        ]
    assert sorted(p.name for p in world.work_dir.iterdir()) == []


# -- kill points -----------------------------------------------------------------------------

#: (CRASH_AT, files visible at the kill, file rows done, tasks archived). The run is
#: ``--id MULTI --id VIDEO``, one download at a time: MULTI's files 0, 1, 2, its
#: sidecar and archived row, then VIDEO's file, its sidecar and archived row. Of
#: the six ``os.rename`` events, 1-3 and 5 place files and 4 and 6 place sidecars;
#: "after" kills at the directory fsync that follows the rename, before any DB write.
#: Database steps taken in one turn of the event loop are committed together when
#: the turn ends, so a task's last file row lands with its archived row: killed
#: between them, that file is downloaded again by the next run.
KILL_POINTS = [
    pytest.param("sqlite3.connect||1|before", 0, 0, (), id="connect-1-before-any-state"),
    pytest.param("open|.part|1|before", 0, 0, (), id="open-part-1-before-body"),
    pytest.param("os.rename||1|before", 0, 0, (), id="rename-1-before-first-file-placed"),
    pytest.param("os.rename||1|after", 1, 0, (), id="rename-1-placed-before-file-row"),
    pytest.param("open|.part|2|before", 1, 1, (), id="open-part-2-between-files"),
    pytest.param("os.rename||2|before", 1, 1, (), id="rename-2-before-second-file-placed"),
    pytest.param("os.rename||2|after", 2, 1, (), id="rename-2-placed-before-file-row"),
    pytest.param("os.rename||3|before", 2, 2, (), id="rename-3-before-last-file-placed"),
    pytest.param("os.rename||3|after", 3, 2, (), id="rename-3-placed-before-file-row"),
    pytest.param("open|.json.tmp|1|before", 3, 2, (), id="open-sidecar-temp-1-files-placed"),
    pytest.param("os.rename||4|before", 3, 2, (), id="rename-4-before-sidecar-placed"),
    pytest.param("os.rename||4|after", 4, 2, (), id="rename-4-sidecar-placed-no-archived-row"),
    pytest.param("open|.part|4|before", 4, 3, ("multi",), id="open-part-4-second-task-starts"),
    pytest.param(
        "open|.part.json|5|before", 4, 3, ("multi",), id="open-record-5-before-video-record"
    ),
    pytest.param("open|.part|4|body", 4, 3, ("multi",), id="open-part-4-mid-body-second-task"),
    pytest.param("os.remove|.part.json|1|before", 4, 3, ("multi",), id="remove-record-1-verified"),
    pytest.param("os.rename||5|before", 4, 3, ("multi",), id="rename-5-second-task-file"),
    pytest.param("os.rename||5|after", 5, 3, ("multi",), id="rename-5-placed-before-file-row"),
    pytest.param("open|.json.tmp|2|before", 5, 3, ("multi",), id="open-sidecar-temp-2"),
    pytest.param("os.rename||6|before", 5, 3, ("multi",), id="rename-6-before-second-sidecar"),
    pytest.param("os.rename||6|after", 6, 3, ("multi",), id="rename-6-sidecar-no-archived-row"),
]


@pytest.mark.parametrize(("crash_at", "visible", "done", "archived"), KILL_POINTS)
def test_sigkill_at_any_step_leaves_a_resumable_archive(
    world: World, crash_at: str, visible: int, done: int, archived: tuple[str, ...]
) -> None:
    """SIGKILL at any step shows nothing partial, and a re-run completes it without re-asking."""
    names = {"multi": world.multi, "video": world.video}
    body_kill = crash_at.endswith("|body")
    if body_kill:
        world.replica.fault(
            "files", f"{world.video}/video.mp4", Fault(drop_after=STALL_AFTER, stall=20)
        )

    killed = world.fetch(world.multi, world.video, crash_at=crash_at)

    assert killed.returncode == -9, killed.stderr
    assert_nothing_partial(world)
    state = committed(world)
    # The kill landed where it was meant to.
    assert (len(archived_files(world.archive)), len(state.done_urls)) == (visible, done)
    assert state.archived == {names[n] for n in archived}
    if body_kill:
        part = Archive(world.archive).work_path(world.video, 0)
        kept = part.stat().st_size
        assert WRITE_BLOCK <= kept < VIDEO_SIZE
        assert part.with_name(part.name + ".json").is_file()
    files_before, api_before = len(world.replica.seen("files")), len(world.replica.seen("api"))

    again = world.fetch(world.multi, world.video)

    assert again.returncode == 0, again.stderr
    assert_complete(world, world.multi, world.video)
    asked = [r.path for r in world.replica.seen("files")[files_before:]]
    assert not set(asked) & state.done_urls
    queried = [r.path for r in world.replica.seen("api")[api_before:]]
    assert not [q for q in queried if q.rsplit("/", 1)[-1] in state.archived]
    if body_kill:
        (resumed,) = [r for r in world.replica.seen("files")[files_before:] if "video" in r.path]
        assert resumed.headers.get("Range") == f"bytes={kept}-"
        assert resumed.headers.get("If-Range")


def test_a_file_a_killed_run_left_queued_is_downloaded_by_a_run_that_names_no_task(
    world: World,
) -> None:
    """SIGKILL mid-download leaves the file queued: a run over an empty list resumes it."""
    world.replica.fault(
        "files", f"{world.video}/video.mp4", Fault(drop_after=STALL_AFTER, stall=20)
    )
    killed = world.fetch(world.multi, world.video, crash_at="open|.part|4|body")
    assert killed.returncode == -9, killed.stderr
    part = Archive(world.archive).work_path(world.video, 0)
    kept = part.stat().st_size
    empty = world.tmp / "empty.txt"
    empty.write_text("", encoding="utf-8")
    files_before, api_before = len(world.replica.seen("files")), len(world.replica.seen("api"))

    again = world.fetch(args=(str(empty),))

    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["from_queue"], summary["archived"]) == (1, 1)
    assert [t["task_id"] for t in summary["tasks"]] == [world.video]
    assert_complete(world, world.multi, world.video)
    assert world.replica.seen("api")[api_before:] == []
    (resumed,) = world.replica.seen("files")[files_before:]
    assert resumed.headers.get("Range") == f"bytes={kept}-"


# -- a full disk, an unwritable archive --------------------------------------------------------


def private_mounts(setup: str, target: Path) -> tuple[str, ...]:
    """A command prefix: a private mount namespace where ``setup`` ran (``$0`` is ``target``).

    Mounts made there vanish with the process and never touch the host's view.
    As root this is a plain ``unshare -m``; otherwise a user namespace maps us to root.
    """
    userns = () if os.geteuid() == 0 else ("-r",)
    prefix = ("unshare", *userns, "-m", "sh", "-c", f'{setup} && exec "$@"', str(target))
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    # A machine without mount namespaces cannot show this; say so as a failure, not a skip.
    assert probe.returncode == 0, f"no private mount namespace here: {probe.stderr.strip()}"
    return prefix


def task_rows(world: World, tid: str) -> tuple[list[tuple[object, ...]], ...]:
    """The task's row and file rows, every column."""
    with read_only(world.db_path) as conn:
        return (
            conn.execute("SELECT * FROM tasks WHERE task_id = ?", (tid,)).fetchall(),
            conn.execute("SELECT * FROM files WHERE task_id = ? ORDER BY idx", (tid,)).fetchall(),
        )


def task_column(world: World, tid: str, column: str) -> str:
    """One column of the task's row (``state``, ``dir``)."""
    with read_only(world.db_path) as conn:
        (row,) = conn.execute(
            f"SELECT {column} FROM tasks WHERE task_id = ?",
            (tid,),
        ).fetchall()
    return str(row[0])


def requested(replica: Replica, since: tuple[int, int], tid: str) -> list[str]:
    """Requests naming ``tid`` that either server got after ``since`` (files, api) counts."""
    new = replica.seen("files")[since[0] :] + replica.seen("api")[since[1] :]
    return [r.path for r in new if tid in r.path]


def counts(replica: Replica) -> tuple[int, int]:
    return len(replica.seen("files")), len(replica.seen("api"))


def test_disk_full_while_downloading_stops_the_run(world: World) -> None:
    """A real ENOSPC while a file streams in: exit 3, one error line, earlier work untouched."""
    first = world.fetch(world.multi)
    assert first.returncode == 0, first.stderr
    kept_files, kept_rows = archived_files(world.archive), task_rows(world, world.multi)
    # A 256 KiB tmpfs over the work folder: the 1.5 MB video cannot fit there.
    prefix = private_mounts('mount -t tmpfs -o size=256k fetcher-full "$0"', world.work_dir)
    since = counts(world.replica)

    full = world.fetch(world.multi, world.video, prefix=prefix)

    work = Archive(world.archive).work_path(world.video, 0)
    assert full.returncode == 3, full.stderr
    assert full.stderr.splitlines() == [f"fetcher: error: disk full while writing {str(work)!r}"]
    assert archived_files(world.archive) == kept_files
    assert task_rows(world, world.multi) == kept_rows
    assert requested(world.replica, since, world.multi) == []
    assert task_column(world, world.video, "state") != "archived"
    assert_integrity(world)
    assert_nothing_partial(world)

    again = world.fetch(world.multi, world.video)

    assert again.returncode == 0, again.stderr
    assert_complete(world, world.multi, world.video)


def test_disk_full_while_writing_the_sidecar_stops_the_run(world: World) -> None:
    """ENOSPC from /dev/full on the sidecar: exit 3, no task.json, nothing committed half."""
    first = world.fetch(world.video)
    assert first.returncode == 0, first.stderr
    kept_files, kept_rows = archived_files(world.archive), task_rows(world, world.video)
    since = counts(world.replica)

    # The sidecar's temp file becomes a symlink to /dev/full just before it is opened.
    full = world.fetch(world.multi, world.video, crash_at="open|.json.tmp|1|devfull")

    target = world.archive / task_column(world, world.multi, "dir") / "task.json"
    assert full.returncode == 3, full.stderr
    assert full.stderr.splitlines() == [f"fetcher: error: disk full while writing {str(target)!r}"]
    assert not target.exists()
    assert Path("/dev/full").is_char_device()
    assert [p for p in world.work_dir.iterdir() if p.name.endswith(".json.tmp")] == []
    assert task_column(world, world.multi, "state") != "archived"
    assert {k: v for k, v in archived_files(world.archive).items() if k in kept_files} == kept_files
    assert task_rows(world, world.video) == kept_rows
    assert requested(world.replica, since, world.video) == []
    assert_integrity(world)
    assert_nothing_partial(world)
    since = counts(world.replica)

    again = world.fetch(world.multi, world.video)

    assert again.returncode == 0, again.stderr
    assert_complete(world, world.multi, world.video)
    assert world.replica.seen("files")[since[0] :] == []  # MULTI's files were done and in place


def test_unwritable_task_type_folder_stops_the_run(world: World) -> None:
    """A task-type folder that cannot be written: exit 3, one error line, earlier work untouched."""
    third = task_id(3)
    world.datas[third] = add_image_task(world.replica, third, 1)
    world.extension[third] = ".png"
    first = world.fetch(world.multi)
    assert first.returncode == 0, first.stderr
    kept_files, kept_rows = archived_files(world.archive), task_rows(world, world.multi)
    folder = world.archive / "AigcImageTask"
    since = counts(world.replica)

    if os.geteuid() == 0:  # root writes through 0o555; a read-only bind mount stops even root
        prefix = private_mounts('mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"', folder)
        denied = world.fetch(world.multi, third, prefix=prefix)
    else:
        folder.chmod(0o555)
        try:
            denied = world.fetch(world.multi, third)
        finally:
            folder.chmod(0o755)

    assert denied.returncode == 3, denied.stderr
    (line,) = denied.stderr.splitlines()
    assert line.startswith(f"fetcher: error: archive not writable: '{folder}/")
    assert line.endswith(("(Read-only file system)", "(Permission denied)"))
    assert archived_files(world.archive) == kept_files
    assert task_rows(world, world.multi) == kept_rows
    assert requested(world.replica, since, world.multi) == []
    assert task_column(world, third, "state") != "archived"
    assert_integrity(world)
    assert_nothing_partial(world)

    again = world.fetch(world.multi, third)

    assert again.returncode == 0, again.stderr
    assert_complete(world, world.multi, third)
