"""plugins_sdk ``ctx.mesh``: callbacks inherit the call's deadline.

(That they join the call's trace is in ``test_sdk_tracing``: the client's
interceptors do it, not this view.)
"""

from __future__ import annotations

from typing import Any

from plugins_sdk._mesh import CallMesh


class RecordingClient:
    """Stands in for ``AsyncMeshClient``, recording what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    async def call_tool(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(("call_tool", args, kwargs))
        return "result"

    def invoke(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(("invoke", args, kwargs))
        return "stream"


async def test_callbacks_default_to_the_remaining_deadline() -> None:
    client = RecordingClient()
    mesh = CallMesh(client, lambda: 2.5)  # type: ignore[arg-type]
    assert await mesh.call_tool("tools-demo/add", {"a": 1}, b=2) == "result"
    name, args, kwargs = client.calls[-1]
    assert name == "call_tool"
    assert args == ("tools-demo/add", {"a": 1})
    assert kwargs == {"timeout": 2.5, "metadata": (), "b": 2}


async def test_an_explicit_timeout_and_metadata_are_kept() -> None:
    client = RecordingClient()
    mesh = CallMesh(client, lambda: None)  # type: ignore[arg-type]
    mesh.invoke("assistant", "hi", timeout=1.0, metadata=[("k", "v")])
    _, args, kwargs = client.calls[-1]
    assert args == ("assistant", "hi")
    assert kwargs == {"timeout": 1.0, "metadata": [("k", "v")]}
    await mesh.call_tool("add")
    assert client.calls[-1][2]["timeout"] is None  # no deadline: none for the callback
