"""``fetcher demo``: the whole pipeline against the bundled replica, no key needed.

A newcomer sees real HTTP, a real archive and a real sidecar in a few seconds,
and the same code path as a production run: only the base URL and key differ.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .archive import META_DIR, SIDECAR_NAME
from .config import Settings
from .ids import IdSource, iter_entries
from .pipeline import FetchOptions, fetch_sync
from .progress import Progress
from .replica import Replica, load_demo
from .summary import RunSummary


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Where the demo archive went, what the run did, and a sidecar to show."""

    archive: Path
    summary: RunSummary
    sidecar: Path | None


def sample_tasks() -> Path:
    """The packaged ``sample_tasks.txt`` (the repository's top-level file is the same)."""
    return Path(str(resources.files("fetcher").joinpath("sample_tasks.txt")))


@contextmanager
def demo_replica() -> Iterator[Replica]:
    """The replica, loaded with a story for every ID in ``sample_tasks.txt``."""
    ids = [e for e in iter_entries([IdSource.from_path(sample_tasks())]) if isinstance(e, str)]
    with Replica() as replica:
        load_demo(replica, ids)
        yield replica


def run_demo(target: Path | None = None, progress: Progress | None = None) -> DemoResult:
    """Serve the sample tasks from a replica on loopback and archive them into ``target``."""
    archive = target or Path(tempfile.mkdtemp(prefix="fetcher-demo-"))
    with demo_replica() as replica:
        settings = Settings(archive=archive, base_url=replica.api_url, api_key=replica.api_key)
        summary = fetch_sync(
            settings, [IdSource.from_path(sample_tasks())], FetchOptions(), progress
        )
    sidecars = sorted(archive.rglob(SIDECAR_NAME))
    return DemoResult(archive, summary, sidecars[0] if sidecars else None)


def tree_lines(root: Path) -> list[str]:
    """The archive as an indented tree; fetcher's own folder is shown but not expanded."""
    lines = [f"{root}/"]

    def walk(folder: Path, indent: str) -> None:
        entries = sorted(folder.iterdir(), key=lambda p: (p.is_file(), p.name))
        for number, entry in enumerate(entries):
            last = number == len(entries) - 1
            branch = "└── " if last else "├── "
            if entry.is_dir():
                note = "  (state database, lock, work files)" if entry.name == META_DIR else ""
                lines.append(f"{indent}{branch}{entry.name}/{note}")
                if entry.name != META_DIR:
                    walk(entry, indent + ("    " if last else "│   "))
            else:
                lines.append(f"{indent}{branch}{entry.name}  ({entry.stat().st_size} bytes)")

    walk(root, "")
    return lines
