"""The nftables rule set that gives every answer from the metadata address its IP TTL ([mdserver] hop_limit).

granian owns the listening sockets, so mdserver cannot set IP_TTL on them;
the rule does it on the way out instead, for all answers (AWS limits only
the token's). A TTL of 1 reaches the guest (same link: no router
decrements it) but not a container behind NAT or a proxy inside the guest:
the guest's forwarding drops it.
"""

from mdserver.config import MdserverSection

TABLE = "mdserver_hop_limit"


def ruleset(md: MdserverSection) -> str:
    """`nft -f` input: replaces the table atomically (hop_limit 0: removes it)."""
    lines = [f"# mdserver: [mdserver] hop_limit = {md.hop_limit}",
             # declare-then-delete: works whether or not the table exists yet
             f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    if md.hop_limit:
        family, ttl = ("ip6", "ip6 hoplimit") if ":" in md.listen_address else ("ip", "ip ttl")
        # port 0 (any free port) is for tests: every TCP answer from the address
        sport = f" tcp sport {md.port}" if md.port else " meta l4proto tcp"
        lines += [f"table inet {TABLE} {{",
                  "    chain output {",
                  "        type filter hook output priority 0; policy accept;",
                  f"        {family} saddr {md.listen_address}{sport} {ttl} set {md.hop_limit}",
                  "    }", "}"]
    return "\n".join(lines) + "\n"
