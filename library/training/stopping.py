"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM so that a state can be saved.

One process: the signal raises ``KeyboardInterrupt`` where the run is (SIGTERM is turned into one too), and
the loop saves the state of the last completed step. Several processes: each process receives the signal at
a different point, and a process that stopped inside a collective would leave the others waiting forever.
So the signal only sets a flag; the flag travels with the step's loss reduction (no extra communication),
every process sees the same answer after the same optimizer step, and they stop there together, which lets
them save one consistent state. A second Ctrl-C (more than a second after the first: the launcher forwards
the terminal's signal to its workers, which then receive it twice at once) stops a process at once, without
a state. The launcher kills workers that have not stopped 30 seconds after the signal.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Iterator


REPEAT_SECONDS = 1.0  # a signal this long after the first one stops at once


class StopRequest:
    """Set by the signal handlers of a multi-process run; read at each optimizer step."""

    def __init__(self) -> None:
        self.requested = False  # this process received a signal
        self.agreed = False  # every process saw a request after the same step: they stop together
        self._first = 0.0

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if time.monotonic() - self._first > REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.requested = True
        self._first = time.monotonic()
        print(f"\n{signal.Signals(signum).name}: stopping after the current step (all processes together); "
              "press Ctrl-C again to stop at once without saving", flush=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals(num_processes: int) -> Iterator[StopRequest]:
    """Install the handlers for the loop (see the module docstring); restores the previous ones after."""
    request = StopRequest()
    signals = (signal.SIGINT, signal.SIGTERM) if num_processes > 1 else (signal.SIGTERM,)
    handler = request.handle if num_processes > 1 else _raise_interrupt
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: signals stay as they are
        pass
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
