"""Test plugin: a sidecar granted network that calls the mesh's client listener over TCP.

Through its callback socket it is ``plugin:tcp-caller``; over TCP it is a
stranger that needs a credential of its own, and the owner's token file is
outside its sandbox. ``tests/integration/test_auth.py`` drives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from plugins_sdk import Plugin
from sidemesh.v1 import tool_pb2, tool_pb2_grpc

app = Plugin()  # named by its plugin.yaml


@app.tool()
async def call_over_tcp(
    address: str, tool: str = "tools-demo/add", token: str = ""
) -> dict[str, Any]:
    """Calls ``tool`` (a=1, b=2) at ``address`` over plain TCP, with ``token`` if given; the
    status it ended with, its message and the ErrorInfo reason."""
    arguments = struct_pb2.Struct()
    arguments.update({"a": 1, "b": 2})
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        call = stub.CallTool(
            tool_pb2.CallToolRequest(tool=tool, arguments=arguments), metadata=metadata, timeout=10
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return {"code": exc.code().name, "message": exc.details() or "",
                    "reason": _reason(exc.trailing_metadata())}  # fmt: skip
    return {"code": "OK", "message": "", "reason": ""}


@app.tool(read_only=True)
def read_file(path: str) -> dict[str, Any]:
    """Reads ``path`` (the owner's token file on the host, say): its text, or the error."""
    try:
        return {"ok": True, "text": Path(path).read_text()}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__}


def _reason(trailers: Any) -> str:
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""
