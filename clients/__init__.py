"""Sidemesh clients: call the mesh's agents and tools from Python.

The error classes here are the mesh's one exception hierarchy: the SDK and the
orchestrator raise the same classes, each keeping its gRPC status code.
"""

from clients._address import DEFAULT_TCP_ADDRESS, normalize_address, unix_socket_path
from clients._errors import (
    ERROR_DOMAIN,
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidemeshError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    from_status,
)

__all__ = [
    "DEFAULT_TCP_ADDRESS",
    "ERROR_DOMAIN",
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SidemeshError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "from_status",
    "normalize_address",
    "unix_socket_path",
]
