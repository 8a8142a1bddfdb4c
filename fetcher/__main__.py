"""``python -m fetcher``: the same as the ``fetcher`` command."""

from .cli import main

raise SystemExit(main())
