"""The query API client: one authenticated connection pool, used only for the API's origin.

The key lives in this client's session headers and nowhere else; redirects are
never followed, so it cannot be carried to another host. Answers are asked for
gzip: a DescribeTaskDetail body is JSON that compresses several times over. Transient trouble
(throttling, 5xx, dropped connections, Tencent's ``RequestLimitExceeded``) is
retried under the shared :class:`~fetcher.retry.RetryPolicy`; a rejected key
(HTTP 401, ``AuthFailure.*``) raises :class:`~fetcher.errors.AuthError` at once,
since every later query would fail the same way. A 403 or ``UnauthorizedOperation``
is one task's :class:`~fetcher.errors.Forbidden`, unless the run's first queries all
get it (:mod:`fetcher.probe`, which also tells a wrong base URL from one task's
trouble).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self
from urllib.parse import quote

from . import __version__
from .errors import (
    AuthError,
    ConnectFailed,
    Forbidden,
    HttpError,
    NoQueryPath,
    QueryError,
    ResponseError,
    TaskNotFound,
    Unreachable,
    UntrustedCertificate,
)
from .models import ApiErrorCode, Task, load_json, parse_task, redact, server_text
from .probe import Blame, FirstQueries
from .retry import RETRY_STATUSES, RateLimiter, RetryPolicy, attempts, parse_retry_after
from .transport import Session
from .url import Url

QUERY_PATH = "/tencent-vod/v1/query/"
#: A query answer is a few KiB; anything past this is not an answer.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
USER_AGENT = f"fetcher/{__version__}"


class _Transient(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(
        self, reason: str, retry_after: float | None = None, blame: Blame | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        #: What this failure blames, were every first query of the run to get it.
        self.blame = blame


class ApiClient:
    """Queries tasks; use as ``async with ApiClient(...) as api: await api.query(id)``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float,
        policy: RetryPolicy,
        rate: float,
        concurrency: int,
        proxies: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: Every query's URL but the task ID: parsed once, here, not once per query.
        self._prefix = Url.parse(self.base_url + QUERY_PATH)
        self.origin = self._prefix.origin
        self._key = api_key
        self._timeout = timeout
        self._policy = policy
        self._limiter = RateLimiter(rate)
        self._concurrency = concurrency
        self._proxies = dict(proxies)
        self._client: Session | None = None
        #: Queries actually sent, retries included: what "zero requests" is measured by.
        self.requests_sent = 0
        #: Judges the run's first answers: the key's or the base URL's fault, or the task's.
        self.first = FirstQueries(concurrency, redact(self.base_url, api_key))

    async def __aenter__(self) -> Self:
        self._client = Session(
            headers={
                "Authorization": f"Bearer {self._key}",
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "gzip, deflate",
            },
            timeout=self._timeout,
            connections=self._concurrency,
            proxies=self._proxies,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def query(self, task_id: str) -> Task:
        """The task as the API describes it now; raises TaskError subclasses, or AuthError
        and GatewayError when the key or the base URL is at fault."""
        attempt = 0
        counted = False
        while True:
            attempt += 1
            try:
                task = await self._attempt(task_id)
            except (Forbidden, NoQueryPath, Unreachable) as exc:
                if not counted:
                    self.first.blame(_BLAMES[type(exc)], str(exc))
                raise
            except (TaskNotFound, ApiErrorCode):
                self.first.answered()  # a Tencent answer: the key and the URL work
                raise
            except _Transient as exc:
                if exc.blame is not None and not counted:
                    counted = True
                    self.first.blame(exc.blame, exc.reason)
                if attempt > self._policy.retries:
                    raise QueryError(
                        f"query failed after {attempts(attempt)}: {exc.reason}", task_id=task_id
                    ) from None
                await asyncio.sleep(self._policy.delay(attempt, exc.retry_after))
            else:
                self.first.answered()
                return task

    async def _attempt(self, task_id: str) -> Task:
        status, retry_after, body = await self._get(task_id)
        if status == 401:
            raise AuthError(f"the API rejected the key (HTTP {status}{self._detail(body)})")
        if status == 403:
            raise Forbidden(
                f"the API refused this task (HTTP 403{self._detail(body)})", task_id=task_id
            )
        if status in RETRY_STATUSES:
            raise _Transient(f"HTTP {status}", retry_after)
        if 300 <= status < 400:
            raise QueryError(
                f"the API answered HTTP {status} (redirects are not followed)", task_id=task_id
            )
        if status == 404:
            # Only the upstream's own "no such task" is final; a bare 404 is as likely
            # a wrong base URL, and must not write off every task for good.
            try:
                parse_task(task_id, body, secret=self._key)
            except TaskNotFound:
                raise
            except QueryError:
                pass
            raise NoQueryPath(
                f"the API answered HTTP 404{self._detail(body)} (is the base URL right?)",
                task_id=task_id,
            )
        if status >= 400:
            raise QueryError(f"the API answered HTTP {status}{self._detail(body)}", task_id=task_id)
        try:
            return parse_task(task_id, body, secret=self._key)
        except ApiErrorCode as exc:
            if exc.code.startswith("UnauthorizedOperation"):
                raise Forbidden(
                    f"the API refused this task ({exc.code})", task_id=task_id
                ) from None
            if exc.auth:
                raise AuthError(f"the API rejected the key ({exc.code})") from None
            if exc.retryable:
                raise _Transient(exc.code) from None
            raise

    async def _get(self, task_id: str) -> tuple[int, float | None, bytes]:
        """One query's status, ``Retry-After`` in seconds, and decoded body."""
        assert self._client is not None, "ApiClient used outside 'async with'"
        await self._limiter.wait()
        url = self._prefix.joined(quote(task_id, safe=""))
        self.requests_sent += 1
        try:
            async with self._client.get(url) as response:
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ResponseError(
                            f"response larger than {MAX_RESPONSE_BYTES} bytes", task_id=task_id
                        )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                return response.status, retry_after, bytes(body)
        except UntrustedCertificate as exc:
            raise Unreachable(
                f"query failed: {redact(str(exc), self._key)}", task_id=task_id
            ) from exc
        except HttpError as exc:
            # aiohttp's words for a malformed head may quote the server's bytes.
            reason = redact(str(exc), self._key)
            if not exc.retryable:
                raise QueryError(f"query failed: {reason}", task_id=task_id) from exc
            blame = Blame.UNREACHABLE if isinstance(exc, ConnectFailed) else None
            raise _Transient(reason, blame=blame) from exc

    def _detail(self, body: bytes) -> str:
        """The gateway's own message, if it sent one, with the key blotted out."""
        try:
            document = load_json(body)
            message = document["error"]["message"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return ""
        if not isinstance(message, str) or not server_text(message, self._key):
            return ""
        return ": " + server_text(message, self._key)[:200]


_BLAMES: dict[type[QueryError], Blame] = {
    Forbidden: Blame.FORBIDDEN,
    NoQueryPath: Blame.NO_PATH,
    Unreachable: Blame.UNREACHABLE,
}
