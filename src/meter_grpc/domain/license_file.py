"""The license file format of SPEC §6, compatible with Keygen's published verifiers.

    -----BEGIN LICENSE FILE-----
    base64 of {"enc": ..., "sig": ..., "alg": ...}, 60 characters a line (Ruby's encode64)
    -----END LICENSE FILE-----

`alg` is "base64+ed25519" (`enc` = base64 of the JSON payload) or "aes-256-gcm+ed25519"
(`enc` = "ciphertext.iv.tag", each base64, AES-256-GCM under SHA-256(license key) with a
12-byte IV and a 16-byte tag). `sig` is base64 of the Ed25519 signature of b"license/" + enc.

Both sides live here: `issue` for the server, `verify` for clients (no network needed).
`issue` runs in a worker process of the server (domain/offline.py); it works in small steps
(JSON one item at a time, base64 and AES-GCM by chunks; Ed25519 releases the GIL), so that
it never holds the GIL for more than a few milliseconds at a time wherever it runs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BEGIN = "-----BEGIN LICENSE FILE-----"
END = "-----END LICENSE FILE-----"
ALG_PLAIN = "base64+ed25519"
ALG_ENCRYPTED = "aes-256-gcm+ed25519"
SIGNED_PREFIX = b"license/"
LINE_LENGTH = 60
IV_BYTES = 12
TAG_BYTES = 16
# Bytes handed to one C call (base64, AES) while issuing: a few milliseconds of work each.
_CHUNK = 3 * 256 * 1024
# Lists longer than this are JSON-encoded one item at a time.
_ITEMS_AT_ONCE = 16
# A file issued further in the future than this (by the verifier's clock) is refused.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


class FileTooLarge(ValueError):
    """`issue` stopped before encrypting and signing: the file would be `size` bytes."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)  # the args, so that it pickles (from a worker process)
        self.size, self.limit = size, limit

    def __str__(self) -> str:
        return f"the license file would be {self.size} bytes, more than {self.limit}"


def file_size(plaintext_bytes: int, encrypted: bool) -> int:
    """The exact length (characters) of the license file `issue` makes of a payload whose
    JSON is `plaintext_bytes` long."""

    def b64(n: int) -> int:
        return 4 * ((n + 2) // 3)

    enc = b64(plaintext_bytes)
    alg = ALG_PLAIN
    if encrypted:  # "ciphertext.iv.tag"; AES-GCM keeps the length
        enc, alg = enc + 1 + b64(IV_BYTES) + 1 + b64(TAG_BYTES), ALG_ENCRYPTED
    body = len('{"enc":"","sig":"","alg":""}') + enc + b64(64) + len(alg)
    text = b64(body)
    lines = (text + LINE_LENGTH - 1) // LINE_LENGTH
    return len(BEGIN) + 1 + text + lines + len(END) + 1


class LicenseFileError(ValueError):
    """A license file that must not be trusted; `reason` says why.

    Reasons: MALFORMED, UNSUPPORTED_ALGORITHM, BAD_SIGNATURE, LICENSE_KEY_REQUIRED,
    DECRYPTION_FAILED, EXPIRED, ISSUED_IN_FUTURE.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 in UTC with milliseconds (Keygen's format)."""
    if ms is None:
        return None
    # clamped into 1970..9999 as Timestamps are: an expiry stored past year 9999 (before
    # renewals were bounded) must not fail a checkout
    ms = min(max(ms, 0), 253_402_300_799_999)
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def ms_of_iso(text: str) -> int:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def encode64(data: bytes) -> str:
    """Base64 in lines of 60 characters, each ending in a newline (Ruby's Base64.encode64)."""
    text = _b64(data)
    return "".join(text[i : i + LINE_LENGTH] + "\n" for i in range(0, len(text), LINE_LENGTH))


def _b64(data: bytes) -> str:
    if len(data) <= _CHUNK:
        return base64.b64encode(data).decode()
    # _CHUNK is a multiple of 3: the pieces' base64 concatenate to the whole's
    return "".join(
        base64.b64encode(data[i : i + _CHUNK]).decode() for i in range(0, len(data), _CHUNK)
    )


def _dumps(value: Any, depth: int = 0) -> str:
    """json.dumps(value, separators=(",", ":")), the same text, but a long list (within the
    first levels of dicts) is encoded one item at a time (each a short C call) instead of in
    one call holding the GIL."""
    if isinstance(value, dict) and value and depth < 4:
        return (
            "{"
            + ",".join(json.dumps(k) + ":" + _dumps(v, depth + 1) for k, v in value.items())
            + "}"
        )
    if isinstance(value, list) and len(value) > _ITEMS_AT_ONCE:
        return "[" + ",".join(json.dumps(v, separators=(",", ":")) for v in value) + "]"
    return json.dumps(value, separators=(",", ":"))


def _seal(key: bytes, iv: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM (ciphertext, tag), as AESGCM.encrypt gives them, by chunks."""
    encryptor = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    parts = [encryptor.update(plaintext[i : i + _CHUNK]) for i in range(0, len(plaintext), _CHUNK)]
    parts.append(encryptor.finalize())
    return b"".join(parts), encryptor.tag


def _aes_key(license_key: str) -> bytes:
    return hashlib.sha256(license_key.encode()).digest()


def issue(
    payload: Mapping[str, Any],
    sign: Callable[[bytes], bytes],
    license_key: str | None = None,
    *,
    aes_key: bytes | None = None,
    max_bytes: int | None = None,
) -> str:
    """The armored license file of `payload`, encrypted when a license key (or `aes_key`,
    SHA-256 of the license key, for a server that stores keys only as digests) is given.
    FileTooLarge when it would be longer than `max_bytes` (checked before encrypting)."""
    plaintext = _dumps(payload).encode()
    if license_key is not None:
        aes_key = _aes_key(license_key)
    if max_bytes is not None:
        size = file_size(len(plaintext), aes_key is not None)
        if size > max_bytes:
            raise FileTooLarge(size, max_bytes)
    if aes_key is None:
        alg, enc = ALG_PLAIN, _b64(plaintext)
    else:
        iv = os.urandom(IV_BYTES)
        ciphertext, tag = _seal(aes_key, iv, plaintext)
        alg, enc = ALG_ENCRYPTED, ".".join((_b64(ciphertext), _b64(iv), _b64(tag)))
    sig = _b64(sign(SIGNED_PREFIX + enc.encode()))
    # enc, sig and alg are base64 and '.', '+', '-' only: nothing to escape in JSON
    body = ('{"enc":"' + enc + '","sig":"' + sig + '","alg":"' + alg + '"}').encode()
    return f"{BEGIN}\n{encode64(body)}{END}\n"


def _public_key(public_key: bytes | str | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    raw = bytes.fromhex(public_key) if isinstance(public_key, str) else public_key
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes (64 hex characters)")
    return Ed25519PublicKey.from_public_bytes(raw)


def _strict_b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _malformed(message: str) -> LicenseFileError:
    return LicenseFileError("MALFORMED", message)


def open_file(
    certificate: str,
    public_key: bytes | str | Ed25519PublicKey,
    license_key: str | None = None,
) -> dict[str, Any]:
    """The payload of a license file whose signature verifies (decrypted if need be).

    Checks the armor, the signature and the decryption, not the times (see `verify`).
    """
    key = _public_key(public_key)
    text = certificate.strip()
    if not text.startswith(BEGIN) or not text.endswith(END):
        raise _malformed("not a license file: the BEGIN/END LICENSE FILE lines are missing")
    body = "".join(text[len(BEGIN) : -len(END)].split())
    try:
        outer = json.loads(_strict_b64(body))
        enc, sig, alg = outer["enc"], outer["sig"], outer["alg"]
        if not all(isinstance(x, str) for x in (enc, sig, alg)):
            raise TypeError
        signature = _strict_b64(sig)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise _malformed("the license file's body is not base64 JSON {enc, sig, alg}") from exc
    if alg not in (ALG_PLAIN, ALG_ENCRYPTED):
        raise LicenseFileError("UNSUPPORTED_ALGORITHM", f"unsupported algorithm {alg!r}")
    try:
        key.verify(signature, SIGNED_PREFIX + enc.encode())
    except InvalidSignature:
        raise LicenseFileError(
            "BAD_SIGNATURE", "the license file's signature does not verify"
        ) from None
    try:
        if alg == ALG_PLAIN:
            plaintext = _strict_b64(enc)
        else:
            if license_key is None:
                raise LicenseFileError(
                    "LICENSE_KEY_REQUIRED", "the license file is encrypted: give the license key"
                )
            parts = enc.split(".")
            if len(parts) != 3:
                raise _malformed("an encrypted enc is 'ciphertext.iv.tag'")
            ciphertext, iv, tag = (_strict_b64(p) for p in parts)
            if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
                raise _malformed("the IV must be 12 bytes and the tag 16")
            try:
                plaintext = AESGCM(_aes_key(license_key)).decrypt(iv, ciphertext + tag, None)
            except InvalidTag:
                raise LicenseFileError(
                    "DECRYPTION_FAILED", "cannot decrypt the license file with this license key"
                ) from None
        payload = json.loads(plaintext)
    except LicenseFileError:
        raise
    except (ValueError, binascii.Error) as exc:
        raise _malformed("the license file's payload is not JSON") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict):
        raise _malformed("the license file's payload has no meta")
    return payload


def verify(
    certificate: str,
    public_key: bytes | str | Ed25519PublicKey,
    license_key: str | None = None,
    *,
    now_ms: int,
    max_skew_ms: int = MAX_CLOCK_SKEW_MS,
) -> dict[str, Any]:
    """`open_file`, then refuses a file issued in the future (beyond the skew) or expired."""
    payload = open_file(certificate, public_key, license_key)
    meta = payload["meta"]
    try:
        issued = ms_of_iso(meta["issued"])
        expiry = None if meta.get("expiry") is None else ms_of_iso(meta["expiry"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed("meta.issued / meta.expiry are not ISO 8601 times") from exc
    if issued > now_ms + max_skew_ms:
        raise LicenseFileError(
            "ISSUED_IN_FUTURE",
            f"the license file was issued at {meta['issued']}, after this clock's now "
            f"({iso(now_ms)}) by more than {max_skew_ms // 1000} s: is the clock wrong?",
        )
    if expiry is not None and now_ms >= expiry:
        raise LicenseFileError("EXPIRED", f"the license file expired at {meta['expiry']}")
    return payload
