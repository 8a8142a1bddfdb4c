"""The gallery's HTML: the grid and a task's page, every value from the archive escaped.

Pages are built as text with :func:`html.escape` on every value that comes from the
archive (a prompt, a model, a reason, a sidecar): a prompt holding ``<script>`` is
shown as those characters. The pages carry no inline script or style (the Content
Security Policy forbids both); ``/static/gallery.js`` adds scrolling for more,
keyboard steps and the filters' auto-submit, and builds what it adds with the DOM's
``textContent``. Without it the pages still work: a "More" link and a Search button.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from ..catalog import Card, CardFile, Facets
from ..models import format_time
from ..sizes import format_size
from ..state import STATES
from .params import Filters

TITLE = "fetcher gallery"


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def task_href(task_id: str, filters: str) -> str:
    """A task page's address, keeping the grid's filters (the arrows step within them)."""
    return f"/task/{quote(task_id, safe='')}" + (f"?{filters}" if filters else "")


def file_href(task_id: str, index: int, route: str = "file") -> str:
    return f"/{route}/{quote(task_id, safe='')}/{index}"


def cover(card: Card) -> CardFile | None:
    """The file a card shows: its first picture, else its first video; archived files only."""
    ready = [f for f in card.files if f.path is not None and f.state == "done"]
    for kind in ("image", "video"):
        for item in ready:
            if item.kind == kind:
                return item
    return None


def card_json(card: Card, filters: str) -> dict[str, Any]:
    """A card as ``/api/cards`` sends it: what the grid's script needs to draw a tile."""
    shown = cover(card)
    return {
        "task_id": card.task_id,
        "state": card.state,
        "task_type": card.task_type,
        "created_at": format_time(card.created_at),
        "model": card.model,
        "model_version": card.model_version,
        "prompt": card.prompt,
        "href": task_href(card.task_id, filters),
        "cover": None
        if shown is None
        else {
            "kind": shown.kind,
            "src": file_href(
                card.task_id, shown.index, "thumb" if shown.kind == "image" else "file"
            ),
        },
    }


def _page(title: str, body: str, body_class: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title>"
        '<link rel="stylesheet" href="/static/gallery.css">'
        '<script src="/static/gallery.js" defer></script>'
        f'</head><body class="{body_class}">{body}</body></html>\n'
    )


def _options(values: Iterable[str], chosen: str | None, anything: str) -> str:
    rows = [f'<option value="">{_e(anything)}</option>']
    for value in values:
        mark = " selected" if value == chosen else ""
        rows.append(f'<option value="{_e(value)}"{mark}>{_e(value)}</option>')
    return "".join(rows)


def _filter_form(facets: Facets, chosen: Mapping[str, str]) -> str:
    states = [s for s in STATES if facets.states.get(s)]
    state_labels = "".join(
        f'<option value="{_e(s)}"{" selected" if chosen.get("state") == s else ""}>'
        f"{_e(s)} ({facets.states[s]})</option>"
        for s in states
    )
    return (
        '<form id="filters" class="filters" method="get" action="/" role="search">'
        '<input type="search" name="q" placeholder="Search prompts, models, IDs" '
        f'aria-label="Search" value="{_e(chosen.get("q", ""))}">'
        '<select name="type" aria-label="Task type">'
        f"{_options(facets.task_types, chosen.get('type'), 'any type')}</select>"
        '<select name="model" aria-label="Model">'
        f"{_options(facets.models, chosen.get('model'), 'any model')}</select>"
        '<select name="state" aria-label="State">'
        f'<option value="">any state</option>{state_labels}</select>'
        '<label>from <input type="date" name="since" '
        f'value="{_e(chosen.get("since", ""))}"></label>'
        '<label>to <input type="date" name="until" '
        f'value="{_e(chosen.get("until", ""))}"></label>'
        '<button type="submit">Search</button>'
        "</form>"
    )


def _tile(card: Card, filters: str) -> str:
    shown = cover(card)
    if shown is None:
        picture = f'<span class="placeholder">{_e(card.state)}</span>'
    elif shown.kind == "image":
        picture = (
            f'<img src="{file_href(card.task_id, shown.index, "thumb")}" alt="" loading="lazy">'
        )
    else:
        picture = (
            f'<video src="{file_href(card.task_id, shown.index)}#t=0.1" preload="metadata" '
            "muted playsinline></video>"
        )
    meta = " · ".join(
        _e(part)
        for part in (card.model, (format_time(card.created_at) or "")[:10], card.state)
        if part
    )
    return (
        f'<li class="card state-{_e(card.state)}">'
        f'<a href="{_e(task_href(card.task_id, filters))}" data-task="{_e(card.task_id)}">'
        f"{picture}"
        f'<span class="caption"><span class="prompt">{_e(card.prompt or card.task_id)}</span>'
        f'<span class="meta">{meta}</span></span></a></li>'
    )


def grid_page(
    cards: Sequence[Card],
    following: str | None,
    facets: Facets,
    asked: Filters,
    *,
    whole: bool,
) -> str:
    """The grid: filters, the first page of tiles, and a link to the next page."""
    chosen, filters = asked.chosen, asked.encoded
    tiles = "".join(_tile(card, filters) for card in cards)
    more = ""
    if following is not None:
        rest = urlencode(sorted({**chosen, "after": following}.items()))
        more = f'<p id="more"><a href="/?{_e(rest)}" rel="next">More</a></p>'
    note = (
        ""
        if whole
        else '<p class="note">The search index does not cover the whole archive yet: '
        "the next <code>fetcher fetch</code> or <code>fetcher search</code> builds it.</p>"
    )
    empty = "" if cards else '<p class="empty">Nothing matches.</p>'
    body = (
        f'<header><h1><a href="/">{_e(TITLE)}</a></h1>{_filter_form(facets, chosen)}</header>'
        f'<main>{note}<ul id="grid" class="grid" data-filters="{_e(filters)}" '
        f'data-next="{_e(following or "")}">{tiles}</ul>{empty}{more}</main>'
    )
    return _page(TITLE, body, "grid-page")


def _file_block(card: Card, item: CardFile) -> str:
    href = file_href(card.task_id, item.index)
    if item.path is None or item.state != "done":
        shown = f'<p class="missing">not archived ({_e(item.state)})</p>'
    elif item.kind == "image":
        shown = f'<a href="{href}"><img src="{href}" alt="file {item.index}"></a>'
    elif item.kind == "video":
        shown = f'<video src="{href}" controls preload="metadata" playsinline></video>'
    else:
        shown = f'<p><a href="{href}">open file {item.index}</a></p>'
    facts = [
        ("path", item.path),
        ("type", item.content_type),
        ("size", None if item.size is None else f"{format_size(item.size)} ({item.size} bytes)"),
        ("sha256", item.sha256),
    ]
    rows = "".join(
        f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in facts if value is not None
    )
    return (
        f'<figure class="file file-{_e(item.kind)}">{shown}'
        f"<figcaption><dl>{rows}</dl></figcaption></figure>"
    )


def _step(side: str, task_id: str | None, filters: str, label: str, key: str) -> str:
    """A task page's arrow: to ``task_id``, or hidden at the end of the list."""
    href = "#" if task_id is None else task_href(task_id, filters)
    shown = " hidden" if task_id is None else ""
    return f'<a id="{side}" href="{_e(href)}"{shown} title="{key}">{label}</a>'


def task_page(
    card: Card,
    sidecar: str | None,
    filters: str,
    near: tuple[str | None, str | None] = (None, None),
) -> str:
    """One task: every file, what made it, when, and the sidecar as it is on disk.

    ``near`` is the newer and the older task of the grid's order (with its filters):
    the arrows work on a page opened from a link or a bookmark too.
    """
    back = "/" + (f"?{filters}" if filters else "")
    facts = [
        ("task ID", card.task_id),
        ("state", card.state),
        ("type", card.task_type),
        ("model", " ".join(p for p in (card.model, card.model_version) if p) or None),
        ("created", format_time(card.created_at)),
        ("finished", format_time(card.finished_at)),
        ("folder", card.folder),
        ("failure", card.reason),
        ("negative prompt", card.negative_prompt),
    ]
    rows = "".join(
        f'<dt>{_e(name)}</dt><dd class="{_e(name.replace(" ", "-"))}">{_e(value)}</dd>'
        for name, value in facts
        if value
    )
    files = "".join(_file_block(card, item) for item in card.files)
    raw = ""
    if sidecar is not None:
        raw = (
            '<section class="sidecar"><h2>Sidecar '
            f'<a href="{file_href(card.task_id, 0, "sidecar").rsplit("/", 1)[0]}">task.json</a>'
            f"</h2><pre>{_e(_pretty(sidecar))}</pre></section>"
        )
    body = (
        '<header class="task-head"><nav>'
        f'<a id="back" href="{_e(back)}" title="Esc">Back to the grid</a>'
        f"{_step('prev', near[0], filters, 'Previous', 'Left arrow')}"
        f"{_step('next', near[1], filters, 'Next', 'Right arrow')}</nav></header>"
        f'<main class="task" data-task="{_e(card.task_id)}" data-filters="{_e(filters)}">'
        f'<h1 class="prompt">{_e(card.prompt or card.task_id)}</h1>'
        f'<dl class="facts">{rows}</dl><section class="files">{files}</section>{raw}</main>'
    )
    return _page(f"{card.prompt or card.task_id} - {TITLE}", body, "task-page")


def _pretty(text: str) -> str:
    """The sidecar indented for reading; text that is not JSON is shown as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text
