"""Ray for the search's levels 2 and 3: start it in process, or join a cluster, with clear
errors instead of Ray's long silent retries, and the caller's SIGTERM handler kept.

Locally Ray starts in process (``ray.init(num_cpus=..., include_dashboard=False)``);
``address`` joins an existing cluster (``ray start --head`` on one machine, ``ray start
--address`` on the others).
"""

from __future__ import annotations

import contextlib
import os

from ..errors import AutocompressError
from ..interrupts import Terminated


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init replaces the process's SIGTERM handler (with sys.exit, and its core worker's
    crash handler that aborts); the caller's is put back so SIGTERM ends the search as the
    caller decided."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_cluster_address(address: str, timeout_s: float = 10.0) -> None:
    """A cluster address nothing answers on is an error within seconds: ray.init retries an
    unreachable head for many minutes without a word. Checked when a search starts (before
    hours of sensitivity table) and again when Ray joins. ``auto`` is Ray's own lookup."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise AutocompressError(f"--address {address!r} is not HOST:PORT (the head's GCS "
                                "address, as `ray start --head` prints it)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise AutocompressError(
            f"nothing answers at {address} ({err.strerror or err}); start the cluster's head "
            "(`ray start --head --port PORT`) or give its address") from err


def start_ray(num_cpus: int | None, address: str | None) -> None:
    """Ray for levels 2 and 3: the cluster at ``address``, or a local one in process with
    ``num_cpus`` (default: all cores); nothing when this process already has one."""
    import ray

    if ray.is_initialized():
        return
    try:
        with _keeping_sigterm_handler():
            if address:
                check_cluster_address(address)
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, ray.exceptions.AuthenticationError) as err:
                    # Ray's own message runs to a traceback; its last line says why
                    reason = str(err).strip().splitlines()[-1][:300]
                    raise AutocompressError(
                        f"cannot join the Ray cluster at {address} ({reason}); check it with "
                        f"`ray status --address {address}`, and that this shell's RAY_AUTH_MODE "
                        "and token match the cluster's") from err
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
    except SystemExit:  # SIGTERM during ray.init met Ray's handler, sys.exit: end as ours do
        raise Terminated() from None


def wait_for_cpus(cpus: int, address: str, timeout_s: float, log=print) -> None:
    """Block until the cluster has ``cpus`` free CPUs for a trial. A driver that was killed
    leaves its trials running on the cluster until Ray has cleaned up its job; Tune would wait
    for them without a word (forever, if they never go). Raises after ``timeout_s``."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    said = False
    while ray.available_resources().get("CPU", 0) < cpus:
        if not said:
            log(f"level 3: waiting for {cpus} free CPU(s) on the cluster at {address} (a "
                "stopped search's trials may still hold them)")
            said = True
        if time.monotonic() > deadline:
            raise AutocompressError(
                f"the cluster at {address} has had fewer than {cpus} free CPU(s) for "
                f"{timeout_s:.0f} s; see `ray status --address {address}` for what holds them, "
                "stop it, and run again with --resume")
        time.sleep(0.5)
