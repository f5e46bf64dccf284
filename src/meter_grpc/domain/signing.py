"""The Ed25519 key that signs license files (SPEC §6).

Loaded from METER_SIGNING_KEY_FILE (a PEM private key), or created once in METER_DATA_DIR with
mode 0600 and loaded from there on every later start, so files signed before a restart still
verify after it. Creation is atomic: a complete file appears under its name or none does, and
when two replicas share a data dir the first one's key wins.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_grpc.domain import secretfile

DEFAULT_FILE_NAME = "signing-key.pem"


class SigningKeyError(Exception):
    """The configured signing key file is missing or not an Ed25519 private key."""


class Signer:
    algorithm = "ed25519"

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        public = key.public_key()
        self.public_key: bytes = public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # The same key the way other verifiers take it: X.509 SubjectPublicKeyInfo in PEM
        # (OpenSSL, Node's crypto, Java, Go; its base64 body is the SPKI DER).
        self.public_key_pem: str = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def raw_private_key(self) -> bytes:
        """The 32-byte private key, for the processes that sign license files."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def load(cls, path: Path) -> Signer:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key {path}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        secretfile.warn_if_readable_by_others(path, "signing key")
        return cls(key)

    @classmethod
    def configured(cls, key_file: Path | None, data_dir: Path) -> Signer:
        """METER_SIGNING_KEY_FILE (must exist), else the key kept in METER_DATA_DIR."""
        if key_file is not None:
            return cls.load(key_file)
        return cls.load_or_create(data_dir / DEFAULT_FILE_NAME)

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Loads the key at `path`, creating it first (mode 0600) when there is none."""
        if not path.exists():
            _create(path)
        return cls.load(path)


def _create(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    secretfile.create_once(path, pem, "license file signing key")
