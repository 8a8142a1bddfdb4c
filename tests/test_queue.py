"""The download queue lives in the state database: earliest expiry first, queries never wait.

A long list of slow videos must not keep a file that expires soon waiting behind
it, nor keep the rest of the list from being asked about.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import add_image_task, on_each_state, run_cli, state_env, task_id, tweak

from fetcher import summary as summary_module
from fetcher.config import Settings
from fetcher.ids import IdSource
from fetcher.jsonlines import compact, write_object
from fetcher.pipeline import fetch
from fetcher.progress import NullProgress
from fetcher.replica import Fault, Replica, file_info, png, pseudo_video, task_response
from fetcher.summary import Outcome, RunSummary, TaskOutcome

#: Every test here exercises the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)

VIDEOS = 200
#: Each video's answer waits this long: two downloads at a time get through few of them.
#: It is also the time the 203 queries have to be answered in, on a loaded machine and on
#: PostgreSQL too (2 s was seen to fall short there under a load of 6 on 2 cores).
SLOW = 6.0
#: How long a file is held back where a test stops its run before any file is in: the
#: run's queries have that long to be answered, however loaded the machine.
HELD = 15.0


class FirstFileDone(NullProgress):
    """Notes how many queries the replica had answered when the first download ended."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.queries_then: int | None = None

    def file_done(self) -> None:
        if self.queries_then is None:
            self.queries_then = len(self.replica.seen("api"))


def add_slow_videos(replica: Replica, count: int) -> list[str]:
    """``count`` finished video tasks, each file answered only after :data:`SLOW` seconds."""
    ids = []
    for n in range(count):
        tid = task_id(n, "AigcVideoTask")
        url = replica.add_file(f"{tid}/video.mp4", pseudo_video(2_000, seed=n), "video/mp4")
        info = file_info(url, file_type="video", expire=datetime.now(UTC) + timedelta(days=7))
        replica.set_task(tid, task_response(tid, task_type="AigcVideoTask", files=[info]))
        replica.fault("files", f"{tid}/video.mp4", Fault(delay=SLOW))
        ids.append(tid)
    return ids


def add_urgent_images(replica: Replica, count: int) -> list[str]:
    """``count`` image tasks whose file expires within the hour."""
    ids = []
    for n in range(count):
        tid = task_id(1000 + n)
        url = replica.add_file(f"{tid}/image_0.png", png(8, 8, seed=n))
        soon = datetime.now(UTC) + timedelta(minutes=30 + n)
        replica.set_task(tid, task_response(tid, files=[file_info(url, expire=soon)]))
        ids.append(tid)
    return ids


async def run_until_archived(
    settings: Settings, ids: Sequence[str], wanted: Sequence[str], progress: NullProgress
) -> RunSummary:
    """A run over ``ids``, stopped (as by SIGINT) once ``wanted`` are archived, or after
    :data:`SLOW` + 10 s."""
    summary, stop = RunSummary(), asyncio.Event()

    async def watch() -> None:
        for _ in range(int((SLOW + 10) * 100)):
            done = {t.task_id for t in summary.tasks if t.outcome is Outcome.ARCHIVED}
            if done >= set(wanted):
                break
            await asyncio.sleep(0.01)
        stop.set()

    watcher = asyncio.create_task(watch())
    source = IdSource.from_values("test", ids)
    await fetch(settings, [source], progress=progress, stop=stop, summary=summary)
    await watcher
    return summary


@pytest.fixture
def backlog(replica: Replica, settings: Settings) -> tuple[Settings, list[str], list[str]]:
    """200 slow videos first in the list, 3 urgent images last; two downloads, eight queries."""
    videos, urgent = add_slow_videos(replica, VIDEOS), add_urgent_images(replica, 3)
    # A timeout well past SLOW: a video's late answer is slow, not a failure to retry.
    return tweak(settings, downloads=2, concurrency=8, timeout=SLOW + 10), videos, urgent


def test_slow_videos_hold_back_neither_the_queries_nor_the_files_that_expire_soon(
    replica: Replica, backlog: tuple[Settings, list[str], list[str]]
) -> None:
    """Every task is asked about before the first slow video is in, and the urgent images,
    last in the list, are fetched right after the videos that were already in flight."""
    settings, videos, urgent = backlog
    progress = FirstFileDone(replica)

    summary = asyncio.run(run_until_archived(settings, [*videos, *urgent], urgent, progress))

    assert progress.queries_then == VIDEOS + len(urgent)
    archived = {t.task_id for t in summary.tasks if t.outcome is Outcome.ARCHIVED}
    assert set(urgent) <= archived
    order = [r.path.split("/")[1] for r in replica.seen("files")]
    positions = sorted(order.index(tid) for tid in urgent)
    # Two downloads at a time: only the two videos in flight came before them.
    assert positions == [2, 3, 4], positions


def test_status_shows_the_head_of_the_queue(
    replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """`status` lists the next files to download, earliest expiry first, and counts them."""
    urgent = add_urgent_images(replica, 3)
    later = task_id(7)
    add_image_task(replica, later, 2)
    names = [f"{tid}/image_0.png" for tid in urgent] + [f"{later}/image_{k}.png" for k in (0, 1)]
    for name in names:
        replica.fault("files", name, Fault(delay=HELD))

    held = tweak(settings, timeout=HELD + 10)
    asyncio.run(_queue_only(replica, held, [later, *reversed(urgent)]))
    env = {
        "FETCHER_ARCHIVE": str(settings.archive),
        "XDG_CONFIG_HOME": str(tmp_path / "nc"),
        **state_env(settings),
    }

    document = json.loads(run_cli(["status", "--json", "--limit", "4"], env=env).stdout)
    text = run_cli(["status"], env=env).stdout

    head = [(f["task_id"], f["index"]) for f in document["queue"]["head"]]
    assert head == [(urgent[0], 0), (urgent[1], 0), (urgent[2], 0), (later, 0)]
    assert document["queue"]["length"] == 5
    assert "download queue, 5 files, next first:" in text
    queue = text[text.index("download queue") :]
    assert queue.index(urgent[0]) < queue.index(urgent[2]) < queue.index(later)


async def _queue_only(replica: Replica, settings: Settings, ids: Sequence[str]) -> None:
    """A run stopped (as by SIGINT) once its queries are answered, before any file is in."""
    stop = asyncio.Event()

    async def watch() -> None:
        for _ in range(int(HELD * 100)):
            if len(replica.seen("api")) == len(ids) and replica.seen("files"):
                break
            await asyncio.sleep(0.01)
        stop.set()

    watcher = asyncio.create_task(watch())
    summary = await fetch(settings, [IdSource.from_values("test", ids)], stop=stop)
    await watcher
    assert summary.interrupted


# -- a long run's outcomes ---------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 5, 23], ids=["none", "one", "in-memory", "spilled"])
@pytest.mark.parametrize("one_line", [False, True], ids=["json", "json-lines"])
def test_a_long_summary_prints_as_json_dumps_would(
    monkeypatch: pytest.MonkeyPatch, count: int, one_line: bool
) -> None:
    """Outcomes past those kept in memory wait on disk; printed, the object is json.dumps's."""
    monkeypatch.setattr(summary_module, "KEEP_IN_MEMORY", 4)
    summary = RunSummary()
    for n in range(count):
        folder = None if n % 2 else f"images/{n}"
        summary.add(TaskOutcome(f"t{n}", Outcome.PENDING, "status PROCESSING ✓", n, folder))
    extra = {"exit_code": 0, "error": {"code": "x", "message": "y"}}
    out = io.StringIO()

    write_object(out, {**summary.to_json_streamed(), **extra}, one_line=one_line)

    document = {**summary.to_json(), **extra}
    assert (
        out.getvalue() == (compact(document) if one_line else json.dumps(document, indent=2)) + "\n"
    )
    assert [t.task_id for t in summary.tasks] == [f"t{n}" for n in range(count)]
    assert len(summary.tasks) == count
    assert len(repr(summary.tasks)) < 400
