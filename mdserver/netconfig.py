"""Network facts rendered as OpenStack network_data.json and as cloud-init network config v2 (pure)."""

from typing import Any, Dict, Optional

from mdserver.view import NetworkFacts

LINK_ID = "mds0"
# The v2 key for the NIC: with `match` on the MAC and no `set-name`, cloud-init
# configures the NIC that has this MAC under its own kernel name.
V2_ID = "mds0"


def network_data(facts: NetworkFacts) -> Optional[Dict[str, Any]]:
    """nova's network_data.json for the one NIC; None when mode is none
    (cloud-init then falls back to DHCP on its first NIC)."""
    if facts.mode == "none":
        return None
    link = {"id": LINK_ID, "type": "phy", "ethernet_mac_address": facts.mac, "mtu": None,
            "vif_id": LINK_ID}
    # DNS servers only with a static address: cloud-init turns top-level dns
    # services into fixed nameservers even beside DHCP, which already gives them.
    services = [{"type": "dns", "address": a} for a in facts.dns] \
        if facts.mode == "static" else []
    if facts.mode == "dhcp":
        net: Dict[str, Any] = {"id": "network0", "type": "ipv4_dhcp", "link": LINK_ID,
                               "network_id": "mds"}
    else:
        net = {"id": "network0", "type": "ipv4", "link": LINK_ID, "network_id": "mds",
               "ip_address": facts.address, "netmask": facts.netmask,
               "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0",
                           "gateway": facts.gateway}],
               "services": services}
    return {"links": [link], "networks": [net], "services": services}


def config_v2(facts: NetworkFacts) -> Optional[Dict[str, Any]]:
    """cloud-init network config version 2 for the one NIC; None when mode is none."""
    if facts.mode == "none":
        return None
    eth: Dict[str, Any] = {"match": {"macaddress": facts.mac}}
    if facts.mode == "dhcp":
        eth["dhcp4"] = True
    else:
        eth["dhcp4"] = False
        eth["addresses"] = [f"{facts.address}/{facts.prefix}"]
        eth["routes"] = [{"to": "0.0.0.0/0", "via": facts.gateway}]
        # No search domain: nova's format has none, and every face gives the
        # same facts (the domain is in the FQDN cloud-init sets anyway).
        if facts.dns:
            eth["nameservers"] = {"addresses": list(facts.dns)}
    return {"version": 2, "ethernets": {V2_ID: eth}}
