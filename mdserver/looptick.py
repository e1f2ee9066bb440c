"""One turn of the worker's event loop: whether a check made earlier in it still covers the code running now."""

import threading
from typing import Any, Optional


class LoopTick:
    """Lets a per-request check (is anything queued on the neighbour
    socket?) run once per turn of the event loop instead of once per request.

    A check covers every request that reached the server before it. The
    loop's thread runs steps from its ready queue in order; `checking()`,
    called just before a check, appends a marker there. A step that runs
    before the marker was queued before it, so before the check, and its
    request arrived before it was queued: the check covers it. Once the
    marker has run, the next step checks again. (The marker goes in first:
    another thread may queue a step while the check runs, and that step
    must come after the marker.) Other threads (the relays of POSTs) are never covered: they check
    every time. Before `attach` (tests, mdserverctl) nothing is covered.
    """

    def __init__(self) -> None:
        self._loop: Optional[Any] = None
        self._thread: Optional[int] = None
        self._covered = False

    def attach(self, loop: Any) -> None:
        """Called in the thread that runs `loop` (RSGI's __rsgi_init__)."""
        self._loop, self._thread = loop, threading.get_ident()

    def covers(self) -> bool:
        return self._covered and threading.get_ident() == self._thread

    def checking(self) -> None:
        """A check is about to be made (by the caller, holding its lock)."""
        if self._loop is not None and not self._covered \
                and threading.get_ident() == self._thread:
            self._covered = True
            self._loop.call_soon(self._reset)

    def _reset(self) -> None:
        self._covered = False
