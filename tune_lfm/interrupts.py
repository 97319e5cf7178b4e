"""Ctrl-C and SIGTERM stop a sweep cleanly and say so: what finished, and the exact command that resumes it.

While a sweep runs, SIGINT and SIGTERM are routed to Ray Tune's own stop request (the handler Tune installs for
SIGUSR1 while it runs), so running trials are stopped, the finished trials' rows are already written, and the driver
exits with 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by that signal. A second signal stops
at once. Tune's own SIGINT handler is switched off (TUNE_DISABLE_SIGINT_HANDLER) so the driver learns that it was
interrupted instead of reporting a finished sweep.
"""

from __future__ import annotations

import os
import shlex
import signal
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """`with Interrupts(log) as interrupts:` ... `interrupts.received` is the signal number, or None."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without waiting for trials to wind down
        self.received = signum
        self.log(f"{signal.Signals(signum).name} received: stopping the running trials (send it again to stop at once)")
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_stop):  # Tune is not running yet: there is nothing to wind down
            raise KeyboardInterrupt
        tune_stop(signum, frame)


def resume_command(argv: list[str], name: str) -> str:
    """The command line that continues this experiment: the same arguments with `--name <name> --resume`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--name":
            skip = True
        elif not arg.startswith("--name=") and arg not in ("--resume", "--resume-if-exists"):
            kept.append(arg)
    return shlex.join(["python", "-m", "tune_lfm.search", *kept, "--name", name, "--resume"])
