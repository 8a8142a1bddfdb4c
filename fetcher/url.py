"""http(s) URLs as fetcher requests them: parsed once, checked strictly, normalised.

Kept apart from the HTTP client so that the settings, the downloader's checks and
the client all judge a URL, and compare origins, in one way, without importing
the client (and ``ssl``) at start-up.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

#: Characters a request target may carry as they are; the rest is percent-encoded.
_TARGET_SAFE = "/%:@!$&'()*+,;=-._~?"
#: Dot-separated labels of letters, digits, ``-`` and ``_``, at most 63 each (IPv4 fits too).
_HOST = re.compile(
    r"(?!.{254})[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


class InvalidUrl(ValueError):
    """A URL that cannot be requested: its text says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed, requestable http(s) URL."""

    scheme: str
    host: str
    port: int
    target: str
    text: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """Whether the host is this machine: ``localhost`` or a loopback address."""
        host = self.host.lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def in_clear(self) -> bool:
        """Whether what is sent here can be read on the way: plain http to another machine."""
        return self.scheme == "http" and not self.loopback

    def joined(self, quoted: str) -> Url:
        """This URL with ``quoted`` (already percent-encoded) added to its path."""
        return Url(self.scheme, self.host, self.port, self.target + quoted, self.text + quoted)

    @classmethod
    def parse(cls, text: str) -> Url:
        """Parse and normalise; raises :class:`InvalidUrl` for anything unusable."""
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise InvalidUrl("URL holds a control character")
        if text != text.strip(" "):
            raise InvalidUrl("URL starts or ends with a space")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidUrl(str(exc) or "malformed URL") from exc
        if port == 0:
            raise InvalidUrl("port 0 is not a port to connect to")
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidUrl(f"scheme {scheme or 'none'!r} is not http or https")
        host = parts.hostname or ""
        if not host:
            raise InvalidUrl("URL has no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise InvalidUrl(f"host {host!r} is not a valid name") from exc
        if not (_is_ipv6(host) if ":" in host else _HOST.fullmatch(host)):
            raise InvalidUrl(f"host {host!r} is not a valid name")
        target = quote(parts.path or "/", safe=_TARGET_SAFE)
        if parts.query:
            target += "?" + quote(parts.query, safe=_TARGET_SAFE)
        return cls(scheme, host, port or (443 if scheme == "https" else 80), target, text)


def _is_ipv6(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
