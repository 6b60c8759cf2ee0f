"""Command line: one sub-command per verb. Parses, calls the library, prints. No logic here.

program.py runs the program (signal handlers first, one line on any error); parser.py builds
the sub-commands without importing torch; one module per group of commands (plans, evaluate,
search, hardware, study), and what they share (args, common, output)."""

from .program import main, run
from .parser import build_parser

__all__ = ["build_parser", "main", "run"]
