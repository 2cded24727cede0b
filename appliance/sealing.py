"""Guest credentials, sealed by the client to this appliance's X25519 key, opened only here.

The client seals them (a libsodium sealed box, see messages/README.md); they
cross SQS, sit in the dead-letter queue and rest in Redis as that ciphertext
only. The appliance opens them twice: once when the request arrives, to refuse
credentials that do not open or are empty (``invalid_credentials``) and drop
them, and once when prepare runs, to use and drop them. While open, their
values are registered with the log redactor, so no log line can carry them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from appliance import logs
from appliance.errors import InvalidCredentials
from messages.keys import ApplianceKeyPair, CannotOpen, GuestLogin


class Sealer:
    def __init__(self, keys: ApplianceKeyPair) -> None:
        self._keys = keys

    def check(self, sealed: str) -> None:
        """Raise InvalidCredentials unless ``sealed`` opens to usable credentials."""
        with self.opened(sealed):
            pass

    @contextmanager
    def opened(self, sealed: str) -> Iterator[GuestLogin]:
        """The credentials, for the length of the block; their values are redacted from logs."""
        try:
            login = self._keys.open_login(sealed)
        except CannotOpen as error:
            raise InvalidCredentials(str(error)) from None
        with logs.secrets_in_flight(login.username, login.password):
            yield login
