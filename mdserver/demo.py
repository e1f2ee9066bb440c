"""`mdserver --demo`: a loopback-only configuration, one demo instance, and how to try it."""

import getpass
import os
import time

from mdserver.models import Instance
from mdserver.storeapi import InstanceStore

DEMO_PORT = 8169
DEMO_UUID = "ec2de302-0000-4000-8000-000000000001"


def write_demo(state_dir: str, port: int = DEMO_PORT) -> str:
    """A demo configuration on loopback and `port` (0: any free one), state in `state_dir`."""
    state_dir = os.path.abspath(state_dir)
    os.makedirs(os.path.join(state_dir, "userdata"), exist_ok=True)
    path = os.path.join(state_dir, "mdserver.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""\
# Written by `mdserver --demo`: a loopback-only demo. Not for production.
[mdserver]
listen_address = 127.0.0.1
port = {port}
db_file = db.json
userdata_dir = userdata
admin_socket = admin.sock
access_log = yes

[dnsmasq]
base_dir = dnsmasq
user = {getpass.getuser()}

[public-keys]
demo = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKeyDemo demo@mdserver
""")
    return path


def register_demo(store: InstanceStore) -> None:
    """Register 127.0.0.1 as instance `demo`, so curl from this host sees its metadata."""
    if store.by_uuid(DEMO_UUID) is None:
        now = time.time()
        store.commit(put=[Instance(uuid=DEMO_UUID, name="demo", mac="52:54:00:de:30:01",
                                   ipv4="127.0.0.1", hostname="demo", first_seen=now,
                                   last_seen=now, host=store.host)])


def print_hints(host: str, port: int) -> None:
    """Once serving (the port is known then, also for port 0): what to try."""
    base = f"http://{host}:{port}"
    print(f"mdserver demo: instance 'demo' is 127.0.0.1. Try:\n"
          f"  curl {base}/latest/meta-data/\n"
          f"  curl {base}/latest/meta-data/instance-id\n"
          f"  curl {base}/latest/user-data\n"
          f"Stop with Ctrl-C.", flush=True)
