"""One exception hierarchy for the whole mesh, each class keeping its gRPC status.

Clients raise these from failed calls (``clients`` re-exports them); servers (the
orchestrator, sidecars, and plugin code through the SDK) raise them to end a call
with the right status.
Rich details travel as a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer, the standard that grpcio-status and other languages read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from sidemesh.core._state import TOKEN_ENV, TOKEN_FILE_ENV

#: ``ErrorInfo.domain`` of every error the mesh itself raises.
ERROR_DOMAIN = "sidemesh.dev"
_DETAILS_KEY = "grpc-status-details-bin"

#: How to authenticate, for an ``UNAUTHENTICATED`` error whose message does not say.
HOW_TO_AUTHENTICATE = (
    "authenticate with a bearer token (clients: token= or token_file=; the sidemesh CLI: "
    f"--token-file or ${TOKEN_FILE_ENV} / ${TOKEN_ENV}; a mesh on this machine keeps its "
    "owner's token in <state_dir>/token) or a TLS client certificate (clients: "
    "tls=TlsOptions(ca=..., cert=..., key=...); the CLI: --tls-ca, --tls-cert, --tls-key)"
)

#: Added to ``UNAVAILABLE`` when grpc's message shows a failed TLS handshake, which it
#: words only as ``Unwrap failed (TSI_DATA_CORRUPTED)`` or ``Ssl handshake failed``.
TLS_HANDSHAKE_HINT = (
    "the TLS handshake with the mesh failed: a mesh with auth.tls.require_client_cert takes "
    "only a client certificate signed by its client_ca (clients: tls=TlsOptions(ca=..., "
    "cert=..., key=...); the CLI: --tls-cert and --tls-key, or $SIDEMESH_TLS_CERT and "
    "$SIDEMESH_TLS_KEY), and the mesh's certificate must be signed by the CA this client "
    "trusts (--tls-ca, $SIDEMESH_TLS_CA) for the name it connects to"
)
_HANDSHAKE_MARKERS = ("TSI_", "Ssl handshake failed", "SSL_ERROR", "CERTIFICATE_VERIFY_FAILED")


def tls_handshake_failed(message: str) -> bool:
    """Whether grpc's ``UNAVAILABLE`` message says the TLS handshake failed."""
    return any(marker in message for marker in _HANDSHAKE_MARKERS)


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its path (``arguments.items[2]``) and what is wrong."""

    field: str
    description: str


class SidemeshError(Exception):
    """Base of every Sidemesh error; ``code`` is the gRPC status it maps to."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: Stable machine-readable cause, for example ``TARGET_NOT_FOUND``.
        self.reason = reason
        #: Extra facts about the error (``ErrorInfo.metadata``).
        self.metadata: dict[str, str] = dict(metadata or {})
        #: The invalid fields, for ``INVALID_ARGUMENT``.
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        #: Seconds after which a retry may succeed, when known.
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    # -- to the wire ---------------------------------------------------------

    def to_status_proto(self) -> status_pb2.Status:
        """The error as a ``google.rpc.Status`` with its details."""
        details: list[any_pb2.Any] = []
        if self.reason or self.metadata:
            details.append(
                _pack(
                    error_details_pb2.ErrorInfo(
                        reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
                    )
                )
            )
        if self.field_violations:
            bad = error_details_pb2.BadRequest()
            for v in self.field_violations:
                bad.field_violations.add(field=v.field, description=v.description)
            details.append(_pack(bad))
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Trailers carrying the rich status; empty when there are no details."""
        status = self.to_status_proto()
        if not status.details:
            return ()
        return ((_DETAILS_KEY, status.SerializeToString()),)

    async def abort(self, context: grpc.aio.ServicerContext[object, object]) -> NoReturn:
        """Ends the server call ``context`` with this error's status and details."""
        await context.abort(self.code, self.message, self.trailing_metadata())
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    # -- from the wire -------------------------------------------------------

    @staticmethod
    def from_rpc_error(error: grpc.RpcError) -> SidemeshError:
        """Converts a failed call (sync or ``grpc.aio``) into the matching error class."""
        code: grpc.StatusCode = error.code()
        message: str = error.details() or code.name
        trailers = error.trailing_metadata() or ()
        return from_status(code, message, trailers)


def from_status(code: grpc.StatusCode, message: str, trailers: Iterable[Any] = ()) -> SidemeshError:
    """Builds the error for a status code, message and trailing metadata.

    ``trailers`` holds ``(key, value)`` pairs, as both grpc APIs return them.
    """
    cls = _BY_CODE.get(code, UnknownError)
    if code == grpc.StatusCode.UNAUTHENTICATED and TOKEN_ENV not in message:
        message = f"{message}; {HOW_TO_AUTHENTICATE}"  # a terse server: say how here
    elif code == grpc.StatusCode.UNAVAILABLE and tls_handshake_failed(message):
        message = f"{message}; {TLS_HANDSHAKE_HINT}"
    kwargs: dict[str, object] = {}
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            kwargs = _parse_details(status_pb2.Status.FromString(value))
    return cls(message, **kwargs)  # type: ignore[arg-type]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _parse_details(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif detail.Unpack(bad):
            out["field_violations"] = [
                FieldViolation(v.field, v.description) for v in bad.field_violations
            ]
        elif detail.Unpack(retry):
            out["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    return out


class CallCancelledError(SidemeshError):
    """The call was cancelled (``CANCELLED``)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(SidemeshError):
    """An unexpected error, typically raised by plugin code (``UNKNOWN``)."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(SidemeshError):
    """The request is malformed or its arguments do not match the schema."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(SidemeshError):
    """The call's deadline passed before it completed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(SidemeshError):
    """No agent, tool, plugin or resource has that name."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SidemeshError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(SidemeshError):
    """The caller may not make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(SidemeshError):
    """A limit was reached: message size, concurrent calls, rate, memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(SidemeshError):
    """The system is not in a state that allows the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(SidemeshError):
    """The call was aborted, typically by a concurrency conflict."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(SidemeshError):
    """A value is past the valid range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(SidemeshError):
    """The server does not implement the method or capability."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(SidemeshError):
    """An invariant of the server broke; a bug on the server side."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(SidemeshError):
    """The target cannot take the call now (no ready replica, sidecar died); retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(SidemeshError):
    """Unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(SidemeshError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[SidemeshError]] = {
    cls.code: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}

# Traces and tracebacks name the classes where users import them (``exception.type`` is
# ``sidemesh.core.NotFoundError``), not this private module.
for _cls in (SidemeshError, FieldViolation, *_BY_CODE.values()):
    _cls.__module__ = "sidemesh.core"
