"""Several worker processes: every one answers from current data, a write visible to all before its answer returns."""

import pytest

from daemon import Daemon, request
from helpers import domain_xml, write_config
from mdserver import adminclient
from mdserver.server import default_workers


NET = "[dnsmasq]\nnet_address = 127.77.0.0\nnet_prefix = 16\ngateway = 127.77.0.1\n"
UUID = "ec2a0077-aaaa-4bbb-8ccc-000000000077"
MAC = "52:54:00:77:00:77"
ROUNDS = 40
META = "<mds:instance xmlns:mds='urn:mdserver:1'><mds:meta key='round'>{}</mds:meta></mds:instance>"
READS = 6  # new connections per round: the kernel spreads them over the workers


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    path = write_config(tmp, NET, listen_address="127.0.0.1", port=0, workers=3)
    d = Daemon(path).wait_ready()
    d.admin = str(tmp / "admin.sock")
    yield d
    alive = d.proc.poll() is None
    d.stop()
    assert alive, d.output()


def worker_pids(d) -> set:
    with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.process
def test_every_worker_answers_a_change_as_soon_as_it_is_acknowledged(md):
    assert len(worker_pids(md)) >= 3  # the workers are there
    for n in range(ROUNDS):
        # each round changes the same instance (its meta value); the answer
        # to the registration is the promise
        record = adminclient.call(md.admin, "POST", "/instance-upload", domain_xml(
            "vm77", UUID, MAC, metadata=META.format(n)).encode())
        seen = [request(md.host, md.port, "GET", "/openstack/latest/meta_data.json",
                        source=record["ip"])
                for _ in range(READS)]
        assert all(status == 200 for status, _, _ in seen), seen
        assert all(f'"round": "{n}"' in body for _, _, body in seen), (n, seen)


@pytest.mark.unit
@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_default_workers_leave_half_the_cpus_to_the_guests(cpus, workers):
    assert default_workers(cpus) == workers
