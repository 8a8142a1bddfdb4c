"""Whether a run's first queries blame the key or the base URL, rather than one task.

A 403 or ``UnauthorizedOperation`` can be about one task (one of another
sub-application), a refused connection can be a passing blip, and a bare 404
can be a gateway's answer for one path: alone, each is that task's failure. But
when every one of a run's *first queries* gets the same one of these answers,
no query has shown that the key works or that the base URL reaches a gateway,
and asking about the rest would fail each task slowly for the same reason: the
run stops, exit 2.

The first queries are the first ``min(concurrency, tasks queried)`` queries to
come back, counted once each at their first attempt's answer. One of them that
gets any other answer (a task, pending or failed, Tencent's "no such task") or a
query that later gets through, settles it: from then on every such answer is
the task's own. Answers that say nothing about key or URL (a 5xx, a timeout, a
dropped connection after connecting) do not count either way.
"""

from __future__ import annotations

import enum

from .errors import AuthError, FetcherError, GatewayError


class Blame(enum.Enum):
    """What a first query's answer would blame, were every first query to get it."""

    #: HTTP 403 or ``UnauthorizedOperation``: the key.
    FORBIDDEN = "forbidden"
    #: No connection to the gateway: the base URL (or the network).
    UNREACHABLE = "unreachable"
    #: A bare 404 for the query path: the base URL.
    NO_PATH = "no-path"


class FirstQueries:
    """Counts the first answers of a run; raises the run-level error when they all agree."""

    def __init__(self, concurrency: int, base_url: str) -> None:
        self._size = concurrency
        self._base_url = base_url
        self._settled = False
        self._blamed: list[tuple[Blame, str]] = []
        #: Queries that will ever be asked, once the input is all read.
        self._total: int | None = None

    @property
    def settled(self) -> bool:
        """Whether the key and the base URL are known to be fine (or the judging is over)."""
        return self._settled

    def answered(self) -> None:
        """A query got an answer that shows the key and the base URL work."""
        self._settled = True

    def blame(self, blame: Blame, detail: str) -> None:
        """A first query's answer blames the key or the URL; raises once all of them do."""
        if self._settled:
            return
        self._blamed.append((blame, detail))
        self._judge()

    def expect(self, total: int) -> None:
        """No more than ``total`` queries will be asked in this run; may raise now."""
        self._total = total
        if not self._settled:
            self._judge()

    def _judge(self) -> None:
        wanted = self._size if self._total is None else min(self._size, self._total)
        if wanted == 0 or len(self._blamed) < wanted:
            return
        self._settled = True
        kinds = {blame for blame, _ in self._blamed[:wanted]}
        if len(kinds) == 1:
            raise self._error(kinds.pop(), self._blamed[0][1])

    def _error(self, blame: Blame, detail: str) -> FetcherError:
        if blame is Blame.FORBIDDEN:
            return AuthError(f"the API rejected the key: it refused every first query ({detail})")
        if blame is Blame.UNREACHABLE:
            return GatewayError(
                f"cannot reach the gateway at {self._base_url} ({detail}); check --base-url"
            )
        return GatewayError(
            f"the gateway at {self._base_url} answered HTTP 404 for the query path; "
            "check --base-url (the gateway's origin)"
        )
