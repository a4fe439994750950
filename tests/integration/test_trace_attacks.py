"""A plugin forging traces and filling the trace store, in a real mesh: contained and reported.

``tests/plugins/forger`` sends OTLP on its callback socket itself, as any
sandboxed sidecar can: spans with the ids of the orchestrator's own spans
(learned from the ``traceparent`` of the call it serves) claiming to be the
orchestrator, spans into another plugin's trace, thousands of large spans,
and malformed requests. Each test asserts what the operator sees (``GetTrace``
and ``sidemesh trace``, the ``sandbox_violation`` event, ``sidemesh plugins
-v``, the store's file) and that the mesh keeps serving ``tools-demo``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from meshproc import TEST_PLUGINS, Mesh, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from sandboxkit import TOOLS_DEMO, assert_mesh_serves, attack, next_event, watching

from clients import AsyncMeshClient
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

pytestmark = pytest.mark.integration

MakeMesh = Callable[..., Mesh]
FORGER = str(TEST_PLUGINS / "forger")
CLIENT_SPAN = "sidemesh.v1.ToolService/CallTool"
SERVER, CLIENT = mesh_pb2.SPAN_KIND_SERVER, mesh_pb2.SPAN_KIND_CLIENT


def _tracer() -> trace.Tracer:
    """A tracer for the test's own root spans (so that it knows the trace ids)."""
    return TracerProvider().get_tracer("test-client")


def _mesh(make_mesh: MakeMesh, **config: Any) -> Mesh:
    return make_mesh(plugin_dirs=[FORGER, str(TOOLS_DEMO)], **config).start(
        ready=["forger", "tools-demo"]
    )


def _spans(mesh: Mesh, trace_id: str, where: Callable[[list[mesh_pb2.TraceSpan]], bool]) -> Any:
    """The trace's spans from ``GetTrace``, once ``where`` holds for them."""

    def get() -> list[mesh_pb2.TraceSpan] | None:
        with grpc.insecure_channel(mesh.address) as channel:
            stub = mesh_pb2_grpc.MeshServiceStub(channel)
            try:
                spans = list(stub.GetTrace(mesh_pb2.GetTraceRequest(trace_id=trace_id)).spans)
            except grpc.RpcError:
                return None
        return spans if where(spans) else None

    return wait_until(get, 15, f"trace {trace_id} in the store", interval=0.2)


async def _cli(mesh: Mesh, *args: str) -> str:
    command = [sys.executable, "-m", "orchestrator.cli", *args, "-a", mesh.address]
    out = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def _traced_call(mesh: Mesh, tool: str, **arguments: Any) -> tuple[str, dict[str, Any]]:
    """Calls ``tool`` under a root span of the test's; its trace id and what it returned."""
    with _tracer().start_as_current_span("test client") as root:
        async with AsyncMeshClient(mesh.address) as client:
            result = await client.call_tool(tool, arguments, timeout=60)
    assert not result.is_error, result.text
    return f"{root.get_span_context().trace_id:032x}", dict(result.structured or {})


async def test_forged_spans_are_the_plugins_and_never_the_orchestrators(
    make_mesh: MakeMesh,
) -> None:
    mesh = _mesh(make_mesh)
    victim, _ = await _traced_call(mesh, "tools-demo/add", a=2, b=3)
    _spans(mesh, victim, lambda spans: any(s.service == "tools-demo" for s in spans))

    async with watching(mesh, "forger") as events:
        own, got = await _traced_call(mesh, "forger/forge", victim_trace=victim)
        assert got["trace_id"] == own
        # Its span with the id of the orchestrator's CLIENT span is taken as its own, also
        # when sent again once the orchestrator has stored its span (an insert-or-replace
        # store would now show what the plugin wrote in the orchestrator's place).
        assert got["own"]["code"] == "OK", got
        later = await attack(mesh, "forger/forged_later")
        assert later["code"] == "OK", later
        spans = _spans(
            mesh, own, lambda spans: any(s.service == "forger" and s.kind == SERVER for s in spans)
        )
        named = [(s.name, s.service) for s in spans if s.span_id == got["span_id"]]
        assert (CLIENT_SPAN, "sidemesh-orchestrator") in named, named
        same_id = {s.source: s for s in spans if s.span_id == got["span_id"]}
        real = same_id["orchestrator"]
        assert (real.name, real.service, real.kind) == (
            CLIENT_SPAN,
            "sidemesh-orchestrator",
            CLIENT,
        )
        assert real.attributes["sidemesh.plugin"] == "forger"
        forged = same_id["plugin:forger"]
        assert (forged.name, forged.service) == ("FORGED", "forger")
        assert forged.attributes["sidemesh.claimed_service"] == "sidemesh-orchestrator"
        assert all(s.source != "orchestrator" for s in spans if s.name == "FORGED")

        # No span reached a trace that is not its own, even after calling back with it.
        assert got["injected"]["code"] == "PERMISSION_DENIED", got
        assert got["after_callback"]["code"] == "PERMISSION_DENIED", got
        violation = await next_event(events, "sandbox_violation", 15)
    assert "never routed to it" in violation.detail
    stolen = _spans(mesh, victim, lambda spans: True)
    assert not [s for s in stolen if s.name == "INJECTED" or s.source == "plugin:forger"]

    waterfall = await _cli(mesh, "trace", own)
    line = next(line for line in waterfall.splitlines() if "FORGED" in line)
    assert "plugin:forger" in line and "reuses another source's span id" in line
    plugins = await _cli(mesh, "plugins", "-v")
    forger = plugins[plugins.index("\nforger ") :]
    assert "2 for traces not its own" in forger, plugins
    await assert_mesh_serves(mesh)


async def test_a_plugin_flooding_the_trace_store_is_stopped_at_its_quota(
    make_mesh: MakeMesh,
) -> None:
    mesh = _mesh(make_mesh, plugins={"forger": {"sandbox": {"trace_quota_mb": 1}}})
    async with watching(mesh, "forger") as events:
        _, got = await _traced_call(mesh, "forger/flood", spans=1600, kib=5, batch=100)
        violation = await next_event(events, "sandbox_violation", 15)
    # 8 MiB sent against a quota of 1 MiB: the first exports are stored, the rest refused.
    assert got["codes"].get("OK", 0) >= 1, got
    assert got["codes"].get("RESOURCE_EXHAUSTED", 0) >= 10, got
    assert "over its trace quota" in violation.detail
    assert "of 1 MiB used" in violation.detail
    # Logged too, once (refusals are reported at most every 10 s), not per refused export.
    warnings = [line for line in mesh.log().splitlines() if "over its trace quota" in line]
    assert 1 <= len(warnings) <= 2, warnings

    usage = mesh.plugin("forger").trace_usage
    assert usage.bytes_quota == 1 << 20
    assert usage.bytes_used <= usage.bytes_quota
    assert usage.refused_over_quota >= 1000
    plugins = await _cli(mesh, "plugins", "-v")
    forger = plugins[plugins.index("\nforger ") :]
    assert "traces: 1.0 of 1 MiB quota" in forger, plugins
    assert "over quota" in forger
    # The store's files (with its write-ahead log) hold the quota's worth, not the 8 MiB sent.
    files = {p.name: p.stat().st_size for p in mesh.state_dir.glob("traces.db*")}
    assert sum(files.values()) <= 3 << 20, files

    # The mesh serves, and other plugins' spans are still stored.
    await assert_mesh_serves(mesh)
    after, _ = await _traced_call(mesh, "tools-demo/add", a=1, b=1)
    _spans(mesh, after, lambda spans: any(s.source == "plugin:tools-demo" for s in spans))


async def test_malformed_exports_are_refused_and_the_mesh_keeps_serving(
    make_mesh: MakeMesh,
) -> None:
    mesh = _mesh(make_mesh)
    _, got = await _traced_call(mesh, "forger/garbage")
    for attack_name in ("not_protobuf", "bad_ids", "bad_utf8", "too_deep"):
        assert got[attack_name]["code"] == "INVALID_ARGUMENT", (attack_name, got)
    usage = mesh.plugin("forger").trace_usage
    assert usage.refused_malformed >= 5
    assert usage.bytes_quota == 16 << 20  # its manifest's sandbox.trace_quota_mb (the default)
    await assert_mesh_serves(mesh)
    # The store still takes spans: a new call's trace holds the orchestrator's and the plugin's.
    after, _ = await _traced_call(mesh, "tools-demo/add", a=1, b=1)
    _spans(
        mesh,
        after,
        lambda spans: {"orchestrator", "plugin:tools-demo"} <= {s.source for s in spans},
    )
    assert (await attack(mesh, "tools-demo/add", a=2, b=2)) == {"result": 4}
