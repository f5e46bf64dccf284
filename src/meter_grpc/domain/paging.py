"""Opaque page tokens: base64url JSON of the last id served and the list's scope."""

from __future__ import annotations

import base64
import binascii
import json

from meter_grpc.domain.errors import invalid


def encode(last_id: str, scope: str) -> str:
    raw = json.dumps({"a": last_id, "s": scope}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, scope: str, field: str = "page_token") -> str:
    """The id to continue after ('' for the first page); INVALID_ARGUMENT for a bad token."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        last, token_scope = data["a"], data["s"]
        if not isinstance(last, str) or not isinstance(token_scope, str):
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise invalid(field, "is not a page token returned by this list") from None
    if token_scope != scope:
        raise invalid(field, "belongs to a list with other filters")
    return last
