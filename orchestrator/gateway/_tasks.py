"""MCP tasks (2025-11-25, experimental): a tool call the client starts now and collects later.

A 2025-11-25 client may send ``tools/call`` with ``params.task``: the gateway
then starts the mesh call in the background and answers at once with a
``CreateTaskResult``; ``tasks/get`` reports its status, ``tasks/result`` waits
for and returns the tool's result, ``tasks/list`` and ``tasks/cancel`` do what
they say. A task belongs to the principal that created it, and is forgotten
``ttl`` milliseconds after its creation (the client's, capped).

The official SDK routes no ``tasks/*`` for 2025-11-25 and checks
``tools/call`` results against ``CallToolResult``, so the task-augmented
call is taken by a server middleware before that check, and the ``tasks/*``
methods are registered as the SDK's custom methods. A background task's
server requests (sampling, elicitation, roots) are refused: its request has
ended, and MCP's ``input_required`` task status is not implemented here.
2026 clients use ``input_required`` results instead (``_calls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import mcp_types as types
from mcp.server import ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.shared.exceptions import MCPError

#: The protocol versions whose clients have tasks.
TASK_VERSIONS = ("2025-11-25",)
#: A task's lifetime when the client asks for none, and the longest it may ask (ms).
DEFAULT_TTL_MS, MAX_TTL_MS = 300_000, 3_600_000
#: How often the client is told to poll (ms).
POLL_INTERVAL_MS = 500
#: Tasks kept at most; the oldest finished ones are forgotten first.
MAX_TASKS = 10_000

RunCall = Callable[
    [ServerRequestContext[Any], types.CallToolRequestParams], Awaitable[types.CallToolResult]
]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Task:
    task_id: str
    principal: str
    ttl: int
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    status: str = "working"
    message: str | None = None
    result: dict[str, Any] | None = None
    error: MCPError | None = None
    runner: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float = 0.0

    def wire(self) -> dict[str, Any]:
        task: dict[str, Any] = {
            "taskId": self.task_id, "status": self.status, "createdAt": self.created,
            "lastUpdatedAt": self.updated, "ttl": self.ttl, "pollInterval": POLL_INTERVAL_MS,
        }  # fmt: skip
        if self.message:
            task["statusMessage"] = self.message
        return task

    def finish(self, status: str, message: str | None = None) -> None:
        self.status, self.message, self.updated = status, message, _now()
        self.done.set()


class Tasks:
    """The gateway's tasks, and the SDK hooks that serve them."""

    def __init__(self, run_call: RunCall, principal_of: Callable[[Any], str]) -> None:
        self._run_call = run_call
        self._principal_of = principal_of
        self._tasks: dict[str, _Task] = {}

    # -- the hooks --------------------------------------------------------------------

    async def middleware(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Takes a task-augmented ``tools/call`` of a 2025-11-25 client."""
        params = ctx.params
        if (
            ctx.method != "tools/call"
            or ctx.protocol_version not in TASK_VERSIONS
            or not isinstance(params, dict)
            or not isinstance(params.get("task"), dict)
        ):
            return await call_next(ctx)
        call = types.CallToolRequestParams.model_validate(
            {k: v for k, v in params.items() if k != "task"}, by_name=False
        )
        requested = params["task"].get("ttl")
        ttl = min(int(requested), MAX_TTL_MS) if isinstance(requested, int) else DEFAULT_TTL_MS
        task = self._create(self._principal_of(ctx), ttl)
        background = replace(ctx, params={k: v for k, v in params.items() if k != "task"})
        task.runner = asyncio.create_task(self._run(task, background, call))
        return {"task": task.wire()}

    def register(self, server: Any) -> None:
        """The ``tasks/*`` methods, on the SDK server."""
        server.add_request_handler("tasks/get", types.GetTaskRequestParams, self._get)
        server.add_request_handler("tasks/result", types.GetTaskPayloadRequestParams, self._result)
        server.add_request_handler("tasks/list", types.PaginatedRequestParams, self._list)
        server.add_request_handler("tasks/cancel", types.CancelTaskRequestParams, self._cancel)

    @staticmethod
    def capability() -> types.ServerTasksCapability:
        return types.ServerTasksCapability(
            list=types.TasksListCapability(),
            cancel=types.TasksCancelCapability(),
            requests=types.ServerTasksRequestsCapability(
                tools=types.TasksToolsCapability(call=types.TasksCallCapability())
            ),
        )

    def close(self) -> None:
        for task in self._tasks.values():
            if task.runner is not None:
                task.runner.cancel()

    # -- running ----------------------------------------------------------------------

    def _create(self, principal: str, ttl: int) -> _Task:
        self._expire()
        task = _Task(secrets.token_urlsafe(18), principal, ttl)
        task.expires = time.monotonic() + ttl / 1000
        self._tasks[task.task_id] = task
        return task

    async def _run(
        self, task: _Task, ctx: ServerRequestContext[Any], call: types.CallToolRequestParams
    ) -> None:
        try:
            result = await self._run_call(ctx, call)
        except asyncio.CancelledError:
            task.finish("cancelled")
            raise
        except MCPError as err:
            task.error = err
            task.finish("failed", err.message)
            return
        except Exception as err:  # a bug: the task fails, the gateway goes on
            task.error = MCPError(types.INTERNAL_ERROR, f"{type(err).__name__}: {err}")
            task.finish("failed", str(err))
            return
        task.result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        task.finish("failed" if result.is_error else "completed")

    def _expire(self) -> None:
        now = time.monotonic()
        for task_id in [t for t, task in self._tasks.items() if task.expires < now]:
            task = self._tasks.pop(task_id)
            if task.runner is not None:
                task.runner.cancel()
        while len(self._tasks) >= MAX_TASKS:
            oldest = next(iter(self._tasks))
            task = self._tasks.pop(oldest)
            if task.runner is not None:
                task.runner.cancel()

    def _find(self, ctx: ServerRequestContext[Any], task_id: str) -> _Task:
        self._expire()
        task = self._tasks.get(task_id)
        if task is None or task.principal != self._principal_of(ctx):
            raise MCPError(types.INVALID_PARAMS, f"Unknown task: {task_id}")
        return task

    # -- tasks/* ----------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any], params: types.GetTaskRequestParams) -> Any:
        return self._find(ctx, params.task_id).wire()

    async def _result(
        self, ctx: ServerRequestContext[Any], params: types.GetTaskPayloadRequestParams
    ) -> Any:
        task = self._find(ctx, params.task_id)
        await task.done.wait()
        if task.status == "cancelled":
            raise MCPError(types.INVALID_PARAMS, f"Task {task.task_id} was cancelled")
        if task.error is not None:
            raise task.error
        related = {"io.modelcontextprotocol/related-task": {"taskId": task.task_id}}
        return {**(task.result or {}), "_meta": related}

    async def _list(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams
    ) -> Any:
        self._expire()
        principal = self._principal_of(ctx)
        return {"tasks": [t.wire() for t in self._tasks.values() if t.principal == principal]}

    async def _cancel(
        self, ctx: ServerRequestContext[Any], params: types.CancelTaskRequestParams
    ) -> Any:
        task = self._find(ctx, params.task_id)
        if task.done.is_set():
            raise MCPError(types.INVALID_PARAMS, f"Task {task.task_id} is already {task.status}")
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.runner
        task.finish("cancelled")
        return task.wire()
