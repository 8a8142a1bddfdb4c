"""The catalog on a thread of its own, so the event loop never waits on SQLite.

SQLite connections belong to the thread that opened them: the catalog is opened,
asked and closed on one worker thread, and requests await its answers. Thumbnails
are made on a second small pool, so a burst of them never holds up a query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from ..catalog import Catalog, reading_state

_T = TypeVar("_T")
#: Thumbnails made at once: the machine's cores are for serving too.
THUMB_WORKERS = 2


class Reader:
    """``async with Reader(db_path) as reader:`` opens the archive's catalog read-only."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._catalog: Catalog | None = None
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
        self._catalog = self._stack.enter_context(reading_state(self._db_path))

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
        """``question(catalog)``, answered on the catalog's thread."""

        def answer() -> _T:
            assert self._catalog is not None, "Reader used outside 'async with'"
            return question(self._catalog)

        return await self._on_db(answer)

    async def picture(self, work: Callable[[], _T]) -> _T:
        """``work()`` on the thumbnail pool (Pillow's decoding releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self._pictures, work)
