"""The coordinator's keys: one to sign registry manifests, one to encrypt artifacts at rest.

Why: the API must load only models the coordinator itself registered (design principle 5),
so every manifest is signed with an Ed25519 key; and model weights and checkpoints are
encrypted with AES-256-GCM so that a copied disk or backup does not hand them out.

Guarantees, under the assumption that only the coordinator's account can read ``directory``:
- Keys are created on first use and never overwritten: if two processes race to create one,
  both end up with the key that landed first.
- Key files are created with mode 0600 (never world-readable, not even briefly) and written
  atomically (temporary file, fsync, rename), so a crash leaves either no key or a whole key.
- A key file that group or others can access is refused, not silently used.
- No key material appears in messages, reprs or logs.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsynth.files import fsync_directory

SIGNING_KEY_FILE = "registry_signing.pem"
ENCRYPTION_KEY_FILE = "registry_encryption.key"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


class KeyFileError(ValueError):
    """A key file is unreadable, damaged, or readable by other users."""


class SignatureError(ValueError):
    """A signature does not verify with this key store's public key."""


class DecryptionError(ValueError):
    """A ciphertext was altered, truncated, or encrypted with another key."""


class KeyStore:
    """Signing and encryption keys kept as files in one private directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._signing: Ed25519PrivateKey | None = None
        self._aead: AESGCM | None = None

    def __repr__(self) -> str:
        return f"KeyStore(directory={str(self.directory)!r})"

    # ------------------------------------------------------------------ signing
    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return self._signing_key().sign(data)

    def verify(self, data: bytes, signature: bytes) -> None:
        """Return if ``signature`` is this store's signature of ``data``, else SignatureError."""
        try:
            self._signing_key().public_key().verify(signature, data)
        except InvalidSignature:
            raise SignatureError(
                "signature does not verify: signed by another key, or the data was altered"
            ) from None

    def public_key_pem(self) -> bytes:
        """The public half of the signing key (SubjectPublicKeyInfo PEM), safe to publish."""
        return (
            self._signing_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    # ------------------------------------------------------------------ encryption
    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """``nonce (12 bytes) + AES-256-GCM ciphertext and tag``.

        ``associated_data`` is authenticated, not stored: pass the same value to
        :meth:`decrypt`. Binding it to the file's identity stops one valid ciphertext from
        being swapped in for another.
        """
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._cipher().encrypt(nonce, plaintext, associated_data)

    def decrypt(self, blob: bytes, associated_data: bytes) -> bytes:
        """The plaintext of :meth:`encrypt`'s output, or DecryptionError."""
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError(
                f"ciphertext is {len(blob)} bytes, shorter than nonce and tag: the file was "
                "truncated or altered"
            )
        try:
            return self._cipher().decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise DecryptionError(
                "cannot decrypt: the file was altered, or encrypted with another key"
            ) from None

    # ------------------------------------------------------------------ key files
    def _signing_key(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._signing is None:
                path = self.directory / SIGNING_KEY_FILE
                if not path.exists():
                    pem = Ed25519PrivateKey.generate().private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                    self._create(path, pem)
                self._signing = _parse_signing_key(path, _read_private(path))
            return self._signing

    def _cipher(self) -> AESGCM:
        with self._lock:
            if self._aead is None:
                path = self.directory / ENCRYPTION_KEY_FILE
                if not path.exists():
                    self._create(path, AESGCM.generate_key(bit_length=8 * KEY_BYTES))
                key = _read_private(path)
                if len(key) != KEY_BYTES:
                    raise KeyFileError(
                        f"{path}: holds {len(key)} bytes, an AES-256 key has {KEY_BYTES}; "
                        "restore the file from backup (a new key cannot decrypt old artifacts)"
                    )
                self._aead = AESGCM(key)
            return self._aead

    def _create(self, path: Path, data: bytes) -> None:
        """Write a new key file, mode 0600, unless another process just created one."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                # link() refuses to overwrite, so a concurrent creator's key is never
                # replaced by ours (os.replace would silently orphan what it encrypted).
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # file systems without hard links
                if not path.exists():
                    os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_directory(self.directory)


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path}: group or others can access this key file "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            )
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None


def _parse_signing_key(path: Path, pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path}: not an unencrypted PKCS8 PEM Ed25519 private key; restore it from "
            "backup (a new key cannot verify models signed with the old one)"
        )
    return key
