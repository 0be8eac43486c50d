"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (SLURM, torchrun) finish the step, then save.

The first signal only sets a flag the training loop reads at every safe point: after each step, before
the next one starts (a signal during the data loading) and between epochs (a signal during the epoch's
checkpoint or k-NN), so no new step begins once it is set; the loop then saves a checkpoint and returns.
The same signal delivered twice within two seconds (SLURM signals the job step, torchrun forwards it
again) counts once; a second, deliberate one aborts at once.

The command then exits as a process killed by that signal would be seen by a shell, 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM), so ``pretrain && evaluate`` stops there.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into :attr:`requested` for the code inside it."""

    DOUBLE_DELIVERY_S = 2.0

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested = False
        self.signal_name: str | None = None
        self.signal_number: int | None = None
        self._first: float | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._first is not None:
            if now - self._first > self.DOUBLE_DELIVERY_S:  # a second, deliberate signal: stop now
                raise KeyboardInterrupt
            return
        self._first = now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.signal_number = int(signum)
        if self.announce:
            from tqdm.auto import tqdm

            tqdm.write(f"clmae: received {self.signal_name}; finishing this step and saving a checkpoint "
                       "(send again to abort)", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        """What the command exits with: ``128 + signal number`` after a signal, else 0."""
        return 128 + self.signal_number if self.signal_number is not None else 0

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
