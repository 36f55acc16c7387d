"""Stop signals and crash-saving around a training run, as one context manager."""
import signal
import threading

import torch

from core import distributed
from core.errors import NonFiniteTraining, TrainingInterrupted

# SIGUSR2: SLURM's warning before a time limit (submitit's requeue signal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopGuard:
    """Stop signals and crash-saving around training, as one context manager.

    SIGINT, SIGTERM and SIGUSR2 ask for a stop after the current step (`requested`); the first one received
    is the one reported. A second Ctrl-C stops at once (KeyboardInterrupt); a repeated SIGTERM does not, as
    SLURM sends two in a row. Any other exception leaving the block calls `on_crash(err)` (set once there is
    something to save) before it goes on."""

    def __init__(self):
        self.received = 0
        self.on_crash = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def requested(self, ctx):
        """The signal a rank received (0: none; the highest number where ranks differ); every rank gets the same
        answer, so all stop together."""
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
