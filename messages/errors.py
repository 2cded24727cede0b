"""Why a message cannot be accepted, as data both sides of the wire share.

    MessageError            a raw message is rejected before anyone acts on it
    ├── carries ErrorCode   machine-readable, also sent in ErrorResponse.code
    ├── correlation_id      read from the raw body when it can be, else None
    └── authenticated       whether its signature had checked out before it failed

The appliance maps an *authenticated* MessageError to an ``ErrorResponse``; a
client that gets one of its own back can match it by ``correlation_id``. An
unauthenticated one is only logged and dead-lettered: answering it would let a
forger fail someone else's pending request.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every error code an ``ErrorResponse`` can carry."""

    # The message itself is unusable: never retried, dead-lettered.
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    SCHEMA_VIOLATION = "schema_violation"
    MISSING_SIGNATURE = "missing_signature"
    BAD_SIGNATURE = "bad_signature"
    STALE_MESSAGE = "stale_message"
    MESSAGE_ID_REUSED = "message_id_reused"
    NOT_A_COMMAND = "not_a_command"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    # The command is well formed but cannot be carried out.
    UNKNOWN_VM = "unknown_vm"
    UNKNOWN_MIGRATION = "unknown_migration"
    CONFLICT = "conflict"
    INVALID_REQUEST = "invalid_request"
    PRECHECK_FAILED = "precheck_failed"
    INVALID_CREDENTIALS = "invalid_credentials"
    NOT_IMPLEMENTED = "not_implemented"
    AMBIGUOUS_VM_NAME = "ambiguous_vm_name"  # a name that more than one VM has: use the id
    INVALID_VM = "invalid_vm"  # a VM the site cannot describe (unreadable, unfit name)
    RESTING_IN_CLOUD = "resting_in_cloud"  # the VM runs in the cloud (tbc): migrate back first
    MIGRATING_BACK = "migrating_back"  # the migration is migrating back (or has)
    NOT_RESTING = "not_resting"  # migrate back or sync of a migration not resting in the cloud
    CUT_OVER = "cut_over"  # a warm VM cut over to its cloud volumes (or committed): no way back
    # The appliance could not do it (this time).
    UNAVAILABLE = "unavailable"
    SERVICES_DEGRADED = "services_degraded"  # a component it needs is down: retry once Ready
    DATA_PATH = "data_path"
    OUT_OF_SPACE = "out_of_space"
    INTERNAL = "internal"


class MessageError(Exception):
    """A raw message was rejected; ``code`` says why, ``reason`` in words."""

    def __init__(
        self,
        code: ErrorCode,
        reason: str,
        correlation_id: str | None = None,
        *,
        authenticated: bool = False,
    ) -> None:
        self.code = code
        self.reason = reason
        self.correlation_id = correlation_id
        self.authenticated = authenticated
        super().__init__(f"{code.value}: {reason}")
