"""A failed TLS handshake, which grpc words as a transport error, says what to check."""

from __future__ import annotations

import grpc

from sidemesh.core import UnavailableError, from_status


def test_a_failed_handshake_says_what_to_check() -> None:
    err = from_status(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
        "Unwrap failed (TSI_DATA_CORRUPTED)",
    )
    assert isinstance(err, UnavailableError)
    assert "(TSI_DATA_CORRUPTED); the TLS handshake with the mesh failed" in err.message
    assert "--tls-cert and --tls-key" in err.message


def test_other_unavailable_errors_are_left_alone() -> None:
    message = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"
    assert from_status(grpc.StatusCode.UNAVAILABLE, message).message == message
