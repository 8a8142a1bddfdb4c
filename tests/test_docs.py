"""The README is the user's manual: every command and flag the CLI has is documented there."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from conftest import ROOT

from fetcher.cli import build_parser

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


COMMANDS = _subparsers(build_parser())
FLAGS = sorted(
    {
        option
        for command in COMMANDS.values()
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
)


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=str)
def test_every_command_is_in_the_readme(command: str) -> None:
    """Each subcommand appears as `fetcher <command>` in the README."""
    assert f"fetcher {command}" in README


@pytest.mark.parametrize("flag", FLAGS, ids=str)
def test_every_flag_is_in_the_readme(flag: str) -> None:
    """Each long flag of every subcommand appears in the README."""
    assert re.search(re.escape(flag) + r"(?![\w-])", README), f"{flag} is not documented"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the test command the README gives under Development."""
    development = README.split("## Development", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", development, re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command.group(1).strip() in ci.splitlines()
    assert shlex.split(command.group(1))[-2:] == ["-m", "pytest"]


def test_sample_tasks_match_the_packaged_copy() -> None:
    """The top-level sample_tasks.txt is the file the demo serves."""
    top = (ROOT / "sample_tasks.txt").read_bytes()
    packaged = (ROOT / "fetcher" / "sample_tasks.txt").read_bytes()
    assert top == packaged
