"""``fetcher work``: keep draining the archive's queue as IDs are enqueued, until stopped.

The long-running mode of a deployment whose app hands IDs over with
``fetcher enqueue``. It looks at the state every :data:`POLL` seconds (a read of
an index or two), and on a PostgreSQL state as soon as an enqueue's ``NOTIFY``
arrives (``LISTEN``); when tasks are queued, or files wait in the download queue,
it runs one pass: an ordinary :func:`fetcher.pipeline.fetch` over the queued
tasks (on SQLite under the archive's lock, waiting for it while another run
holds it; on a shared state beside the other runs, each task under a lease).
Between passes it holds nothing, so a cron ``fetch`` still gets its turn.

Tasks the API still runs (pending) are asked about again every
``pending_every`` seconds, not at every pass: an app that enqueues an ID a
second would otherwise have every running task queried a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

from .config import Settings
from .ids import IdSource
from .intake import CHANNEL
from .lease import DEFAULT_LEASE
from .pipeline import FetchOptions, fetch
from .progress import NullProgress, Progress
from .state import INCOMPLETE, PENDING, QUEUED, Records, open_state
from .stores import fetch_state, open_store
from .summary import RunSummary

#: Seconds between two looks at the state for queued work.
POLL = 1.0
#: Seconds between two rounds of questions about tasks the API still runs.
PENDING_EVERY = 30.0
#: Queued tasks taken by one pass at most: the next pass takes the next ones, so a
#: queue of millions is never held in memory at once.
PASS_TASKS = 10_000


@dataclass(frozen=True, slots=True)
class WorkOptions:
    """How ``work`` paces itself."""

    #: Return after this many seconds with nothing queued (None: run until stopped).
    idle_exit: float | None = None
    poll: float = POLL
    pending_every: float = PENDING_EVERY
    #: Each pass's ``--lease``.
    lease: float = DEFAULT_LEASE


@dataclass(frozen=True, slots=True)
class _Look:
    """What the state holds for the next pass."""

    queued: list[str]
    files: bool
    unfinished: bool

    @property
    def busy(self) -> bool:
        """Whether anything new waits: idle time is time without it."""
        return bool(self.queued) or self.files


def work_sync(
    settings: Settings, options: WorkOptions | None = None, progress: Progress | None = None
) -> RunSummary:
    """Run :func:`work` to completion from synchronous code (with ``idle_exit`` set)."""
    return asyncio.run(work(settings, options, progress))


async def work(
    settings: Settings,
    options: WorkOptions | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Drain queued tasks as they come, until ``stop`` is set or ``idle_exit`` passes.

    ``summary`` gathers every pass: each task's outcome, and the totals. Errors
    that stop a run (rejected key, unwritable archive) stop this too, raised as
    :func:`~fetcher.pipeline.fetch` raises them.
    """
    settings.require_api()
    options = options or WorkOptions()
    progress = progress or NullProgress()
    stop = stop or asyncio.Event()
    summary = summary if summary is not None else RunSummary()
    # Every task counted once, by where it ended: a running task is asked about pass
    # after pass, and the README's sum (archived + ... + skipped) is the tasks given.
    summary.pending_ids = set()
    store = open_store(settings.archive, settings)
    summary.archive = store.name
    if not await fetch_state(store):
        await store.open()
        await store.close()
    idle_since = time.monotonic()
    asked_pending = -math.inf
    with open_state(store) as db:
        listening = db.listen(CHANNEL)
        while not stop.is_set():
            look = _look(db)
            due = look.unfinished and time.monotonic() - asked_pending >= options.pending_every
            if look.busy or due:
                if due:
                    asked_pending = time.monotonic()
                pass_options = FetchOptions(pending=due, wait_lock=math.inf, lease=options.lease)
                did = await _pass(settings, look.queued, pass_options, progress, stop, summary)
                if look.busy:
                    idle_since = time.monotonic()
                if did:
                    continue
            elif options.idle_exit is not None and (
                time.monotonic() - idle_since >= options.idle_exit
            ):
                break
            await _nap(db, listening, stop, options.poll)
    if stop.is_set():
        summary.interrupted = True
    return summary


async def _nap(db: Records, listening: bool, stop: asyncio.Event, seconds: float) -> None:
    """Until ``seconds`` pass, ``stop`` is set, or (on a state that notifies) IDs are queued.

    A notice is waited for on a thread, at most ``seconds`` at a time, so a stop is
    seen within that; the connection is used by nothing else meanwhile.
    """
    if listening:
        await asyncio.to_thread(db.wait_notice, seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _look(db: Records) -> _Look:
    """Queued tasks (the first :data:`PASS_TASKS`), and whether files or unfinished tasks wait."""
    queued = db.query(
        "SELECT task_id FROM tasks WHERE state = ? ORDER BY first_seen LIMIT ?",
        (QUEUED, PASS_TASKS),
    )
    files = db.query_one("SELECT 1 FROM files WHERE state = 'wanted' LIMIT 1")
    unfinished = db.query_one(
        "SELECT 1 FROM tasks WHERE state IN (?, ?) LIMIT 1", (PENDING, INCOMPLETE)
    )
    return _Look([str(r[0]) for r in queued], files is not None, unfinished is not None)


async def _pass(
    settings: Settings,
    queued: list[str],
    options: FetchOptions,
    progress: Progress,
    stop: asyncio.Event,
    summary: RunSummary,
) -> bool:
    """One fetch over ``queued`` (and the unfinished tasks with ``pending``), into ``summary``.

    Returns whether it settled anything, so a pass that could not (another run's
    files, a stop) is followed by a pause, not by the same pass at once.
    """
    before = (sum(summary.counts.values()), summary.files_downloaded)
    requests = summary.requests
    sources = [IdSource.from_values("queued", queued)] if queued else []
    try:
        await fetch(settings, sources, options, progress, stop=stop, summary=summary)
    finally:
        # A run sets the count of its own requests: the passes' add up.
        summary.requests += requests
    return (sum(summary.counts.values()), summary.files_downloaded) != before
