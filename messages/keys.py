"""The appliance's key pair: Ed25519 signs its events, X25519 opens guest credentials.

The *public* half travels as one text, ``<ed25519 hex>:<x25519 hex>`` (two
64-character lowercase hex strings): ``ferry-appliance keys show`` prints it,
every Heartbeat carries it, and a client pins it (``FERRY_APPLIANCE_KEY``).

* Events are signed with Ed25519 (libsodium ``crypto_sign_detached``) over the
  canonical form of the envelope without ``signature``; a client checks them
  with the pinned key.
* Guest credentials are sealed by the client to the X25519 key with libsodium's
  sealed box (``crypto_box_seal``) over the UTF-8 JSON
  ``{"username": ..., "password": ...}``; only the appliance can open them.

All cryptography is PyNaCl's (libsodium); nothing here is hand-written crypto.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

_PUBLIC_TEXT = re.compile(r"^([0-9a-f]{64}):([0-9a-f]{64})$")
MAX_CREDENTIAL_CHARS = 255


class KeyFormatError(ValueError):
    """A key text or key file that is not in the documented form."""


class CannotOpen(ValueError):
    """A sealed box that this key cannot open, or whose content is not valid credentials."""


@dataclass(frozen=True, slots=True)
class GuestLogin:
    """Opened guest credentials: lives only while prepare runs; never logged or stored."""

    username: str
    password: str

    def __repr__(self) -> str:
        return "GuestLogin(**********)"


@dataclass(frozen=True, slots=True)
class AppliancePublicKey:
    """What a client pins: the appliance's Ed25519 verify key and X25519 sealing key."""

    signing: bytes
    sealing: bytes

    @classmethod
    def parse(cls, text: str) -> AppliancePublicKey:
        match = _PUBLIC_TEXT.match(text.strip())
        if match is None:
            raise KeyFormatError(
                "an appliance key is '<ed25519 hex>:<x25519 hex>' (64 + 64 lowercase hex "
                "characters); `ferry-appliance keys show` prints it"
            )
        return cls(bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2)))

    @property
    def text(self) -> str:
        return f"{self.signing.hex()}:{self.sealing.hex()}"

    def verifies(self, data: bytes, signature: bytes) -> bool:
        try:
            VerifyKey(self.signing).verify(data, signature)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True

    def seal(self, plaintext: bytes) -> str:
        """A libsodium sealed box for this appliance, base64 (standard alphabet, padded)."""
        sealed = SealedBox(PublicKey(self.sealing)).encrypt(plaintext)
        return base64.b64encode(sealed).decode("ascii")

    def seal_login(self, username: str, password: str) -> str:
        """Seal guest credentials as the protocol says: JSON {"username", "password"}."""
        check_login(username, password)
        document = {"username": username, "password": password}
        return self.seal(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def check_login(username: str, password: str) -> None:
    """Raise CannotOpen unless both are non-empty strings of at most 255 characters."""
    for name, value in (("username", username), ("password", password)):
        if not isinstance(value, str) or not value:
            raise CannotOpen(f"the sealed credentials have an empty or missing {name}")
        if len(value) > MAX_CREDENTIAL_CHARS:
            raise CannotOpen(f"the sealed {name} is longer than {MAX_CREDENTIAL_CHARS} characters")


class ApplianceKeyPair:
    """The private half; only the appliance holds it."""

    def __init__(self, signing_seed: bytes, sealing_secret: bytes) -> None:
        self._signing = SigningKey(signing_seed)
        self._sealing = PrivateKey(sealing_secret)
        self.public = AppliancePublicKey(
            bytes(self._signing.verify_key), bytes(self._sealing.public_key)
        )

    @classmethod
    def generate(cls) -> ApplianceKeyPair:
        return cls(bytes(SigningKey.generate()), bytes(PrivateKey.generate()))

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data).signature

    def open(self, sealed: str) -> bytes:
        try:
            raw = base64.b64decode(sealed.encode("ascii"), validate=True)
            return SealedBox(self._sealing).decrypt(raw)
        except (CryptoError, binascii.Error, ValueError, TypeError):
            raise CannotOpen("the sealed credentials do not open with this appliance's key") from (
                None
            )

    def open_login(self, sealed: str) -> GuestLogin:
        """Open sealed guest credentials; CannotOpen names what is wrong, never a value."""
        try:
            document = json.loads(self.open(sealed).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CannotOpen("the sealed credentials are not a JSON object") from None
        if not isinstance(document, dict) or set(document) != {"username", "password"}:
            raise CannotOpen('the sealed credentials must be exactly {"username", "password"}')
        check_login(document["username"], document["password"])
        return GuestLogin(document["username"], document["password"])

    def to_json(self) -> str:
        """The key file's content (secret: the caller writes it 0600)."""
        return json.dumps(
            {
                "format": "ferry-appliance-key-v1",
                "ed25519_seed": bytes(self._signing).hex(),
                "x25519_secret": bytes(self._sealing).hex(),
                "public": self.public.text,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ApplianceKeyPair:
        try:
            document = json.loads(text)
        except ValueError:
            raise KeyFormatError("the appliance key file is not JSON") from None
        if not isinstance(document, dict) or document.get("format") != "ferry-appliance-key-v1":
            raise KeyFormatError("not a ferry-appliance-key-v1 file")
        try:
            pair = cls(
                bytes.fromhex(document["ed25519_seed"]), bytes.fromhex(document["x25519_secret"])
            )
        except (ValueError, KeyError, TypeError, CryptoError) as error:
            raise KeyFormatError(f"unreadable appliance key file: {type(error).__name__}") from None
        if document.get("public") not in (None, pair.public.text):
            raise KeyFormatError("the key file's public key does not match its private keys")
        return pair

    def __repr__(self) -> str:
        return f"ApplianceKeyPair(public={self.public.text})"
