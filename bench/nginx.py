"""The nginx reference: Debian's nginx, its own config, one worker, serving mdserver's recorded bytes at the same paths to the same guests."""

import os
import signal
import subprocess
from typing import Dict, List, Tuple

from bench.lab import NGINX_ADDRESS

# Answers per guest address: {ip: {path: [status, body]}} (latin-1 text).
Answers = Dict[str, Dict[str, List]]

CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    # Small answers: sendfile with tcp_nopush (Debian's default pair) makes
    # an answer of more than one segment (meta_data.json) 4x slower over the
    # veths (21k against 81k req/s, 64 connections); read() and writev()
    # serve every size at full speed.
    sendfile off;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    types {{ }}
    default_type text/plain;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    map_hash_bucket_size 256;
    map_hash_max_size 8192;
    # The request path names a file number, the guest's address its
    # directory: each guest gets its own bytes, as from mdserver. Paths are
    # not files themselves (/openstack is both a file and a directory).
    map $uri $answer {{
        default "/none";
{entries}
    }}
    server {{
        listen {address}:80 backlog={backlog};
        root {d}/www;
        location / {{ try_files /$remote_addr$answer =404; }}
    }}
}}
"""


def write_tree(d: str, answers: Answers, backlog: int) -> str:
    """www/<guest address>/<n> for every 200 answer; the config mapping
    paths to n. Answers that were not 200 are left out (nginx says 404,
    which is what the crawl recorded for those optional files)."""
    paths = sorted({p for per in answers.values() for p in per})
    number = {p: i for i, p in enumerate(paths)}
    www = os.path.join(d, "www")
    for addr, per in answers.items():
        os.makedirs(os.path.join(www, addr), exist_ok=True)
        for path, (status, body) in per.items():
            if status == 200:
                with open(os.path.join(www, addr, str(number[path])), "wb") as f:
                    f.write(body.encode("latin-1"))
    for root, dirs, files in os.walk(d):  # nginx's worker runs as nobody
        os.chmod(root, 0o755)
        for x in files:
            os.chmod(os.path.join(root, x), 0o644)
    entries = "\n".join(f'        "{p}" "/{i}";' for p, i in number.items())
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(d=d, entries=entries, address=NGINX_ADDRESS, backlog=backlog))
    return conf


class Nginx:
    """nginx in the host namespace on NGINX_ADDRESS:80; stopped by its PID."""

    def __init__(self, d: str, netns: str, answers: Answers, backlog: int):
        os.makedirs(d, exist_ok=True)
        conf = write_tree(d, answers, backlog)
        self.log = open(os.path.join(d, "stdout.log"), "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nginx", "-p", d, "-e", os.path.join(d, "error.log"),
             "-c", conf], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.d = d

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the master waits for its worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def errors(self) -> str:
        try:
            with open(os.path.join(self.d, "error.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


def version() -> Tuple[str, str]:
    r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return "nginx", (r.stderr or r.stdout).strip().split("/")[-1]
