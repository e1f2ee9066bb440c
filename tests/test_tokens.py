"""IMDSv2 tokens: TTL rules, binding to one guest, expiry, no table."""

import os

import pytest

from mdserver import tokens
from mdserver.errors import BadRequest, Unauthorized

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.mark.parametrize("header, ttl", [("1", 1), ("21600", 21600), (" 300 ", 300)])
def test_ttl_accepted(header, ttl):
    assert tokens.parse_ttl(header) == ttl


@pytest.mark.parametrize("header", [None, "0", "21601", "-5", "abc", "", "1.5"])
def test_ttl_refused(header):
    with pytest.raises(BadRequest):
        tokens.parse_ttl(header)


def test_token_valid_for_its_guest_until_ttl():
    clock = Clock()
    signer = tokens.TokenSigner(b"k" * 32, clock)
    token = signer.issue("10.122.0.2", 60)
    assert "\n" not in token and token
    assert signer.remaining(token, "10.122.0.2") == 60
    clock.t += 59
    assert signer.remaining(token, "10.122.0.2") == 1
    clock.t += 1
    with pytest.raises(Unauthorized, match="expired"):
        signer.remaining(token, "10.122.0.2")


def test_token_is_bound_to_the_guest_and_the_key():
    signer = tokens.TokenSigner(b"k" * 32, Clock())
    token = signer.issue("10.122.0.2", 60)
    with pytest.raises(Unauthorized):
        signer.remaining(token, "10.122.0.3")
    with pytest.raises(Unauthorized):
        tokens.TokenSigner(b"x" * 32, Clock()).remaining(token, "10.122.0.2")


@pytest.mark.parametrize("bad", ["", "garbage", "123", "123.", ".abc",
                                 "99999999999999.abc", "１２３.abc"])
def test_malformed_tokens(bad):
    with pytest.raises(Unauthorized):
        tokens.TokenSigner(b"k" * 32, Clock()).remaining(bad, "10.122.0.2")


def test_forged_expiry_is_refused():
    clock = Clock()
    signer = tokens.TokenSigner(b"k" * 32, clock)
    expiry, sig = signer.issue("10.122.0.2", 1).split(".")
    with pytest.raises(Unauthorized):
        signer.remaining(f"{int(expiry) + 1000}.{sig}", "10.122.0.2")


def test_key_file_created_private_and_reused(tmp_path):
    path = str(tmp_path / "sub" / "key")
    key = tokens.load_or_create_key(path)
    assert len(key) == tokens.KEY_BYTES
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert tokens.load_or_create_key(path) == key
