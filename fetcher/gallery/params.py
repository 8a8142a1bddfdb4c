"""A request's filters, read into the catalog's :class:`~fetcher.catalog.Query`.

Anything a browser would not send is a 400 that says which parameter is wrong, never
a 500: a limit that is not a small whole number, a date that is not ``YYYY-MM-DD``, a
state fetcher does not have, text past any sensible length. The keyset cursor
(``after``) is the catalog's: it refuses one it did not make.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlencode

from ..catalog import Query
from ..state import STATES

#: Tiles a page holds, and the most a client may ask for at once.
PAGE = 48
MAX_PAGE = 200
#: Longer search text than any prompt worth typing is refused, not searched.
MAX_TEXT = 1000
#: The filter parameters the grid keeps in its links, in the form's names.
FILTERS = ("q", "type", "model", "state", "since", "until")


class BadParameter(ValueError):
    """A query parameter the gallery refuses; its text names it."""


@dataclass(frozen=True, slots=True)
class Filters:
    """What the grid was asked for: the catalog's query and the form's values to show."""

    query: Query
    #: The filter parameters given, non-empty ones only, as the form names them.
    chosen: dict[str, str]

    @property
    def encoded(self) -> str:
        """The filters as a query string, for links that keep them."""
        return urlencode(sorted(self.chosen.items()))


def read_filters(params: Mapping[str, str], *, paged: bool = True) -> Filters:
    """The filters of a grid or ``/api/cards`` request; :class:`BadParameter` if one is bad."""
    chosen = {name: params[name].strip() for name in FILTERS if params.get(name, "").strip()}
    text = chosen.get("q", "")
    if len(text) > MAX_TEXT:
        raise BadParameter(f"q: longer than {MAX_TEXT} characters")
    state = chosen.get("state")
    if state is not None and state not in STATES:
        raise BadParameter(f"state: {state!r} is not one of {', '.join(STATES)}")
    limit = _limit(params.get("limit")) if paged else PAGE
    after = params.get("after") or None if paged else None
    query = Query(
        text=text,
        task_type=chosen.get("type"),
        model=chosen.get("model"),
        since=_day(chosen, "since"),
        until=_day(chosen, "until"),
        states=(state,) if state else (),
        limit=limit,
        after=after,
    )
    return Filters(query, chosen)


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return PAGE
    if not value.isdigit() or len(value) > 4 or not 1 <= int(value) <= MAX_PAGE:
        raise BadParameter(f"limit: a whole number from 1 to {MAX_PAGE}")
    return int(value)


def _day(chosen: Mapping[str, str], name: str) -> datetime | None:
    """The form's day as the catalog's bound: ``since`` from its start, ``until`` (a day
    the user means to include) up to the start of the next day, UTC."""
    value = chosen.get(name)
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
        start = datetime.combine(day, time(), UTC)
        return start + timedelta(days=1) if name == "until" else start
    except (ValueError, OverflowError):
        raise BadParameter(f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)") from None
