"""The exceptions fetcher raises, rooted in one tree.

Errors that stop the whole run carry the exit code the CLI maps them to; errors
that concern one task or one file are caught by the pipeline and recorded as
that task's outcome, so the rest of the run goes on::

    FetcherError                      exit 1
    ├── UsageError                    exit 2   bad flag, setting or layout
    │   ├── ConfigError               exit 2   unreadable or invalid config file
    │   ├── InputError                exit 2   unreadable task-ID file
    │   ├── CatalogError              exit 2   a search or listing asked amiss (bad cursor,
    │                                          state, limit)
    │   ├── GatewayError              exit 2   the base URL reaches no gateway (first queries)
    │   └── ListenError               exit 2   the gallery cannot listen there (port in use)
    ├── AuthError                     exit 2   the API rejected the key (401, AuthFailure.*,
    │                                          or 403 to every first query)
    ├── StoreRefused                  exit 2   the bucket's store said no: wrong key,
    │                                          no such bucket, a denied write
    ├── StateUnreachable              exit 2   the PostgreSQL state cannot be reached:
    │                                          refused, wrong password, no such database
    ├── LockedError                   exit 75  another run holds the archive
    ├── ArchiveError                  exit 3   the archive or its state cannot be written
    │   ├── StoreFailing              exit 3   the bucket's store still failing after the
    │   │                                      retries, or its quota full
    │   └── StepLost                  exit 3   a state step cut off with its connection
    │                                          (redone by the functions that allow it)
    ├── InternalError                 exit 70  a bug stopped the run
    └── TaskError                     (per task: recorded, run goes on)
        ├── QueryError                the API could not be queried
        │   ├── ResponseError         the API answered something unusable
        │   ├── Forbidden             403 / UnauthorizedOperation for this task (not final)
        │   ├── NoQueryPath           a bare 404 for the query path: likely a wrong base URL
        │   └── Unreachable           the gateway could not be connected to
        ├── TaskBug                   a bug while handling this task (traceback at -v)
        ├── TaskNotFound              the API does not know the task
        └── DownloadError             a file could not be downloaded
            ├── FileExpired           the host refused the file after its ExpireTime
            ├── FileGone              the host dropped the file early; a fresh URL may help
            └── IntegrityError        the bytes do not match what was promised

    HttpError                         one request's attempt failed on the way
    ├── ConnectFailed                 no connection: refused, unknown host, proxy   (retried)
    ├── TimedOut                      nothing moved for ``timeout`` seconds         (retried)
    ├── ConnectionLost                dropped before the answer or the body ended   (retried)
    ├── BadResponse                   not valid HTTP: contradictory framing, a head
    │                                 over the limits                          (not retried)
    └── UntrustedCertificate          the certificate does not verify          (not retried)

    StepSpansAwait (AssertionError)   a state step awaited: a bug in fetcher, never caught

:class:`HttpError` never leaves the API client or the downloader: they retry it
or turn it into the task's :class:`QueryError` or :class:`DownloadError`. Its
``retryable`` says whether another attempt can change the answer.

Lower-level exceptions (aiohttp's, sqlite3, OSError) are translated where they are
caught, with ``raise ... from exc``, so callers only ever list these; aiohttp's
in one place, :func:`fetcher.transport.translate`. Anything else one task or
file raises is a bug: the pipeline makes it that item's :class:`TaskBug` and goes
on; a bug outside any one task is the run's :class:`InternalError`.

Each run-level class has a ``code``, the stable word ``--json`` reports in
``error.code``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: The run stopped before settling its tasks: disk full, archive unwritable, state error.
EXIT_STOPPED = 3
#: A bug stopped the run (sysexits' EX_SOFTWARE).
EXIT_BUG = 70
EXIT_LOCKED = 75
EXIT_SIGINT = 130


class FetcherError(Exception):
    """Base of every error fetcher raises on purpose."""

    exit_code = EXIT_FAILED
    #: What ``--json`` says in ``error.code`` when this stops a run.
    code = "failed"


class UsageError(FetcherError):
    """A flag, setting or layout template is invalid."""

    exit_code = EXIT_USAGE
    code = "usage"


class ConfigError(UsageError):
    """The config file cannot be read or holds an invalid value."""

    code = "config"


class InputError(UsageError):
    """A task-ID file cannot be read."""

    code = "input"


class CatalogError(UsageError):
    """A search or listing cannot be answered as asked: a bad page cursor, state or limit."""

    code = "catalog"


class GatewayError(UsageError):
    """The run's first queries all failed to connect, or all got a bare 404: the base URL."""

    code = "gateway"


class ListenError(UsageError):
    """``fetcher serve`` cannot listen where it was told: the port is taken, the host unknown."""

    code = "listen"


class AuthError(FetcherError):
    """The API rejected the key; every further query would fail the same way."""

    exit_code = EXIT_USAGE
    code = "auth"


class StoreRefused(FetcherError):
    """The bucket's store refused what no retry can change: the credentials, the bucket, a write."""

    exit_code = EXIT_USAGE
    code = "store"


class StateUnreachable(FetcherError):
    """The PostgreSQL state cannot be connected to: refused, a wrong password, no database."""

    exit_code = EXIT_USAGE
    code = "state"


class LockedError(FetcherError):
    """Another run holds the archive's lock."""

    exit_code = EXIT_LOCKED
    code = "locked"


class ArchiveError(FetcherError):
    """The archive or its state database cannot be written (disk full, permissions)."""

    exit_code = EXIT_STOPPED
    code = "archive"


class StoreFailing(ArchiveError):
    """The bucket's store kept failing (5xx, throttling, dropped) after the retries, or is full."""


class StepLost(ArchiveError):
    """A state step was cut off with its connection: none of it committed, and the state has a
    new connection (or says why not) by the next statement. Functions made of steps alone
    run again whole (:func:`fetcher.state.redone`); anywhere else it stops the run."""


class InternalError(FetcherError):
    """A bug outside any one task stopped the run; its cause carries the traceback."""

    exit_code = EXIT_BUG
    code = "internal"


class TaskError(FetcherError):
    """Something went wrong with one task; it is recorded and the run goes on."""

    #: True when asking again cannot change the answer (the API said so).
    final = False

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id


class QueryError(TaskError):
    """The API could not be queried for this task (network, rate limit, 5xx)."""


class ResponseError(QueryError):
    """The API answered with a body fetcher cannot use."""


class Forbidden(QueryError):
    """HTTP 403 or ``UnauthorizedOperation`` for this task: this key may not see it (for now)."""


class NoQueryPath(QueryError):
    """A bare HTTP 404 (not Tencent's "no such task"): the query path itself is unknown."""


class Unreachable(QueryError):
    """The gateway could not be connected to (refused, unknown host, TLS)."""


class TaskBug(TaskError):
    """A bug while handling one task or file; that item fails, the run goes on."""


class TaskNotFound(TaskError):
    """The API does not know this task ID (typo, or older than the query window)."""

    final = True


class DownloadError(TaskError):
    """A file could not be downloaded after the retries allowed."""

    def __init__(self, message: str, *, task_id: str | None = None, url: str | None = None) -> None:
        super().__init__(message, task_id=task_id)
        self.url = url


class FileExpired(DownloadError):
    """The file's URL expired, or the host no longer has it."""

    final = True


class FileGone(DownloadError):
    """The file host answered 403/404/410 before ``ExpireTime``; the task may have a fresh URL."""


class IntegrityError(DownloadError):
    """The downloaded bytes do not match the size or checksum promised for them."""


class HttpError(Exception):
    """One request's attempt failed on the way; its text is one line saying how."""

    #: Whether another attempt may get through: the cause can pass (a drop, a timeout).
    retryable = True


class ConnectFailed(HttpError):
    """No connection: refused, unknown host, a TLS handshake that failed, or the proxy said no."""


class TimedOut(HttpError):
    """Nothing moved for ``timeout`` seconds; ``phase`` is connect or read."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"timed out ({phase})")
        self.phase = phase


class ConnectionLost(HttpError):
    """The connection closed before the answer, or before its body was whole."""


class BadResponse(HttpError):
    """The answer is not valid HTTP (two Content-Lengths, a head over the limits)."""

    retryable = False


class UntrustedCertificate(HttpError):
    """The host's TLS certificate does not verify against the trusted CAs."""

    retryable = False


class StepSpansAwait(AssertionError):
    """A state-database step awaited, or began inside another: a bug, never the user's doing."""
