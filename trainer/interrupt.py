"""Stop a training loop cleanly: the first Ctrl-C (or SIGTERM) lets the current step finish, the
loop checkpoints and raises KeyboardInterrupt; a second Ctrl-C interrupts at once."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: checkpoint; raise KeyboardInterrupt``.

    Handlers are installed only in the main thread (elsewhere ``requested`` stays False) and the
    previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
              "(Ctrl-C again to stop at once, without one)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
