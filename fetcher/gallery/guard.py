"""What keeps the gallery a window and not a door: the token, the Host, paths, headers.

Every request passes :func:`guard` before its handler: its raw path is refused when it
holds a ``..`` segment or an encoded slash, backslash, dot or NUL (400); the token is
required when one is set (401); a gallery on loopback without a token answers only
requests that name it by a loopback Host (a web page elsewhere cannot reach it through
a DNS name it re-pointed at 127.0.0.1). Every response, errors included, carries the
headers of :func:`secure_headers`. Files reach the handlers only through
:func:`contained`, which refuses anything outside the archive or inside a hidden folder.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Middleware

#: The policy of every page: its own script, style, images and media, nothing else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
#: The policy of an archived file opened on its own: inert, whatever it holds.
FILE_POLICY = "default-src 'none'; sandbox; frame-ancestors 'none'"
#: Raw-path pieces that mean a client is trying to step around the routes.
_ENCODED = ("%2f", "%5c", "%2e", "%00")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cookie_name(port: int) -> str:
    """The token's cookie: one per port, as two galleries on one host keep two tokens."""
    return f"fetcher_token_{port}"


class Gate:
    """The token and Host rules of one listening gallery."""

    def __init__(self, token: str | None, *, loopback: bool) -> None:
        self._token = token
        #: Check the Host header (loopback without a token: nothing else stands guard).
        self._check_host = loopback and token is None

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when ``request`` may pass; else the answer it gets."""
        problem = _raw_path_problem(request.raw_path)
        if problem:
            return web.Response(status=400, text=f"400: {problem}\n")
        if self._check_host and not _loopback_host(request.host):
            return web.Response(status=421, text="421: this gallery answers to loopback only\n")
        if self._token is None:
            return None
        offered = request.query.get("token")
        if offered is not None:
            return self._exchange(request, offered)
        if self._valid(_bearer(request)) or self._valid(request.cookies.get(_cookie(request))):
            return None
        return web.Response(
            status=401,
            text="401: this gallery needs its token: open it once with ?token=..., "
            "or send 'Authorization: Bearer ...'\n",
            headers={"WWW-Authenticate": 'Bearer realm="fetcher"'},
        )

    def _exchange(self, request: web.Request, offered: str) -> web.Response:
        """``?token=``: a right token becomes a cookie, and the URL loses it (history, logs)."""
        if not self._valid(offered):
            return web.Response(status=401, text="401: wrong token\n")
        rest = [(k, v) for k, v in request.query.items() if k != "token"]
        # The path as it came, still percent-encoded: nothing decoded reaches a header.
        target = request.raw_path.split("?", 1)[0] + ("?" + urlencode(rest) if rest else "")
        answer = web.Response(status=303, headers={"Location": target})
        answer.set_cookie(
            _cookie(request), offered, httponly=True, samesite="Strict", path="/", max_age=None
        )
        return answer

    def _valid(self, offered: str | None) -> bool:
        if offered is None or self._token is None:
            return False
        return hmac.compare_digest(offered.encode(), self._token.encode())


def _cookie(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return cookie_name(int(sockname[1]) if sockname else 0)


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _loopback_host(host: str) -> bool:
    """A Host header naming loopback, with or without a port (``[::1]:8765`` included)."""
    name = host[1 : host.find("]")] if host.startswith("[") else host.split(":", 1)[0]
    return is_loopback(name)


def _raw_path_problem(raw: str) -> str | None:
    """Why a raw request path is refused, or None: the routes never need these."""
    path = raw.split("?", 1)[0]
    lowered = path.lower()
    if "\\" in path or "\x00" in path:
        return "backslash or NUL in the path"
    if any(code in lowered for code in _ENCODED):
        return "encoded slash, backslash, dot or NUL in the path"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "dot segment in the path"
    return None


def make_guard(gate: Gate) -> Middleware:
    """The middleware: :meth:`Gate.refusal` first, then the handler."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = gate.refusal(request)
        if refused is not None:
            return refused
        return await handler(request)

    return guard


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response's headers: a strict policy, no sniffing, no referrer, no framing."""
    file_like = request.path.startswith(("/file/", "/sidecar/"))
    headers = response.headers
    headers["Content-Security-Policy"] = FILE_POLICY if file_like else PAGE_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")


class Outside(Exception):
    """A path the gallery will not serve: outside the archive, hidden, a link, not a file."""


def visible_parts(relative: str) -> list[str]:
    """The segments of ``relative`` (archive-relative, ``/``-separated), or :class:`Outside`.

    Refused: an absolute path, a NUL or backslash, a ``..`` or empty segment, and any
    segment starting with a dot (``.fetcher/`` with the state, lock and work files, and
    every other hidden folder). A folder's files and a bucket's keys pass this alike.
    """
    parts = relative.split("/")
    if relative.startswith("/") or "\x00" in relative or "\\" in relative:
        raise Outside(relative)
    if any(not part or part.startswith(".") for part in parts):
        raise Outside(relative)
    return parts


def contained(root: Path, relative: str) -> Path:
    """``relative`` (archive-relative, ``/``-separated) as a real file inside ``root``.

    ``root`` is the archive's resolved path. Refused (:class:`Outside`): what
    :func:`visible_parts` refuses, a symbolic link anywhere below the root (even one
    pointing inside: it could point at the state), and anything but a regular file.
    """
    candidate = root.joinpath(*visible_parts(relative))
    if os.path.realpath(candidate) != str(candidate):
        raise Outside(relative)  # a link on the way, or the root itself is not resolved
    try:
        mode = candidate.lstat().st_mode
    except OSError as exc:
        raise Outside(relative) from exc
    if not stat.S_ISREG(mode):
        raise Outside(relative)
    return candidate
