"""FairQueue: guests take turns in tag order, a flood waits behind a lone request, the per-guest bound refuses."""

import asyncio
from typing import List

import pytest

from mdserver.errors import GuestQueueFull
from mdserver.fairness import SHARED_WINDOW, FairQueue

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(coro)


async def _through(queue: FairQueue, client: str, order: List[str]) -> None:
    await queue.turn(client)
    order.append(client)


def test_a_lone_request_goes_before_a_flood_that_came_first():
    async def scenario():
        queue, order = FairQueue(per_client=100), []
        tasks = [asyncio.create_task(_through(queue, "flood", order)) for _ in range(20)]
        await asyncio.sleep(0)  # the flood registers first
        tasks.append(asyncio.create_task(_through(queue, "crawl", order)))
        await asyncio.gather(*tasks)
        return order
    order = run(scenario())
    assert len(order) == 21
    # FIFO would put it last (21st). When it came, the flood's first was
    # already let through (serving tag 1): it takes tag 2, as the flood's
    # second did before it, so it goes third.
    assert order.index("crawl") == 2, order


def test_two_floods_alternate():
    async def scenario():
        queue, order = FairQueue(per_client=100), []
        tasks = [asyncio.create_task(_through(queue, c, order))
                 for c in ["a"] * 10 + ["b"] * 10]
        await asyncio.gather(*tasks)
        return order
    order = run(scenario())
    assert order == ["a", "b"] * 10


def test_a_guest_alone_goes_through_in_order_and_the_queue_empties():
    async def scenario():
        queue, order = FairQueue(per_client=100), []
        seen = []

        async def one(i):
            await queue.turn("g")
            seen.append(i)
        await asyncio.gather(*(one(i) for i in range(50)))
        return queue, seen
    queue, seen = run(scenario())
    assert seen == list(range(50))
    assert queue.waiting("g") == 0 and not queue._heap and not queue._pumping


def test_past_the_bound_a_guest_is_refused_and_others_are_not():
    async def scenario():
        queue = FairQueue(per_client=16)
        waiting = [asyncio.create_task(queue.turn("flood")) for _ in range(16)]
        await asyncio.sleep(0)
        with pytest.raises(GuestQueueFull) as info:
            await queue.turn("flood")
        await queue.turn("other")  # another guest is not refused
        await asyncio.gather(*waiting)
        await queue.turn("flood")  # and the flood is taken again once its queue drained
        return info.value
    error = run(scenario())
    assert (error.client, error.waiting) == ("flood", 16)


def test_a_request_cancelled_while_waiting_does_not_stall_the_others():
    async def scenario():
        queue, order = FairQueue(per_client=100), []
        first = asyncio.create_task(_through(queue, "a", order))
        gone = asyncio.create_task(_through(queue, "b", order))
        last = asyncio.create_task(_through(queue, "c", order))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, last)
        return queue, order
    queue, order = run(scenario())
    assert order == ["a", "c"] and queue.waiting("b") == 0


def test_shared_only_while_two_addresses_ask():
    now = [100.0]
    queue = FairQueue(per_client=100, clock=lambda: now[0])

    async def ask(client):
        await queue.turn(client)

    async def scenario():
        await ask("a")
        await ask("a")
        alone = queue.shared()
        await ask("b")
        both = queue.shared()
        now[0] += SHARED_WINDOW + 0.01
        return alone, both, queue.shared()
    alone, both, later = run(scenario())
    assert (alone, both, later) == (False, True, False)
