#!/usr/bin/env python3
"""Executable answers to the granian questions in docs/server-choice.md.

Each check starts granian (this script re-executed with ``--child JSON``) on a
free 127.0.0.1 port, pokes it, and stops it by PID.  Only loopback traffic.

    python bench/granian_checks.py [--json out.json] [--only name,name]

Checks:
  api_interface_str   Server(..., interface='wsgi') (plain str) vs Interfaces.WSGI
  loader_fork         serve(target_loader=partial(f, arg=...)) with the default 'fork' start method
  loader_spawn        same with multiprocessing start method 'spawn' (partial vs lambda)
  factory_flag        Server('module:factory', factory=True) -- factory called with no arguments
  hooks               when on_startup/on_shutdown run; is the port accepting at on_startup?
  sighup              SIGHUP respawns workers (new PIDs), re-runs the loader, calls on_reload; wrk during it
  sd_notify           READY=1 sent from an on_startup thread once connect() succeeds
  sigterm             SIGTERM / SIGINT to the main PID; and SIGTERM to the whole group (systemd KillMode=control-group)
  remote_addr         REMOTE_ADDR is the TCP peer (connect from 127.0.0.2), X-Forwarded-For ignored
  slow_timeouts       does header_read_timeout close silent / half-request / idle keep-alive sockets?
  backpressure_cap    are idle connections counted against --backpressure (per worker)?
  keepalive_off       HTTP1Settings(keep_alive=False) -> Connection: close
  backlog             listen backlog as seen by `ss -ltn`
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------


def _can_connect(port):
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect(('127.0.0.1', port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _event(events_path, name, port, **extra):
    rec = {'event': name, 't': time.time(), 'pid': os.getpid(), 'port_accepting': _can_connect(port)}
    rec.update(extra)
    with open(events_path, 'a') as f:
        f.write(json.dumps(rec) + '\n')


def check_app_loader(target, events_path=None, port=None, data_file=None):
    """target_loader: granian calls loader(target) in every worker (fork: not pickled)."""
    version = None
    if data_file:
        with open(data_file) as f:
            version = f.read().strip()
    if events_path:
        _event(events_path, 'loader_called', port, target=target, version=version)

    def app(environ, start_response):
        body = json.dumps(
            {
                'remote_addr': environ.get('REMOTE_ADDR'),
                'remote_port': environ.get('REMOTE_PORT'),
                'xff': environ.get('HTTP_X_FORWARDED_FOR'),
                'pid': os.getpid(),
                'version': version,
            }
        ).encode()
        start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
        return [body]

    return app


def sd_notify(message):
    """Minimal sd_notify(3): one datagram to $NOTIFY_SOCKET (no-op when unset)."""
    addr = os.environ.get('NOTIFY_SOCKET')
    if not addr:
        return False
    if addr.startswith('@'):
        addr = '\0' + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(message.encode())
    return True


def notify_ready_when_listening(server, host, port, timeout=60.0):
    """Register granian hooks that send READY=1 once a worker accepts connections.

    on_startup runs in the main process after the main-process bind (no listen())
    but *before* workers are spawned; the listening sockets are created in the
    workers (SO_REUSEPORT), after the app loader ran.  So poll connect() from a
    thread and notify when it succeeds.
    """
    import threading

    def poll():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            sd_notify('READY=1\nSTATUS=listening on %s:%d' % (host, port))
            return

    server.on_startup(lambda: threading.Thread(target=poll, name='sd-notify', daemon=True).start())
    server.on_reload(lambda: sd_notify('STATUS=respawning workers (SIGHUP)'))
    server.on_shutdown(lambda: sd_notify('STOPPING=1'))


def child(cfg):
    import multiprocessing

    if cfg.get('start_method'):
        multiprocessing.set_start_method(cfg['start_method'], force=True)
    from pathlib import Path

    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    port, events = cfg['port'], cfg['events']
    kwargs = {
        'address': '127.0.0.1',
        'port': port,
        'interface': 'wsgi' if cfg.get('interface_str') else Interfaces.WSGI,
        'workers': cfg.get('workers', 1),
        'http': HTTPModes.http1,
        'log_level': LogLevels.info,
        'log_access': False,
    }
    for key in ('backpressure', 'blocking_threads', 'respawn_interval', 'backlog', 'workers_kill_timeout'):
        if key in cfg:
            kwargs[key] = cfg[key]
    if 'http1' in cfg:
        kwargs['http1_settings'] = HTTP1Settings(**cfg['http1'])
    target = 'mdserver-check'
    if cfg.get('factory_flag'):
        target = 'server_candidates:build_app'
        kwargs['factory'] = True
        kwargs['working_dir'] = Path(HERE)
    server = Server(target, **kwargs)
    server.on_startup(lambda: _event(events, 'on_startup', port))
    server.on_reload(lambda: _event(events, 'on_reload', port))
    server.on_shutdown(lambda: _event(events, 'on_shutdown', port))
    if cfg.get('sd_notify'):
        notify_ready_when_listening(server, '127.0.0.1', port)
    if cfg.get('factory_flag'):
        server.serve()
        return
    if cfg.get('loader') == 'lambda':
        data_file = cfg.get('data_file')
        loader = lambda target: check_app_loader(target, events, port, data_file)  # noqa: E731
    else:
        loader = functools.partial(check_app_loader, events_path=events, port=port, data_file=cfg.get('data_file'))
    server.serve(target_loader=loader)


# --------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start_time(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except OSError:
        return None


def _children(pid):
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        out.append((int(entry), _start_time(int(entry))))
            except (OSError, ValueError, IndexError):
                pass
    return out


class Granian:
    def __init__(self, workdir, env=None, **cfg):
        self.port = free_port()
        self.events = os.path.join(workdir, f'events-{self.port}.jsonl')
        self.log = os.path.join(workdir, f'granian-{self.port}.log')
        cfg.update(port=self.port, events=self.events)
        self._logf = open(self.log, 'wb')
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--child', json.dumps(cfg)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self.pid = self.proc.pid

    def ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                get(self.port, timeout=1)
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def workers(self):
        return sorted(self.children_with_start())

    def children_with_start(self):
        return _children(self.pid)

    def read_events(self):
        try:
            with open(self.events) as f:
                return [json.loads(line) for line in f]
        except OSError:
            return []

    def log_text(self):
        with open(self.log, errors='replace') as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        kids = self.children_with_start()
        rc = self.proc.poll()
        if rc is None:
            os.kill(self.pid, sig)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                rc = self.proc.wait(5)
        time.sleep(0.2)
        for pid, st in kids:  # our own (former) children only, matched by start time
            if st and _start_time(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._logf.close()
        return rc


def get(port, path='/', headers=None, timeout=5, source=None):
    """Minimal HTTP/1.1 GET on a fresh connection; returns (status, headers, body)."""
    s = socket.create_connection(('127.0.0.1', port), timeout=timeout, source_address=(source, 0) if source else None)
    try:
        req = f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n'
        for k, v in (headers or {}).items():
            req += f'{k}: {v}\r\n'
        s.sendall((req + '\r\n').encode())
        data = b''
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, v in (ln.split(':', 1) for ln in lines[1:] if ':' in ln)}
    return status, hdrs, body


def get_json(port, **kw):
    return json.loads(get(port, **kw)[2])


def sock_state(s):
    """'open' (server keeps it), 'closed' (server closed: EOF/reset) or 'data' (server sent bytes)."""
    s.setblocking(False)
    try:
        data = s.recv(1, socket.MSG_PEEK)
        return 'closed' if data == b'' else 'data'
    except BlockingIOError:
        return 'open'
    except OSError:
        return 'closed'


def open_slow(port, kind):
    s = socket.create_connection(('127.0.0.1', port), timeout=2)
    if kind == 'half':
        s.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ')
    elif kind == 'idle_keepalive':
        s.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        time.sleep(0.2)
        s.recv(65536)  # drain the response, keep the connection
    return s


# ---- individual checks -----------------------------------------------------


def chk_api_interface_str(wd):
    out = {}
    for label, cfg in (('interface=Interfaces.WSGI', {}), ("interface='wsgi'", {'interface_str': True})):
        g = Granian(wd, **cfg)
        ok = g.ready(15)
        rc = g.stop()
        err = re.findall(r'^\w*Error.*$', g.log_text(), re.M)
        out[label] = {'served': ok, 'exit': rc, 'error': err[-1] if err else None}
    return out


def chk_loader_fork(wd):
    data = os.path.join(wd, 'data-fork.txt')
    with open(data, 'w') as f:
        f.write('v1')
    g = Granian(wd, workers=2, data_file=data)
    ok = g.ready()
    answers = {get_json(g.port)['pid'] for _ in range(20)} if ok else set()
    loaded = [e for e in g.read_events() if e['event'] == 'loader_called']
    rc = g.stop()
    return {
        'call': 'Server(...).serve(target_loader=functools.partial(check_app_loader, data_file=...))',
        'served': ok,
        'loader_calls': len(loaded),
        'loader_pids_are_workers': all(e['pid'] != g.pid for e in loaded),
        'loader_called_with_target': loaded[0]['target'] if loaded else None,
        'port_accepting_when_loader_ran': [e['port_accepting'] for e in loaded],
        'distinct_worker_pids_answering': len(answers),
        'exit': rc,
    }


def chk_loader_spawn(wd):
    out = {}
    for loader in ('partial', 'lambda'):
        g = Granian(wd, start_method='spawn', loader=loader)
        ok = g.ready(20)
        rc = g.stop()
        errs = re.findall(r'^\S*(?:Pickl|Attribute)\w*Error.*$', g.log_text(), re.M)
        out[loader] = {'served': ok, 'exit': rc, 'error': errs[0][:200] if errs else None}
    return out


def chk_factory_flag(wd):
    g = Granian(wd, factory_flag=True)
    ok = g.ready(30)
    status = get(g.port, '/latest/meta-data/instance-id')[0] if ok else None
    rc = g.stop()
    return {
        'call': "Server('server_candidates:build_app', factory=True, working_dir=Path(bench_dir))",
        'served': ok,
        'leaf_status': status,
        'note': 'factory() is called with no arguments (load_target: rv = rv())',
        'exit': rc,
    }


def chk_hooks(wd):
    g = Granian(wd, workers=2)
    t0 = time.time()
    ok = g.ready()
    t_ready = time.time()
    rc = g.stop()
    ev = g.read_events()
    startup = [e for e in ev if e['event'] == 'on_startup']
    shutdown = [e for e in ev if e['event'] == 'on_shutdown']
    loaders = [e for e in ev if e['event'] == 'loader_called']
    return {
        'served': ok,
        'on_startup_in_main_pid': bool(startup) and startup[0]['pid'] == g.pid,
        'port_accepting_at_on_startup': startup[0]['port_accepting'] if startup else None,
        'on_startup_before_loader_ms': round((loaders[0]['t'] - startup[0]['t']) * 1000, 1)
        if startup and loaders
        else None,
        'first_answer_after_start_ms': round((t_ready - t0) * 1000, 1),
        'on_shutdown_in_main_pid': bool(shutdown) and shutdown[0]['pid'] == g.pid,
        'port_accepting_at_on_shutdown': shutdown[0]['port_accepting'] if shutdown else None,
        'exit': rc,
    }


def chk_sighup(wd):
    data = os.path.join(wd, 'data-hup.txt')
    with open(data, 'w') as f:
        f.write('v1')
    g = Granian(wd, workers=2, respawn_interval=1.0, data_file=data)
    ok = g.ready()
    before = {pid for pid, _ in g.workers()}
    v_before = get_json(g.port)['version']
    with open(data, 'w') as f:
        f.write('v2')
    wrk = None
    if shutil.which('wrk'):
        wrk = subprocess.Popen(
            ['wrk', '-t1', '-c16', '-d6s', f'http://127.0.0.1:{g.port}/'],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1)
    os.kill(g.pid, signal.SIGHUP)
    time.sleep(3.5)
    wrk_out = wrk.communicate(timeout=30)[0] if wrk else ''
    after = {pid for pid, _ in g.workers()}
    versions = {get_json(g.port)['version'] for _ in range(20)}
    main_alive = g.proc.poll() is None
    rc = g.stop()
    ev = g.read_events()
    m = re.search(r'Socket errors: (.*)', wrk_out)
    n = re.search(r'Non-2xx or 3xx responses: (\d+)', wrk_out)
    r = re.search(r'(\d+) requests in', wrk_out)
    return {
        'served': ok,
        'main_pid_unchanged_alive': main_alive,
        'workers_before': len(before),
        'workers_after': len(after),
        'all_workers_replaced': bool(after) and not (before & after),
        'loader_calls': sum(1 for e in ev if e['event'] == 'loader_called'),
        'on_reload_calls': sum(1 for e in ev if e['event'] == 'on_reload'),
        'version_before': v_before,
        'versions_after': sorted(versions),
        'wrk_during_hup': {
            'requests': int(r.group(1)) if r else None,
            'socket_errors': m.group(1) if m else 'none',
            'non_2xx': int(n.group(1)) if n else 0,
        },
        'exit': rc,
    }


def chk_sigterm(wd):
    out = {}
    for label, sig, group in (
        ('SIGTERM main pid', signal.SIGTERM, False),
        ('SIGINT main pid', signal.SIGINT, False),
        ('SIGTERM whole process group (systemd KillMode=control-group)', signal.SIGTERM, True),
    ):
        g = Granian(wd, workers=2)
        ok = g.ready()
        t0 = time.monotonic()
        if group:
            # the group was created by start_new_session for this child: it holds only granian
            os.killpg(g.pid, sig)
            try:
                rc = g.proc.wait(15)
            except subprocess.TimeoutExpired:
                rc = None
            g.stop()
        else:
            rc = g.stop(sig)
        ev = g.read_events()
        log = g.log_text()
        out[label] = {
            'served': ok,
            'exit': rc,
            'seconds': round(time.monotonic() - t0, 2),
            'on_shutdown_called': any(e['event'] == 'on_shutdown' for e in ev),
            'unexpected_worker_exit_logged': 'Unexpected exit from worker' in log,
        }
    return out


def chk_sd_notify(wd):
    path = os.path.join(wd, 'notify.sock')
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(20)
    g = Granian(wd, env=dict(os.environ, NOTIFY_SOCKET=path), workers=2, sd_notify=True)
    t0 = time.monotonic()
    res = {'call': 'notify_ready_when_listening(server, host, port) before server.serve(...)'}
    try:
        msg = rx.recv(4096).decode()
        res['first_message'] = msg
        res['ms_after_start'] = round((time.monotonic() - t0) * 1000, 1)
        res['port_accepting_when_ready_received'] = _can_connect(g.port)
    except OSError as exc:
        res['error'] = repr(exc)
    g.stop()
    try:
        rx.settimeout(1)
        res['on_shutdown_message'] = rx.recv(4096).decode()
    except OSError:
        res['on_shutdown_message'] = None
    rx.close()
    return res


def chk_remote_addr(wd):
    g = Granian(wd)
    ok = g.ready()
    res = {'served': ok}
    if ok:
        res['from_127.0.0.1'] = get_json(g.port)
        try:
            res['from_127.0.0.2'] = get_json(g.port, source='127.0.0.2')
        except OSError as exc:
            res['from_127.0.0.2'] = repr(exc)
        res['with_xff_header'] = get_json(g.port, headers={'X-Forwarded-For': '10.1.2.3'})
        s = socket.create_connection(('127.0.0.1', g.port), source_address=('127.0.0.3', 0))
        replies = []
        for _ in range(2):
            s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            time.sleep(0.2)
            replies.append(json.loads(s.recv(65536).partition(b'\r\n\r\n')[2])['remote_addr'])
        s.close()
        res['keepalive_reused_connection_from_127.0.0.3'] = replies
    res['exit'] = g.stop()
    return res


def chk_slow_timeouts(wd):
    out = {}
    for label, http1, wait in (
        ('header_read_timeout=2000ms', {'header_read_timeout': 2000}, 4.0),
        ('default (header_read_timeout=30000ms)', None, 4.0),
    ):
        cfg = {'http1': http1} if http1 else {}
        g = Granian(wd, **cfg)
        ok = g.ready()
        socks = {kind: open_slow(g.port, kind) for kind in ('silent', 'half', 'idle_keepalive')}
        time.sleep(wait)
        states = {kind: sock_state(s) for kind, s in socks.items()}
        for s in socks.values():
            s.close()
        out[label] = {'served': ok, f'after_{wait}s': states}
        g.stop()
    return out


def chk_backpressure_cap(wd):
    out = {}
    for label, cfg, n_idle in (
        ('backpressure=32, 1 worker, 40 idle sockets', {'backpressure': 32, 'blocking_threads': 2}, 40),
        ('backpressure=32, 1 worker, 20 idle sockets', {'backpressure': 32, 'blocking_threads': 2}, 20),
        ('default (backpressure=1024), 1 worker, 1100 idle sockets', {'blocking_threads': 2}, 1100),
        ('backpressure=4096, 1 worker, 1100 idle sockets', {'backpressure': 4096, 'blocking_threads': 2}, 1100),
    ):
        g = Granian(wd, **cfg)
        ok = g.ready()
        idle = []
        for i in range(n_idle):
            try:
                idle.append(open_slow(g.port, 'silent' if i % 2 else 'half'))
            except OSError:
                break
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            status = get(g.port, timeout=3)[0]
        except OSError as exc:
            status = f'no answer within 3s ({exc.__class__.__name__})'
        res = {
            'served': ok,
            'idle_opened': len(idle),
            'fresh_request': status,
            'fresh_request_ms': round((time.monotonic() - t0) * 1000, 1),
        }
        for s in idle[: len(idle) // 2]:
            s.close()
        time.sleep(0.5)
        try:
            res['fresh_request_after_closing_half'] = get(g.port, timeout=3)[0]
        except OSError as exc:
            res['fresh_request_after_closing_half'] = f'no answer ({exc.__class__.__name__})'
        for s in idle:
            s.close()
        g.stop()
        out[label] = res
    return out


def chk_keepalive_off(wd):
    out = {}
    for label, http1 in (('default', None), ('HTTP1Settings(keep_alive=False)', {'keep_alive': False})):
        g = Granian(wd, **({'http1': http1} if http1 else {}))
        g.ready()
        s = socket.create_connection(('127.0.0.1', g.port), timeout=3)
        s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        time.sleep(0.3)
        head = s.recv(65536).partition(b'\r\n\r\n')[0].decode('latin-1')
        time.sleep(0.2)
        out[label] = {
            'connection_header': (re.search(r'(?im)^connection:[ \t]*([^\r\n]*)', head) or [None, None])[1],
            'socket_after_response': sock_state(s),
        }
        s.close()
        g.stop()
    return out


def chk_backlog(wd):
    out = {}
    somaxconn = open('/proc/sys/net/core/somaxconn').read().strip()
    for backlog in (1024, 8192):
        g = Granian(wd, backlog=backlog, workers=2)
        g.ready()
        time.sleep(1.0)  # let the second worker bind too
        t_stop = None
        ss = subprocess.run(['ss', '-ltnH', f'sport = :{g.port}'], capture_output=True, text=True).stdout
        out[f'backlog={backlog}'] = {
            'listen_sockets': len(ss.strip().splitlines()),
            'ss_send_q': [ln.split()[2] for ln in ss.strip().splitlines()],
        }
        t_stop = time.monotonic()
        g.stop()
        out[f'backlog={backlog}']['stop_seconds'] = round(time.monotonic() - t_stop, 2)
    out['net.core.somaxconn'] = somaxconn
    return out


CHECKS = {
    'api_interface_str': chk_api_interface_str,
    'loader_fork': chk_loader_fork,
    'loader_spawn': chk_loader_spawn,
    'factory_flag': chk_factory_flag,
    'hooks': chk_hooks,
    'sighup': chk_sighup,
    'sigterm': chk_sigterm,
    'sd_notify': chk_sd_notify,
    'remote_addr': chk_remote_addr,
    'slow_timeouts': chk_slow_timeouts,
    'backpressure_cap': chk_backpressure_cap,
    'keepalive_off': chk_keepalive_off,
    'backlog': chk_backlog,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--json')
    ap.add_argument('--only')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    names = args.only.split(',') if args.only else list(CHECKS)
    wd = tempfile.mkdtemp(prefix='granian-checks-')
    results = {}
    try:
        import granian

        results['granian_version'] = granian.__version__
        for name in names:
            t0 = time.monotonic()
            try:
                results[name] = CHECKS[name](wd)
            except Exception as exc:  # keep going; report the failure
                results[name] = {'check_failed': repr(exc)}
            print(f'== {name} ({time.monotonic() - t0:.1f}s)', file=sys.stderr, flush=True)
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())
