"""Ctrl-C and SIGTERM unwind the program from wherever it is.

SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) so both signals take the same path:
temporary files removed, atomic writes never half done. One trap: a signal that arrives while
a finalizer (``__del__``, a weakref callback) runs raises inside it, and Python swallows
exceptions there ("Exception ignored in ..."), so the signal would be lost and the program go
on. The hook installed here sees that swallowed interrupt and raises it again a millisecond
later from an alarm (SIGALRM, which nothing else here uses), in ordinary code.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds like Ctrl-C and exits 143."""


_SIGTERM_SEEN: list[bool] = []  # a library may swallow the exception (Ray Tune ends its loop)


def _on_sigterm(signum, frame):
    _SIGTERM_SEEN.append(True)
    raise Terminated()


def sigterm_seen(clear: bool = True) -> bool:
    """Whether SIGTERM arrived since the last call (a library may have eaten its exception)."""
    seen = bool(_SIGTERM_SEEN)
    if clear:
        _SIGTERM_SEEN.clear()
    return seen


_SWALLOWED: list[type[KeyboardInterrupt]] = []


def _on_rearm_alarm(signum, frame):
    if _SWALLOWED:
        raise _SWALLOWED.pop()()


def _reraise_swallowed_interrupts(previous_hook):
    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt):
            # raised again a millisecond later by an alarm, in whatever ordinary code runs
            # then (raising it here would be inside the hook, and swallowed again)
            _SWALLOWED[:] = [type(exc)]
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            return
        previous_hook(unraisable)
    return hook


@contextlib.contextmanager
def signals_unwind(then_ignore: bool = False):
    """Within the block SIGTERM raises Terminated and no interrupt is lost in a finalizer.
    Everything is restored on the way out (main() is also called in-process, by tests), unless
    ``then_ignore``: the program's own entry point, whose work is done by then, ignores SIGINT
    and SIGTERM from there on, since Python's teardown of torch and friends takes over a
    second and a default handler there would kill it mid-exit without a word. Off the main
    thread signals cannot be handled, so nothing changes there."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    handlers = {sig: signal.getsignal(sig)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGALRM, _on_rearm_alarm)
    sys.unraisablehook = _reraise_swallowed_interrupts(previous_hook)
    try:
        yield True
    finally:
        if then_ignore:  # first: a signal during the rest of this cleanup changes nothing
            ignore_further_signals()
            shut_down_ray()  # now, not at Python's exit, where it would undo the ignoring
        signal.setitimer(signal.ITIMER_REAL, 0)
        _SWALLOWED.clear()
        sys.unraisablehook = previous_hook
        for sig, handler in handlers.items():
            if not (then_ignore and sig in (signal.SIGINT, signal.SIGTERM)):
                signal.signal(sig, handler)


def shut_down_ray() -> None:
    """Ray shut down, if this process started it, with the signal handlers kept: Ray's
    shutdown resets SIGTERM to the default action in its native code, behind Python's back."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        ray.shutdown()
        resync_handlers()


def resync_handlers() -> None:
    """Put the handlers Python has on record back in place: a native library (Ray's core
    worker, when Ray shuts down) can reset SIGTERM to the default action behind Python's
    back, and a SIGTERM would then kill the process without a word."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None:
                signal.signal(sig, handler)


def ignore_further_signals() -> None:
    """While the one closing line is said, a second signal does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
