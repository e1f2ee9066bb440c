"""Bottle apps: the guest-facing metadata app. The only module that imports bottle's app side."""

import functools
import json
import logging
from typing import Callable, Collection, Dict, Iterable, Optional, Tuple

from bottle import Bottle, HTTPError, HTTPResponse, request, response

from mdserver import logs
from mdserver.errors import (BadRequest, Conflict, DaemonUnavailable, Forbidden,
                             ForeignSender, MdserverError, NotFound, PayloadTooLarge,
                             PoolExhausted, StoreConflict, StoreFull, StoreLocked,
                             StoreUnavailable, TemplateError, Unauthorized, UnknownGuest)
from mdserver.domainxml import MAX_XML_BYTES
from mdserver.faces import Reply, ec2, nocloud, openstack
from mdserver.metrics import EnrollReports, classify, parse_enroll_report
from mdserver.registry import Registry, record_json
from mdserver.service import MetadataService

log = logging.getLogger(__name__)
access = logging.getLogger("mdserver.access")

TEXT = "text/plain"
STATUS = (  # most specific first
    (NotFound, 404), (Unauthorized, 401), (Forbidden, 403), (PayloadTooLarge, 413),
    (Conflict, 409), (StoreConflict, 409), (BadRequest, 400),
    (PoolExhausted, 503), (StoreLocked, 503), (StoreUnavailable, 503), (DaemonUnavailable, 503), (TemplateError, 500),
    (StoreFull, 507),  # Insufficient Storage: nothing written until space is freed
)
TOKEN_HEADER = "HTTP_X_AWS_EC2_METADATA_TOKEN"
TTL_HEADER = "HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS"
# A counted event of the guest app: (name, label), see metrics.WorkerMetrics.event.
Events = Callable[[str, str], None]


def _no_events(name: str, label: str = "") -> None:
    pass


def request_fields(env: dict, status: int) -> dict:
    """The stable log fields of a guest request (logs.fields)."""
    path = env.get("PATH_INFO") or ""
    face, kind = classify(path)
    return logs.fields(ip=env.get("REMOTE_ADDR"), face=face, kind=kind,
                       method=env.get("REQUEST_METHOD"), path=path, status=status)


def status_of(error: MdserverError) -> int:
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    return 500


def error_response(error: MdserverError) -> HTTPResponse:
    """One plain-text line for the guest, one log line for the admin."""
    status = status_of(error)
    env = request.environ
    level = logging.ERROR if status >= 500 else logging.INFO
    if not getattr(error, "logged", False):  # else logged (rate-limited) where detected
        log.log(level, "%d %s %s from %s: %s", status, env.get("REQUEST_METHOD"),
                env.get("PATH_INFO"), env.get("REMOTE_ADDR"), error,
                extra=request_fields(env, status))
    # Server-side failures stay in the log: the guest learns only their kind.
    if status < 500 or status in (503, 507):
        reason = str(error)
    else:
        reason = "template error" if isinstance(error, TemplateError) else "internal error"
    return HTTPResponse(f"{reason}\n", status, {"Content-Type": TEXT})


def _plain_error(res: HTTPError) -> str:
    # Bottle's own 404/405 pages are HTML; guests get one plain line.
    response.set_header("Content-Type", TEXT)
    if res.status_code >= 500:
        log.error("%s %s: %s", request.method, request.path, res.exception or res.body)
        return "internal error\n"
    return f"{res.status_line.split(' ', 1)[1]}\n"


def read_body(environ: dict, limit: int = MAX_XML_BYTES) -> bytes:
    """The request body, or PayloadTooLarge past `limit` (checked before reading it all);
    BadRequest if it stops short of its Content-Length or does not come in time.
    (The listeners read what a rejected body leaves, so the 413 reaches the client.)"""
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        raise BadRequest("bad Content-Length") from None
    if length > limit:
        raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
    try:
        data = environ["wsgi.input"].read(limit + 1 if length < 0 else length)
    except OSError as e:  # the listener's deadline for the body, or the client left
        raise BadRequest(f"request body incomplete: {e}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    if 0 <= length != len(data):
        raise BadRequest(f"request body ended after {len(data)} of {length} bytes")
    return data


Relay = Callable[[bytes], Tuple[int, bytes]]
PasswordRelay = Callable[[str, bytes], Tuple[int, bytes]]  # (uuid, blob) -> (status, body)


def errors_to_status(events: Events = _no_events) -> Callable:
    """Bottle plugin: an MdserverError raised by a route becomes its status
    and one log line (error_response), so no route needs a try/except; the
    errors that are counted are told to `events` here, once per answer (the
    fast path hands every error to the app)."""

    def plugin(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except MdserverError as e:
                _count_error(events, e)
                return error_response(e)
        return wrapper

    return plugin


def _count_error(events: Events, error: MdserverError) -> None:
    if isinstance(error, UnknownGuest):
        events("unknown_guest", "")
    elif isinstance(error, ForeignSender):
        events("refused_identity", "")
    elif isinstance(error, Unauthorized):
        events("token_failure", "check")


def _reply(reply: Reply, headers: Optional[Dict[str, str]] = None) -> HTTPResponse:
    return HTTPResponse(reply.body, 200, {"Content-Type": reply.content_type, **(headers or {})})


def metadata_app(service: MetadataService, access_log: bool = False,
                 upload: Optional[Relay] = None,
                 host_addresses: Collection[str] = (),
                 password: Optional[PasswordRelay] = None,
                 events: Events = _no_events) -> Callable:
    """The WSGI app guests talk to, identified by their TCP source address only.

    One route set per face: OpenStack under /openstack, NoCloud under
    /nocloud, EC2 everywhere else (its IMDSv2 token checks wrap its routes
    only). POST /instance-upload (md_server's registration URL) is accepted
    from `host_addresses` only and handed to `upload` (the main process's
    registry); a guest's POST of its password goes to `password`. Unknown
    guests, refused identities and tokens are counted through `events`.
    """
    app = Bottle(catchall=True)
    app.default_error_handler = _plain_error
    app.install(errors_to_status(events))

    def guest_ip() -> str:
        return request.environ["REMOTE_ADDR"]  # never X-Forwarded-For: a guest could claim any identity

    @app.post("/instance-upload")
    def instance_upload():
        env = request.environ
        if env["REMOTE_ADDR"] not in host_addresses or upload is None:
            raise Forbidden("registration is accepted from this host only")
        status, data = upload(read_body(env))
        ctype = "application/json" if status == 200 else TEXT
        return HTTPResponse(data, status, {"Content-Type": ctype})

    def mount(face) -> None:
        """GET /<face>, /<face>/ and /<face>/<path>, answered by `face`."""
        def get(path=""):
            return _reply(service.answer(face, guest_ip(), path))
        root = "/" + face.NAME
        for rule in (root, root + "/", root + "/<path:path>"):
            app.get(rule, callback=get)

    # -- OpenStack and NoCloud: plain GETs, plus the guest's password ------------
    mount(openstack)
    mount(nocloud)

    @app.post("/openstack/<version>/password")
    def openstack_password(version):
        if not openstack.takes_password(version):
            raise NotFound(f"no password at version {version!r}")
        inst = service.guest(guest_ip())
        body = read_body(request.environ, openstack.PASSWORD_MAX)
        if password is None:
            raise Forbidden("passwords cannot be stored here")
        status, data = password(inst.uuid, body)
        # The record the admin socket answers with is not the guest's business.
        return HTTPResponse(b"" if status == 200 else data, status, {"Content-Type": TEXT})

    # -- EC2 -------------------------------------------------------------------
    @app.get("/")
    def versions():
        return HTTPResponse(ec2.VERSION_LISTING, 200, {"Content-Type": TEXT})

    @app.put("/<version>/api/token")
    def token(version):
        env = request.environ
        try:
            value, ttl = service.issue_token(env["REMOTE_ADDR"], version, env.get(TTL_HEADER),
                                             forwarded="HTTP_X_FORWARDED_FOR" in env)
        except MdserverError:
            events("token_failure", "issue")
            raise
        events("token_issued", "")
        return HTTPResponse(value, 200, {"Content-Type": TEXT,
                                         "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": str(ttl)})

    @app.get("/<version>/api/token")
    def token_get(version):
        return HTTPResponse("Method Not Allowed\n", 405, {"Allow": "PUT", "Content-Type": TEXT})

    @app.get("/<version>")
    @app.get("/<version>/")
    @app.get("/<version>/<path:path>")
    def ec2_get(version, path=""):
        ip = guest_ip()
        left = service.check_token(ip, request.environ.get(TOKEN_HEADER))
        reply = service.answer(ec2, ip, f"{version}/{path}")
        headers = {} if left is None else {"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": str(left)}
        return _reply(reply, headers)

    return with_access_log(app) if access_log else app


def admin_app(registry: Registry, scrape: Optional[Callable[[], Tuple[bytes, str]]] = None,
              enroll: Optional[EnrollReports] = None) -> Callable:
    """Registration and administration, served on the admin Unix socket only;
    the daemon's metrics (`scrape`) at GET /metrics, the enroller's pushed
    counts into `enroll` at POST /metrics/enroll."""
    app = Bottle(catchall=True)
    app.default_error_handler = _plain_error
    app.install(errors_to_status())

    def reply(body) -> HTTPResponse:
        return HTTPResponse(json.dumps(body, indent=1) + "\n", 200,
                            {"Content-Type": "application/json"})

    @app.post("/instance-upload")
    def upload():
        # ?pending=1: the definition of a running domain (see Registry.register)
        pending = request.query.get("pending") == "1"
        return reply(registry.describe(registry.register(read_body(request.environ),
                                                         pending=pending)))

    @app.get("/instances")
    def list_():
        return reply([registry.describe(i) for i in registry.list()])

    @app.get("/instances/<key>")
    def show(key):
        return reply(registry.describe(registry.find(key)))

    @app.delete("/instances/<key>")
    def remove(key):
        # ?any_host=1: also another host's instance (mdserverctl remove --any-host)
        any_host = request.query.get("any_host") == "1"
        return reply(record_json(registry.remove(key, any_host=any_host)))

    @app.get("/store")
    def store_status():
        return reply(registry.store.status())

    @app.get("/instances/<key>/password")
    def password_get(key):
        return reply({"password": registry.find(key).password_blob})

    @app.post("/instances/<key>/password")
    def password_set(key):
        body = read_body(request.environ, openstack.PASSWORD_MAX)
        return reply(record_json(registry.set_password_blob(key, body)))

    @app.delete("/instances/<key>/password")
    def password_clear(key):
        return reply(record_json(registry.clear_password_blob(key)))

    @app.get("/metrics")
    def metrics_get():
        if scrape is None:
            raise NotFound("no metrics here")
        body, ctype = scrape()
        return HTTPResponse(body, 200, {"Content-Type": ctype})

    @app.post("/metrics/enroll")
    def metrics_enroll():
        if enroll is None:
            raise NotFound("no metrics here")
        try:
            report = parse_enroll_report(json.loads(read_body(request.environ, 4096)))
        except ValueError as e:  # JSONDecodeError is one
            raise BadRequest(f"enroller report: {e}") from None
        enroll.receive(report)
        return reply({"received": True})

    return app


def with_access_log(app: Callable) -> Callable:
    """One info line per request: who, what, status, whether a token came with it.
    Never the token itself or any body."""

    def logged(environ: dict, start_response: Callable) -> Iterable[bytes]:
        seen = []

        def capture(status, headers, exc_info=None):
            seen.append(status)
            return start_response(status, headers, exc_info)

        result = app(environ, capture)
        status = seen[0].split(" ", 1)[0] if seen else "-"
        access.info("%s %s %s %s token=%s", environ.get("REMOTE_ADDR"),
                    environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), status,
                    "yes" if TOKEN_HEADER in environ else "no",
                    extra=request_fields(environ, int(status) if status.isdigit() else 0))
        return result

    return logged
