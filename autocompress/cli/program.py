"""The program: signal handlers first, then parse, dispatch, and one line on any error
or interrupt."""

from __future__ import annotations

import sys

from ..errors import AutocompressError
from ..interrupts import Terminated, ignore_further_signals, signals_unwind, sigterm_seen
from .evaluate import cmd_eval
from .hardware import cmd_devices, cmd_estimate, cmd_profile
from .output import console
from .parser import build_parser
from .plans import cmd_apply, cmd_export, cmd_layers, cmd_plan
from .search import cmd_search, cmd_sensitivity
from .study import cmd_study


def run() -> int:
    """The ``autocompress`` program: main() on sys.argv, then signals are ignored while Python
    exits (see interrupts.signals_unwind)."""
    return main(None, exiting=True)


def main(argv: list[str] | None = None, exiting: bool = False) -> int:
    # the handlers first: a SIGTERM from the first moment ends with the one line and 143, not
    # the default action's silent death (the fault drill met it while the parser was built)
    with signals_unwind(then_ignore=exiting):
        args = None
        try:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exc:  # a usage error (one line, said by _Parser) or --help
                return exc.code if isinstance(exc.code, int) else 2
            from ..peak_memory import bound_heap

            bound_heap()
            return COMMANDS[args.command](args)
        except AutocompressError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            return _interrupted(args, exc)
        except Exception as exc:
            # Python wraps what a signal raises in some places: inside a class body's
            # __set_name__ (a dataclass being defined while a module imports) it becomes a
            # RuntimeError caused by it (the fault drill's SIGTERM met it)
            interrupt = _interrupt_behind(exc)
            if interrupt is None:
                raise
            return _interrupted(args, interrupt)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an exception was raised from, if any (its cause or context
    chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    """One line, whatever was running; a second signal while saying it is ignored."""
    ignore_further_signals()
    terminated = sigterm_seen() or isinstance(exc, Terminated)
    what = "terminated" if terminated else "interrupted"
    again = (" (rerun with --resume to continue)"
             if args is not None and args.command == "search" else "")
    _silence_progress_bars()
    # a progress bar may hold the cursor mid-line: the line is cleared (terminal) or ended
    sys.stderr.write("\r\x1b[2K" if console.is_terminal else "\n")
    console.print(f"{what}; files already written are kept, nothing is half-written{again}",
                  highlight=False, soft_wrap=True)
    return 143 if terminated else 130


def _silence_progress_bars() -> None:
    """A bar held in a variable of an unwound frame closes only when the traceback is freed,
    after the line below, and its clean-up (blanks, cursor up) would follow the line: every open
    bar is disabled now, so its later close writes nothing."""
    tqdm = sys.modules.get("tqdm")  # never imported here: no bar can be open without it
    if tqdm is None:
        return
    for bar in list(tqdm.tqdm._instances):
        bar.disable = True


COMMANDS = {"study": cmd_study, "layers": cmd_layers, "sensitivity": cmd_sensitivity,
            "plan": cmd_plan, "apply": cmd_apply, "export": cmd_export, "eval": cmd_eval,
            "search": cmd_search, "devices": cmd_devices, "profile": cmd_profile,
            "estimate": cmd_estimate}
