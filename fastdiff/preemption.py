"""Stop training cleanly on SIGTERM / SIGINT: finish the step, save, then exit.

A scheduler preempting a job (or reaching its time limit) sends SIGTERM, a user presses
Ctrl-C (SIGINT).  While :class:`StopSignals` is active, either signal is only *recorded*;
the training loop reads :attr:`StopSignals.received` between steps, writes a checkpoint of
the step it has just finished and raises :class:`TrainingInterrupted`.  Further signals while
that happens are recorded too (nothing is cut short, so nothing is half-written); they print
a one-line notice.  SIGKILL cannot be caught: a killed run resumes from its last checkpoint.

Handlers can only be installed from the main thread (a Python rule): elsewhere
:class:`StopSignals` installs nothing and signals keep their previous behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

#: The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_AGAIN = (
    b"fastdiff: already stopping: the current step finishes and the checkpoint is written,"
    b" please wait\n"
)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after finishing a step and saving a checkpoint of it.

    A KeyboardInterrupt subclass, so ``except KeyboardInterrupt`` catches it and
    ``except Exception`` does not.  Attributes:

        signum        the signal (signal.SIGTERM or signal.SIGINT)
        step          the last step completed (the step the checkpoint holds)
        checkpoint    the checkpoint directory written (None without out_dir)
        out_dir       the run's output directory (None if none was given)
        exit_status   128 + signum: 143 for SIGTERM, 130 for SIGINT (what shells report)

    ``train(..., out_dir=out_dir, resume=True)`` continues exactly where it stopped.
    """

    def __init__(self, signum: int, step: int, checkpoint=None, out_dir=None):
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.out_dir = None if out_dir is None else Path(out_dir)
        super().__init__(self.signum, self.step, self.checkpoint, self.out_dir)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        where = (
            f"checkpoint saved to {str(self.checkpoint)!r}"
            if self.checkpoint is not None
            else "nothing saved (no out_dir)"
        )
        return f"training stopped by {signal_name(self.signum)} after step {self.step}; {where}"


class StopSignals:
    """Context manager recording SIGTERM / SIGINT instead of dying (see the module doc).

    ``received`` is the first signal number received, or None.  On exit the previous
    handlers are restored.  In a child process forked while it is active (e.g. a DataLoader
    worker) the inherited handler ignores the signal: the parent decides when to stop.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.received is None:
            self.received = signum
        else:
            os.write(2, _AGAIN)  # os.write: safe even if the main thread is mid-print

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # None: the previous handler was not installed from Python; restore the default.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
