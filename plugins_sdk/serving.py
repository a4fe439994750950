"""Serving a plugin: the public layer every sidecar runtime builds on.

``plugins_sdk.run`` serves a :class:`~plugins_sdk.Plugin` this way
(``sidecars.python``); a runtime that makes something else a mesh plugin
(``sidecars.mcp`` serves an MCP server) writes its own servicers from the
same parts, so that every sidecar serves, traces, fails and stops alike:

- the process: :func:`sidecar_server` (a gRPC server with the sidecar's
  options), :func:`listen` (its socket, ``OSError`` when it cannot),
  :func:`stop_on_signals` (SIGTERM and SIGINT start a drain of
  :data:`SIGNAL_GRACE` seconds), :func:`grace_period` (the drain a
  ``PluginService.Shutdown`` asks for) and :data:`MAX_MESSAGE_BYTES`;
- each call: a :class:`Chain` of :class:`Interceptor` hooks runs it, the
  first, :class:`ServeCall`, starting its SERVER span in the caller's trace
  (:class:`ServerSpans`, :class:`CallSpan`) and ending a failure with its
  status (:func:`end_call`: a ``SidemeshError`` keeps its own, anything else
  becomes a sanitized ``UNKNOWN`` and a logged traceback); each hook takes the
  call's :class:`CallInput` (:class:`CallInfo`: its id, caller, deadline and
  metadata) and calls ``next``;
- a streaming call: :class:`EventPump` runs the handler as a task and streams
  the :data:`Event` values it emits, with backpressure; :func:`response`
  wraps one in a response message.

A streaming servicer method then reads::

    async def CallTool(self, request, context):
        call = self.chain.input("CallTool", context, request.tool, f"tool {request.tool!r}")
        async for response in self.chain.stream(call, self.handler(request)):
            yield response
"""

from plugins_sdk._context import CallInfo, Event, response
from plugins_sdk._failures import end_call
from plugins_sdk._interceptors import (
    CallInput,
    Chain,
    Interceptor,
    ServeCall,
    StreamNext,
    UnaryNext,
)
from plugins_sdk._plugin_service import grace_period
from plugins_sdk._pump import EventPump
from plugins_sdk._runner import (
    MAX_MESSAGE_BYTES,
    SIGNAL_GRACE,
    listen,
    sidecar_server,
    stop_on_signals,
)
from plugins_sdk._tracing import CallSpan, ServerSpans

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SIGNAL_GRACE",
    "CallInfo",
    "CallInput",
    "CallSpan",
    "Chain",
    "Event",
    "EventPump",
    "Interceptor",
    "ServeCall",
    "ServerSpans",
    "StreamNext",
    "UnaryNext",
    "end_call",
    "grace_period",
    "listen",
    "response",
    "sidecar_server",
    "stop_on_signals",
]
