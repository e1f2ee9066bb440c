"""Signals taken by one thread of their own (sigwait), whichever thread the kernel picks."""

import logging
import signal
import threading
from typing import Callable, Dict

log = logging.getLogger(__name__)


def on_signals(actions: Dict[signal.Signals, Callable[[], object]]) -> None:
    """Run actions[signum] on each of those signals, in a thread of its own.

    The signals are blocked in the calling thread and so in every thread
    started after it (and in child processes); one thread takes them with
    sigwait(). A Python-level handler is not enough here: the kernel may
    deliver a signal to a native server thread while the main thread sits in
    a blocking wait, and the handler would then not run until something else
    wakes it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, set(actions))

    def loop() -> None:
        while True:
            signum = signal.Signals(signal.sigwait(set(actions)))
            try:
                actions[signum]()
            except Exception:  # one failed action must not end the loop
                log.exception("handling signal %d failed", signum)

    threading.Thread(target=loop, daemon=True, name="signals").start()
