"""How an exception from plugin code ends a call: its own status, or a sanitized ``UNKNOWN``."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, NoReturn

import grpc

from plugins_sdk._tracing import CallSpan
from sidemesh.core import SidemeshError, UnknownError

log = logging.getLogger("plugins_sdk")


async def end_call(
    context: grpc.aio.ServicerContext[Any, Any],
    error: Exception,
    what: str,
    call_id: str,
    logger: logging.Logger = log,
    *,
    span: CallSpan | None = None,
) -> NoReturn:
    """Ends the call with ``error``'s status.

    A ``SidemeshError`` keeps its code, message and details. Anything else is a
    bug in the plugin: the caller gets ``UNKNOWN`` with the exception's type and
    the call id only (its message may hold secrets), and the traceback goes to
    the plugin's log under the same call id (and the ids of the call's
    ``span``, when given).
    """
    if isinstance(error, SidemeshError):
        await error.abort(context)
    with span.current() if span is not None else nullcontext():
        logger.error("%s failed (call id %s)", what, call_id, exc_info=error)
    sanitized = UnknownError(
        f"{what} failed: {type(error).__name__} (call id {call_id}); see the plugin log",
        reason="PLUGIN_ERROR",
    )
    await sanitized.abort(context)
