"""The exceptions fetcher raises, rooted in one tree.

Errors that stop the whole run carry the exit code the CLI maps them to; errors
that concern one task or one file are caught by the pipeline and recorded as
that task's outcome, so the rest of the run goes on::

    FetcherError                      exit 1
    ├── UsageError                    exit 2   bad flag, setting or layout
    │   ├── ConfigError               exit 2   unreadable or invalid config file
    │   └── InputError                exit 2   unreadable task-ID file
    ├── AuthError                     exit 2   the API rejected the key
    ├── LockedError                   exit 75  another run holds the archive
    ├── ArchiveError                  exit 1   the archive cannot be written
    └── TaskError                     (per task: recorded, run goes on)
        ├── QueryError                the API could not be queried
        │   └── ResponseError         the API answered something unusable
        ├── TaskNotFound              the API does not know the task
        └── DownloadError             a file could not be downloaded
            ├── FileExpired           the file's URL expired before download
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
in one place, :func:`fetcher.transport.translate`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75
EXIT_SIGINT = 130


class FetcherError(Exception):
    """Base of every error fetcher raises on purpose."""

    exit_code = EXIT_FAILED


class UsageError(FetcherError):
    """A flag, setting or layout template is invalid."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """The config file cannot be read or holds an invalid value."""


class InputError(UsageError):
    """A task-ID file cannot be read."""


class AuthError(FetcherError):
    """The API rejected the key; every further query would fail the same way."""

    exit_code = EXIT_USAGE


class LockedError(FetcherError):
    """Another run holds the archive's lock."""

    exit_code = EXIT_LOCKED


class ArchiveError(FetcherError):
    """The archive or its state database cannot be written (disk full, permissions)."""


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
