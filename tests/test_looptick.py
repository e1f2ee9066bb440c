"""One look at the neighbour socket per turn of the event loop: which steps a check covers."""

import asyncio
import threading

import pytest

from mdserver.looptick import LoopTick
from mdserver.neighbours import KernelNeighbours

pytestmark = pytest.mark.unit


def run_steps(steps):
    """Each step as a callback in a fresh loop; the loop attached to a tick."""
    loop = asyncio.new_event_loop()
    tick = LoopTick()
    tick.attach(loop)
    seen = []
    try:
        for step in steps:
            loop.call_soon(step, tick, seen)
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    return seen


def test_unattached_tick_covers_nothing():
    tick = LoopTick()
    tick.checking()
    assert not tick.covers()


def test_a_check_covers_the_steps_queued_before_it_and_no_later_one():
    def first(tick, seen):
        seen.append(("first", tick.covers()))
        tick.checking()
        seen.append(("first after", tick.covers()))
        # queued after the check: must check again
        asyncio.get_running_loop().call_soon(later, tick, seen)

    def queued_before(tick, seen):
        seen.append(("queued before", tick.covers()))

    def later(tick, seen):
        seen.append(("later", tick.covers()))

    assert run_steps([first, queued_before]) == [
        ("first", False), ("first after", True), ("queued before", True), ("later", False)]


def test_a_step_another_thread_queues_during_the_check_comes_after_the_marker():
    def checker(tick, seen):
        tick.checking()
        loop = asyncio.get_running_loop()
        t = threading.Thread(target=loop.call_soon_threadsafe, args=(arrived, tick, seen))
        t.start()
        t.join()  # "during the check": after the marker, before the step ends

    def arrived(tick, seen):
        seen.append(("arrived during the check", tick.covers()))

    assert run_steps([checker]) == [("arrived during the check", False)]


def test_other_threads_are_never_covered():
    def step(tick, seen):
        tick.checking()
        out = []
        t = threading.Thread(target=lambda: out.append(tick.covers()))
        t.start()
        t.join()
        seen.append(("relay thread", out[0]))
        seen.append(("loop thread", tick.covers()))

    assert run_steps([step]) == [("relay thread", False), ("loop thread", True)]


def test_kernel_neighbours_drain_once_per_covered_turn():
    tick = LoopTick()
    neighbours = KernelNeighbours(read=lambda: {"10.0.0.5": "52:54:00:00:00:05"}, tick=tick)
    drains = []
    neighbours._drain = lambda: drains.append(1)  # counts the looks at the socket
    try:
        loop = asyncio.new_event_loop()
        tick.attach(loop)

        def step():
            assert neighbours.lookup("10.0.0.5") == "52:54:00:00:00:05"
        for _ in range(5):
            loop.call_soon(step)
        loop.run_until_complete(asyncio.sleep(0))
        assert len(drains) == 1  # five requests queued together: one look
        loop.call_soon(step)
        loop.run_until_complete(asyncio.sleep(0))
        assert len(drains) == 2  # a later one looks again
        # in another thread (a POST's relay): every time
        t = threading.Thread(target=lambda: [neighbours.lookup("10.0.0.5") for _ in range(2)])
        t.start()
        t.join()
        assert len(drains) == 4
        loop.close()
    finally:
        neighbours.close()
