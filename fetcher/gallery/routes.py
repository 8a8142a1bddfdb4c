"""The gallery's routes: pages, the cards API, files, thumbnails, sidecars and static files.

Files are addressed by task and position (``/file/<task>/<index>``), never by a path
from the URL: the path comes from the state database and still passes
:func:`~fetcher.gallery.guard.visible_parts` (a folder's, :func:`~fetcher.gallery.guard.contained`
too) in its source, so a hostile database cannot name a file outside the archive either.
Only GET (and HEAD) exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from ..catalog import Card, CardFile, Catalog, Query
from ..errors import UsageError
from .guard import Outside
from .pages import card_json, grid_page, task_page
from .params import BadParameter, Filters, read_filters
from .reader import Reader
from .sources import FileSource
from .thumbs import CONTENT_TYPE, NotAPicture

READER = web.AppKey("reader", Reader)
SOURCE = web.AppKey("source", FileSource)
STATIC = web.AppKey("static", dict)

#: A task ID as the gateway makes them (and as fetcher accepts them).
_TASK = r"{task_id:[A-Za-z0-9._-]{1,256}}"
_INDEX = r"{index:[0-9]{1,6}}"
#: A sidecar embedded in a task page; a larger one is linked, not shown.
SIDECAR_SHOWN = 1 << 20
_STATIC_TYPES = {"gallery.js": "text/javascript", "gallery.css": "text/css"}


def add_routes(app: web.Application) -> None:
    app[STATIC] = {
        name: resources.files(__package__).joinpath("static", name).read_bytes()
        for name in _STATIC_TYPES
    }
    app.router.add_get("/", grid)
    app.router.add_get("/api/cards", cards)
    app.router.add_get(f"/task/{_TASK}", task)
    app.router.add_get(f"/file/{_TASK}/{_INDEX}", archived_file)
    app.router.add_get(f"/thumb/{_TASK}/{_INDEX}", thumbnail)
    app.router.add_get(f"/sidecar/{_TASK}", sidecar)
    app.router.add_get("/static/{name}", static)


def _filters(request: web.Request, *, paged: bool = True) -> Filters:
    try:
        return read_filters(request.query, paged=paged)
    except BadParameter as exc:
        raise web.HTTPBadRequest(text=f"400: {exc}\n") from None


async def _find(request: web.Request, query: Query, *more: str) -> Any:
    """``catalog.find(query)`` (and the named extra answers); a query it refuses (a cursor
    it did not make, too many words) is a 400 that says why."""

    def ask(catalog: Catalog) -> Any:
        page = catalog.find(query)
        return (page, *(getattr(catalog, name)() for name in more))

    try:
        return await request.app[READER].ask(ask)
    except UsageError as exc:
        raise web.HTTPBadRequest(text=f"400: {exc}\n") from None


async def grid(request: web.Request) -> web.Response:
    filters = _filters(request)
    page, facets, whole = await _find(request, filters.query, "facets", "indexed_whole")
    body = grid_page(page.cards, page.next, facets, filters, whole=whole)
    return web.Response(text=body, content_type="text/html")


async def cards(request: web.Request) -> web.Response:
    filters = _filters(request)
    (page,) = await _find(request, filters.query)
    document = {"cards": [card_json(c, filters.encoded) for c in page.cards], "next": page.next}
    return web.json_response(document)


async def _card(request: web.Request) -> Card:
    task_id = request.match_info["task_id"]
    card: Card | None = await request.app[READER].ask(lambda catalog: catalog.card(task_id))
    if card is None:
        raise web.HTTPNotFound(text="404: no such task in this archive\n")
    return card


async def _served(
    answer: Callable[[], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """``answer()``; a path the source will not serve (outside, hidden, a link) is a 404."""
    try:
        return await answer()
    except Outside:
        raise web.HTTPNotFound(text="404: not in the archive\n") from None


async def task(request: web.Request) -> web.Response:
    card = await _card(request)
    filters = _filters(request, paged=False)
    text = None
    if card.folder:
        text = await request.app[SOURCE].sidecar(card.folder.rstrip("/"), SIDECAR_SHOWN)
    try:
        near = await request.app[READER].ask(
            lambda catalog: catalog.neighbours(card.task_id, filters.query)
        )
    except UsageError as exc:
        raise web.HTTPBadRequest(text=f"400: {exc}\n") from None
    page = task_page(card, text, filters.encoded, near)
    return web.Response(text=page, content_type="text/html")


async def _file_of(request: web.Request) -> CardFile:
    card = await _card(request)
    index = int(request.match_info["index"])
    for item in card.files:
        if item.index == index and item.state == "done":
            if item.path is None:
                raise web.HTTPNotFound(text="404: not archived\n")
            return item
    raise web.HTTPNotFound(text="404: no such file in this task\n")


async def archived_file(request: web.Request) -> web.StreamResponse:
    """The file's bytes; Range requests are answered (206 with Content-Range)."""
    item = await _file_of(request)
    path = item.path or ""
    return await _served(lambda: request.app[SOURCE].send(request, path, item.content_type))


async def thumbnail(request: web.Request) -> web.StreamResponse:
    item = await _file_of(request)
    if item.kind != "image":
        raise web.HTTPNotFound(text="404: only pictures have thumbnails\n")
    try:
        data = await request.app[SOURCE].thumbnail(request.app[READER], item)
    except NotAPicture:
        raise web.HTTPNotFound(text="404: not a picture Pillow can read\n") from None
    except Outside:
        raise web.HTTPNotFound(text="404: not in the archive\n") from None
    return web.Response(
        body=data,
        content_type=CONTENT_TYPE,
        headers={"Cache-Control": "private, max-age=86400"},
    )


async def sidecar(request: web.Request) -> web.StreamResponse:
    card = await _card(request)
    if not card.folder:
        raise web.HTTPNotFound(text="404: not archived\n")
    folder = card.folder.rstrip("/")
    return await _served(lambda: request.app[SOURCE].send_sidecar(request, folder))


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = _STATIC_TYPES.get(name)
    if kind is None:
        raise web.HTTPNotFound(text="404\n")
    return web.Response(
        body=request.app[STATIC][name],
        content_type=kind,
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )
