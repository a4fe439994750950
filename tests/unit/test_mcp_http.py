"""The streamable-HTTP MCP endpoint in-process, on loopback, over a fake mesh: MCP
authorization (bearer JWTs, 401 with the protected-resource metadata, RFC 9728's
document), virtual servers bound to principals, sessions bound to their principal,
and the authorization hook deciding what a principal sees."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from clients import ToolCallResult
from orchestrator._mcp_config import McpGatewaySettings
from orchestrator.gateway import McpHttpEndpoint
from sidemesh.core import to_struct
from sidemesh.v1 import common_pb2, mesh_pb2, tool_pb2

ISSUER = "https://auth.example.test"


def descriptor(qualified: str) -> tool_pb2.ToolDescriptor:
    plugin, _, name = qualified.partition("/")
    return tool_pb2.ToolDescriptor(
        name=name, plugin=plugin, qualified_name=qualified,
        input_schema=to_struct({"type": "object"}),
    )  # fmt: skip


class FakeCall:
    """A tool call's stream that ends, after ``delay`` seconds, with the text ``done``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.result: ToolCallResult | None = None

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> tool_pb2.CallToolResponse:
        if self.result is not None:
            raise StopAsyncIteration
        await asyncio.sleep(self.delay)
        proto = tool_pb2.ToolResult(content=[common_pb2.Content(text="done")])
        self.result = ToolCallResult.from_proto(proto)
        return tool_pb2.CallToolResponse(result=proto)

    def cancel(self) -> None:
        pass


class FakeMesh:
    """The catalog part of ``AsyncMeshClient`` that the endpoint reads, and tool calls."""

    def call_tool_stream(self, tool: str, arguments: dict[str, Any]) -> FakeCall:
        return FakeCall(float(arguments.get("delay", 0)))

    async def list_tools(self) -> list[tool_pb2.ToolDescriptor]:
        return [descriptor("tools-demo/add"), descriptor("mcp-time/get_current_time")]

    async def list_agents(self) -> list[Any]:
        return []

    async def list_plugins(self) -> list[mesh_pb2.PluginStatus]:
        return []

    async def watch_events(self, **_: Any) -> AsyncIterator[Any]:
        if False:  # pragma: no cover - no events
            yield None


class OnlyTime:
    """An authorizer: ``jwt:bob`` may call mcp-time's tools only."""

    def may(self, principal: str, kind: str, target: str) -> bool:
        return principal != "jwt:bob" or target.startswith("mcp-time/")


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks(tmp_path: Path, key: rsa.RSAPrivateKey) -> Path:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    return path


def token(key: rsa.RSAPrivateKey, sub: str, audience: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": sub, "aud": audience, "iat": now, "exp": now + 300,
            "scope": "mcp", **claims}  # fmt: skip
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
async def endpoint(jwks: Path) -> AsyncIterator[McpHttpEndpoint]:
    settings = McpGatewaySettings.model_validate(
        {
            "http": {"enabled": True, "listen": "127.0.0.1:0"},
            "auth": {
                "enabled": True, "jwks_file": str(jwks), "authorization_servers": [ISSUER],
                "required_scopes": ["mcp"], "scopes_supported": ["mcp"],
                "resource": "https://mesh.example.test/mcp",
            },
            "servers": {"ops": {"tools": ["tools-demo/*"], "principals": ["jwt:alice"],
                                "rename": {"tools-demo/add": "plus"}}},
        }
    )  # fmt: skip
    ep = McpHttpEndpoint(settings, FakeMesh(), authorizer=OnlyTime())  # type: ignore[arg-type]
    await ep.start()
    try:
        yield ep
    finally:
        await ep.stop()


async def list_tools(url: str, bearer: str) -> list[str]:
    headers = {"Authorization": f"Bearer {bearer}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        return [t.name for t in (await client.list_tools()).tools]


async def test_no_token_is_401_pointing_at_the_protected_resource_metadata(
    endpoint: McpHttpEndpoint,
) -> None:
    url = endpoint.urls["sidemesh"]
    async with httpx2.AsyncClient() as http:
        refused = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert refused.status_code == 401
        challenge = refused.headers["www-authenticate"]
        # RFC 9728: on the resource URI's origin (the endpoint may be behind a proxy), ...
        well_known = "/.well-known/oauth-protected-resource/mcp"
        assert challenge.startswith(
            f'Bearer resource_metadata="https://mesh.example.test{well_known}"'
        )
        # ... and served here at the same path.
        document = (await http.get(endpoint.base_url + well_known)).json()
    assert document["resource"] == "https://mesh.example.test/mcp"
    assert document["authorization_servers"] == [ISSUER]
    assert document["scopes_supported"] == ["mcp"]


async def test_a_valid_token_lists_what_its_principal_may_call(
    endpoint: McpHttpEndpoint, key: rsa.RSAPrivateKey
) -> None:
    url, audience = endpoint.urls["sidemesh"], "https://mesh.example.test/mcp"
    alice = await list_tools(url, token(key, "alice", audience))
    assert alice == ["mcp-time.get_current_time", "tools-demo.add"]
    bob = await list_tools(url, token(key, "bob", audience))
    assert bob == ["mcp-time.get_current_time"]  # the authorizer hides the rest


@pytest.mark.parametrize(
    ("claims", "status", "error"),
    [
        ({"aud": "https://elsewhere.test/mcp"}, 401, "invalid_token"),
        ({"iss": "https://evil.test"}, 401, "invalid_token"),
        ({"exp": 1}, 401, "invalid_token"),
        ({"scope": "read"}, 403, "insufficient_scope"),
    ],
)
async def test_bad_tokens_are_refused(
    endpoint: McpHttpEndpoint,
    key: rsa.RSAPrivateKey,
    claims: dict[str, Any],
    status: int,
    error: str,
) -> None:
    bearer = token(key, "alice", "https://mesh.example.test/mcp", **claims)
    async with httpx2.AsyncClient() as http:
        refused = await http.post(
            endpoint.urls["sidemesh"],
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Authorization": f"Bearer {bearer}"},
        )
    assert refused.status_code == status
    assert f'error="{error}"' in refused.headers["www-authenticate"]


async def test_a_virtual_server_is_bound_to_its_principals_and_renames(
    endpoint: McpHttpEndpoint, key: rsa.RSAPrivateKey
) -> None:
    url = endpoint.urls["ops"]
    assert url.endswith("/mcp/ops")
    audience = "https://mesh.example.test/mcp/ops"
    assert await list_tools(url, token(key, "alice", audience)) == ["plus"]
    async with httpx2.AsyncClient() as http:
        bearer = token(key, "bob", audience)
        refused = await http.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Authorization": f"Bearer {bearer}"},
        )  # fmt: skip
    assert refused.status_code == 403


async def test_a_session_belongs_to_the_principal_that_opened_it(
    endpoint: McpHttpEndpoint, key: rsa.RSAPrivateKey
) -> None:
    url, audience = endpoint.urls["sidemesh"], "https://mesh.example.test/mcp"
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }  # fmt: skip
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient() as http:
        alice = {**accept, "Authorization": f"Bearer {token(key, 'alice', audience)}"}
        opened = await http.post(url, json=initialize, headers=alice)
        assert opened.status_code == 200
        session = opened.headers["mcp-session-id"]
        bob = {**accept, "Authorization": f"Bearer {token(key, 'bob', audience)}"}
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        stolen = await http.post(url, json=ping, headers={**bob, "Mcp-Session-Id": session})
        assert stolen.status_code == 404


@pytest.fixture
async def open_endpoint() -> AsyncIterator[McpHttpEndpoint]:
    settings = McpGatewaySettings.model_validate(
        {"http": {"enabled": True, "listen": "127.0.0.1:0"}}
    )
    ep = McpHttpEndpoint(settings, FakeMesh())  # type: ignore[arg-type]
    await ep.start()
    try:
        yield ep
    finally:
        await ep.stop()


async def test_a_post_gets_a_stream_only_when_its_call_may_need_one(
    open_endpoint: McpHttpEndpoint,
) -> None:
    url = open_endpoint.urls["sidemesh"]
    accept = {"Accept": "application/json, text/event-stream"}
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }  # fmt: skip
    async with httpx2.AsyncClient(headers=accept) as http:
        opened = await http.post(url, json=initialize)
        assert opened.headers["content-type"].startswith("text/event-stream")
        headers = {"Mcp-Session-Id": opened.headers["mcp-session-id"],
                   "Mcp-Protocol-Version": "2025-11-25"}  # fmt: skip
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                        headers=headers)  # fmt: skip
        listed = await http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                                 headers=headers)  # fmt: skip
        assert listed.headers["content-type"].startswith("application/json")
        assert [t["name"] for t in listed.json()["result"]["tools"]] == [
            "mcp-time.get_current_time",
            "tools-demo.add",
        ]
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "tools-demo.add", "arguments": {}}}  # fmt: skip
        plain = await http.post(url, json=call, headers=headers)
        assert plain.headers["content-type"].startswith("application/json")
        call["params"]["_meta"] = {"progressToken": "p1"}  # type: ignore[index]
        with_progress = await http.post(url, json={**call, "id": 4}, headers=headers)
        assert with_progress.headers["content-type"].startswith("text/event-stream")


async def test_a_2025_client_runs_a_tool_call_as_a_task(open_endpoint: McpHttpEndpoint) -> None:
    url = open_endpoint.urls["sidemesh"]
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }  # fmt: skip
    async with httpx2.AsyncClient(
        headers={"Accept": "application/json, text/event-stream"}
    ) as http:
        opened = await http.post(url, json=initialize)
        assert '"tasks"' in opened.text  # the capability is declared
        headers = {"Mcp-Session-Id": opened.headers["mcp-session-id"],
                   "Mcp-Protocol-Version": "2025-11-25"}  # fmt: skip

        async def rpc(n: int, method: str, params: dict[str, Any]) -> Any:
            body = {"jsonrpc": "2.0", "id": n, "method": method, "params": params}
            answer = (await http.post(url, json=body, headers=headers)).json()
            return answer.get("result", answer.get("error"))

        await rpc(1, "tools/list", {})
        created = await rpc(2, "tools/call", {"name": "tools-demo.add", "arguments": {"delay": 0.2},
                                              "task": {"ttl": 60000}})  # fmt: skip
        task_id = created["task"]["taskId"]
        assert created["task"]["status"] == "working" and created["task"]["ttl"] == 60000
        assert (await rpc(3, "tasks/get", {"taskId": task_id}))["status"] == "working"
        result = await rpc(4, "tasks/result", {"taskId": task_id})
        assert result["content"] == [{"type": "text", "text": "done"}]
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task_id}
        assert (await rpc(5, "tasks/get", {"taskId": task_id}))["status"] == "completed"
        assert [t["taskId"] for t in (await rpc(6, "tasks/list", {}))["tasks"]] == [task_id]
        slow = await rpc(7, "tools/call", {"name": "tools-demo.add", "arguments": {"delay": 30},
                                           "task": {}})  # fmt: skip
        cancelled = await rpc(8, "tasks/cancel", {"taskId": slow["task"]["taskId"]})
        assert cancelled["status"] == "cancelled"
        unknown = await rpc(9, "tasks/get", {"taskId": "nope"})
        assert unknown["code"] == -32602
