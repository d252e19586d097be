"""Stopping a run on request: SIGINT, SIGTERM and SIGUSR2 (Slurm's preemption warning, as submitit
asks for it: `#SBATCH --signal=USR2@<seconds>`).

A signal sets a flag. The training loop reads it between iterations (it then writes last.pt and
stops); validations and the final test read it between evaluation chunks and stop at once, keeping
the checkpoints already written (`StopRequest.check` raises `Stopped`). A second signal stops at
once (KeyboardInterrupt). The handlers are installed for the run only and restored after it.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()
)


class Stopped(Exception):
    """The run stopped on a signal. `signum`: the signal; `during`: what it interrupted
    ('training', 'the validation at iteration N', 'the final test')."""

    def __init__(self, signum: int, during: str):
        super().__init__(f"{signal.Signals(signum).name} received during {during}")
        self.signum, self.during = int(signum), during

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, the shell's convention (143 for SIGTERM)."""
        return 128 + self.signum


class StopRequest:
    """While entered, SIGINT/SIGTERM/SIGUSR2 set `signum`; the run reads it where it can stop."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, during: str) -> None:
        """Raises Stopped when a signal came (called between evaluation chunks)."""
        if self.signum is not None:
            raise Stopped(self.signum, during)

    def previous_handler(self, signum):
        """The handler this one replaced, when it is a Python function (submitit's requeue on
        SIGUSR2)."""
        old = self._old.get(signum)
        return old if callable(old) else None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
