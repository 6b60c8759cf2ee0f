"""Where the command line speaks: tables and logs on stderr (stdout carries --json)."""

from __future__ import annotations

from rich.console import Console


console = Console(stderr=True)  # tables and logs on stderr; stdout carries --json output


def _log(message: str) -> None:
    """A library's progress line, on stderr, one message on one line."""
    console.print(message, highlight=False, soft_wrap=True)
