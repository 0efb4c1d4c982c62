"""SIGINT and SIGTERM end a run cleanly: anywhere but inside a store write, which finishes first."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from kvbench.errors import Interrupted


class Guard:
    """Where a signal may end the run: anywhere but inside a store write (which then finishes first)."""

    def __init__(self):
        self.writing, self.pending = False, None

    @contextmanager
    def write(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending is not None:
            raise interrupted(self.pending)


def interrupted(signum: int) -> Interrupted:
    return Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


@contextmanager
def signals_end_the_run():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (deferred while a store write is under way)."""
    guard = Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # signals are delivered to the main thread only; nothing to install here
        return

    def handler(signum, frame):
        if guard.writing:
            guard.pending = signum
        else:
            raise interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, h in old.items():
            signal.signal(s, h)
