"""Guests take turns: requests wait in one queue per guest address, served round-robin, so a flood delays only its sender."""

import asyncio
import heapq
import itertools
import time
from typing import Callable, Dict, List, Tuple

from mdserver.errors import GuestQueueFull

# How long after requests from two different addresses the queue counts as
# shared (see FairQueue.shared).
SHARED_WINDOW = 0.1
# Requests in a row from one address that make it a flood (FairQueue.contended):
# a crawl asks one thing at a time, so other guests' requests come between.
FLOOD_RUN = 4


class FairQueue:
    """Start-time fair queuing over client addresses, on one asyncio loop.

    Every request takes a tag one past the later of its sender's last tag
    and the tag now being served, and requests are let through one at a
    time in tag order (arrival order among equal tags). A guest with 64
    requests waiting therefore holds tags N+1..N+64 while a guest that
    sends one gets N+1: it goes next but one, whatever the flood. The queue
    is work-conserving: a guest alone is let through as fast as the loop
    turns.

    Why one at a time through a pump callback instead of running a request
    as soon as its coroutine starts: the loop starts coroutines in arrival
    order, so "run at once when nobody waits" would be first come, first
    served again. Each request first registers (cheap), and the pump, queued
    behind the registrations that arrived meanwhile, picks the lowest tag.

    `per_client`: requests one address may have waiting; past it the
    request is refused (GuestQueueFull -> 429 with Retry-After). A crawl
    has one at a time; only hundreds of concurrent connections reach it.
    """

    def __init__(self, per_client: int, clock: Callable[[], float] = time.monotonic):
        self.per_client = per_client
        self.clock = clock
        self._heap: List[Tuple[int, int, str, "asyncio.Future[None]"]] = []
        self._seq = itertools.count()
        self._last: Dict[str, int] = {}     # client -> its latest tag
        self._waiting: Dict[str, int] = {}  # client -> requests in the heap
        self._serving = 0                   # the tag let through last
        self._pumping = False
        self._previous = ""                 # the address that registered last
        self._shared_until = 0.0
        self._flood_until = 0.0
        self._run = 0                       # requests in a row from _previous

    def waiting(self, client: str) -> int:
        return self._waiting.get(client, 0)

    def shared(self) -> bool:
        """Whether requests from more than one address came within the last
        SHARED_WINDOW seconds (a lone guest, however busy, is not sharing)."""
        return self._shared_until > self.clock()

    def contended(self) -> bool:
        """Whether, within the last SHARED_WINDOW seconds, the queue was
        shared and one address sent FLOOD_RUN requests in a row (a flood):
        only then is a request still in granian's hands likely owed a turn
        before what the loop already has. Guests that each ask one thing at
        a time (a boot storm's crawls) come interleaved, and are served in
        arrival order anyway. (Requests waiting in the loop's ready queue
        are not visible here; a run from one address is.)"""
        return self.shared() and self._flood_until > self.clock()

    async def turn(self, client: str) -> None:
        """Wait until it is `client`'s turn (GuestQueueFull past per_client)."""
        count = self._waiting.get(client, 0)
        if count >= self.per_client:
            raise GuestQueueFull(client, count)
        if client != self._previous:
            if self._previous:
                self._shared_until = self.clock() + SHARED_WINDOW
            self._previous, self._run = client, 1
        else:
            self._run += 1
            now = self.clock()
            if self._run >= FLOOD_RUN:
                self._flood_until = now + SHARED_WINDOW
            if not self._pumping and self._shared_until <= now:
                return  # one guest alone and nobody waiting: no order to keep
        loop = asyncio.get_running_loop()
        tag = max(self._serving, self._last.get(client, 0)) + 1
        self._last[client] = tag
        self._waiting[client] = count + 1
        future: "asyncio.Future[None]" = loop.create_future()
        heapq.heappush(self._heap, (tag, next(self._seq), client, future))
        if not self._pumping:
            self._pumping = True
            loop.call_soon(self._pump)
        try:
            await future
        except asyncio.CancelledError:
            if not future.done():  # left before its turn (client gone): forget it
                future.cancel()
            raise

    def _pump(self) -> None:
        """Let the lowest tag through; come back after it has run (its wake-up
        is queued first), so arrivals meanwhile are ranked before the next pick."""
        while self._heap:
            tag, _, client, future = heapq.heappop(self._heap)
            left = self._waiting[client] - 1
            if left:
                self._waiting[client] = left
            else:
                del self._waiting[client]
            if future.cancelled():
                continue
            self._serving = tag
            future.set_result(None)
            asyncio.get_running_loop().call_soon(self._pump)
            return
        # Nobody waits: forget the tags (bounded memory; everyone is even).
        self._pumping = False
        self._last.clear()
        self._serving = 0
