"""The archive's memory; every module imports the state from here."""

from __future__ import annotations

from .sqlite import *  # noqa: F403
from .sqlite import opt_text, upsert_text  # noqa: F401
