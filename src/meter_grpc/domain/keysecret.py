"""The server secret: license keys at rest as HMAC digests, and secrets sealed under it.

Nothing in Redis reveals a license key or SHA-256(key) (the AES key of its encrypted license
files):
- a key is indexed and stored as `digest(key)` = HMAC-SHA256(secret, key), hex;
- what license-file encryption needs (SHA-256(key)) and the key a create with a request_id
  generated (returned again by its replay) are sealed: AES-256-GCM under a key derived from
  the secret by HKDF-SHA256, with a random 12-byte nonce and the purpose as associated data.

The secret is 32 random bytes, read from METER_KEY_SECRET_FILE or created once (mode 0600)
in METER_DATA_DIR like the signing key. Every replica sharing one Redis must use the same
secret: `check` (an HMAC of a fixed label) is stored in Redis by the first replica and a
replica whose secret gives another value refuses to start (storage/migrate.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meter_grpc.domain import secretfile

DEFAULT_FILE_NAME = "key-secret"
SECRET_BYTES = 32
NONCE_BYTES = 12
_SEAL_INFO = b"meter-grpc seal v1"
_CHECK_LABEL = b"meter-grpc key secret check v1"
_SEALED_PREFIX = "s1."

# What a sealed value is for (its associated data): a value sealed for one purpose (or one
# license) does not open as another.
FILE_KEY = "file-key:"  # + license id: SHA-256(license key), for encrypted license files
CREATE_SECRET = "create-key"  # the key a create with a request_id generated


class KeySecretError(Exception):
    """The secret file is unusable, or a sealed value does not open under this secret."""


class KeySecret:
    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise KeySecretError(f"the key secret is {len(secret)} bytes, not {SECRET_BYTES}")
        self._secret = secret
        seal_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(
            secret
        )
        self._aead = AESGCM(seal_key)
        self.check: str = hmac.new(secret, _CHECK_LABEL, hashlib.sha256).hexdigest()

    def digest(self, key: str) -> str:
        """HMAC-SHA256(secret, key), hex: how a license key is indexed and stored."""
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, purpose: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, data, purpose.encode())
        return _SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, text: str, purpose: str) -> bytes:
        """The data `seal(data, purpose)` sealed; KeySecretError when it does not open."""
        if not text.startswith(_SEALED_PREFIX):
            raise KeySecretError("not a sealed value")
        body = text[len(_SEALED_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], purpose.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise KeySecretError("a sealed value does not open under this key secret") from None

    def seal_file_key(self, license_id: str, key: str) -> str:
        """SHA-256(key) (the AES key of the license's encrypted files), sealed to the license."""
        return self.seal(hashlib.sha256(key.encode()).digest(), FILE_KEY + license_id)

    def open_file_key(self, license_id: str, sealed: str) -> bytes:
        return self.open(sealed, FILE_KEY + license_id)

    @classmethod
    def load(cls, path: Path) -> KeySecret:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeySecretError(f"cannot read the key secret {path}: {exc}") from exc
        text = data.strip()
        secret = data
        if len(data) != SECRET_BYTES:  # also accepted: 64 hex digits (e.g. `openssl rand -hex 32`)
            try:
                secret = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                secret = b""
        if len(secret) != SECRET_BYTES:
            raise KeySecretError(
                f"{path} holds {len(data)} bytes: expected {SECRET_BYTES} random bytes "
                f"or {2 * SECRET_BYTES} hex digits"
            )
        secretfile.warn_if_readable_by_others(path, "key secret")
        return cls(secret)

    @classmethod
    def configured(cls, secret_file: Path | None, data_dir: Path) -> KeySecret:
        """METER_KEY_SECRET_FILE (must exist), else the secret kept in METER_DATA_DIR."""
        if secret_file is not None:
            return cls.load(secret_file)
        path = data_dir / DEFAULT_FILE_NAME
        if not path.exists():
            _create(path)
        return cls.load(path)


def _create(path: Path) -> None:
    """Writes 32 random bytes to `path` (mode 0600) atomically; the first creator wins."""
    secretfile.create_once(path, os.urandom(SECRET_BYTES), "license key secret")
