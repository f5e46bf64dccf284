"""Opaque page tokens: base64url JSON of the last id served and the list's scope.

Decoding is bounded and non-recursive: a token longer than MAX_TOKEN_LEN is refused before
it is decoded, and the JSON must be exactly the flat object `encode` writes (matched by a
regular expression; only its two string literals go through json.loads), so no token can
nest, recurse or allocate beyond its length."""

from __future__ import annotations

import base64
import binascii
import json
import re

from meter_grpc.domain.errors import invalid

MAX_TOKEN_LEN = 2048
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrtu])*"'
_TOKEN_JSON = re.compile(r'\{"a":(' + _STRING + r'),"s":(' + _STRING + r")\}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def encode(last_id: str, scope: str) -> str:
    raw = json.dumps({"a": last_id, "s": scope}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, scope: str, field: str = "page_token") -> str:
    """The id to continue after ('' for the first page); INVALID_ARGUMENT for a bad token."""
    if not token:
        return ""
    try:
        if len(token) > MAX_TOKEN_LEN or not _BASE64URL.fullmatch(token):
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        m = _TOKEN_JSON.fullmatch(raw)
        if m is None:
            raise ValueError
        last, token_scope = json.loads(m[1]), json.loads(m[2])
        if not isinstance(last, str) or not isinstance(token_scope, str):
            raise ValueError
    except (ValueError, binascii.Error, UnicodeError):
        raise invalid(field, "is not a page token returned by this list") from None
    if token_scope != scope:
        raise invalid(field, "belongs to a list with other filters")
    return last
