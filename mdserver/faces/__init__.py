"""The faces: one pure module per metadata format, all reading one InstanceView.

Each face module has NAME, `lookup(view, path) -> Reply | None` (path is
relative to the face's root, no leading slash; None means 404) and
`files(view) -> [(path, bytes)]` for a seed image. No HTTP in them.
"""

import logging
from typing import NamedTuple, Optional

from mdserver.errors import TemplateError

log = logging.getLogger(__name__)

TEXT = "text/plain"
JSON = "application/json"
BINARY = "application/octet-stream"


class Reply(NamedTuple):
    body: bytes
    content_type: str = TEXT
    # False: made per request (user-data: templates change on disk).
    cacheable: bool = True


def text(body: str, content_type: str = TEXT, cacheable: bool = True) -> Reply:
    return Reply(body.encode("utf-8"), content_type, cacheable)


def user_data_or_none(view, face: str) -> Optional[str]:
    """The rendered user-data, or None (and one error line) if the template
    fails: where a failing file would throw away the guest's whole datasource,
    the guest is better off with keys and hostname and no user-data."""
    try:
        return view.user_data()
    except TemplateError as e:
        log.error("%s: %s user-data left out: %s", view.name, face, e)
        return None
