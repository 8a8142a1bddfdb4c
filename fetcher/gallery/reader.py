"""The catalog on a thread of its own, so the event loop never waits on the state.

An SQLite connection belongs to the thread that opened it, and a psycopg connection
is not for concurrent use: either way the catalog is opened, asked and closed on one
worker thread, one question at a time, and requests await its answers. Thumbnails
are made on a second small pool, so a burst of them never holds up a query.

A PostgreSQL state is another server, which may restart while the gallery runs: the
state reconnects by itself for up to ``--state-reconnect`` seconds; past that, the
question is asked once more on a newly opened state, and a server still out of reach
answers that request 503 (the next request tries again), never the whole gallery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from types import TracebackType
from typing import Self, TypeVar

from aiohttp import web

from ..catalog import Catalog
from ..errors import ArchiveError, StateUnreachable
from ..state import Holder, open_state

_T = TypeVar("_T")
#: What a state that cannot answer raises: lost or refused connections, a failed read.
_UNANSWERED = (ArchiveError, StateUnreachable)
#: Thumbnails made at once: the machine's cores are for serving too.
THUMB_WORKERS = 2


class Reader:
    """``async with Reader(holder) as reader:`` opens the archive's catalog read-only: the
    SQLite file ``holder`` names, or the PostgreSQL state that takes its place."""

    def __init__(self, holder: Holder) -> None:
        self._holder = holder
        self._catalog: Catalog | None = None
        self._shared = False
        self._stack = ExitStack()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="gallery-catalog")
        self._pictures = ThreadPoolExecutor(THUMB_WORKERS, thread_name_prefix="gallery-thumbs")

    async def __aenter__(self) -> Self:
        try:
            await self._on_db(self._open)
        except BaseException:
            self._shutdown()
            raise
        return self

    def _open(self) -> None:
        db = self._stack.enter_context(open_state(self._holder, readonly=True))
        self._shared = db.shared
        self._catalog = Catalog(db)

    def _reopen(self) -> None:
        """A new connection in place of one the server dropped."""
        self._catalog = None
        self._stack.close()
        self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._on_db(self._stack.close)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._db.shutdown(wait=True)
        self._pictures.shutdown(wait=True, cancel_futures=True)

    async def _on_db(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._db, work)

    async def ask(self, question: Callable[[Catalog], _T]) -> _T:
        """``question(catalog)``, answered on the catalog's thread; a state that cannot
        answer is a 503 (a shared one is asked once more, on a new connection, first)."""

        def answer() -> _T:
            if self._catalog is None:  # the last reconnection failed: try again now
                self._open()
            assert self._catalog is not None
            try:
                return question(self._catalog)
            except _UNANSWERED:
                if not self._shared:
                    raise
            self._reopen()  # reads only: asking again repeats nothing
            assert self._catalog is not None
            return question(self._catalog)

        try:
            return await self._on_db(answer)
        except _UNANSWERED as exc:
            raise web.HTTPServiceUnavailable(text=f"503: {exc}\n") from None

    async def picture(self, work: Callable[[], _T]) -> _T:
        """``work()`` on the thumbnail pool (Pillow's decoding releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self._pictures, work)
