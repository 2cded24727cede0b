"""Sealing secrets that must survive a restart (guest credentials) so Redis never holds plaintext.

AES-256-GCM with a key derived (HKDF-SHA256) from the bus token, and the
owning record's id as associated data, so a sealed value cannot be moved to
another record. Rotating the bus token makes older sealed values unreadable,
which is the safe failure: the migration's prepare step reports it.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import SealBroken


class Sealer:
    def __init__(self, token: bytes, purpose: bytes = b"ferry guest credentials v1") -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"ferry", info=purpose).derive(token)
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, context: str) -> bytes:
        try:
            raw = base64.b64decode(sealed.encode(), validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], context.encode())
        except (InvalidTag, ValueError):
            raise SealBroken(context) from None
