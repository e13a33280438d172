"""Stop cleanly on a signal: SIGTERM (``kill``, schedulers), SIGINT (Ctrl-C), SIGUSR2 (SLURM's
pre-timeout signal, submitit's, what ``scontrol requeue`` and preemption send).

:func:`stop_on_signals` makes the first of them a request: the trainer finishes the
step in progress, writes ``current.pth`` at that step and returns; the task ends and the
process exits with ``128 + signal number`` (:func:`exit_code`), as if killed by the signal, so
a scheduler sees how it ended. A second Ctrl-C exits at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_received: int | None = None


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of ``signals`` is a stop request (:func:`received`, read it
    inside); the previous handlers come back after it. Only the main thread may handle
    signals: elsewhere this does nothing."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {signum: signal.signal(signum, _request_stop) for signum in signals}
    try:
        yield
    finally:
        _received = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _request_stop(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: leave now, without a checkpoint
    if _received is None:
        _received = signum
        log.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again to "
                    "exit at once)", signal.Signals(signum).name)


def received() -> int | None:
    """The number of the first stop signal received since the handlers were last installed."""
    return _received


def exit_code() -> int | None:
    """``128 + signum`` after a stop signal (the shell's code for a death by it), else None."""
    return None if _received is None else 128 + _received


def ignore_in_worker(_worker_id: int = 0) -> None:
    """For loader worker processes: a Ctrl-C reaches the whole process group, and a worker
    that died of it would fail the step the trainer is finishing; the main process ends the
    workers itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
