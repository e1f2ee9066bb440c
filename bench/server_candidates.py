#!/usr/bin/env python3
"""Benchmark WSGI server candidates for mdserver against nginx.

Self-contained: stdlib + bottle + whichever candidate servers are importable.
Needs `wrk` and `nginx` on PATH.  Only ever talks to 127.0.0.1.

What it does:

* builds a representative Bottle app (``build_app``): N fake instances keyed
  by IPv4 (127.0.0.1 included so wrk's requests resolve to an instance),
  ``GET /<version>/meta-data/<path:path>`` looks the guest up by
  ``environ['REMOTE_ADDR']`` (never X-Forwarded-For) and returns a
  precomputed string as text/plain without trailing newline, 404 otherwise;
* starts each candidate as a separate process on a free 127.0.0.1 port
  (this very script re-executed with ``--serve NAME``, or uwsgi's own binary),
  waits until it answers, checks body/headers/REMOTE_ADDR, warms up, runs
  ``wrk -t2 -c64 -d10s --latency`` and stops it again by PID;
* measures nginx (own config in a temp dir, ``daemon off``, access_log off,
  static file with the same body at the same path) before and after the
  candidates; the reference is the mean of the two nginx runs;
* re-runs each candidate while slow clients (half connect and send nothing,
  half send an incomplete request) hold connections open;
* re-runs the best candidate with one Python ``logging`` access line per
  request (INFO, FileHandler) to quantify logging cost (from a WSGI
  middleware, and for granian also with granian's own access log);
* prints a table and writes JSON (``--json PATH``).

Usage:  python bench/server_candidates.py --json results.json
        python bench/server_candidates.py --only granian-1w,waitress-8t
        python bench/server_candidates.py --only granian-2w-bt1-bp64   # ad-hoc granian variant
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LEAF_PATH = '/latest/meta-data/instance-id'
DEFAULT_INSTANCES = 10_000
SEED = 20240601

# --------------------------------------------------------------------------
# The representative app
# --------------------------------------------------------------------------

META_VERSIONS = frozenset(
    ['latest', '1.0', '2007-01-19', '2009-04-04', '2011-01-01', '2016-09-02', '2021-03-23']
)


def make_instances(n_instances: int = DEFAULT_INSTANCES, seed: int = SEED) -> dict[str, dict[str, str]]:
    """N fake instances keyed by IPv4 address; 127.0.0.1 is always one of them."""
    rng = random.Random(seed)
    addrs = ['127.0.0.1']
    i = 1
    while len(addrs) < n_instances:
        b, c, d = (i >> 16) & 255, (i >> 8) & 255, i & 255
        if d not in (0, 255):
            addrs.append(f'10.{b}.{c}.{d}')
        i += 1
    instances = {}
    for idx, ip in enumerate(addrs):
        iid = 'i-%017x' % rng.getrandbits(68)
        mac = '02:' + ':'.join('%02x' % rng.getrandbits(8) for _ in range(5))
        host = 'ip-' + ip.replace('.', '-')
        instances[ip] = {
            'instance-id': iid,
            'ami-id': 'ami-%017x' % rng.getrandbits(68),
            'ami-launch-index': str(idx % 4),
            'reservation-id': 'r-%017x' % rng.getrandbits(68),
            'instance-type': rng.choice(['t3.micro', 'm5.large', 'c6i.xlarge']),
            'hostname': host + '.ec2.internal',
            'local-hostname': host + '.ec2.internal',
            'local-ipv4': ip,
            'mac': mac,
            'placement/availability-zone': 'zone-' + rng.choice('abc'),
            'security-groups': 'default',
        }
    return instances


def expected_body(seed: int = SEED) -> str:
    return make_instances(1, seed)['127.0.0.1']['instance-id']


def _access_log_middleware(app, log_path: str):
    """One Python logging line per request at INFO to a file (cost probe)."""
    logger = logging.getLogger('mdserver.bench.access')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    logger.addHandler(handler)

    def logged(environ, start_response):
        status = []

        def sr(st, headers, exc_info=None):
            status.append(st)
            return start_response(st, headers, exc_info)

        body = app(environ, sr)
        logger.info(
            '%s "%s %s" %s',
            environ.get('REMOTE_ADDR'),
            environ.get('REQUEST_METHOD'),
            environ.get('PATH_INFO'),
            status[0][:3] if status else '-',
        )
        return body

    return logged


def build_app(n_instances: int = DEFAULT_INSTANCES, seed: int = SEED, access_log: str | None = None):
    """App factory: returns a WSGI callable (a Bottle app, optionally wrapped)."""
    import bottle

    instances = make_instances(n_instances, seed)
    app = bottle.Bottle()

    def not_found():
        return bottle.HTTPResponse('Not Found', status=404, headers={'Content-Type': 'text/plain'})

    @app.get('/<version>/meta-data/<path:path>')
    def meta_leaf(version, path):
        inst = instances.get(bottle.request.environ.get('REMOTE_ADDR'))
        if inst is None or version not in META_VERSIONS:
            return not_found()
        value = inst.get(path)
        if value is None:
            return not_found()
        bottle.response.content_type = 'text/plain'
        return value

    @app.get('/_bench/remote-addr')
    def remote_addr():
        # Only for the harness' sanity check of what the server puts in REMOTE_ADDR.
        bottle.response.content_type = 'text/plain'
        return str(bottle.request.environ.get('REMOTE_ADDR'))

    if access_log:
        return _access_log_middleware(app, access_log)
    return app


# --------------------------------------------------------------------------
# Server runners (executed in the child process: --serve NAME)
# --------------------------------------------------------------------------


def _granian_loader(target, app_kwargs):
    # granian calls target_loader(target) inside each worker process.
    return build_app(**app_kwargs)


def serve_granian(port, app_kwargs, workers=1, blocking_threads=None, backpressure=None, granian_access_log=None):
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    extra = {}
    if blocking_threads:
        extra['blocking_threads'] = blocking_threads
    if backpressure:
        extra['backpressure'] = backpressure
    if granian_access_log:  # granian's own access log (Python logging), to a file
        extra['log_access'] = True
        extra['log_dictconfig'] = {
            'handlers': {
                'console': {'formatter': 'generic', 'class': 'logging.StreamHandler', 'stream': 'ext://sys.stdout'},
                'access': {'formatter': 'access', 'class': 'logging.FileHandler', 'filename': granian_access_log},
            },
            'loggers': {
                '_granian': {'handlers': ['console'], 'level': 'WARNING', 'propagate': False},
                'granian.access': {'handlers': ['access'], 'level': 'INFO', 'propagate': False},
            },
        }
    else:
        extra['log_access'] = False
    server = Server(
        'mdserver-bench',  # only a label: target_loader below builds the app
        address='127.0.0.1',
        port=port,
        interface=Interfaces.WSGI,  # the enum, not the plain string 'wsgi'
        workers=workers,
        http=HTTPModes.http1,
        log_level=LogLevels.warning,
        **extra,
    )
    server.serve(target_loader=functools.partial(_granian_loader, app_kwargs=app_kwargs))


def serve_waitress(port, app_kwargs, threads=8):
    import waitress

    waitress.serve(
        build_app(**app_kwargs),
        host='127.0.0.1',
        port=port,
        threads=threads,
        connection_limit=1024,  # default 100 would be exhausted by 64 + 50 slow clients
        backlog=1024,
        _quiet=True,
    )


def serve_cheroot(port, app_kwargs, threads=16):
    from cheroot import wsgi

    server = wsgi.Server(('127.0.0.1', port), build_app(**app_kwargs), numthreads=threads, request_queue_size=1024)
    signal.signal(signal.SIGTERM, lambda *a: server.stop())
    try:
        server.safe_start()
    finally:
        server.stop()


def serve_gunicorn(port, app_kwargs, worker_class='gthread', workers=2, threads=8):
    from gunicorn.app.base import BaseApplication

    class FactoryApp(BaseApplication):
        def load_config(self):
            opts = {
                'bind': f'127.0.0.1:{port}',
                'workers': workers,
                'worker_class': worker_class,
                'threads': threads,
                'worker_connections': 1000,
                'backlog': 1024,
                'accesslog': None,
                'loglevel': 'warning',
                'graceful_timeout': 5,
                'keepalive': 5,
            }
            for key, value in opts.items():
                self.cfg.set(key, value)

        def load(self):  # runs in each worker (preload_app is off)
            return build_app(**app_kwargs)

    FactoryApp().run()


def serve_pyruvate(port, app_kwargs, threads=8):
    import pyruvate

    logging.getLogger('pyruvate').setLevel(logging.WARNING)
    # max_reuse_count defaults to 0 (= no keep-alive): enable keep-alive like the others
    # Default max_reuse_count=0 = no keep-alive.  With keep-alive enabled
    # (max_reuse_count is a u8, <= 255) pyruvate 1.6.1 did not answer the second
    # request on a reused connection in our test, so it is measured without.
    pyruvate.serve(build_app(**app_kwargs), f'127.0.0.1:{port}', threads)


# name -> (runner, kwargs, required module, description)
CANDIDATES = {
    'granian-1w': (serve_granian, {'workers': 1}, 'granian', 'granian WSGI, 1 worker, default blocking threads'),
    'granian-1w-bt2': (
        serve_granian,
        {'workers': 1, 'blocking_threads': 2},
        'granian',
        'granian WSGI, 1 worker, blocking_threads=2',
    ),
    'granian-2w': (serve_granian, {'workers': 2}, 'granian', 'granian WSGI, 2 workers, default blocking threads'),
    'granian-2w-bt2': (
        serve_granian,
        {'workers': 2, 'blocking_threads': 2},
        'granian',
        'granian WSGI, 2 workers, blocking_threads=2 each',
    ),
    'waitress-8t': (serve_waitress, {'threads': 8}, 'waitress', 'waitress, threads=8, connection_limit=1024'),
    'cheroot-16t': (serve_cheroot, {'threads': 16}, 'cheroot', 'cheroot, numthreads=16'),
    'gunicorn-gthread-2w8t': (
        serve_gunicorn,
        {'worker_class': 'gthread', 'workers': 2, 'threads': 8},
        'gunicorn',
        'gunicorn gthread, 2 workers x 8 threads',
    ),
    'gunicorn-gevent-2w': (
        serve_gunicorn,
        {'worker_class': 'gevent', 'workers': 2},
        'gevent',
        'gunicorn gevent, 2 workers',
    ),
    'pyruvate-8t': (serve_pyruvate, {'threads': 8}, 'pyruvate', 'pyruvate, 8 threads, no keep-alive (its default)'),
    'uwsgi-2p2t': (
        None,
        {'processes': 2, 'threads': 2},
        'uwsgi-binary',
        'uWSGI --http-socket (no keep-alive), 2 processes x 2 threads',
    ),
}


_GRANIAN_SPEC = re.compile(r'granian-(\d+)w(?:-bt(\d+))?(?:-bp(\d+))?')


def lookup_candidate(name):
    """CANDIDATES entry, or an ad-hoc granian variant such as granian-2w-bt2-bp32."""
    if name in CANDIDATES:
        return CANDIDATES[name]
    m = _GRANIAN_SPEC.fullmatch(name)
    if not m:
        raise KeyError(name)
    kw = {'workers': int(m.group(1))}
    if m.group(2):
        kw['blocking_threads'] = int(m.group(2))
    if m.group(3):
        kw['backpressure'] = int(m.group(3))
    return serve_granian, kw, 'granian', 'granian WSGI ' + ', '.join(f'{k}={v}' for k, v in kw.items())


def run_serve(name, port, app_kwargs, granian_access_log=None):
    runner, kwargs, _, _ = lookup_candidate(name)
    if granian_access_log:
        kwargs = dict(kwargs, granian_access_log=granian_access_log)
    runner(port, app_kwargs, **kwargs)


# --------------------------------------------------------------------------
# Harness (parent process)
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f'/proc/{pid}/stat') as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(')', 1)[1].split()[19]


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, starttime) of all live descendants of root, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            st = _proc_start_time(child)
            if st is not None:
                out.append((child, st))
                todo.append(child)
    return out


class Managed:
    """A server process we started; stopped by its PID (and its recorded descendants)."""

    def __init__(self, argv, log_path, env=None, stop_signal=signal.SIGTERM):
        self.log_path = log_path
        self.stop_signal = stop_signal
        self._log = open(log_path, 'wb')
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        desc = _descendants(self.proc.pid)
        if self.alive():
            os.kill(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        for pid, st in desc:
            while _proc_start_time(pid) == st and time.monotonic() < deadline:
                time.sleep(0.05)
            if _proc_start_time(pid) == st:  # same process still there: ours, kill it
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()

    def tail(self, n=15):
        try:
            with open(self.log_path, errors='replace') as f:
                return ''.join(f.readlines()[-n:])
        except OSError:
            return ''


def http_get(port, path, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        conn.request('GET', path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader('Content-Type') or '', resp.read().decode('utf-8', 'replace')
    finally:
        conn.close()


def wait_ready(port, proc: Managed, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        try:
            status, _, _ = http_get(port, LEAF_PATH, timeout=1.0)
            if status in (200, 404):
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def keepalive_check(port, body):
    """Three requests on one connection: each must resolve to the 127.0.0.1 instance.

    A server may close the connection instead of keeping it alive (then we
    reconnect, like any client would); what must never happen is a wrong
    answer on a reused connection.
    """
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
    answers, reconnects = [], 0
    try:
        for _ in range(3):
            for attempt in range(2):
                try:
                    conn.request('GET', LEAF_PATH)
                    resp = conn.getresponse()
                    answers.append((resp.status, resp.read().decode('utf-8', 'replace')))
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    reconnects += 1
                    if attempt:
                        raise
    except (OSError, http.client.HTTPException) as exc:
        answers.append(('error', repr(exc)))
    finally:
        conn.close()
    ok = len(answers) == 3 and all(a == (200, body) for a in answers)
    return ok, {'answers': answers, 'reconnects': reconnects}


def sanity_checks(port, body, is_nginx=False):
    checks = {}
    checks['keepalive_ok'], ka = keepalive_check(port, body)
    checks['keepalive_reconnects'] = ka['reconnects']
    if not checks['keepalive_ok']:
        checks['keepalive_answers'] = ka['answers']
    status, ctype, text = http_get(port, LEAF_PATH)
    checks['leaf_status'] = status
    checks['leaf_body_ok'] = text == body
    checks['no_trailing_newline'] = not text.endswith('\n')
    checks['content_type'] = ctype
    if not is_nginx:
        checks['unknown_leaf_status'] = http_get(port, '/latest/meta-data/no-such-leaf')[0]
        checks['remote_addr'] = http_get(port, '/_bench/remote-addr')[2]
        # a forged header must not change the lookup
        checks['remote_addr_with_xff'] = http_get(
            port, '/_bench/remote-addr', headers={'X-Forwarded-For': '10.0.0.5'}
        )[2]
        st_xff, _, text_xff = http_get(port, LEAF_PATH, headers={'X-Forwarded-For': '10.0.0.5'})
        checks['xff_ignored'] = st_xff == 200 and text_xff == body
    checks['ok'] = (
        status == 200
        and checks['leaf_body_ok']
        and checks['no_trailing_newline']
        and ctype.startswith('text/plain')
        and checks['keepalive_ok']
        and (is_nginx or (checks['remote_addr'] == '127.0.0.1' and checks['xff_ignored']))
    )
    return checks


_UNIT = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60_000.0, 'h': 3_600_000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r'([\d.]+)(us|ms|s|m|h)', value.strip())
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict:
    res = {}
    m = re.search(r'Requests/sec:\s+([\d.]+)', out)
    res['rps'] = float(m.group(1)) if m else 0.0
    for pct in ('50', '75', '90', '99'):
        m = re.search(rf'^\s+{pct}%\s+(\S+)', out, re.M)
        res[f'p{pct}_ms'] = _ms(m.group(1)) if m else None
    m = re.search(r'(\d+) requests in ([\d.]+\w+)', out)
    res['requests'] = int(m.group(1)) if m else 0
    m = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
    res['socket_errors'] = dict(zip(('connect', 'read', 'write', 'timeout'), map(int, m.groups()))) if m else {}
    m = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
    res['non_2xx'] = int(m.group(1)) if m else 0
    return res


def run_wrk(port, duration, threads, connections, warmup):
    url = f'http://127.0.0.1:{port}{LEAF_PATH}'
    if warmup > 0:
        subprocess.run(
            ['wrk', f'-t{threads}', f'-c{connections}', f'-d{warmup}s', url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    argv = ['wrk', f'-t{threads}', f'-c{connections}', f'-d{duration}s', '--latency', url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False).stdout
    res = parse_wrk(out)
    res['wrk_cmd'] = ' '.join(argv[:-1]) + f' http://127.0.0.1:PORT{LEAF_PATH}'
    return res, out


class SlowClients:
    """Half of them connect and send nothing; the other half send an incomplete request."""

    PARTIAL = f'GET {LEAF_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow'.encode()

    def __init__(self, port, n):
        self.socks = []
        self.connect_errors = 0
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(('127.0.0.1', port))
                if i % 2:
                    s.sendall(self.PARTIAL)
            except OSError:
                self.connect_errors += 1
                s.close()
                continue
            self.socks.append(s)

    def still_open(self):
        n_open = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                data = s.recv(1, socket.MSG_PEEK)
                n_open += 0 if data == b'' else 1  # b'' = closed by server; data = error response
            except BlockingIOError:
                n_open += 1
            except OSError:
                pass
        return n_open

    def close(self):
        for s in self.socks:
            s.close()


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    types {{ }}
    default_type text/plain;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        location / {{ }}
    }}
}}
"""


def start_nginx(workdir, body):
    d = tempfile.mkdtemp(prefix='nginx-', dir=workdir)
    os.chmod(d, 0o755)  # nginx workers may run as an unprivileged user
    leaf = os.path.join(d, 'www', LEAF_PATH.lstrip('/'))
    os.makedirs(os.path.dirname(leaf))
    with open(leaf, 'w') as f:
        f.write(body)
    for root, dirs, files in os.walk(os.path.join(d, 'www')):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
        for x in files:
            os.chmod(os.path.join(root, x), 0o644)
    port = free_port()
    conf = os.path.join(d, 'nginx.conf')
    with open(conf, 'w') as f:
        f.write(NGINX_CONF.format(d=d, port=port))
    proc = Managed(
        ['nginx', '-p', d, '-e', os.path.join(d, 'error.log'), '-c', conf],
        os.path.join(d, 'stdout.log'),
        stop_signal=signal.SIGQUIT,
    )
    return proc, port


def start_candidate(name, workdir, n_instances, access_log=None, granian_access_log=None):
    port = free_port()
    log = os.path.join(workdir, f'{name}{"-log" if access_log or granian_access_log else ""}.out')
    if name.startswith('uwsgi'):
        _, kw, _, _ = CANDIDATES[name]
        uwsgi = os.path.join(os.path.dirname(sys.executable), 'uwsgi')
        if not os.path.exists(uwsgi):
            uwsgi = shutil.which('uwsgi')
        env = dict(os.environ, BENCH_INSTANCES=str(n_instances))
        if access_log:
            env['BENCH_ACCESS_LOG'] = access_log
        argv = [
            uwsgi,
            # --http11-socket would keep connections alive, but uWSGI 2.0.31 then
            # passes REMOTE_ADDR=0.0.0.0 for the 2nd+ request on a connection.
            '--http-socket', f'127.0.0.1:{port}',
            '--wsgi-file', os.path.join(HERE, '_wsgi_target.py'),
            '--callable', 'application',
            '--home', sys.prefix,
            '--master',
            '--processes', str(kw['processes']),
            '--threads', str(kw['threads']),
            '--lazy-apps',
            '--need-app',
            '--die-on-term',
            '--disable-logging',
        ]
        return Managed(argv, log, env=env, stop_signal=signal.SIGTERM), port
    argv = [sys.executable, os.path.abspath(__file__), '--serve', name, '--port', str(port), '--instances', str(n_instances)]
    if access_log:
        argv += ['--access-log', access_log]
    if granian_access_log:
        argv += ['--granian-access-log', granian_access_log]
    return Managed(argv, log), port


def candidate_available(name):
    module = lookup_candidate(name)[2]
    if module == 'uwsgi-binary':
        return os.path.exists(os.path.join(os.path.dirname(sys.executable), 'uwsgi')) or bool(shutil.which('uwsgi'))
    import importlib.util

    return importlib.util.find_spec(module) is not None


def measure(label, proc, port, body, args, is_nginx=False, slow_clients=0, duration=None, warmup=None):
    row = {'candidate': label, 'pid': proc.pid}
    if not wait_ready(port, proc):
        row['error'] = 'did not become ready: ' + proc.tail()
        return row
    row['checks'] = sanity_checks(port, body, is_nginx=is_nginx)
    slow = None
    if slow_clients:
        slow = SlowClients(port, slow_clients)
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            st, _, text = http_get(port, LEAF_PATH, timeout=5)
            row['fresh_guest_ok'] = st == 200 and text == body
        except OSError as exc:
            row['fresh_guest_ok'] = False
            row['fresh_guest_error'] = repr(exc)
        row['fresh_guest_ms'] = round((time.monotonic() - t0) * 1000, 2)
    res, raw = run_wrk(
        port, duration or args.duration, args.threads, args.connections, args.warmup if warmup is None else warmup
    )
    row.update(res)
    row['raw_wrk'] = raw
    if slow is not None:
        row['slow_clients'] = len(slow.socks)
        row['slow_clients_open_after'] = slow.still_open()
        slow.close()
    row['server_alive_after'] = proc.alive()
    return row


def aggregate(runs):
    """One row per candidate: the median-req/s run, with the spread of all runs."""
    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if 'error' not in r]
    if not ok:
        return runs[0]
    ordered = sorted(ok, key=lambda r: r['rps'])
    row = dict(ordered[len(ordered) // 2])
    row['rps'] = statistics.median(r['rps'] for r in ok)
    row['p99_ms'] = statistics.median(r['p99_ms'] for r in ok if r.get('p99_ms') is not None)
    row['runs_rps'] = [r['rps'] for r in runs if 'rps' in r]
    row['runs_p99_ms'] = [r.get('p99_ms') for r in runs]
    row['non_2xx'] = sum(r.get('non_2xx', 0) for r in ok)
    row['socket_errors'] = {
        k: sum(r.get('socket_errors', {}).get(k, 0) for r in ok) for k in ('connect', 'read', 'write', 'timeout')
    }
    row['checks'] = dict(row['checks'], ok=all(r['checks']['ok'] for r in ok))
    if 'access_log_lines' in row:
        row['access_log_lines'] = [r.get('access_log_lines') for r in runs]
    row.pop('raw_wrk', None)
    row['raw_wrk_runs'] = [r.get('raw_wrk') for r in runs]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--json', help='write results as JSON to this path')
    ap.add_argument('--instances', type=int, default=DEFAULT_INSTANCES)
    ap.add_argument('--duration', type=int, default=10, help='wrk seconds per measurement')
    ap.add_argument('--warmup', type=int, default=2, help='wrk warm-up seconds')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--connections', type=int, default=64)
    ap.add_argument('--repeat', type=int, default=1, help='clean and logging runs per candidate (median reported)')
    ap.add_argument('--slow-clients', type=int, default=50, help='0 disables the slow-client pass')
    ap.add_argument('--slow-duration', type=int, default=5)
    ap.add_argument('--only', help='comma-separated candidate names')
    ap.add_argument('--no-logging-run', action='store_true')
    ap.add_argument('--keep-workdir', action='store_true')
    # child mode
    ap.add_argument('--serve', help=argparse.SUPPRESS)
    ap.add_argument('--port', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--access-log', help=argparse.SUPPRESS)
    ap.add_argument('--granian-access-log', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve:
        app_kwargs = {'n_instances': args.instances}
        if args.access_log:
            app_kwargs['access_log'] = args.access_log
        run_serve(args.serve, args.port, app_kwargs, granian_access_log=args.granian_access_log)
        return 0

    for tool in ('wrk', 'nginx'):
        if not shutil.which(tool):
            sys.exit(f'{tool} not found on PATH (apt-get install -y nginx-light wrk)')

    names = list(CANDIDATES)
    if args.only:
        names = [n.strip() for n in args.only.split(',') if n.strip()]
        unknown = set()
        for n in names:
            try:
                lookup_candidate(n)
            except KeyError:
                unknown.add(n)
        if unknown:
            sys.exit(f'unknown candidates: {sorted(unknown)}')
    skipped = [n for n in names if not candidate_available(n)]
    names = [n for n in names if n not in skipped]

    body = expected_body()
    workdir = tempfile.mkdtemp(prefix='mdserver-bench-')
    os.chmod(workdir, 0o755)
    versions = {}
    for mod in ('bottle', 'granian', 'waitress', 'cheroot', 'gunicorn', 'gevent', 'pyruvate'):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            pass
    nginx_v = subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run(['wrk', '-v'], capture_output=True, text=True).stdout.splitlines()[:1]
    results = {
        'method': {
            'wrk': f'wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency (after {args.warmup}s warm-up)',
            'repeat': args.repeat,
            'path': LEAF_PATH,
            'body': body,
            'body_bytes': len(body),
            'instances': args.instances,
            'slow_clients': args.slow_clients,
            'slow_duration_s': args.slow_duration,
        },
        'machine': {
            'python': platform.python_version(),
            'platform': platform.platform(),
            'cpus': os.cpu_count(),
            'nginx': nginx_v,
            'wrk': wrk_v[0] if wrk_v else '',
            'versions': versions,
        },
        'skipped': skipped,
        'nginx': [],
        'candidates': [],
        'slow': [],
        'logging': [],
    }

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def run_nginx(tag):
        proc, port = start_nginx(workdir, body)
        try:
            row = measure(f'nginx ({tag})', proc, port, body, args, is_nginx=True)
        finally:
            proc.stop()
        log(f'  {row["candidate"]}: {row.get("rps", 0):.0f} req/s p99 {row.get("p99_ms")} ms')
        results['nginx'].append(row)

    def run_candidate(name, slow=0, access_log=None, granian_access_log=None, label=None):
        proc, port = start_candidate(
            name, workdir, args.instances, access_log=access_log, granian_access_log=granian_access_log
        )
        try:
            row = measure(
                label or name,
                proc,
                port,
                body,
                args,
                slow_clients=slow,
                duration=args.slow_duration if slow else None,
                warmup=1 if slow else None,
            )
        finally:
            proc.stop()
        row['description'] = lookup_candidate(name)[3]
        if 'error' in row:
            log(f'  {row["candidate"]}: ERROR {row["error"][:300]}')
        else:
            errs = sum(row.get('socket_errors', {}).values())
            log(
                f'  {row["candidate"]}: {row["rps"]:.0f} req/s p99 {row["p99_ms"]} ms'
                f' non2xx={row["non_2xx"]} sockerr={errs} checks_ok={row["checks"]["ok"]}'
            )
        return row

    log(f'workdir {workdir}; candidates: {names}; skipped (not installed): {skipped}')
    t_start = time.monotonic()
    run_nginx('before')
    clean_runs: dict[str, list] = {name: [] for name in names}
    for rnd in range(args.repeat):
        if rnd:
            run_nginx(f'round {rnd + 1}')
        for name in names:
            clean_runs[name].append(run_candidate(name))
    for name in names:
        results['candidates'].append(aggregate(clean_runs[name]))
    if args.slow_clients:
        log(f'slow-client pass: {args.slow_clients} slow clients held open during wrk')
        for name in names:
            results['slow'].append(run_candidate(name, slow=args.slow_clients, label=f'{name} +{args.slow_clients} slow'))

    def clean(row):
        return 'error' not in row and row['checks']['ok'] and row['non_2xx'] == 0 and not any(
            row['socket_errors'].values()
        )

    valid = [r for r in results['candidates'] if clean(r)]
    results['logging'] = []
    if valid and not args.no_logging_run:
        best = max(valid, key=lambda r: r['rps'])
        modes = [('app', 'one logging.info line per request from a WSGI middleware, FileHandler')]
        if best['candidate'].startswith('granian'):
            modes.append(('granian', "granian's own access log (log_access=True) routed to a FileHandler"))
        for mode, what in modes:
            runs = []
            for rnd in range(args.repeat):
                access_log = os.path.join(workdir, f'access-{mode}-{rnd}.log')
                run = run_candidate(
                    best['candidate'],
                    access_log=access_log if mode == 'app' else None,
                    granian_access_log=access_log if mode == 'granian' else None,
                    label=f'{best["candidate"]} +access log ({mode})',
                )
                try:
                    with open(access_log, 'rb') as f:
                        run['access_log_lines'] = sum(1 for _ in f)
                except OSError:
                    run['access_log_lines'] = 0
                runs.append(run)
            row = aggregate(runs)
            row['logging_mode'] = what
            row['without_logging_rps'] = best['rps']
            row['logging_cost_pct'] = (
                round(100 * (1 - row.get('rps', 0) / best['rps']), 1) if best['rps'] else None
            )
            results['logging'].append(row)
    run_nginx('after')
    results['elapsed_s'] = round(time.monotonic() - t_start, 1)

    ref = statistics.mean(r.get('rps', 0) for r in results['nginx'])
    results['reference_rps'] = ref
    results['requirement'] = {'min_ratio': 0.3, 'min_rps': 0.3 * ref}
    all_rows = results['candidates'] + results['slow'] + results['logging']
    for row in results['nginx'] + all_rows:
        row['ratio'] = round(row.get('rps', 0) / ref, 3) if ref else None
        row['meets_0.3x'] = bool(row['ratio'] and row['ratio'] >= 0.3) if row in all_rows else None

    # table
    def fmt(row):
        errs = row.get('socket_errors', {})
        note = []
        if 'error' in row:
            note.append('FAILED to start')
        else:
            if not row['checks']['ok']:
                note.append('CHECKS FAILED')
            if row.get('non_2xx'):
                note.append(f'non2xx={row["non_2xx"]}')
            if any(errs.values()):
                note.append('sockerr=' + ','.join(f'{k}:{v}' for k, v in errs.items() if v))
            if 'fresh_guest_ok' in row:
                note.append(f'fresh guest {"ok" if row["fresh_guest_ok"] else "FAILED"} {row["fresh_guest_ms"]}ms')
                note.append(f'slow open after {row["slow_clients_open_after"]}/{row["slow_clients"]}')
            if 'runs_rps' in row:
                note.append(f'median of {len(row["runs_rps"])}: ' + '/'.join(f'{x:.0f}' for x in row['runs_rps']))
            if 'logging_cost_pct' in row:
                note.append(f'-{row["logging_cost_pct"]}% vs no logging, {row["access_log_lines"]} lines')
        p99 = row.get('p99_ms')
        return (
            f'{row["candidate"]:<38} {row.get("rps", 0):>10.0f} {p99 if p99 is not None else float("nan"):>9.2f}'
            f' {row.get("ratio") or 0:>6.3f}  {"; ".join(note)}'
        )

    head = f'{"candidate":<38} {"req/s":>10} {"p99 ms":>9} {"ratio":>6}  notes'
    lines = [
        f'# {results["method"]["wrk"]}, GET {LEAF_PATH} ({len(body)} B body), {args.instances} instances',
        f'# reference nginx = mean of {len(results["nginx"])} runs = {ref:.0f} req/s; requirement >= 0.3x = {0.3 * ref:.0f} req/s',
        head,
        '-' * len(head),
    ]
    lines += [fmt(r) for r in results['nginx']]
    lines += [fmt(r) for r in results['candidates']]
    lines += [fmt(r) for r in results['logging']]
    if results['slow']:
        lines.append(f'# with {args.slow_clients} slow clients (half silent, half half-sent request), wrk {args.slow_duration}s')
        lines += [fmt(r) for r in results['slow']]
    if skipped:
        lines.append(f'# skipped (not installed): {", ".join(skipped)}')
    table = '\n'.join(lines)
    print(table)
    results['table'] = table

    if args.json:
        text = json.dumps(results, indent=2)
        # no absolute paths of this machine in the saved results
        for path, placeholder in (
            (workdir, '<workdir>'),
            (os.path.dirname(HERE), '<repo>'),
            (sys.prefix, '<venv>'),
            (os.path.expanduser('~'), '~'),
        ):
            if path and len(path) > 1:
                text = text.replace(path, placeholder)
        with open(args.json, 'w') as f:
            f.write(text)
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
