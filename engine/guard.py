"""Stop signals and crash-saving around a training run, as one context manager."""
import signal
import threading

import torch

from core import distributed
from core.errors import NonFiniteTraining, TrainingInterrupted


class StopGuard:
    """Stop signals and crash-saving around training, as one context manager.

    SIGINT and SIGTERM ask for a stop after the current step (`requested`); the same signal a second time
    stops at once (KeyboardInterrupt). Any other exception leaving the block calls `on_crash(err)` (set once
    there is something to save) before it goes on."""

    def __init__(self):
        self.received = 0
        self.on_crash = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == signum:
            raise KeyboardInterrupt
        self.received = max(self.received, signum)

    def requested(self, ctx):
        """The signal any rank received (0: none); every rank gets the same answer, so all stop together."""
        if ctx.world_size == 1:
            return self.received
        return int(distributed.all_reduce_max(torch.tensor(self.received, device=ctx.device)).item())

    def __exit__(self, exc_type, exc, tb):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        on_crash, self.on_crash = self.on_crash, None  # it holds the trainer, which must be freed (DDP) after this
        if exc is not None and on_crash is not None and not isinstance(exc, (TrainingInterrupted, NonFiniteTraining)):
            on_crash(exc)
        return False
