"""IMDSv2 session tokens: HMAC-signed and self-expiring, bound to one guest address."""

import base64
import hashlib
import hmac
import os
import time
from typing import Callable, Optional

from mdserver.errors import BadRequest, Unauthorized
from mdserver.fsutil import atomic_write, make_dir

MAX_TTL = 21600
KEY_BYTES = 32


def parse_ttl(header: Optional[str]) -> int:
    """The TTL a PUT asks for, as AWS accepts it (1..21600 seconds)."""
    if header is None:
        raise BadRequest("missing X-aws-ec2-metadata-token-ttl-seconds")
    try:
        ttl = int(header.strip())
    except ValueError:
        raise BadRequest("X-aws-ec2-metadata-token-ttl-seconds is not a number") from None
    if not 1 <= ttl <= MAX_TTL:
        raise BadRequest(f"X-aws-ec2-metadata-token-ttl-seconds must be 1..{MAX_TTL}")
    return ttl


class TokenSigner:
    """Issues and checks tokens; no table: the token carries its own expiry."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time):
        if len(key) < 16:
            raise ValueError("token key too short")
        self._key = key
        self._clock = clock

    def _sign(self, expiry: int, ip: str) -> str:
        mac = hmac.new(self._key, f"{expiry}|{ip}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, ip: str, ttl: int) -> str:
        expiry = int(self._clock()) + ttl
        return f"{expiry}.{self._sign(expiry, ip)}"

    def remaining(self, token: str, ip: str) -> int:
        """Seconds the token has left, or Unauthorized if it is not valid for `ip`."""
        expiry_text, _, signature = token.strip().partition(".")
        # ASCII digits only: isdigit() also takes superscripts, which int() refuses.
        if not (expiry_text.isascii() and expiry_text.isdigit()) or len(expiry_text) > 12:
            raise Unauthorized("malformed token")
        expiry = int(expiry_text)
        if not hmac.compare_digest(signature.encode(), self._sign(expiry, ip).encode()):
            raise Unauthorized("invalid token")
        left = expiry - int(self._clock())
        if left <= 0:
            raise Unauthorized("expired token")
        return left


def read_key(path: str) -> Optional[bytes]:
    """The key at `path`, None if there is none (or a short one); OSError
    if it cannot be read."""
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        return None
    return key if len(key) >= KEY_BYTES else None


def load_or_create_key(path: str) -> bytes:
    """The signing key kept at `path` (created 0600 on first use), so tokens
    stay valid across restarts for exactly their TTL."""
    key = read_key(path)
    if key is not None:
        return key
    make_dir(os.path.dirname(os.path.abspath(path)))
    key = os.urandom(KEY_BYTES)
    atomic_write(path, key, 0o600)
    return key
