"""One attempt of a routed call on one replica: its messages, and what its failure means.

:func:`attempt` yields the raw response messages of one upstream call and
turns every way it can fail into :class:`AttemptFailed`, which says whether it
was the replica's fault (see :mod:`orchestrator._resilience`) and carries the
status the caller gets if the mesh gives up. The router decides about retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from clients import UnavailableError
from orchestrator._plugin import PluginRuntime
from orchestrator._replica import Replica, ReplicaGone
from orchestrator._resilience import NEVER_REACHED, TIMEOUT, TRANSPORT, failure_kind

Trailers = tuple[tuple[str, Any], ...]
#: Statuses a dying sidecar's connection can end a call with, besides UNAVAILABLE.
_MAYBE_DYING = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class AttemptFailed(Exception):
    """An attempt ended without its answer: ``kind`` is the replica's fault, or None."""

    def __init__(self, kind: str | None, code: grpc.StatusCode, details: str, trailers: Trailers):
        super().__init__(details)
        #: ``never_reached``, ``transport`` or ``timeout``; None: the plugin's own error.
        self.kind = kind
        self.code = code
        self.details = details
        self.trailers = trailers


async def attempt(
    replica: Replica,
    path: str,
    kind: str,
    payload: Any,
    *,
    timeout: float | None,
    per_try: float | None,
    metadata: list[tuple[str, Any]],
) -> AsyncGenerator[bytes, None]:
    """The response messages of one call to ``replica``, as the bytes it sent.

    ``timeout`` is the caller's remaining deadline. ``per_try`` bounds the wait
    for the first response (for a unary call, the whole call). Raises
    :class:`AttemptFailed` for any failure; cancellation of the caller's task
    propagates as ``CancelledError``.
    """
    budget = timeout
    if per_try is not None and kind == "unary_unary":
        budget = per_try if timeout is None else min(per_try, timeout)
    try:
        call = replica.method(path, kind)(payload, timeout=budget, metadata=metadata)
    except ReplicaGone as gone:
        raise AttemptFailed(NEVER_REACHED, grpc.StatusCode.UNAVAILABLE, str(gone), ()) from None
    replica.calls.add(call)
    try:
        if kind == "unary_unary":
            yield await call
            return
        first = True
        while True:
            if first and per_try is not None:
                message = await asyncio.wait_for(call.read(), per_try)
            else:
                message = await call.read()
            first = False
            if message is grpc.aio.EOF:
                return
            yield message
    except grpc.aio.AioRpcError as exc:
        failure = _failed(exc, per_try is not None and budget != timeout)
        if failure.kind is None and failure.code in _MAYBE_DYING and await _went_away(replica):
            failure.kind = TRANSPORT  # not the plugin's error: its sidecar is dying
        raise failure from None
    except TimeoutError:
        raise AttemptFailed(
            TIMEOUT, grpc.StatusCode.UNAVAILABLE, f"no response within {per_try:g}s", ()
        ) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller cancelled, or its deadline passed
        # Not this handler being cancelled: the replica went away and its channel
        # cancelled our call to it. The caller must hear that, not silence.
        raise AttemptFailed(
            TRANSPORT, grpc.StatusCode.UNAVAILABLE, "its connection was closed", ()
        ) from None
    finally:
        if not call.done():
            call.cancel()
        replica.calls.discard(call)


def _failed(exc: grpc.aio.AioRpcError, per_try_set: bool) -> AttemptFailed:
    code = exc.code()
    details = exc.details() or code.name
    trailers = tuple(exc.trailing_metadata() or ())
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and per_try_set:
        return AttemptFailed(TIMEOUT, code, details, trailers)
    return AttemptFailed(failure_kind(exc), code, details, trailers)


async def give_up(
    failure: AttemptFailed, plugin: PluginRuntime, replica: Replica, closing: bool
) -> tuple[grpc.StatusCode, str, Trailers]:
    """The status the caller gets for a call whose last attempt failed.

    The plugin's own errors pass through; a replica that died or went away
    becomes UNAVAILABLE with a message that says so.
    """
    if closing:
        err = UnavailableError(
            "the mesh is shutting down and its grace period for calls in flight is over; "
            "the call did not complete: retry against the mesh once it is back",
            reason="MESH_SHUTTING_DOWN",
            retry_delay=1.0,
        )
        return err.code, err.message, err.trailing_metadata()
    code = failure.code
    if failure.kind is None and code != grpc.StatusCode.CANCELLED:
        return code, failure.details, failure.trailers
    if failure.kind == TIMEOUT:
        err = UnavailableError(
            f"plugin {plugin.name!r} replica {replica.index} did not answer in time "
            f"({failure.details}; the per-try timeout is "
            f"{plugin.resilience.retries.per_try_timeout:g}s) and no other attempt was possible",
            reason="PER_TRY_TIMEOUT",
            metadata={"plugin": plugin.name, "replica": str(replica.index)},
            retry_delay=1.0,
        )
    else:
        err = sidecar_gone(plugin, replica, failure.details)
    return err.code, err.message, err.trailing_metadata()


def sidecar_gone(plugin: PluginRuntime, replica: Replica, how: str) -> UnavailableError:
    """The error for a call whose sidecar died or went away while it ran."""
    died = replica.process is None or replica.process.returncode is not None
    what = "exited" if died else "became unreachable"
    return UnavailableError(
        f"plugin {plugin.name!r} replica {replica.index} {what} during the call ({how}); "
        "the call did not complete. The replica is being restarted: retry",
        reason="SIDECAR_UNAVAILABLE",
        metadata={"plugin": plugin.name, "replica": str(replica.index)},
        retry_delay=1.0,
    )


async def _went_away(replica: Replica) -> bool:
    """Whether an INTERNAL/UNKNOWN status came from a sidecar that is going away.

    Connected still: the plugin's own error, passed on at once. Otherwise the
    sidecar may be dying: give its exit a moment to show.
    """
    connected = replica.channel is not None and (
        replica.channel.get_state() == grpc.ChannelConnectivity.READY
    )
    return not connected and await _exits_soon(replica, 0.25)


async def _exits_soon(replica: Replica, within: float) -> bool:
    process = replica.process
    if process is None or process.returncode is not None:
        return True
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        return False
    return True
