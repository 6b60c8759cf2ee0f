import gc
import os
import signal
import time

import pytest

from autocompress.interrupts import Terminated, signals_unwind, sigterm_seen


class _SignalsInFinalizer:
    """Sends the signal to this process from inside __del__ and waits for it there, as when
    SIGTERM lands while the garbage collector runs a library's finalizer."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        time.sleep(0.05)  # the handler runs here, inside the finalizer


@pytest.fixture(autouse=True)
def _ctrl_c_as_at_a_terminal():
    """A suite started in the background inherits SIGINT ignored (POSIX, for ``cmd &``);
    these tests want Python's own KeyboardInterrupt handler, as at a terminal."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ordinary_work():
    for _ in range(200):
        time.sleep(0.001)


@pytest.mark.parametrize("sig, raised", [(signal.SIGTERM, Terminated),
                                         (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_inside_a_finalizer_is_not_lost(sig, raised):
    with signals_unwind():
        with pytest.raises(raised):
            victim = _SignalsInFinalizer(sig)
            del victim
            gc.collect()
            _ordinary_work()  # without the hook the interrupt is swallowed and this finishes
    sigterm_seen()  # cleared for the next test


def test_sigterm_raises_terminated_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with signals_unwind():
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            _ordinary_work()
        assert sigterm_seen() and not sigterm_seen()
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_unraisable_exceptions_still_reach_the_previous_hook():
    class Broken:
        def __del__(self):
            raise ValueError("in a finalizer")

    seen = []
    import sys
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(type(u.exc_value))
    try:
        with signals_unwind():
            Broken()
            gc.collect()
        assert seen == [ValueError]
    finally:
        sys.unraisablehook = previous


def test_the_program_exits_with_its_code_when_signalled_while_python_tears_down(tmp_path):
    """The console script's entry (cli.run): once the command is done, a SIGTERM or Ctrl-C
    that lands while Python exits (over a second with torch loaded) changes nothing; with the
    default handlers restored it would kill the finished program (exit -15, no line)."""
    import subprocess
    import sys

    # the signal is sent after run() returned, as the teardown would receive it
    code = ("import os, signal, sys, time; from autocompress.cli import run; rc = run(); "
            "[os.kill(os.getpid(), s) for s in (signal.SIGTERM, signal.SIGINT)]; "
            "time.sleep(0.2); sys.exit(rc)")
    missing = tmp_path / "absent" / "config.json"  # a quick command that ends with exit 2
    proc = subprocess.run([sys.executable, "-c", code, "plan", "--config", str(missing),
                           "--out", str(tmp_path / "plan.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # the command's own code, not -15
    assert "Traceback" not in proc.stderr and "terminated" not in proc.stderr
