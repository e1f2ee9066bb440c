"""md_server 0.6 database records -> Instances (pure), for the one-time conversion."""

import ipaddress
import uuid as uuidlib
from typing import List

from mdserver.models import Instance, default_hostname


def convert(records: list) -> List[Instance]:
    """Every 0.6 record as an Instance, keeping its address; ValueError names a bad record."""
    out = []
    for number, r in enumerate(records, 1):
        try:
            name = str(r["domain_name"])
            uuid = str(uuidlib.UUID(str(r["domain_uuid"])))
            mac = str(r["mds_mac"]).lower()
            ipv4 = str(ipaddress.IPv4Address(r["mds_ipv4"]))
            first = float(r.get("first_seen") or 0.0)
            last = float(r.get("last_update") or first)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"record {number}: {e}") from None
        out.append(Instance(uuid=uuid, name=name, mac=mac, ipv4=ipv4,
                            hostname=default_hostname(name, uuid),
                            first_seen=first, last_seen=last))
    return out
