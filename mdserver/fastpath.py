"""The hot GET paths without the framework: a face's reply straight from the service; anything unusual goes to the Bottle app."""

from typing import List, Optional, Tuple

from mdserver.errors import MdserverError
from mdserver.faces import ec2, nocloud, openstack
from mdserver.service import MetadataService

Headers = List[Tuple[str, str]]
Answer = Tuple[int, Headers, bytes]

TTL_HEADER = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
_MOUNTED = {openstack.NAME: openstack, nocloud.NAME: nocloud}


class FastPath:
    """Answers what a crawl asks most: a GET (or HEAD) of a face's file.

    It routes as metadata_app's rules do (`/openstack[/...]`,
    `/nocloud[/...]`, else EC2's `/<version>[/<path>]`) and calls the same
    service, so the answer is the app's own; it only skips building the
    environ, the framework's routing and its response object (measured:
    most of a request's time). Everything else returns None and goes to the
    app: other methods, `/`, and every error (GET of the token path is
    one: the face has no such file), so that error
    answers and their log lines have one source. (A repeated token header:
    the first is checked here, where the app would check them joined; either
    way only a valid token for the sender's address passes.)
    """

    def __init__(self, service: MetadataService):
        self.service = service

    def __call__(self, method: str, path: str, remote: str, token: Optional[str]) -> \
            Optional[Answer]:
        if method != "GET" and method != "HEAD" or path[:1] != "/":
            return None
        first, _, rest = path[1:].partition("/")
        if not first:
            return None  # "/" (the version listing) or an empty segment
        face = _MOUNTED.get(first)
        try:
            if face is not None:
                reply = self.service.answer(face, remote, rest)
                extra: Headers = []
            else:
                left = self.service.check_token(remote, token)
                reply = self.service.answer(ec2, remote, f"{first}/{rest}")
                extra = [] if left is None else [(TTL_HEADER, str(left))]
        except MdserverError:
            return None
        return 200, [("Content-Type", reply.content_type),
                     ("Content-Length", str(len(reply.body)))] + extra, reply.body
