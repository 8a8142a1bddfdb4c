"""Settings, built once from defaults < config file < environment < flags, then frozen.

No other module reads the environment or the config file: the CLI calls
:func:`load_settings` at start-up and passes the result down explicitly.
:class:`Settings` checks itself when it is made, so settings built in Python are
held to the same rules as the command line's; the loader adds where a bad value
came from (the config file, the ``FETCHER_*`` variable or the flag).

A config file and an API key file are refused when another user owns them or
could write to them (as ssh refuses such a config): whoever can edit the file
can point the key at a server of their choosing.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from .errors import ConfigError, UsageError
from .layout import DEFAULT_LAYOUT, Layout
from .sizes import parse_size
from .state.address import DEFAULT_RECONNECT, DatabaseUrl, is_database
from .stores import BucketUrl, is_bucket
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
#: How bucket URLs are addressed: path-style for an IP or localhost endpoint, else virtual.
S3_ADDRESSING = ("auto", "path", "virtual")
#: Read the API key from this file instead: a flag, a variable and a config key, not a setting.
KEY_FILE = "api_key_file"


def default_archive() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME)) / "archive"


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know, validated; the API key never shows in its repr.

    Made with a bad value (``downloads=0``, ``archive=5``) it raises
    :class:`~fetcher.errors.ConfigError` at once, not somewhere inside a run.
    ``archive`` may be given as a string; it is kept as a :class:`~pathlib.Path`.
    """

    #: A folder, or a bucket (given as ``s3://BUCKET[/PREFIX]``).
    archive: Path | BucketUrl = field(default_factory=default_archive)
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
    #: The S3 endpoint (None: as the AWS CLI finds it, ``AWS_ENDPOINT_URL_S3`` and so on).
    s3_endpoint: str | None = None
    s3_addressing: str = "auto"
    #: The SQLite state of a bucket archive (None: one file per bucket and prefix in the
    #: user data folder; a folder archive keeps its state inside itself), or, for either,
    #: a PostgreSQL database (``postgresql://USER@HOST/DB``) several hosts share.
    state: Path | DatabaseUrl | None = None
    #: Seconds a run waits for a lost PostgreSQL state to come back before it stops.
    state_reconnect: float = DEFAULT_RECONNECT
    #: From ``http_proxy``/``https_proxy``/``all_proxy``/``no_proxy``, not a setting of its own.
    proxies: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold a password

    def __post_init__(self) -> None:
        for name in SETTING_NAMES:
            checked = check_setting(name, getattr(self, name))
            object.__setattr__(self, name, checked)  # frozen: the one sanctioned write
        if isinstance(self.state, DatabaseUrl):
            # The database's address carries how long to wait for it, to whoever opens it.
            waiting = replace(self.state, reconnect=self.state_reconnect)
            object.__setattr__(self, "state", waiting)

    def require_api(self) -> tuple[str, str]:
        """The base URL and key, or a usage error saying which one is missing."""
        if not self.base_url:
            raise ConfigError("no API base URL: pass --base-url or set FETCHER_BASE_URL")
        if not self.api_key:
            raise ConfigError(
                "no API key: pass --api-key-file, set FETCHER_API_KEY_FILE or FETCHER_API_KEY"
            )
        return self.base_url, self.api_key


#: The names a config file, ``FETCHER_<NAME>`` and flags may set.
SETTING_NAMES = tuple(f.name for f in fields(Settings) if f.name != "proxies")
_INT_SETTINGS = {"concurrency": 1, "downloads": 1, "retries": 0, "max_file_size": 1}
_FLOAT_SETTINGS = ("timeout", "rate", "retry_wait", "state_reconnect")
_REQUIRED_TEXT = ("layout", "s3_addressing")
_TEXT_SETTINGS = ("base_url", "api_key", "layout", "s3_endpoint", "s3_addressing")


def check_setting(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` keeps it, or a one-line ConfigError naming the setting.

    Types are strict (``downloads="8"`` is refused: text is parsed by the loader,
    which knows where it came from); ``archive`` takes a string or a path.
    """
    label = f"setting {name!r}"
    if name == "archive" and isinstance(value, BucketUrl):
        return value
    if name == "archive" and is_bucket(value):
        try:
            return BucketUrl.parse(value)
        except UsageError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    if name == "state":
        if value is None or isinstance(value, DatabaseUrl):
            return value
        if is_database(value):
            try:
                return DatabaseUrl.parse(value)
            except UsageError as exc:
                raise ConfigError(f"{label}: {exc}") from None
        if not isinstance(value, str | os.PathLike) or isinstance(value, bytes) or not str(value):
            raise ConfigError(f"{label}: {value!r} is not a file path")
        return Path(value)
    if name == "archive":
        if not isinstance(value, str | os.PathLike) or isinstance(value, bytes):
            raise ConfigError(f"{label}: {value!r} is not a folder path")
        if os.fspath(value) == "":
            raise ConfigError(f"{label}: an empty path is not a folder")
        return Path(value)
    if name in _TEXT_SETTINGS:
        if not isinstance(value, str) and not (value is None and name not in _REQUIRED_TEXT):
            shown = "the value given" if name == "api_key" else repr(value)  # never echo a secret
            raise ConfigError(f"{label}: {shown} is not a string")
        if name == "base_url" and value:
            try:
                Url.parse(value)
            except InvalidUrl as exc:
                raise ConfigError(f"{label}: {value!r} is not an http(s) URL ({exc})") from None
        if name == "s3_endpoint" and value:
            try:
                Url.parse(value)
            except InvalidUrl as exc:
                raise ConfigError(f"{label}: {value!r} is not an http(s) URL ({exc})") from None
        if name == "s3_addressing" and value not in S3_ADDRESSING:
            raise ConfigError(f"{label}: {value!r} is not one of {', '.join(S3_ADDRESSING)}")
        if name == "layout":
            try:
                Layout(value)
            except UsageError as exc:
                raise ConfigError(f"{label}: {exc}") from None
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if name in _INT_SETTINGS else "a number"
        raise ConfigError(f"{label}: {value!r} is not {kind}")
    if name in _INT_SETTINGS:
        if not isinstance(value, int):
            raise ConfigError(f"{label}: {value!r} is not an integer")
        if value < _INT_SETTINGS[name]:
            raise ConfigError(f"{label} must be at least {_INT_SETTINGS[name]}")
        return value
    if not 0 < value < math.inf:
        raise ConfigError(f"{label} must be a finite number greater than 0")
    return float(value)


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings plus what loading them has to tell the user (never secrets)."""

    settings: Settings
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Given:
    """One value from one layer, and where it came from for the error message."""

    value: Any
    origin: str
    #: From text (an environment variable, a flag): parsed, not taken as typed.
    text: bool
    #: A config file's folder: a relative path in that file is relative to it.
    base: Path | None = None


def load_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_path: Path | None = None,
    labels: Mapping[str, str] | None = None,
) -> Loaded:
    """Merge the layers and validate the result in one place.

    ``flags`` holds only the flags given (``None`` values are ignored), keyed by
    setting name, plus ``api_key_file``; ``config_path`` is the ``--config``
    flag, falling back to ``FETCHER_CONFIG`` and then to the platform's config
    folder, where a missing file is fine. ``labels`` names a flag a message
    should name where it is not ``--<setting>`` (``search --state-db``).
    """
    explicit = config_path or (Path(env["FETCHER_CONFIG"]) if env.get("FETCHER_CONFIG") else None)
    path = explicit or default_config_path()
    warnings: list[str] = []
    layers: list[dict[str, _Given]] = []
    if explicit is not None or path.is_file():
        layers.append(_file_layer(path, warnings))
    layers.append(
        {
            name: _Given(env[variable], variable, True)
            for name in (*SETTING_NAMES, KEY_FILE)
            if env.get(variable := ENV_PREFIX + name.upper())
        }
    )
    layers.append(
        {
            name: _Given(value, (labels or {}).get(name, "--" + name.replace("_", "-")), True)
            for name, value in flags.items()
            if value is not None
        }
    )
    values = _merge(layers)
    changes = {name: _coerce(name, given) for name, given in values.items() if name != KEY_FILE}
    if KEY_FILE in values:
        key, warning = _key_from_file(values[KEY_FILE])
        changes["api_key"] = key
        warnings.extend(warning)
    settings = Settings(**changes, proxies=_proxies(env))
    return Loaded(settings, tuple(warnings))


def _file_layer(path: Path, warnings: list[str]) -> dict[str, _Given]:
    origin = f"config file {str(path)!r}"
    file_values = _read_config(path)
    if "api_key" in file_values and _readable_by_others(path):
        warnings.append(f"{origin} holds the API key and is readable by other users (chmod 600 it)")
    base = path.absolute().parent
    return {name: _Given(value, origin, False, base) for name, value in file_values.items()}


def _merge(layers: list[dict[str, _Given]]) -> dict[str, _Given]:
    """Each layer over the ones below; ``api_key`` and ``api_key_file`` count as one setting."""
    values: dict[str, _Given] = {}
    for layer in layers:
        if "api_key" in layer and KEY_FILE in layer:
            raise ConfigError(
                f"{layer['api_key'].origin} and {layer[KEY_FILE].origin} both give the API key:"
                " give one"
            )
        if "api_key" in layer or KEY_FILE in layer:
            values.pop("api_key", None)
            values.pop(KEY_FILE, None)
        values.update(layer)
    return values


def _coerce(name: str, given: _Given) -> Any:
    """One layer's value as the setting's type; errors name the file, variable or flag."""
    value = given.value
    try:
        if name in ("archive", "state") and not is_bucket(value) and not is_database(value):
            value = _path(value, given)
        elif isinstance(value, str) and name in _TEXT_SETTINGS:
            value = value.strip()
        elif isinstance(value, str) and name == "max_file_size" and (given.text or value):
            value = _parse(name, value, parse_size, "a size (like 16GiB, 500MB or 1048576)")
        elif isinstance(value, str) and given.text and name in _INT_SETTINGS:
            value = _parse(name, value, int, "an integer")
        elif isinstance(value, str) and given.text and name in _FLOAT_SETTINGS:
            value = _parse(name, value, float, "a number")
        elif isinstance(value, float) and name in _INT_SETTINGS and value.is_integer():
            value = int(value)  # ``downloads = 4.0`` in TOML: an integer in float clothing
        return check_setting(name, value)
    except ConfigError as exc:
        raise ConfigError(f"{given.origin}: {exc}") from None


def _parse(name: str, text: str, parse: Callable[[str], Any], kind: str) -> Any:
    try:
        return parse(text.strip())
    except ValueError:
        raise ConfigError(f"setting {name!r}: {text!r} is not {kind}") from None


def _path(value: Any, given: _Given) -> Any:
    """A folder path: ``~`` expanded; relative in a config file means beside that file."""
    if not isinstance(value, str) or value == "":
        return value  # check_setting says what is wrong with it
    path = Path(value).expanduser()
    if given.base is not None and not path.is_absolute():
        path = given.base / path
    return path


def _key_from_file(given: _Given) -> tuple[str, list[str]]:
    """The API key from the first line of a file, and a warning if others can read it."""
    raw = given.value
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{given.origin}: setting {KEY_FILE!r} must be a file path")
    path = Path(raw.strip()).expanduser()
    if given.base is not None and not path.is_absolute():
        path = given.base / path
    return secret_from_file(path, "API key file", "the key")


def secret_from_file(path: Path, what: str, secret: str) -> tuple[str, list[str]]:
    """A secret (``what`` holds ``secret``) from the first line of ``path``, and a warning if
    others can read it; a file others control, or an unreadable or empty one, is refused."""
    shown = str(path)
    _refuse_if_others_control(path, what)
    try:
        with path.open("rb") as handle:
            first = handle.readline(64 * 1024)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {shown!r}: {exc.strerror}") from None
    try:
        value = first.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {shown!r} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{what} {shown!r} is empty ({secret} goes on its first line)")
    warnings = []
    if _readable_by_others(path):
        warnings.append(f"{what} {shown!r} is readable by other users (chmod 600 it)")
    return value, warnings


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
    _refuse_if_others_control(path, "config file")
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
        if name not in (*SETTING_NAMES, KEY_FILE):
            raise ConfigError(f"config file {str(path)!r}: unknown setting {key!r}")
        values[name] = value
    if "api_key" in values and KEY_FILE in values:
        raise ConfigError(f"config file {str(path)!r} sets both api_key and {KEY_FILE}: keep one")
    return values


def _refuse_if_others_control(path: Path, what: str) -> None:
    """Refuse a file another user owns or may write, as ssh does (root may own it).

    A file that does not exist is left to the caller's read, which says so.
    """
    try:
        info = path.stat()
    except OSError:
        return
    getuid = getattr(os, "getuid", None)
    if getuid is not None and info.st_uid not in (getuid(), 0):
        raise ConfigError(f"{what} {str(path)!r} is owned by another user; refusing to use it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{what} {str(path)!r} is writable by other users; refusing to use it (chmod go-w it)"
        )


def _readable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))
