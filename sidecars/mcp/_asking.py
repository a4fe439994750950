"""Server-to-client requests and log messages of the MCP server, given to the call that caused them.

An MCP server may ask its client something while a tool runs
(``sampling/createMessage``, ``elicitation/create``, ``roots/list``) and log
to it (``notifications/message``). The bridge is that client; the one who
can answer is the mesh caller of the call, when it came through
``McpService.CallToolInteractive``.

Which call: a 2026 server asks within the call's own result (the SDK runs
the callbacks in the call's task, so :data:`_CURRENT` names it); a 2025
server over stdio sends a request that names no call, so it goes to the
only call in flight on the session that can answer that method. With none,
or several, the server gets an MCP error saying why: the bridge never
guesses, since a sampling request given to the wrong caller would leak one
client's work to another. Log messages follow the same rule (the current
call, else the only call in flight; else the ``Watch`` streams that asked
for logs) and always reach the plugin's log too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

import mcp_types as types
from pydantic import ValidationError

from plugins_sdk.serving import Event
from sidemesh.core import struct_to_dict, to_struct
from sidemesh.v1 import common_pb2, mcp_pb2

log = logging.getLogger("sidecars.mcp")

SAMPLING, ELICITATION, ROOTS = "sampling/createMessage", "elicitation/create", "roots/list"
#: The MCP log levels as the mesh's.
LOG_LEVELS = {
    "debug": common_pb2.LOG_LEVEL_DEBUG, "info": common_pb2.LOG_LEVEL_INFO,
    "notice": common_pb2.LOG_LEVEL_NOTICE, "warning": common_pb2.LOG_LEVEL_WARNING,
    "error": common_pb2.LOG_LEVEL_ERROR, "critical": common_pb2.LOG_LEVEL_CRITICAL,
    "alert": common_pb2.LOG_LEVEL_ALERT, "emergency": common_pb2.LOG_LEVEL_EMERGENCY,
}  # fmt: skip

#: The call whose task is running (set around the MCP request of each call).
_CURRENT: ContextVar[CallSlot | None] = ContextVar("sidemesh_mcp_call", default=None)


class Refused(Exception):
    """A server request no caller can answer; ``code`` is the MCP error code to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CallSlot:
    """One call in flight: what its caller can answer, and where its events go."""

    def __init__(
        self,
        tool: str,
        methods: frozenset[str],
        emit: Callable[[Event], Awaitable[None]],
        offer: Callable[[Event], bool],
        *,
        interactive: bool = False,
    ) -> None:
        self.tool = tool
        #: The server requests the caller declared it can answer (none for plain ``CallTool``).
        self.methods = methods
        #: The call came through ``CallToolInteractive`` (its caller could answer something).
        self.interactive = interactive
        self._emit = emit
        self._offer = offer
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Sends ``method`` to the caller and waits for its answer (within the call's deadline)."""
        request_id = str(next(self._ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            request = mcp_pb2.McpServerRequest(id=request_id, method=method)
            request.params.CopyFrom(to_struct(params))
            await self._emit(("server_request", request))
            return await future
        finally:
            self._pending.pop(request_id, None)

    def answer(self, answer: mcp_pb2.McpClientAnswer) -> None:
        """Delivers the caller's answer; one for an unknown id is ignored (it came too late)."""
        future = self._pending.get(answer.id)
        if future is None or future.done():
            return
        if answer.WhichOneof("outcome") == "error":
            future.set_exception(Refused(answer.error.code, answer.error.message))
        else:
            future.set_result(struct_to_dict(answer.result))

    def log(self, record: common_pb2.LogRecord) -> None:
        """Streams a log message of the server to the caller (dropped if the caller is
        behind: the server's session cannot wait for it)."""
        self._offer(("log", record))

    def close(self) -> None:
        """Fails what is still waiting for an answer: the call ended."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Refused(types.INTERNAL_ERROR, "the call ended"))


class InFlight:
    """The calls in flight on the link, and the rule that picks one for a server message.

    Over stdio a server's request or log message does not say which request it
    belongs to. It goes to a call only when that call is the *only* request in
    flight on the session (other requests, a listing or an unsubscribe from
    another client, count too): anything else would be a guess, and a wrong
    guess hands one client's data to another.
    """

    def __init__(self, plugin: str) -> None:
        self._plugin = plugin
        self._calls: list[CallSlot] = []
        #: Requests in flight that are not tool calls (listings, reads, subscriptions).
        self.others = 0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Counts a request while it is in flight, unless it is a call's own (a slot's)."""
        if _CURRENT.get() is not None:
            yield
            return
        self.others += 1
        try:
            yield
        finally:
            self.others -= 1

    @contextlib.contextmanager
    def call(self, slot: CallSlot) -> Iterator[None]:
        """Registers ``slot`` and makes it the current call of the running task."""
        self._calls.append(slot)
        token = _CURRENT.set(slot)
        try:
            yield
        finally:
            _CURRENT.reset(token)
            self._calls.remove(slot)
            slot.close()

    def for_request(self, method: str) -> CallSlot:
        """The call that must answer ``method``; ``Refused`` when none can, or it is unclear."""
        what = _describe(method)
        current = _CURRENT.get()
        if current is not None:
            if method in current.methods:
                return current
            raise Refused(types.METHOD_NOT_FOUND, _cannot(current, what, self._plugin))
        if not self._calls:
            raise Refused(
                types.METHOD_NOT_FOUND,
                f"no call is in flight through the Sidemesh mesh, so no client can answer {what}",
            )
        if len(self._calls) + self.others > 1:
            raise Refused(
                types.INTERNAL_ERROR,
                f"{len(self._calls) + self.others} requests are in flight and the request "
                f"names none of them, so the Sidemesh bridge cannot tell which client must "
                f"answer {what}",
            )
        only = self._calls[0]
        if method not in only.methods:
            raise Refused(types.METHOD_NOT_FOUND, _cannot(only, what, self._plugin))
        return only

    def for_log(self) -> CallSlot | None:
        """The call a log message belongs to: the current one, else the only request in
        flight when it is a call; None: nobody's in particular."""
        current = _CURRENT.get()
        if current is not None:
            return current
        return self._calls[0] if len(self._calls) == 1 and not self.others else None


def _describe(method: str) -> str:
    return {SAMPLING: "sampling", ELICITATION: "elicitation", ROOTS: "roots/list"}.get(
        method, method
    )


def _cannot(slot: CallSlot, what: str, plugin: str) -> str:
    if not slot.interactive:
        return (
            f"the caller of {plugin}/{slot.tool} cannot answer {what}: it made the plain "
            "CallTool (a gRPC client, or an MCP client without that capability); "
            "McpService.CallToolInteractive answers"
        )
    return f"the caller of {plugin}/{slot.tool} did not declare that it can answer {what}"


def capabilities(declared: mcp_pb2.McpClientCapabilities) -> frozenset[str]:
    """The server request methods a caller can answer, from what it declared."""
    methods = {
        SAMPLING: declared.sampling, ELICITATION: declared.elicitation, ROOTS: declared.roots
    }  # fmt: skip
    return frozenset(m for m, able in methods.items() if able)


def log_record(params: types.LoggingMessageNotificationParams) -> common_pb2.LogRecord:
    """An MCP log message as the mesh's ``LogRecord`` (``data`` kept when it is an object)."""
    data = params.data
    record = common_pb2.LogRecord(
        level=LOG_LEVELS.get(params.level, common_pb2.LOG_LEVEL_ERROR),
        message=data if isinstance(data, str) else _short_json(data),
        logger=params.logger or "",
    )
    if isinstance(data, dict):
        record.data.CopyFrom(to_struct(data))
    return record


def _short_json(value: Any) -> str:
    return json.dumps(value, default=str)[:2000]


def struct_params(params: Any) -> dict[str, Any]:
    """An SDK params model as MCP JSON."""
    dumped: dict[str, Any] = params.model_dump(by_alias=True, mode="json", exclude_none=True)
    return dumped


class Callbacks:
    """The bridge's MCP client callbacks: each server request goes to the call that must answer."""

    def __init__(
        self,
        in_flight: InFlight,
        on_log: Callable[[Any], Any],
        unattributed_log: Callable[[common_pb2.LogRecord], None],
    ) -> None:
        self._in_flight = in_flight
        self._on_log = on_log
        self._unattributed_log = unattributed_log

    async def sampling(
        self, context: Any, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        model = types.CreateMessageResultWithTools if params.tools else types.CreateMessageResult
        return await self._ask(SAMPLING, params, model)  # type: ignore[no-any-return]

    async def elicitation(
        self, context: Any, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        return await self._ask(ELICITATION, params, types.ElicitResult)  # type: ignore[no-any-return]

    async def roots(self, context: Any) -> types.ListRootsResult | types.ErrorData:
        return await self._ask(ROOTS, None, types.ListRootsResult)  # type: ignore[no-any-return]

    async def logging(self, params: types.LoggingMessageNotificationParams) -> None:
        await self._on_log(params)
        slot = self._in_flight.for_log()
        if slot is not None:
            slot.log(log_record(params))
        else:
            self._unattributed_log(log_record(params))

    async def _ask(self, method: str, params: Any, model: Any) -> Any:
        try:
            slot = self._in_flight.for_request(method)
            answer = await slot.ask(method, struct_params(params) if params is not None else {})
        except Refused as refused:
            log.warning("refused the MCP server's %s request: %s", method, refused.message)
            return types.ErrorData(code=refused.code, message=refused.message)
        try:
            return model.model_validate(answer)
        except ValidationError as err:
            first = str(err).splitlines()[0:2]
            return types.ErrorData(
                code=types.INTERNAL_ERROR,
                message=f"the client's answer to {method} is not valid MCP: {' '.join(first)}",
            )
