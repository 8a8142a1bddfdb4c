"""Where a shared state lives: a PostgreSQL URL, kept whole for libpq and shown without
its password everywhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import UsageError

#: The schemes libpq takes for a connection URI.
SCHEMES = ("postgresql://", "postgres://")
#: Seconds a run waits, all attempts together, for a lost state database to come back
#: (``--state-reconnect``).
DEFAULT_RECONNECT = 60.0


def is_database(text: object) -> bool:
    """Whether a ``state`` setting names a PostgreSQL database rather than a file."""
    return isinstance(text, str) and text.lower().startswith(SCHEMES)


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """``postgresql://USER@HOST/DB``: handed to libpq as given (so its ``PG*`` variables
    and ``~/.pgpass`` fill in what it leaves out); ``str()`` and ``repr()`` never hold
    the password, which goes to the database server alone."""

    #: The URL as given, password included: for the connection only.
    dsn: str = field(repr=False)
    #: The URL without its password: for messages, logs and reports.
    shown: str
    #: The password written in the URL, if any, to scrub from a server's message.
    password: str | None = field(default=None, repr=False, compare=False)
    #: Seconds to keep reconnecting once the connection is lost, before the run stops.
    reconnect: float = field(default=DEFAULT_RECONNECT, compare=False)

    @classmethod
    def parse(cls, text: str) -> DatabaseUrl:
        """The URL, or a one-line :class:`UsageError` that does not repeat the password."""
        if not is_database(text):
            raise UsageError("a state database is a postgresql:// URL")
        try:
            parts = urlsplit(text)
            password = parts.password
            host = parts.hostname or ""
            port = parts.port
        except ValueError:
            raise UsageError(
                f"{_without_secrets(text)!r} is not a PostgreSQL URL "
                "(postgresql://USER@HOST[:PORT]/DATABASE)"
            ) from None
        user = f"{parts.username}@" if parts.username else ""
        netloc = f"{user}{host}{f':{port}' if port else ''}"
        query = [(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"]
        secret = password or dict(parse_qsl(parts.query)).get("password")
        shown = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))
        return cls(text, shown, secret or None)

    def __str__(self) -> str:
        return self.shown

    def scrub(self, message: str) -> str:
        """``message`` with the password taken out, should a server or library repeat it."""
        return message.replace(self.password, "***") if self.password else message


def _without_secrets(text: str) -> str:
    """What can be said of a URL that did not parse: its scheme and the part after ``@``."""
    scheme, _, rest = text.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest else f"{scheme}://{rest}"
