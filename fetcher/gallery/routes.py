"""The gallery's routes: pages, the cards API, files, thumbnails, sidecars and static files.

Files are addressed by task and position (``/file/<task>/<index>``), never by a path
from the URL: the path comes from the state database and still passes
:func:`~fetcher.gallery.guard.contained`, so a hostile database cannot name a file
outside the archive either. Only GET (and HEAD) exist.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from ..catalog import Card, CardFile, Catalog, Query
from ..errors import UsageError
from .guard import Outside, contained
from .pages import card_json, grid_page, task_page
from .params import BadParameter, Filters, read_filters
from .reader import Reader
from .thumbs import CONTENT_TYPE, NotAPicture, Thumbnails

READER = web.AppKey("reader", Reader)
ROOT = web.AppKey("root", Path)
THUMBS = web.AppKey("thumbs", Thumbnails)
STATIC = web.AppKey("static", dict)

#: A task ID as the gateway makes them (and as fetcher accepts them).
_TASK = r"{task_id:[A-Za-z0-9._-]{1,256}}"
_INDEX = r"{index:[0-9]{1,6}}"
#: A sidecar embedded in a task page; a larger one is linked, not shown.
SIDECAR_SHOWN = 1 << 20
#: Content types a file is served as; anything else is a download (no browser renders it).
_SHOWN_TYPES = ("image/", "video/", "audio/")
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


def _inside(request: web.Request, relative: str | None) -> Path:
    if relative is None:
        raise web.HTTPNotFound(text="404: not archived\n")
    try:
        return contained(request.app[ROOT], relative)
    except Outside:
        raise web.HTTPNotFound(text="404: not in the archive\n") from None


async def task(request: web.Request) -> web.Response:
    card = await _card(request)
    filters = _filters(request, paged=False)
    text = None
    if card.folder:
        try:
            path = _inside(request, f"{card.folder.rstrip('/')}/task.json")
            if path.stat().st_size <= SIDECAR_SHOWN:
                text = path.read_text(encoding="utf-8", errors="replace")
        except (web.HTTPNotFound, OSError):
            text = None
    return web.Response(text=task_page(card, text, filters.encoded), content_type="text/html")


async def _file_of(request: web.Request) -> tuple[CardFile, Path]:
    card = await _card(request)
    index = int(request.match_info["index"])
    for item in card.files:
        if item.index == index and item.state == "done":
            return item, _inside(request, item.path)
    raise web.HTTPNotFound(text="404: no such file in this task\n")


async def archived_file(request: web.Request) -> web.StreamResponse:
    """The file's bytes; Range requests are answered (aiohttp's FileResponse does them)."""
    item, path = await _file_of(request)
    headers = {"Cache-Control": "private, max-age=3600"}
    kind = item.content_type or ""
    if kind.startswith(_SHOWN_TYPES) and "svg" not in kind:
        headers["Content-Type"] = kind
    else:
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
    return web.FileResponse(path, headers=headers)


async def thumbnail(request: web.Request) -> web.Response:
    item, path = await _file_of(request)
    if item.kind != "image":
        raise web.HTTPNotFound(text="404: only pictures have thumbnails\n")
    store = request.app[THUMBS]
    try:
        data = await request.app[READER].picture(lambda: store.get(path, item.path or ""))
    except NotAPicture:
        raise web.HTTPNotFound(text="404: not a picture Pillow can read\n") from None
    return web.Response(
        body=data,
        content_type=CONTENT_TYPE,
        headers={"Cache-Control": "private, max-age=86400"},
    )


async def sidecar(request: web.Request) -> web.StreamResponse:
    card = await _card(request)
    path = _inside(request, f"{(card.folder or '').rstrip('/')}/task.json" if card.folder else None)
    return web.FileResponse(path, headers={"Content-Type": "application/json; charset=utf-8"})


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
