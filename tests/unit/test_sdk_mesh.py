"""plugins_sdk ``ctx.mesh``: callbacks inherit the call's deadline.

``ctx.mesh`` is the plugin's ``AsyncMeshClient`` seen through ``with_deadline``:
the same API, written once. (That callbacks join the call's trace is in
``test_sdk_tracing``: the client's interceptors do it, not this view.)
"""

from __future__ import annotations

from typing import Any

from clients import AsyncMeshClient
from sidemesh.v1 import mesh_pb2


class _Recorded:
    """A stub method recording the deadline and metadata each call was given."""

    def __init__(self, calls: list[dict[str, Any]]) -> None:
        self._calls = calls

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        self._calls.append(kwargs)

        async def reply() -> mesh_pb2.MeshServiceListToolsResponse:
            return mesh_pb2.MeshServiceListToolsResponse()

        return reply()


class _Stubs:
    def __init__(self, calls: list[dict[str, Any]]) -> None:
        self.mesh = type("Mesh", (), {"ListTools": _Recorded(calls)})()


def _client(calls: list[dict[str, Any]]) -> AsyncMeshClient:
    client = AsyncMeshClient("unix:/nonexistent/mesh.sock", timeout=30, token="t")
    client._connect = lambda: (None, _Stubs(calls))  # type: ignore[method-assign,assignment,return-value]
    return client


async def test_callbacks_default_to_the_remaining_deadline() -> None:
    calls: list[dict[str, Any]] = []
    owner = _client(calls)
    view = owner.with_deadline(lambda: 2.5)
    await view.list_tools()
    assert calls[-1]["timeout"] == 2.5
    assert view.timeout == 2.5 and owner.timeout == 30
    assert dict(calls[-1]["metadata"])["authorization"] == "Bearer t"  # the owner's credentials
    await owner.list_tools()
    assert calls[-1]["timeout"] == 30


async def test_an_explicit_timeout_is_kept_and_no_deadline_is_none() -> None:
    calls: list[dict[str, Any]] = []
    view = _client(calls).with_deadline(lambda: None)
    await view.list_tools(timeout=1.0, metadata=[("k", "v")])
    assert calls[-1]["timeout"] == 1.0 and ("k", "v") in calls[-1]["metadata"]
    await view.list_tools()
    assert calls[-1]["timeout"] is None  # no deadline: none for the callback


async def test_closing_the_view_leaves_the_plugins_client_open() -> None:
    calls: list[dict[str, Any]] = []
    owner = _client(calls)
    await owner.with_deadline(lambda: 1.0).close()
    await owner.list_tools()
    assert len(calls) == 1
