"""Stop training cleanly on SIGTERM / SIGINT: finish the step, checkpoint, exit.

Schedulers (Slurm, Kubernetes, Cloud TPU maintenance) send SIGTERM some time before
they kill a job. The handler only records the signal; the training loop looks at it
at each step boundary, saves a checkpoint and returns. A second Ctrl-C while waiting
raises KeyboardInterrupt as usual. Outside the main thread (where Python allows no
signal handlers) it does nothing.

    >>> with StopOnSignal() as stop:
    ...     for step in range(steps):
    ...         train_step(...)
    ...         if stop.requested:
    ...             save(step); break
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop as if `signum` had arrived."""
        self.received = signum

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop waiting
        self.received = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
