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
