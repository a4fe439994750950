"""The data plane forwards real gRPC calls: what clients and upstreams see."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import pytest
from dataplanekit import (
    ROUTES,
    WAIT,
    Decider,
    Mesh,
    call_tool,
    make_dataplane,
    results,
    temp_dir,
    wait_records,
)

from clients import SidemeshError
from sidemesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    mcp_pb2,
    mcp_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    tool_pb2_grpc,
)


async def test_server_stream_is_forwarded_with_the_target_rewritten(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        responses = await results(
            tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo", payload="hi")
        )
    assert [r.result.content[0].text for r in responses] == ["a:hi"]
    assert mesh.a.requests[-1].tool == "echo"  # the decision's rewritten first message
    call = mesh.decider.calls[-1]
    assert (call.path, call.kind, call.listener, call.principal) == (
        "/sidemesh.v1.ToolService/CallTool",
        "unary_stream",
        "clients",
        "anonymous",
    )
    assert call.peer.startswith("127.0.0.1:")


async def test_streams_of_many_messages_and_a_tcp_upstream(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        responses = await results(stub, call_tool("b/progress", count=50))
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.InvokeRequest(agent="a")
        request.input.data.update({"count": 200, "size": 4096})
        deltas = [r async for r in agents.Invoke(request)]
    assert len(responses) == 51 and responses[-1].result.content[0].text == "b:done"
    assert len(deltas) == 201 and all(len(d.text_delta.text) == 4096 for d in deltas[:-1])
    assert deltas[-1].result.status == agent_pb2.AGENT_RESULT_STATUS_COMPLETED


async def test_unary_unary(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.unix) as channel:
        reply = await mcp_pb2_grpc.McpServiceStub(channel).GetServerInfo(
            mcp_pb2.GetServerInfoRequest(server="b"), timeout=WAIT
        )
    assert reply.info.name == "b:b"


async def test_bidi_chat(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        chat = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=WAIT)
        await chat.write(agent_pb2.ChatRequest(start=agent_pb2.ChatStart(agent="a")))
        first = await chat.read()
        heard = []
        for text in ("one", "two", "three"):
            await chat.write(agent_pb2.ChatRequest(input=agent_pb2.AgentInput(text=text)))
            heard.append((await chat.read()).text_delta.text)
        await chat.done_writing()
        assert await chat.read() == grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK
    assert first.text_delta.text == "started a"
    assert heard == ["a heard one", "a heard two", "a heard three"]
    (record,) = await wait_records(mesh.plane)
    assert (record.requests, record.responses, record.context) == (4, 4, {"chat": "a"})


async def test_a_chat_that_ends_before_its_start_is_refused_by_the_decision(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        chat = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=WAIT)
        await chat.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await chat.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before its first message" in caught.value.details()


async def test_metadata_both_ways_and_the_plugins_trailers(mesh: Mesh) -> None:
    metadata = (
        ("x-custom", "v1"),
        ("x-raw-bin", b"\x00\xff"),
        ("sidemesh-principal", "root"),
        ("sidemesh-caller", "forged"),
    )
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        call = tool_pb2_grpc.ToolServiceStub(channel).CallTool(
            call_tool("a/meta"), metadata=metadata
        )
        responses = [r async for r in call]
        initial, trailing = await call.initial_metadata(), await call.trailing_metadata()
    assert responses[0].result.content[0].text == "a:meta"
    assert ("x-initial", "i1") in list(initial)
    assert ("x-trailing", "t2") in list(trailing) and ("x-trailing-bin", b"\x00\x01") in list(
        trailing
    )
    seen = mesh.a.metadata[-1]
    assert seen["x-custom"] == "v1" and seen["x-raw-bin"] == b"\x00\xff"
    assert seen["x-routed-by"] == "test" and seen["x-decider-bin"] == b"\x01\x02"
    assert "sidemesh-principal" not in seen and "sidemesh-caller" not in seen
    assert seen["sidemesh-call-id"] == mesh.decider.calls[-1].call_id
    assert mesh.decider.calls[-1].header("x-raw-bin") == b"\x00\xff"
    assert mesh.decider.calls[-1].header("sidemesh-principal") is None


async def test_the_plugins_own_error_passes_through_with_its_rich_details(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel),
                call_tool("a/fail", code="FAILED_PRECONDITION", message="nope 100% é"),
            )
    err = caught.value
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "nope 100% é")
    assert ("x-plugin-trailer", "t1") in list(err.trailing_metadata())
    assert SidemeshError.from_rpc_error(err).reason == "PLUGIN_REASON"
    assert mesh.decider.failures == []  # not a transport failure
    (record,) = await wait_records(mesh.plane)
    assert record.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert [a[1] for a in record.attempts] == ["status"]


async def test_a_refusal_keeps_code_message_and_details(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("missing/x"))
    err = caught.value
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no tool named 'missing/x'")
    assert SidemeshError.from_rpc_error(err).reason == "TARGET_NOT_FOUND"
    assert mesh.a.calls == mesh.b.calls == 0
    (record,) = await wait_records(mesh.plane)
    assert (record.code, record.context, record.attempts, record.decided_ns > 0) == (
        5,
        None,
        [],
        True,
    )


async def test_decide_raising_ends_the_call_internal(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(call: object) -> object:
        raise RuntimeError("catalog exploded")

    directory = temp_dir()
    decider = Decider()
    decider.decide = broken  # type: ignore[method-assign]
    plane = make_dataplane(decider, None)
    address = plane.listen("127.0.0.1:0", listener_id="x")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"))
            # Without an internal server, unrouted paths are UNIMPLEMENTED.
            with pytest.raises(grpc.aio.AioRpcError) as unrouted:
                await mesh_pb2_grpc.MeshServiceStub(channel).ListPlugins(
                    mesh_pb2.ListPluginsRequest()
                )
    finally:
        plane.stop(0)
        directory.rmdir()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "catalog exploded" in caught.value.details()
    (logged,) = [r for r in caplog.records if r.name == "sidemesh.dataplane"]
    assert logged.getMessage() == "the data plane's decide callback raised"
    assert logged.exc_info is not None and "catalog exploded" in str(logged.exc_info[1])
    assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_unrouted_calls_reach_the_internal_server_with_trusted_identity(mesh: Mesh) -> None:
    forged = (("sidemesh-principal", "plugin:admin"), ("sidemesh-listener", "x"), ("x-keep", "k"))
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        await mesh_pb2_grpc.MeshServiceStub(channel).ListPlugins(
            mesh_pb2.ListPluginsRequest(), metadata=forged, timeout=WAIT
        )
    async with grpc.aio.insecure_channel(mesh.callback) as channel:
        await mesh_pb2_grpc.MeshServiceStub(channel).ListPlugins(mesh_pb2.ListPluginsRequest())
    tcp, callback = mesh.internal.metadata
    assert (tcp["sidemesh-principal"], tcp["sidemesh-listener"], tcp["x-keep"]) == (
        "anonymous",
        "clients",
        "k",
    )
    assert tcp["sidemesh-peer"].startswith("127.0.0.1:")
    assert (
        callback["sidemesh-principal"],
        callback["sidemesh-listener"],
        callback["sidemesh-caller"],
    ) == ("plugin:files", "cb-files", "files")
    assert mesh.plane.take_records() == []  # records are for routed calls


async def test_unix_peers_are_named_by_their_credentials(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.unix) as channel:
        await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"))
    call = mesh.decider.calls[-1]
    assert call.principal == f"unix:uid:{os.getuid()}"
    assert (call.peer_pid, call.peer_uid, call.peer_gid) == (os.getpid(), os.getuid(), os.getgid())
    assert call.peer == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"


async def test_a_callback_listener_names_its_plugin_upstream(mesh: Mesh) -> None:
    metadata = (("sidemesh-caller", "someone-else"),)
    async with grpc.aio.insecure_channel(mesh.callback) as channel:
        await results(
            tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"), metadata=metadata
        )
    call = mesh.decider.calls[-1]
    assert (call.caller, call.principal, call.listener) == ("files", "plugin:files", "cb-files")
    assert mesh.a.metadata[-1]["sidemesh-caller"] == "files"


async def test_services_outside_a_listeners_allow_list_are_unimplemented(mesh: Mesh) -> None:
    address = mesh.plane.listen(
        f"unix:{mesh.dir}/tools-only.sock",
        listener_id="tools",
        services=["sidemesh.v1.ToolService"],
    )
    async with grpc.aio.insecure_channel(address) as channel:
        assert await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh_pb2_grpc.MeshServiceStub(channel).ListPlugins(mesh_pb2.ListPluginsRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == "sidemesh.v1.MeshService is not served on this socket"
    assert mesh.internal.metadata == []


async def test_a_socket_someone_serves_is_refused_and_a_stale_one_replaced(mesh: Mesh) -> None:
    with pytest.raises(OSError, match="another process is already serving"):
        mesh.plane.listen(mesh.unix, listener_id="again")
    stale = mesh.dir / "stale.sock"
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a dead mesh leaves
    assert mesh.plane.listen(f"unix:{stale}", listener_id="stale") == f"unix:{stale}"
    assert oct(stale.stat().st_mode & 0o777) == "0o600"


async def test_message_size_limits_both_ways() -> None:
    directory = temp_dir()
    from dataplanekit import Upstream

    up = Upstream("a", f"unix:{directory}/a.sock")
    await up.start()
    decider = Decider()
    plane = make_dataplane(decider, None, max_message_bytes=10_000)
    plane.set_upstream("a", up.address)
    address = plane.listen("127.0.0.1:0", listener_id="x")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tool_pb2_grpc.ToolServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as request_too_big:
                await results(stub, call_tool("a/echo", payload="x" * 20_000))
            with pytest.raises(grpc.aio.AioRpcError) as response_too_big:
                await results(stub, call_tool("a/big", size=50_000))
            assert (await results(stub, call_tool("a/big", size=5_000)))[0].result.content[0].text
    finally:
        plane.stop(0)
        await up.stop()
    assert request_too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in request_too_big.value.details()
    assert up.calls == 2  # the oversized request never reached it
    assert response_too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_over_the_admission_limit_is_resource_exhausted_with_the_routers_details() -> None:
    from dataplanekit import ADMISSION, Upstream

    directory = temp_dir()
    up = Upstream("a", f"unix:{directory}/a.sock")
    await up.start()
    details = ADMISSION.to_status_proto().SerializeToString()
    plane = make_dataplane(
        Decider(), None, max_concurrent_calls=2, admission_refusal=(ADMISSION.message, details)
    )
    plane.set_upstream("a", up.address)
    address = plane.listen("127.0.0.1:0", listener_id="x")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tool_pb2_grpc.ToolServiceStub(channel)
            slow = [
                asyncio.ensure_future(results(stub, call_tool("a/slow", delay=0.5)))
                for _ in range(2)
            ]
            while plane.in_flight() < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await results(stub, call_tool("a/echo"))
            assert all(r for r in await asyncio.gather(*slow))
            assert plane.in_flight() == 0
            assert await results(stub, call_tool("a/echo"))
    finally:
        plane.stop(0)
        await up.stop()
    err = caught.value
    assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, ADMISSION.message)
    parsed = SidemeshError.from_rpc_error(err)
    assert (parsed.reason, parsed.retry_delay) == ("CONCURRENCY_LIMIT", 0.1)


async def test_the_deadline_reaches_the_upstream_and_ends_the_call(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/slow", delay=5), timeout=0.3
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    remaining = mesh.a.time_remaining[-1]
    # (grpc-core's server clock is coarse: a few ms of slack)
    assert remaining is not None and 0 < remaining <= 0.31
    await asyncio.wait_for(mesh.a.cancelled.wait(), WAIT)  # the handler was cancelled
    (record,) = await wait_records(mesh.plane)
    assert record.code in (1, 4)  # the client's own timer may reset the stream first


async def test_the_data_plane_enforces_the_deadline_itself(mesh: Mesh) -> None:
    # A raw client that sends grpc-timeout but never gives up itself.
    method = "/sidemesh.v1.ToolService/CallTool"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        multi = channel.unary_stream(method)
        call = multi(call_tool("a/slow", delay=5).SerializeToString(), timeout=0.25)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_client_cancel_reaches_the_upstream_handler(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        call = tool_pb2_grpc.ToolServiceStub(channel).CallTool(call_tool("a/slow", delay=10))
        await asyncio.wait_for(mesh.a.started.wait(), WAIT)
        call.cancel()
        await asyncio.wait_for(mesh.a.cancelled.wait(), WAIT)
    (record,) = await wait_records(mesh.plane)
    assert (record.code, record.message) == (1, "cancelled by the caller")
    assert [a[1] for a in record.attempts] == ["cancelled"]
    assert mesh.plane.in_flight() == 0 and mesh.plane.in_flight("a") == 0


async def test_records_and_the_trace_tree(mesh: Mesh) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        await results(
            tool_pb2_grpc.ToolServiceStub(channel),
            call_tool("a/echo"),
            metadata=(("traceparent", parent), ("tracestate", "k=v")),
        )
    (record,) = await wait_records(mesh.plane)
    call = mesh.decider.calls[-1]
    assert record.context == {"tool": "a/echo", "replica": "a"}
    assert (record.code, record.message, record.requests, record.responses) == (0, "", 1, 1)
    assert (record.listener, record.caller, record.principal, record.upstream) == (
        "clients",
        "",
        "anonymous",
        "a",
    )
    assert record.path == "/sidemesh.v1.ToolService/CallTool" and record.call_id == call.call_id
    assert record.trace_id == call.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert record.parent_span_id == "b7ad6b7169203331" and record.sampled
    assert record.server_span_id == call.server_span_id and len(record.server_span_id) == 16
    assert record.start_ns <= record.decided_ns <= record.end_ns
    ((replica, outcome, code, start, end, span_id, detail),) = record.attempts
    assert (replica, outcome, code, detail, span_id) == ("a", "ok", 0, "", call.client_span_id)
    assert record.decided_ns <= start <= end <= record.end_ns
    seen = mesh.a.metadata[-1]
    assert seen["traceparent"] == f"00-{record.trace_id}-{span_id}-01"
    assert seen["tracestate"] == "k=v"


async def test_with_tracing_off_the_callers_trace_headers_pass_through() -> None:
    from dataplanekit import Upstream

    directory = temp_dir()
    up = Upstream("a", f"unix:{directory}/a.sock")
    await up.start()
    decider = Decider()
    plane = make_dataplane(decider, None, tracing=False)
    plane.set_upstream("a", up.address)
    address = plane.listen("127.0.0.1:0", listener_id="x")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel),
                call_tool("a/echo"),
                metadata=(("traceparent", parent), ("baggage", "b=1")),
            )
        (record,) = await wait_records(plane)
    finally:
        plane.stop(0)
        await up.stop()
    assert up.metadata[-1]["traceparent"] == parent and up.metadata[-1]["baggage"] == "b=1"
    assert (record.server_span_id, record.sampled, record.attempts[0][5]) == ("", False, "")
    assert decider.calls[-1].trace_id == "0af7651916cd43dd8448eb211c80319c"


async def test_a_compressed_first_message_is_refused_clearly(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp, compression=grpc.Compression.Gzip) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo", payload="y" * 500)
            )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "must not be compressed" in caught.value.details()


def test_routes_are_validated() -> None:
    with pytest.raises(ValueError, match="stream_unary"):
        make_dataplane(Decider(), None, routes=[*ROUTES, ("/x/Y", "stream_unary")])


async def test_span_rows_make_one_trace_tree_in_the_trace_store(mesh: Mesh) -> None:
    import sidemesh_dataplane as dp

    from orchestrator._trace_store import TraceStore

    mesh.decider.span_attributes = dp.SpanAttributes({"sidemesh.target": "a/echo"})
    mesh.plane.set_upstream("dead", f"unix:{mesh.dir}/nobody.sock")
    mesh.plane.set_upstream(
        "a",
        mesh.a.address,
        span_attributes={"server.address": mesh.a.address, "sidemesh.replica": 0},
    )
    mesh.decider.policy = dp.RetryPolicy(2, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "a"
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with grpc.aio.insecure_channel(mesh.callback) as channel:
        await results(
            tool_pb2_grpc.ToolServiceStub(channel),
            call_tool("dead/echo"),
            metadata=(("traceparent", parent),),
        )
    (record,) = await wait_records(mesh.plane)
    rows = mesh.plane.take_span_rows()
    assert len(rows) == 2  # the never-reached attempt opened no stream: no CLIENT span
    server, client = rows
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    name = "sidemesh.v1.ToolService/CallTool"
    assert server[:3] == (trace_id, record.server_span_id, "b7ad6b7169203331")
    assert server[3:6] == (name, "sidemesh-orchestrator", 2)
    assert client[:3] == (trace_id, record.attempts[1][5], record.server_span_id) and client[5] == 3
    assert json.loads(server[10]) == {
        "rpc.system": "grpc", "rpc.service": "sidemesh.v1.ToolService", "rpc.method": "CallTool",
        "sidemesh.call_id": record.call_id, "sidemesh.caller": "files", "sidemesh.target": "a/echo",
        "rpc.grpc.status_code": "0", "sidemesh.messages.sent": "1",
    }  # fmt: skip
    attributes = json.loads(client[10])
    assert (attributes["server.address"], attributes["sidemesh.replica"]) == (mesh.a.address, "0")
    assert record.start_ns == server[6] <= client[6] <= client[7] <= server[7] == record.end_ns
    store = TraceStore(mesh.dir / "traces.db", 10)
    try:
        store.add_own(rows)  # the data plane's spans are the orchestrator's own
        (span_a, span_b), omitted = await store.spans(trace_id[:8])
        (summary,) = await store.recent(5)
    finally:
        store.close()
    assert {span_a.span_id, span_b.span_id} == {server[1], client[1]} and omitted == 0
    assert span_a.source == span_b.source == "orchestrator"
    assert (summary.root_name, summary.span_count) == ("sidemesh.v1.ToolService/CallTool", 2)


async def test_a_slow_reader_slows_the_sidecar(mesh: Mesh) -> None:
    request = agent_pb2.InvokeRequest(agent="a")
    request.input.data.update({"count": 2000, "size": 4096})  # 8 MiB in all
    # No BDP probing: the client's window stays at HTTP/2's 64 KiB.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(mesh.tcp, options=options) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Invoke(request, timeout=WAIT * 4)
        await call.read()
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        produced = mesh.a.yielded
        received = 1
        while (await call.read()) != grpc.aio.EOF:
            received += 1
        assert await call.code() == grpc.StatusCode.OK
    # Held back by the windows (client 64 KiB, data plane 64 KiB each way, the
    # sidecar's own buffers), not run ahead to the end of the stream.
    assert produced < 200, produced
    assert received == 2001 and mesh.a.yielded == 2000


async def test_large_messages_both_ways(mesh: Mesh) -> None:
    payload = "z" * (3 * 1024 * 1024)
    async with grpc.aio.insecure_channel(mesh.unix) as channel:
        responses = await results(
            tool_pb2_grpc.ToolServiceStub(channel),
            call_tool("a/echo", payload=payload),
            timeout=WAIT,
        )
    assert responses[0].result.content[0].text == f"a:{payload}"


async def test_many_concurrent_calls_on_one_connection_each_way(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        calls = [
            results(stub, call_tool("a/slow", delay=0.2), timeout=WAIT * 2) for _ in range(500)
        ]
        done = await asyncio.gather(*calls)
    assert all(r[0].result.content[0].text == "a:slept" for r in done)
    assert len(await wait_records(mesh.plane, 500)) == 500
    assert mesh.plane.in_flight() == 0 and mesh.plane.stats()["streams"] == 0
