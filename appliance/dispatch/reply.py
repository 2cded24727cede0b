"""Building answers that point back at the command they answer."""

from __future__ import annotations

from messages.commands import Command
from messages.errors import ErrorCode
from messages.events import ErrorResponse, ErrorResponseBody


def error_response(
    appliance_id: str,
    code: ErrorCode,
    message: str,
    correlation_id: str | None,
    command_type: str | None = None,
    *,
    retryable: bool = False,
) -> ErrorResponse:
    body = ErrorResponseBody(
        code=code,
        message=message[:4096],
        correlation_id=correlation_id,
        command_type=command_type,
        retryable=retryable,
    )
    if correlation_id is not None:
        return ErrorResponse(appliance_id=appliance_id, correlation_id=correlation_id, body=body)
    return ErrorResponse(appliance_id=appliance_id, body=body)


def error_for(appliance_id: str, command: Command, code: ErrorCode, message: str) -> ErrorResponse:
    return error_response(appliance_id, code, message, command.correlation_id, command.message_type)
