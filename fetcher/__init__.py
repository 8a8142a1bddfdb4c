"""fetcher: archive AIGC images and videos from Tencent VOD tasks before their links die.

The command line is a thin shell over :func:`fetcher.fetch`; library callers use
the same function. Names are imported lazily so ``fetcher --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "FetchOptions",
    "IdSource",
    "RunSummary",
    "Settings",
    "__version__",
    "fetch",
    "fetch_sync",
]

if TYPE_CHECKING:
    from .config import Settings
    from .ids import IdSource
    from .pipeline import FetchOptions, fetch, fetch_sync
    from .summary import RunSummary

_LAZY = {
    "Settings": "config",
    "IdSource": "ids",
    "FetchOptions": "pipeline",
    "fetch": "pipeline",
    "fetch_sync": "pipeline",
    "RunSummary": "summary",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fetcher' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
