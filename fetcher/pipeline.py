"""One ``fetch`` run: IDs in, queries out, files down, everything committed in order.

IDs stream from their sources in batches; tasks already archived are settled
from the database without a request. The rest go through a bounded queue to
``concurrency`` query workers. A finished task is recorded with its files, which
joins them to the archive's download queue (:mod:`fetcher.queue`: the file rows
still wanted, earliest ``ExpireTime`` first); the query workers never wait for a
download. ``downloads`` workers take the head of that queue, whichever run put
it there, so a file about to expire is never stuck behind a backlog, and a file
a stopped or killed run left is downloaded by the next run.

The order of a commit is the design: stream to a work file, verify, rename into
place, record the file; when the task's last file is in place, write the
sidecar, then mark the task archived. The archived row is the commit point;
anything a crash interrupts before it is redone on the next run.

Every failure belongs to its task or its file, except the run-level ones: bad
settings, the key rejected, the lock, an archive or state database that cannot
be written. Whatever else one task or file raises, a bug included, becomes that
item's outcome with a reason (the traceback is logged at debug level, shown by
``-v``), and the run goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .api import ApiClient
from .archive import archive_error
from .bookmarks import NO_FILE, BookmarkTracker
from .config import Settings
from .dedup import FirstSight
from .download import Downloaded, Downloader
from .errors import (
    ArchiveError,
    FetcherError,
    FileExpired,
    FileGone,
    Forbidden,
    InternalError,
    LockedError,
    NoQueryPath,
    StoreFailing,
    StoreRefused,
    TaskBug,
    TaskError,
    Unreachable,
)
from .feed import batches
from .ids import IdSource, Mark, iter_entries
from .index import build_index_async
from .layout import Layout, LayoutFields
from .lease import DEFAULT_LEASE, Leases, live_run_ids
from .lists import bookmarks, save_bookmark
from .models import RemoteFile, Task, TaskState, redact
from .progress import NullProgress, Progress
from .queue import FileQueue, QueuedFile
from .retry import RetryPolicy
from .sidecar import build_sidecar
from .state import (
    ARCHIVED,
    EXPIRED,
    FAILED,
    INCOMPLETE,
    PENDING,
    Held,
    Records,
    StateDB,
    open_state,
)
from .stores import ArchiveStore, Placed, open_store
from .summary import Outcome, RunSummary, TaskOutcome

#: At most this many lines wait between the reading thread and the loop.
FEED_BATCH = 2000
#: Seconds between two looks, while downloading, at the tasks this run handed to the
#: shared queue, so those other runs settled are counted as they go, not all at the end.
HANDED_LOOK = 2.0
#: Seconds between two looks once this run has nothing left to download: another run
#: has the last files in flight, and this run returns as soon as they are settled.
HANDED_WAIT = 0.25
#: OS errors that say the archive cannot be written at all: the run stops (exit 3).
#: Any other OS error while handling one file is that file's failure.
_ARCHIVE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})

#: Where a dry run keeps its bookkeeping when the archive has no database yet.
IN_MEMORY = Path(":memory:")

_log = logging.getLogger("fetcher")


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """Per-run choices that are not settings."""

    dry_run: bool = False
    #: Also re-query every task the archive holds as pending or incomplete.
    pending: bool = False
    #: Ask again about tasks whose failure was final (failed, unknown, expired).
    retry_failed: bool = False
    #: Seconds to wait for another run's lock (None: fail at once; ``math.inf``: forever).
    wait_lock: float | None = None
    #: Seconds a task's lease lasts unless renewed (see :mod:`fetcher.lease`).
    lease: float = DEFAULT_LEASE


@dataclass(slots=True)
class _AskedAgain:
    """A task queried a second time for a fresh URL: once a run, whichever file asks first."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: bool = False
    task: Task | None = None


class _Stopped(Exception):
    """Internal: the caller's stop event was set (a signal); wind down and report."""


def fetch_sync(
    settings: Settings,
    sources: Iterable[IdSource],
    options: FetchOptions | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Run :func:`fetch` to completion from synchronous code."""
    return asyncio.run(fetch(settings, sources, options, progress))


async def fetch(
    settings: Settings,
    sources: Iterable[IdSource],
    options: FetchOptions | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Archive every task named in ``sources``; returns what happened to each.

    Raises :class:`~fetcher.errors.FetcherError` subclasses only for what stops the
    whole run (bad settings, rejected key or base URL, locked or unwritable archive,
    :class:`~fetcher.errors.InternalError` for a bug outside any one task); a task's
    own trouble is its outcome in the summary. Pass ``summary`` to keep what a run
    did before such an error stopped it. Setting ``stop`` (the CLI does on
    SIGINT/SIGTERM) winds the run down, also while it waits for the lock: downloads
    in flight keep their bytes for the next run to resume, and the summary says
    ``interrupted``.

    ``dry_run`` touches nothing: no lock, no folder, no database created; the state
    database, when there is one, is read read-only.
    """
    settings.require_api()
    options = options or FetchOptions()
    layout = Layout(settings.layout)
    archive = open_store(settings.archive, settings)
    summary = summary if summary is not None else RunSummary()
    summary.archive = archive.name
    if options.dry_run:
        # A read-only look: a database that is not there is an empty one in memory.
        with open_state(archive, readonly=True) if archive.exists() else StateDB(IN_MEMORY) as db:
            run = _Run(settings, options, progress or NullProgress(), archive, db, layout, summary)
            return await run.execute(sources, stop)
    progress = progress or NullProgress()
    try:
        await archive.open()
        return await _locked_run(
            settings, options, progress, archive, layout, summary, sources, stop
        )
    finally:
        await archive.close()


async def _locked_run(
    settings: Settings,
    options: FetchOptions,
    progress: Progress,
    archive: ArchiveStore,
    layout: Layout,
    summary: RunSummary,
    sources: Iterable[IdSource],
    stop: asyncio.Event | None,
) -> RunSummary:
    """The run under the archive's lock; its state handed to the store once closed.

    A shared (PostgreSQL) state takes no lock: runs on any host work beside each
    other, each task under a lease (:mod:`fetcher.lease`), and each stages its
    downloads in a work folder of its own, cleaning only those of runs no longer live
    (:mod:`fetcher.stores.rooms`), since another run may be writing the rest.
    """
    # One event for a signal and for a store whose lock was lost: either winds the run down.
    stop = stop if stop is not None else asyncio.Event()
    waiting = functools.partial(
        progress.message, f"waiting for another run's lock on {archive.name}"
    )
    shared = archive.state_url is not None
    lock = (
        contextlib.nullcontext(True)
        if shared
        else archive.wait_lock(options.wait_lock, stop, waiting)
    )
    async with lock as held:
        if not held:
            summary.interrupted = True
            return summary
        if not shared:
            await archive.clean()
        try:
            with open_state(archive) as db:
                # Once, for an archive recorded before search existed: its own commits.
                if await build_index_async(db, progress, stop):
                    with db.grouped(asyncio.get_running_loop()):
                        run = _Run(settings, options, progress, archive, db, layout, summary)
                        await run.execute(sources, stop)
                else:
                    summary.interrupted = True
        except FetcherError as exc:
            await _keep_state(archive, exc)
            raise
        await archive.committed()
    return summary


#: Errors after which the state is not handed to the store: the store itself failed, or
#: the lock went to another run, whose state it is now.
_STATE_NOT_KEPT = (StoreRefused, StoreFailing, LockedError)


async def _keep_state(archive: ArchiveStore, failure: FetcherError) -> None:
    """After an error under the lock, the store keeps the state as the run left it.

    Every row the run committed stands, so a bucket's snapshot of it is as good as
    after a run that ended well; without it, a host starting from the bucket would
    download again what this run archived. The error that stopped the run is what
    is reported, so this one's own failure is only logged.
    """
    if isinstance(failure, _STATE_NOT_KEPT):
        return
    try:
        await archive.committed()
    except FetcherError as exc:
        _log.warning("the state was not copied to %s: %s", archive.name, exc)


class _Run:
    """The state of one run; lives exactly as long as :func:`fetch`."""

    def __init__(
        self,
        settings: Settings,
        options: FetchOptions,
        progress: Progress,
        archive: ArchiveStore,
        db: Records,
        layout: Layout,
        summary: RunSummary,
    ) -> None:
        self.settings = settings
        self.options = options
        self.progress = progress
        self.archive = archive
        self.db = db
        self.layout = layout
        self.summary = summary
        self._bookmarks = BookmarkTracker(db)
        self._seen = FirstSight(db)
        #: A dry run writes nothing, leases included. On SQLite the run holds the archive's
        #: lock, so no other run is running: a lease another run left is void.
        self._leases = (
            None if options.dry_run else Leases(db, options.lease, exclusive=not db.shared)
        )
        #: Tasks given to this run that another live run holds: watched until settled.
        self._others: set[str] = set()
        #: On a shared state, tasks given to this run whose files wait in the download
        #: queue with no lease: any run's download workers take them (see _hand_over).
        self._handed: set[str] = set()
        self._handed_poll = asyncio.Lock()
        self._handed_looked = time.monotonic()
        #: Files of each task this run's download workers have in hand: its lease stays.
        self._busy: collections.Counter[str] = collections.Counter()
        #: Tasks another run took over from this one (paused past the lease).
        self._gone: set[str] = set()
        #: Tasks handed to the query workers: the run's number of queries, once read.
        self._queued = 0
        #: First queries' failures that may yet be the key's or the base URL's.
        self._held: list[tuple[str, TaskError]] = []
        self._queue = FileQueue(db, self._leases)
        #: Download workers waiting for the queue to grow, each on a future of its own:
        #: a task's files wake as many of them as it queued, not every idle worker.
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._queries_done = False
        #: Second queries for tasks whose host dropped a file early: one per task, only
        #: while that task has files in flight (at most ``--downloads`` entries).
        self._fresh: dict[str, _AskedAgain] = {}

    async def execute(self, sources: Iterable[IdSource], stop: asyncio.Event | None) -> RunSummary:
        base_url, api_key = self.settings.require_api()
        policy = RetryPolicy(retries=self.settings.retries, base=self.settings.retry_wait)
        api = ApiClient(
            base_url,
            api_key,
            timeout=self.settings.timeout,
            policy=policy,
            rate=self.settings.rate,
            concurrency=self.settings.concurrency,
            proxies=self.settings.proxies,
        )
        downloader = Downloader(
            timeout=self.settings.timeout,
            policy=policy,
            max_file_size=self.settings.max_file_size,
            api_origin=api.origin,
            connections=self.settings.downloads,
            proxies=self.settings.proxies,
            on_bytes=self._bytes_received,
        )
        sources = list(sources)
        files = {s.key for s in sources if s.key}
        saved = (
            {}
            if self.options.retry_failed or not files
            else {mark.source: mark for mark, _ in bookmarks(self.db) if mark.source in files}
        )
        if self._leases is not None:
            self._leases.begin()
        try:
            if self._leases is not None and self.db.shared:
                self._work_in_room(self._leases)
            async with api, downloader:
                await self._workers(api, downloader, sources, saved, stop)
            self._let_go()
        except BaseExceptionGroup as group:
            fatal = _first_fatal(group)
            if isinstance(fatal, FetcherError):
                raise fatal from None
            if not isinstance(fatal, _Stopped):
                text = _bug(fatal, self.settings.api_key)
                raise InternalError(f"internal error: {text}") from fatal
            self.summary.interrupted = True
        finally:
            self.summary.requests = api.requests_sent
            self.archive.leave_room()
            # Raised only when nothing else is: a state that failed says so once.
            with contextlib.suppress(ArchiveError):
                self._let_go()
        if not self.options.dry_run:
            # Interrupted too: whatever was settled before the first open task stays so.
            for reached in self._bookmarks.reached().values():
                save_bookmark(self.db, reached)
        return self.summary

    def _work_in_room(self, leases: Leases) -> None:
        """No lock says this run is alone: it stages in a work folder of its own, and cleans
        only the folders of runs the state no longer lists as live."""
        self.archive.work_in_room(leases.run_id, lambda: live_run_ids(self.db, leases.now()))

    def _let_go(self) -> None:
        """Unregister the run, letting go of the tasks it leaves unsettled; once."""
        leases, self._leases = self._leases, None
        if leases is not None:
            leases.end()

    async def _workers(
        self,
        api: ApiClient,
        downloader: Downloader,
        sources: Iterable[IdSource],
        saved: Mapping[str, Mark],
        stop: asyncio.Event | None,
    ) -> None:
        n_queries = self.settings.concurrency
        # A dry run downloads nothing, so it takes nothing from the queue either.
        n_downloads = 0 if self.options.dry_run else self.settings.downloads
        queries: asyncio.Queue[str | None] = asyncio.Queue(maxsize=n_queries * 4)
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(_watch(stop)) if stop is not None else None
            renewer = group.create_task(_renew(self._leases)) if self._leases else None
            group.create_task(self._feed(api, sources, saved, queries, n_queries))
            querying = [
                group.create_task(self._query_worker(api, queries)) for _ in range(n_queries)
            ]
            downloading = [
                group.create_task(self._download_worker(api, downloader))
                for _ in range(n_downloads)
            ]
            await asyncio.wait(querying)
            self._release_held()
            # No query can queue a file now: a worker that finds the queue empty is done.
            self._queries_done = True
            self._wake(len(self._idle))
            if downloading:
                await asyncio.wait(downloading)
            if watcher is not None:
                watcher.cancel()
            if renewer is not None:
                renewer.cancel()

    # -- input --------------------------------------------------------------------------

    async def _feed(
        self,
        api: ApiClient,
        sources: Iterable[IdSource],
        saved: Mapping[str, Mark],
        queries: asyncio.Queue[str | None],
        workers: int,
    ) -> None:
        tracker = self._bookmarks
        async for batch in batches(iter_entries(sources, saved), FEED_BATCH):
            ids: list[str] = []
            lines: list[tuple[str, tuple[str, int]]] = []
            position = tracker.position
            for entry in batch:
                if isinstance(entry, str):
                    ids.append(entry)
                    if position[0]:
                        lines.append((entry, position))
                elif isinstance(entry, Mark):
                    tracker.mark(entry)
                    position = tracker.position
                    self.summary.unchanged += entry.skipped
                else:
                    self.progress.message(str(entry))
                    self._outcome(TaskOutcome(entry.text, Outcome.INVALID, str(entry)))
            await self._admit(ids, queries, lines)
        if self.options.pending:
            tracker.mark(NO_FILE)
            await self._admit(self.db.unfinished_ids(), queries, [])
        api.first.expect(self._queued)
        await self._await_others(queries)
        for _ in range(workers):
            await queries.put(None)

    async def _admit(
        self,
        ids: list[str],
        queries: asyncio.Queue[str | None],
        lines: Sequence[tuple[str, tuple[str, int]]],
    ) -> None:
        """Settle what the database already knows; queue the rest for a query.

        ``lines`` says where in a list file each ID was read, every sighting of it,
        so a task left open keeps the next run reading from before each of them
        (see :mod:`fetcher.bookmarks`).
        """
        fresh, known = self._seen.first_sight(ids)
        before: list[str] = []
        asking: list[str] = []
        for task_id in fresh:
            state = known.get(task_id)
            if state is not None and state.state == ARCHIVED:
                before.append(task_id)
            elif state is not None and state.final and not self.options.retry_failed:
                reason = f"{state.state} in an earlier run: {state.reason}"
                self._outcome(TaskOutcome(task_id, Outcome.SKIPPED, reason))
            else:
                asking.append(task_id)
        self._bookmarks.waiting(asking)
        # Every sighting of a task still open, in this batch or an earlier one. The
        # archived ones hold nothing back: no need to look them up (the cron case).
        archived = set(before)
        self._bookmarks.sighted(line for line in lines if line[0] not in archived)
        # On a shared state a run claims what its query workers are about to take, a
        # slice at a time as they take it: runs given the same list share it out, rather
        # than the first to claim taking it all and the others waiting for it. Under the
        # archive's lock no other run is running: the batch is claimed at once.
        size = self.settings.concurrency if self.db.shared else max(len(asking), 1)
        for start in range(0, len(asking), size):
            part = asking[start : start + size]
            if self._leases is not None:
                # Not those another run holds, nor those another run settled since
                # first_sight read them: those wait in _others for what becomes of them.
                held = self._leases.claim(part, retry_failed=self.options.retry_failed)
                # Not one this run settled meanwhile, its files come through the shared
                # queue to this run's own workers: that is counted already.
                others = [t for t in part if t not in held]
                self._others.update(self._bookmarks.still_asked(others) if others else ())
                part = self._to_ask([t for t in part if t in held])
            for task_id in part:
                self._queued += 1
                await queries.put(task_id)
        if before:
            # The cron case: most of a long list. Counted in bulk, no object per task.
            self.summary.counts[Outcome.ALREADY_ARCHIVED] += len(before)
            self.progress.archived_before(before)

    def _to_ask(self, held: list[str]) -> list[str]:
        """Of tasks this run just claimed, those to ask the API about.

        On a shared state, one answered already, its files in the queue (another run
        asked, or one that stopped), needs a download, not a question: it is handed to
        the queue, for whichever run has a download worker free. A link that lapsed
        meanwhile is asked for again by the file's download.
        """
        if not held or self._leases is None or not self.db.shared:
            return held
        queued = {h.task_id for h in self._leases.holders(held) if h.state == INCOMPLETE}
        for task_id in queued:
            self._hand_over(task_id)
        self._wake(len(queued))
        return [t for t in held if t not in queued]

    async def _await_others(self, queries: asyncio.Queue[str | None]) -> None:
        """Until another run settles each task it holds, or its lease lapses and this run
        takes the task over (queried here like any other)."""
        leases = self._leases
        while leases is not None and self._others:
            await asyncio.sleep(min(1.0, leases.seconds / 4))
            for holder in leases.holders(sorted(self._others)):
                if holder.task_id not in self._others:
                    continue  # settled by this run's own download workers meanwhile
                if holder.run_id is not None and not leases.lapsed(holder):
                    continue
                if holder.run_id is None and holder.state == INCOMPLETE:
                    # Its files wait in the download queue, let go of by the run that
                    # asked: this run's download workers may take them as any run's may.
                    self._others.discard(holder.task_id)
                    self._handed.add(holder.task_id)
                    self._wake(1)
                elif holder.run_id is None and holder.state in _SETTLED_STATES:
                    # Its run let go of it settled (a run stopped early lets go of open ones).
                    self._others.discard(holder.task_id)
                    self._elsewhere(holder.task_id, holder.state, holder.final)
                elif leases.claim([holder.task_id], retry_failed=self.options.retry_failed):
                    self._others.discard(holder.task_id)
                    self._queued += 1
                    await queries.put(holder.task_id)

    def _elsewhere(self, task_id: str, state: str | None, final: bool) -> None:
        """A task given to this run that another run settled."""
        if state == ARCHIVED or final:
            self._bookmarks.settled(task_id)
        reason = f"settled by another run: {state}"
        self._report(TaskOutcome(task_id, Outcome.ELSEWHERE, reason))

    def _lease_check(self, task_id: str) -> Held | None:
        """The check a settling write makes in its own transaction, before it writes: that
        this run still holds the task (None: a dry run, which writes nothing)."""
        return None if self._leases is None else functools.partial(self._leases.held, task_id)

    def _lost(self, task_id: str) -> None:
        """Another run took the task over: if it was given to this run, it says so, once."""
        if task_id in self._gone:
            return
        self._gone.add(task_id)
        if self._leases is not None and self._bookmarks.asked(task_id):
            known = self._leases.holders([task_id])
            state = known[0].state if known else None
            self._elsewhere(task_id, state, final=bool(known and known[0].final))

    # -- queries ------------------------------------------------------------------------

    async def _query_worker(
        self,
        api: ApiClient,
        queries: asyncio.Queue[str | None],
    ) -> None:
        while (task_id := await queries.get()) is not None:
            try:
                task = await api.query(task_id)
                await self._dispatch(task)
            except (Forbidden, NoQueryPath, Unreachable) as exc:
                if api.first.settled:
                    self._settle_failure(task_id, str(exc), final=exc.final)
                else:
                    # Perhaps the key's or the base URL's fault, not this task's: told
                    # once the run's first queries say which (fetcher.probe).
                    self._held.append((task_id, exc))
            except TaskError as exc:
                self._settle_failure(task_id, str(exc), final=exc.final)
            except FetcherError:
                raise
            except Exception as exc:  # one task's bug is that task's failure
                self._settle_failure(task_id, self._bug_reason(task_id, exc), final=False)
            if self._held and api.first.settled:
                self._release_held()

    def _release_held(self) -> None:
        """The first queries did not blame the key or the URL: their failures are the tasks'."""
        held, self._held = self._held, []
        for task_id, exc in held:
            self._settle_failure(task_id, str(exc), final=exc.final)

    async def _dispatch(self, task: Task) -> None:
        dry = self.options.dry_run
        if task.state is TaskState.PENDING:
            if not dry and not self.db.record_pending(task, self._lease_check(task.task_id)):
                self._lost(task.task_id)
                return
            reason = f"status {task.status or 'unknown'} at the API"
            self._outcome(TaskOutcome(task.task_id, Outcome.PENDING, reason))
        elif task.state is TaskState.FAILED:
            self._settle_failure(task.task_id, task.failure or "task failed", final=True, task=task)
        elif dry:
            self._outcome(TaskOutcome(task.task_id, Outcome.READY, files=len(task.files)))
        else:
            await self._queue_files(task)

    async def _queue_files(self, task: Task) -> None:
        """Record a finished task and queue its files; never waits for a download.

        Files already in place stay so. Files still wanted may be in flight already,
        queued by an earlier run: the task is finished by whichever settles its last.
        """
        wanted = str(self.layout.render(_layout_fields(task)))
        started = self.db.start_task(task, wanted, self._lease_check(task.task_id))
        if started is None:
            # Archived while this query was out (from the queue, by this run's own download
            # workers or another run's), or another run took it over: said once, and let
            # go of, so no run waits on it.
            self._lost(task.task_id)
            if self._leases is not None:
                self._leases.release(task.task_id)
            return
        queued = 0
        for remote in task.files:
            kept = started[1].get(remote.index)
            if kept is None:
                queued += 1
            elif not (kept.path and self.archive.has_file(kept.path)):
                self.db.requeue_file(task.task_id, remote.index, self._lease_check(task.task_id))
                queued += 1
        # Requested even past its ExpireTime: only the host's refusal makes a file
        # expired, never this machine's clock.
        if queued:
            self._hand_over(task.task_id)
            self._wake(queued)
        else:
            await self._settle_task(task.task_id)

    def _hand_over(self, task_id: str) -> None:
        """On a shared state, let go of a task whose files are queued, and watch it.

        The download queue is the state's, so the files go to whichever run has a
        download worker free, each taken with the task's lease (:mod:`fetcher.queue`):
        runs given the same list share its downloads, instead of the run that asked
        first holding every task until its own workers get to it.
        """
        if self._leases is None or not self.db.shared:
            return
        if not self._busy[task_id]:  # else this run's download lets go of it when settled
            self._leases.release(task_id)
        self._handed.add(task_id)

    def _wake(self, count: int) -> None:
        """Up to ``count`` idle download workers look at the queue again."""
        while count > 0 and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    # -- downloads ----------------------------------------------------------------------

    async def _download_worker(self, api: ApiClient, downloader: Downloader) -> None:
        while True:
            item = self._queue.claim()
            if item is None:
                if self._queries_done and not self._handed:
                    return
                if self._queries_done:
                    await self._await_handed()
                    continue
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
                continue
            self.progress.file_queued(item.remote.size)
            self._busy[item.task_id] += 1
            try:
                await self._download_one(api, downloader, item)
            finally:
                self._queue.release(item)
                self._busy[item.task_id] -= 1
                if not self._busy[item.task_id]:
                    del self._busy[item.task_id]
            self.progress.file_done()
            await self._settle_task(item.task_id)
            if self._handed and time.monotonic() - self._handed_looked >= HANDED_LOOK:
                self._look_at_handed()

    async def _await_handed(self) -> None:
        """A pause, then the tasks this run handed to the queue that another run settled
        are counted (``elsewhere``); one this run finds nobody will settle is taken back.

        Called by a download worker that found nothing to take once the queries are
        done; the workers take turns, so the state is read once a pause.
        """
        leases = self._leases
        assert leases is not None  # only a shared state's run hands tasks over
        async with self._handed_poll:
            if not self._handed:
                return
            await asyncio.sleep(min(HANDED_WAIT, leases.seconds / 4))
            for task_id in self._look_at_handed():
                if task_id in self._handed and leases.claim([task_id]):
                    # No file of it left to take (done or failed, its row not written
                    # by a run that stopped), or its run's lease lapsed: this run ends it.
                    await self._settle_task(task_id)

    def _look_at_handed(self) -> list[str]:
        """Count the handed tasks another run settled (``elsewhere``); returns those no
        live run holds that are not settled."""
        leases = self._leases
        assert leases is not None
        self._handed_looked = time.monotonic()
        free: list[str] = []
        for holder in leases.holders(sorted(self._handed)):
            if holder.run_id is not None and not leases.lapsed(holder):
                continue  # a live run is downloading it
            if holder.run_id is None and holder.state in _SETTLED_STATES:
                self._handed.discard(holder.task_id)
                self._elsewhere(holder.task_id, holder.state, holder.final)
            else:
                free.append(holder.task_id)
        return free

    async def _settle_task(self, task_id: str) -> None:
        """Finish the task when none of its files is left in the queue."""
        if self.db.wanted_left(task_id):
            return
        self._fresh.pop(task_id, None)
        try:
            await self._finish(task_id)
        except ArchiveError as exc:
            if not _one_place(exc):
                raise
            self._settle_failure(task_id, str(exc), final=False)
        except FetcherError:
            raise
        except Exception as exc:  # one task's bug is that task's failure
            self._settle_failure(task_id, self._bug_reason(task_id, exc), final=False)

    async def _download_one(self, api: ApiClient, downloader: Downloader, item: QueuedFile) -> None:
        task_id, remote = item.task_id, item.remote
        work = self.archive.work_path(task_id, remote.index)
        placed = await self.archive.stored(task_id, remote.index)
        if placed is not None:
            # A killed run put it in place but did not live to record it.
            self._file_done(task_id, remote.index, placed)
            return
        try:
            got = await self._fetch_file(api, downloader, task_id, remote, work)
        except FileExpired as exc:
            self._file_problem(task_id, remote, str(exc), expired=True)
            return
        except TaskError as exc:
            self._file_problem(task_id, remote, str(exc), expired=False)
            return
        except OSError as exc:
            if exc.errno in _ARCHIVE_ERRNOS:
                raise archive_error(exc, work) from exc
            reason = f"file {remote.index}: {archive_error(exc, work)}"
            self._file_problem(task_id, remote, reason, expired=False)
            return
        except FetcherError:
            raise
        except Exception as exc:  # one file's bug is that file's failure
            self._file_problem(task_id, remote, self._bug_reason(task_id, exc), expired=False)
            return
        relative = PurePosixPath(item.folder) / f"{remote.index:02d}{got.extension}"
        placed = Placed(str(relative), got.size, got.sha256, got.content_type)
        try:
            await self.archive.put_file(got.path, placed)
        except ArchiveError as exc:
            if not _one_place(exc):
                raise
            got.path.unlink(missing_ok=True)
            self._file_problem(task_id, remote, f"file {remote.index}: {exc}", expired=False)
            return
        self._file_done(task_id, remote.index, placed)
        self.summary.files_downloaded += 1

    def _file_done(self, task_id: str, index: int, placed: Placed) -> None:
        done = self.db.file_done(
            task_id,
            index,
            path=placed.path,
            size=placed.size,
            sha256=placed.sha256,
            content_type=placed.content_type,
            held=self._lease_check(task_id),
        )
        if not done:
            self._lost(task_id)

    def _bytes_received(self, count: int) -> None:
        """Counted as they arrive, so an interrupted run still says what came down."""
        self.summary.bytes_downloaded += count
        self.progress.bytes_received(count)

    async def _fetch_file(
        self,
        api: ApiClient,
        downloader: Downloader,
        task_id: str,
        remote: RemoteFile,
        work: Path,
    ) -> Downloaded:
        """Download one file; if its host drops it before ``ExpireTime``, ask the API once more."""
        try:
            return await downloader.download(task_id, remote, work)
        except FileGone as gone:
            fresh = await self._fresh_copy(api, task_id, remote)
            if fresh is None:
                raise
            self.db.refresh_file(task_id, fresh)
            try:
                return await downloader.download(task_id, fresh, work)
            except FileGone as again:
                raise FileGone(
                    f"{again} (also after asking the API again)",
                    task_id=task_id,
                    url=fresh.url,
                ) from gone

    async def _fresh_copy(
        self, api: ApiClient, task_id: str, remote: RemoteFile
    ) -> RemoteFile | None:
        """The file as a second query describes it; one query per task, whatever fails."""
        asked = self._fresh.setdefault(task_id, _AskedAgain())
        async with asked.lock:
            if not asked.done:
                asked.done = True
                try:
                    asked.task = await api.query(task_id)
                except TaskError:
                    asked.task = None
        fresh = asked.task
        if fresh is None or fresh.state is not TaskState.FINISHED:
            return None
        return next((f for f in fresh.files if f.index == remote.index), None)

    def _file_problem(
        self, task_id: str, remote: RemoteFile, reason: str, *, expired: bool
    ) -> None:
        state = EXPIRED if expired else FAILED
        if not self.db.file_failed(
            task_id, remote.index, state=state, reason=reason, held=self._lease_check(task_id)
        ):
            self._lost(task_id)  # the task's new holder records its files

    async def _finish(self, task_id: str) -> None:
        """Every file of the task is settled: write the sidecar, then commit.

        The task is read back from the database (its files' rows, and what its
        answer said), so nothing of it stayed in memory while its files queued.
        """
        stored = self.db.stored_task(task_id)
        if stored is None:
            return
        task, folder = stored
        rows = self.db.files_of(task_id)
        count = sum(1 for r in rows if r.state == "done")
        if count:
            sidecar = build_sidecar(task, rows, folder)
            await self.archive.put_sidecar(PurePosixPath(folder), sidecar)
        problems = [r for r in rows if r.state != "done"]
        if not problems:
            # The lease is checked in the archived row's own transaction, on every state.
            if not self.db.mark_archived(task_id, self._lease_check(task_id)):
                self._lost(task_id)
                return
            # Settled here rather than in _outcome: whether it was open says whether this
            # run was given the task, in the statement that settles it.
            if not self._bookmarks.settled(task_id):
                self.summary.from_queue += 1
            self._report(TaskOutcome(task_id, Outcome.ARCHIVED, files=count, folder=folder))
            return
        reason = "; ".join(r.reason or r.state for r in problems)
        all_expired = all(r.state == EXPIRED for r in problems)
        if not self.db.record_failure(
            task_id,
            reason,
            final=all_expired,
            state=EXPIRED if all_expired else FAILED,
            held=self._lease_check(task_id),
        ):
            self._lost(task_id)
            return
        if not self._bookmarks.asked(task_id):
            self.summary.from_queue += 1
        outcome = Outcome.EXPIRED if all_expired else Outcome.FAILED
        self._outcome(TaskOutcome(task_id, outcome, reason, files=count, folder=folder))

    # -- bookkeeping --------------------------------------------------------------------

    def _bug_reason(self, task_id: str, exc: Exception) -> str:
        """One task's bug as its failure's reason; the traceback goes to the log for ``-v``."""
        _log.debug("internal error on %s", task_id, exc_info=exc)
        return str(TaskBug(f"internal error: {_bug(exc, self.settings.api_key)}", task_id=task_id))

    def _settle_failure(
        self, task_id: str, reason: str, *, final: bool, task: Task | None = None
    ) -> None:
        if not self.options.dry_run and not self.db.record_failure(
            task_id, reason, final=final, task=task, held=self._lease_check(task_id)
        ):
            self._lost(task_id)
            return
        if final:
            self._bookmarks.settled(task_id)
        self._outcome(TaskOutcome(task_id, Outcome.FAILED, reason))

    def _outcome(self, outcome: TaskOutcome) -> None:
        if outcome.outcome in _SETTLED:
            self._bookmarks.settled(outcome.task_id)
        self._report(outcome)

    def _report(self, outcome: TaskOutcome) -> None:
        # Counted once: a task another run held, or this run handed to the queue, may have
        # come to this one through the queue and been settled here before a look found it.
        self._others.discard(outcome.task_id)
        self._handed.discard(outcome.task_id)
        if self._leases is not None and outcome.outcome in _LET_GO:
            self._leases.release(outcome.task_id)
        self.summary.add(outcome)
        self.progress.task_done(outcome)


#: Outcomes whose answer will not change by asking again.
_SETTLED = frozenset({Outcome.ARCHIVED, Outcome.EXPIRED, Outcome.SKIPPED})
#: Task states another run leaves a task in when it settled it (not queued, not mid-download).
_SETTLED_STATES = frozenset({ARCHIVED, PENDING, FAILED, EXPIRED})
#: Outcomes after which the run lets go of the task's lease: it settled the task.
_LET_GO = frozenset({Outcome.ARCHIVED, Outcome.PENDING, Outcome.FAILED, Outcome.EXPIRED})


def _one_place(exc: ArchiveError) -> bool:
    """Whether a write failed for one task's place only (a file where its folder should
    be, a name the filesystem refuses), not for the archive (full, read-only, denied)."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno not in _ARCHIVE_ERRNOS


def _bug(exc: BaseException, secret: str | None) -> str:
    """A bug in one line: its type and the first line of its text, the key blotted out."""
    text = redact(str(exc).splitlines()[0], secret)[:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _renew(leases: Leases) -> None:
    """Keep the run's leases (and the run) alive: one statement every third of a lease."""
    while True:
        await asyncio.sleep(leases.seconds / 3)
        leases.renew()


async def _watch(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stopped


def _layout_fields(task: Task) -> LayoutFields:
    return LayoutFields(
        task_id=task.task_id,
        task_type=task.task_type,
        model_name=task.model_name,
        model_version=task.model_version,
        created=task.created,
        finished=task.finished,
    )


def _first_fatal(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that stopped the run; a group of bugs stays a group, traceback and all.

    A real error wins over a stop request that happened at the same time.
    """
    leaves = list(_leaves(group))
    for wanted in (FetcherError, _Stopped):
        for exc in leaves:
            if isinstance(exc, wanted):
                return exc
    return group


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
