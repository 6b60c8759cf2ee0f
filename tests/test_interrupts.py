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


_NATIVE_SIGTERM = """
import ctypes, signal
import ray
from autocompress.interrupts import signals_unwind
from autocompress.search.ray_cluster import start_ray
from autocompress.sensitivity.measured import {pool}

def native(sig):  # the action the kernel runs, whatever Python has on record
    buf = ctypes.create_string_buffer(512)
    assert ctypes.CDLL(None).sigaction(sig, None, buf) == 0
    return ctypes.c_void_p.from_buffer(buf).value or 0

with signals_unwind(then_ignore=True):
    start_ray(1, None)
    pool = {pool}.__new__({pool}); pool.ray, pool.actors, pool.owns = ray, [], True
    pool.close()  # a measured table's Ray, shut down mid-run
    print("after a shutdown mid-run", native(signal.SIGTERM))
    start_ray(1, None)  # the search's levels 2 and 3, still up when the command ends
print("after the command", native(signal.SIGTERM), ray.is_initialized())
"""


def test_ray_shutting_down_does_not_leave_sigterm_to_kill_the_program():
    """Ray's shutdown resets SIGTERM to the default action in native code, behind Python's
    back: mid-run (a measured table's Ray) the handler is put back; at the end of a command
    Ray is shut down before signals are ignored, not after by Python's exit, where a SIGTERM
    would kill the finished program (exit -15, no line)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _NATIVE_SIGTERM.format(pool="_RayPool")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    mid_run, = [line.split()[-1] for line in proc.stdout.splitlines()
                if line.startswith("after a shutdown mid-run")]
    assert int(mid_run) not in (0, 1)  # Python's handler, neither default nor ignored
    assert "after the command 1 False" in proc.stdout  # ignored, Ray already down


def test_sigterm_during_ray_init_ends_as_everywhere_else(monkeypatch):
    """ray.init installs Ray's own SIGTERM handler (sys.exit) while it starts (seconds): a
    SIGTERM then exits 15 without a line unless start_ray turns it into Terminated."""
    import sys
    import types

    from autocompress.search import ray_cluster

    def init_hit_by_sigterm(**kwargs):
        raise SystemExit(signal.SIGTERM)  # what Ray's handler does

    # a stand-in: importing Ray itself here would change what other tests of this run see
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init_hit_by_sigterm)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with signals_unwind(), pytest.raises(Terminated):
        ray_cluster.start_ray(1, None)


def test_the_command_line_is_built_without_torch():
    """The parser is built before a command runs: importing torch there (a second) would leave
    the program that long with no handler of its own."""
    import subprocess
    import sys

    code = ("import sys; from autocompress.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_sigterm_while_the_command_line_is_read_ends_with_one_line(monkeypatch, capsys):
    """The handlers are in place before the parser is built: a SIGTERM from the first moment
    ends as everywhere else (143, one line), not by the default action (exit -15, no line:
    the fault drill's failure when building the parser imported torch)."""
    from autocompress import interrupts
    from autocompress.cli import program

    seen = []

    def parser_hit_by_sigterm():
        seen.append(signal.getsignal(signal.SIGTERM))
        raise Terminated()  # what the handler raises, wherever the program is

    monkeypatch.setattr(program, "build_parser", parser_hit_by_sigterm)
    try:
        code = program.main(["search", "--budget", "4GB"])
    except KeyboardInterrupt:
        pytest.fail("the SIGTERM escaped main(): no handler of the program's was in place")
    assert code == 143
    assert seen == [interrupts._on_sigterm]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terminated"), lines


def test_progress_bars_left_open_by_the_interrupt_write_nothing_after_its_line(capsys):
    """A bar held in a variable stays open while the traceback holds its frame, and closes when
    that is freed, after the one line: its clean-up (spaces, cursor up) must not follow the
    line (the fault drill met it)."""
    from tqdm import tqdm

    from autocompress.cli.program import _interrupted

    def nested_loops():
        for _ in tqdm(range(3), desc="outer"):
            inner = tqdm(total=3, desc="inner", leave=False)
            inner.update()
            raise KeyboardInterrupt

    try:
        nested_loops()
    except KeyboardInterrupt as exc:
        assert _interrupted(None, exc) == 130
    gc.collect()
    err = capsys.readouterr().err
    assert err.endswith("files already written are kept, nothing is half-written\n"), \
        repr(err[-80:])


@pytest.mark.parametrize("interrupt, code, word", [(Terminated(), 143, "terminated"),
                                                   (KeyboardInterrupt(), 130, "interrupted")])
def test_a_signal_python_wrapped_in_another_error_still_ends_with_one_line(
        monkeypatch, capsys, interrupt, code, word):
    """A signal that lands in a class body's __set_name__ (a dataclass defined while a module
    imports) reaches the program as a RuntimeError caused by it: it ends as the signal does,
    not with a traceback (the SIGINT/SIGTERM drill met it). Other errors still propagate."""
    from autocompress.cli import program

    class Wrapping:
        def __set_name__(self, owner, name):
            raise interrupt

    def command_hit_while_importing(args):
        type("Table", (), {"meta": Wrapping()})  # what defining the dataclass did
        return 0

    monkeypatch.setitem(program.COMMANDS, "devices", command_hit_while_importing)
    assert program.main(["devices"]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(word), lines

    def command_failing(args):
        raise RuntimeError("a real bug")

    monkeypatch.setitem(program.COMMANDS, "devices", command_failing)
    with pytest.raises(RuntimeError, match="a real bug"):
        program.main(["devices"])
