"""An archive for the gallery's tests, made by a real fetch from the replica, and the gallery
running over it on a loop thread (port 0).

Both the HTTP tests and the browser tests use it; so does ``python
tests/test_gallery_browser.py``, which takes the README's screenshots.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from servers import LoopThread

from fetcher.config import Settings
from fetcher.gallery import GalleryOptions, serve
from fetcher.ids import IdSource
from fetcher.pipeline import FetchOptions, fetch_sync
from fetcher.replica import Replica, file_info, png, sample_video, task_response
from fetcher.stores import BucketUrl

_Archive = TypeVar("_Archive", Path, BucketUrl)

HOSTILE = '<script>document.title="pwned"</script> a pig in the rain, <b>bold</b> & "quoted"'
PROMPTS = (
    "a pig in the rain, watercolour",
    "a lighthouse at dusk, oil painting",
    "three studies of a red fox in snow",
    "a city of glass at noon, isometric",
    "an astronaut reading in a hammock",
    "koi in a moonlit pond, ink wash",
    "a tram crossing a bridge in fog",
    "a bowl of ramen, studio lighting",
    "a desert caravan at sunset",
    "a robot watering tomatoes",
    HOSTILE,
)
#: Task IDs of the world, by role.
VIDEO = f"1392336703-AigcVideoTask-{hashlib.md5(b'video').hexdigest()}t"
PENDING = f"1392336703-AigcImageTask-{hashlib.md5(b'pending').hexdigest()}t"
FAILED = f"1392336703-AigcImageTask-{hashlib.md5(b'failed').hexdigest()}t"
START = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def image_id(n: int) -> str:
    return f"1392336703-AigcImageTask-{hashlib.md5(f'image{n}'.encode()).hexdigest()}t"


def hostile_id() -> str:
    return image_id(len(PROMPTS) - 1)


def newest_first() -> list[str]:
    """The world's tasks that have a creation time, newest first (the grid's order).

    The failed task has none (the API's answer for it is an error), so where it sorts
    is left out of the comparison: :func:`dated` drops it from a listing.
    """
    created = {image_id(n): START + timedelta(days=n) for n in range(len(PROMPTS))}
    created[VIDEO] = START + timedelta(days=20)
    created[PENDING] = START + timedelta(days=21)
    return sorted(created, key=lambda t: created[t], reverse=True)


def dated(listed: list[str]) -> list[str]:
    """``listed`` without the failed task, after checking it is there exactly once."""
    assert listed.count(FAILED) == 1
    return [t for t in listed if t != FAILED]


def load(replica: Replica) -> list[str]:
    """Give the replica the world's tasks; returns their IDs."""
    ids = []
    for n, prompt in enumerate(PROMPTS):
        tid = image_id(n)
        infos = []
        for k in range(2 if n == 2 else 1):
            url = replica.add_file(f"{tid}/{k}.png", png(160, 120, seed=n * 3 + k))
            infos.append(file_info(url))
        model = ("Hunyuan", "3.0") if n % 2 else ("GEM", "2.5")
        created = START + timedelta(days=n)
        replica.set_task(
            tid, task_response(tid, files=infos, prompt=prompt, model=model, created=created)
        )
        ids.append(tid)
    url = replica.add_file(f"{VIDEO}/clip.mp4", sample_video(), "video/mp4")
    replica.set_task(
        VIDEO,
        task_response(
            VIDEO,
            task_type="AigcVideoTask",
            files=[file_info(url, file_type="video")],
            prompt="a paper boat drifting down a rainy street, slow motion",
            model=("Kling", "2.1"),
            created=START + timedelta(days=20),
        ),
    )
    replica.set_task(
        PENDING,
        task_response(
            PENDING,
            status="PROCESSING",
            prompt="a city of glass",
            created=START + timedelta(days=21),
        ),
    )
    replica.set_task(
        FAILED,
        task_response(
            FAILED,
            err_code=70000,
            err_code_ext="ContentModerationFailed",
            message="The content did not pass moderation.",
            prompt="something refused",
            created=START + timedelta(days=22),
        ),
    )
    return [*ids, VIDEO, PENDING, FAILED]


def build_archive(archive: _Archive, **extra: Any) -> _Archive:
    """A real archive: the world fetched through the pipeline from the replica.

    ``archive`` may be a bucket; ``extra`` settings say how it is reached.
    """
    with Replica() as replica:
        ids = load(replica)
        settings = Settings(
            archive=archive,
            base_url=replica.api_url,
            api_key=replica.api_key,
            retry_wait=0.01,
            **extra,
        )
        fetch_sync(settings, [IdSource.from_values("world", ids)], FetchOptions())
    return archive


@contextmanager
def running(options: GalleryOptions) -> Iterator[str]:
    """The gallery serving ``options`` on a loop thread; yields its URL, stops it after."""
    with LoopThread() as loop:

        async def start() -> tuple[asyncio.Event, asyncio.Task[None], str]:
            stop = asyncio.Event()
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(serve(options, stop, ready.set_result))
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises what stopped it
            return stop, task, ready.result()

        stop, task, url = loop.call(start())

        async def finish() -> None:
            stop.set()
            await task

        try:
            yield url
        finally:
            loop.call(finish())
