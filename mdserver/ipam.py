"""IPv4 allocation from the configured network (pure: what is taken is asked of the caller)."""

import ipaddress
from typing import Callable, Iterable, Tuple

from mdserver.errors import PoolExhausted


class Pool:
    """The host addresses of a network, less reserved ones (gateway, metadata address)."""

    def __init__(self, network: ipaddress.IPv4Network, reserved: Iterable[str]):
        self.network = network
        self.first = int(network.network_address) + 1
        self.last = int(network.broadcast_address) - 1
        # Reserved addresses outside the network (or IPv6) cannot collide: skip them.
        self.reserved = {int(a) for a in map(ipaddress.ip_address, reserved)
                         if a.version == 4 and a in network}
        self.size = max(0, self.last - self.first + 1)

    def usable(self, ip: str) -> bool:
        n = int(ipaddress.IPv4Address(ip))
        return self.first <= n <= self.last and n not in self.reserved

    def find_free(self, cursor: int, taken: Callable[[str], bool]) -> Tuple[str, int]:
        """The first usable address at or after `cursor` (wrapping round) that
        is not `taken`, and the cursor for the next search.

        Callers keep the cursor, so consecutive allocations scan only what
        was handed out since: the cost does not grow with the number of
        instances until the pool is nearly full.
        """
        if not self.first <= cursor <= self.last:
            cursor = self.first
        for step in range(self.size):
            n = self.first + (cursor - self.first + step) % self.size
            if n in self.reserved:
                continue
            ip = str(ipaddress.IPv4Address(n))
            if not taken(ip):
                return ip, n + 1
        raise PoolExhausted(f"no free address left in {self.network}")
