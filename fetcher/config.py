"""Settings, built once from defaults < config file < environment < flags, then frozen.

No other module reads the environment or the config file: the CLI calls
:func:`load_settings` at start-up and passes the result down explicitly.
"""

from __future__ import annotations

import math
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from .errors import ConfigError
from .layout import DEFAULT_LAYOUT, Layout
from .url import InvalidUrl, Url

APP_NAME = "fetcher"
ENV_PREFIX = "FETCHER_"
DEFAULT_CONCURRENCY = 8
DEFAULT_DOWNLOADS = 4
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 5
DEFAULT_RETRY_WAIT = 0.5
DEFAULT_RATE = 50.0
DEFAULT_MAX_FILE_SIZE = 16 * 1024**3


def default_archive() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME)) / "archive"


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know, validated; the API key never shows in its repr."""

    archive: Path = field(default_factory=default_archive)
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = DEFAULT_CONCURRENCY
    downloads: int = DEFAULT_DOWNLOADS
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    retry_wait: float = DEFAULT_RETRY_WAIT
    rate: float = DEFAULT_RATE
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    layout: str = DEFAULT_LAYOUT
    #: From ``http_proxy``/``https_proxy``/``all_proxy``/``no_proxy``, not a setting of its own.
    proxies: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold a password

    def require_api(self) -> tuple[str, str]:
        """The base URL and key, or a usage error saying which one is missing."""
        if not self.base_url:
            raise ConfigError("no API base URL: pass --base-url or set FETCHER_BASE_URL")
        if not self.api_key:
            raise ConfigError("no API key: pass --api-key or set FETCHER_API_KEY")
        return self.base_url, self.api_key


#: The names a config file, ``FETCHER_<NAME>`` and flags may set.
SETTING_NAMES = tuple(f.name for f in fields(Settings) if f.name != "proxies")


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings plus what loading them has to tell the user (never secrets)."""

    settings: Settings
    warnings: tuple[str, ...] = ()


def load_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_path: Path | None = None,
) -> Loaded:
    """Merge the layers and validate the result in one place.

    ``flags`` holds only the flags given (``None`` values are ignored);
    ``config_path`` is the ``--config`` flag, falling back to ``FETCHER_CONFIG``
    and then to the platform's config folder, where a missing file is fine.
    """
    explicit = config_path or (Path(env["FETCHER_CONFIG"]) if env.get("FETCHER_CONFIG") else None)
    path = explicit or default_config_path()
    warnings: list[str] = []
    values: dict[str, Any] = {}
    if explicit is not None or path.is_file():
        file_values = _read_config(path)
        if "api_key" in file_values and _readable_by_others(path):
            warnings.append(
                f"config file {str(path)!r} holds the API key and is readable by other users"
                " (chmod 600 it)"
            )
        values.update(file_values)
    for name in SETTING_NAMES:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    values.update({k: v for k, v in flags.items() if v is not None})
    settings = replace(_build(values), proxies=_proxies(env))
    return Loaded(settings, tuple(warnings))


def _proxies(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Proxies as curl reads them: ``http``/``https``/``all``/``no``, lower-case names first.

    A proxy without a scheme is taken as ``http://``; only http proxies are spoken
    to (HTTPS passes through them in a CONNECT tunnel).
    """
    found: list[tuple[str, str]] = []
    for name in ("http", "https", "all", "no"):
        for variable in (f"{name}_proxy", f"{name.upper()}_PROXY"):
            value = env.get(variable, "").strip()
            if not value:
                continue
            if name != "no":
                value = value if "://" in value else "http://" + value
                if not value.lower().startswith("http://"):
                    raise ConfigError(f"{variable}: only http:// proxies are supported")
                try:
                    Url.parse(value)  # as the client will, so it cannot fail there instead
                except InvalidUrl:
                    # Not the parser's words: they quote the URL, and with it any password.
                    raise ConfigError(f"{variable} is not a usable proxy URL") from None
            found.append((name, value))
            break
    return tuple(found)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in SETTING_NAMES:
            raise ConfigError(f"config file {str(path)!r}: unknown setting {key!r}")
        values[name] = value
    return values


def _readable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def _build(values: Mapping[str, Any]) -> Settings:
    settings = Settings()
    changes: dict[str, Any] = {}
    for name, value in values.items():
        changes[name] = _coerce(name, value, type(getattr(settings, name)))
    settings = replace(settings, **changes)
    _validate(settings)
    return settings


_TEXT_SETTINGS = ("base_url", "api_key", "layout")


def _coerce(name: str, value: Any, kind: type) -> Any:
    label = f"setting {name!r}"
    try:
        if name == "archive":
            return Path(str(value)).expanduser()
        if kind is bool or isinstance(value, bool):
            raise TypeError
        if name in _TEXT_SETTINGS:
            if not isinstance(value, str):
                raise TypeError
            return value.strip()
        if kind is int:
            # int(2.5) would silently truncate a TOML float; int(inf) raises OverflowError.
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        kind_name = "string" if name in _TEXT_SETTINGS else kind.__name__
        shown = "the value given" if name == "api_key" else repr(value)  # never echo a secret
        raise ConfigError(f"{label}: {shown} is not a valid {kind_name}") from exc
    return value


def _validate(settings: Settings) -> None:
    for name, low in (
        ("concurrency", 1),
        ("downloads", 1),
        ("retries", 0),
        ("max_file_size", 1),
    ):
        if getattr(settings, name) < low:
            raise ConfigError(f"setting {name!r} must be at least {low}")
    for name in ("timeout", "rate", "retry_wait"):
        if not 0 < getattr(settings, name) < math.inf:
            raise ConfigError(f"setting {name!r} must be a finite number greater than 0")
    if settings.base_url:
        try:
            Url.parse(settings.base_url)
        except InvalidUrl as exc:
            raise ConfigError(
                f"setting 'base_url': {settings.base_url!r} is not an http(s) URL ({exc})"
            ) from None
    Layout(settings.layout)
