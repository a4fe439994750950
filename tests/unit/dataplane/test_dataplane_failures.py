"""Upstreams that fail: retries where safe, per-try timeouts, dead sidecars, stop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from dataplanekit import WAIT, Background, Mesh, call_tool, results, wait_records

from clients import SidemeshError
from sidemesh.v1 import agent_pb2, agent_pb2_grpc, tool_pb2_grpc


def policy(**kwargs: object) -> object:
    import sidemesh_dataplane as dp

    return dp.RetryPolicy(**kwargs)  # type: ignore[arg-type]


async def test_an_attempt_that_never_reached_a_sidecar_is_retried_elsewhere(mesh: Mesh) -> None:
    mesh.plane.set_upstream("dead", f"unix:{mesh.dir}/nobody.sock")
    mesh.decider.policy = policy(max_attempts=3, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "b"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        responses = await results(
            tool_pb2_grpc.ToolServiceStub(channel), call_tool("dead/echo", payload="p")
        )
    assert responses[0].result.content[0].text == "b:p"
    ((context, failed, reason),) = mesh.decider.retry_picks
    assert (context, failed) == ({"tool": "dead/echo", "replica": "dead"}, "dead")
    assert "nobody.sock" in reason
    (record,) = await wait_records(mesh.plane)
    assert [(a[0], a[1]) for a in record.attempts] == [("dead", "never_reached"), ("b", "ok")]
    assert record.upstream == "b" and record.code == 0
    assert mesh.plane.stats()["retries"] == 1


async def test_a_bidi_chat_is_retried_when_it_never_reached_a_sidecar(mesh: Mesh) -> None:
    mesh.plane.set_upstream("dead", f"unix:{mesh.dir}/nobody.sock")
    mesh.decider.policy = policy(max_attempts=2, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "a"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        chat = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=WAIT)
        await chat.write(agent_pb2.ChatRequest(start=agent_pb2.ChatStart(agent="dead")))
        assert (await chat.read()).text_delta.text == "started dead"
        await chat.done_writing()
        assert await chat.code() == grpc.StatusCode.OK


async def test_without_retries_a_dead_replica_is_unavailable_via_upstream_failed(
    mesh: Mesh,
) -> None:
    mesh.plane.set_upstream("dead", f"unix:{mesh.dir}/nobody.sock")
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("dead/echo"))
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details().startswith(
        "plugin 'test' replica dead exited during the call (cannot connect"
    )
    assert SidemeshError.from_rpc_error(err).reason == "SIDECAR_UNAVAILABLE"
    assert mesh.decider.retry_picks == []


async def test_an_unknown_replica_key_counts_as_never_reached(mesh: Mesh) -> None:
    mesh.decider.policy = policy(max_attempts=2, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "a"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        responses = await results(
            tool_pb2_grpc.ToolServiceStub(channel), call_tool("ghost/echo", payload="g")
        )
    assert responses[0].result.content[0].text == "a:g"


async def test_idempotent_calls_are_retried_after_reaching_and_others_are_not(mesh: Mesh) -> None:
    mesh.decider.next_replica = lambda failed: "b"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        mesh.decider.policy = policy(max_attempts=2, idempotent=False, backoff_base=0.001)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(stub, call_tool("a/fail", code="UNAVAILABLE", message="busy"))
        assert (caught.value.code(), caught.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "busy",
        )
        assert mesh.b.calls == 0 and mesh.decider.retry_picks == []
        mesh.decider.policy = policy(max_attempts=2, idempotent=True, backoff_base=0.001)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await results(stub, call_tool("a/fail", code="UNAVAILABLE", message="busy"))
    # Retried on b, which answered (it has the same tool and fails the same way).
    assert again.value.details() == "busy" and mesh.b.calls == 1
    records = await wait_records(mesh.plane, 2)
    assert [(a[0], a[1], a[2]) for a in records[1].attempts] == [
        ("a", "status", 14),
        ("b", "status", 14),
    ]


async def test_never_retried_after_a_response_message(mesh: Mesh) -> None:
    mesh.decider.policy = policy(max_attempts=3, idempotent=True, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "b"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        call = tool_pb2_grpc.ToolServiceStub(channel).CallTool(call_tool("a/fail_after_progress"))
        first = await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert first.WhichOneof("event") == "progress"
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "flaked after a message",
    )
    assert mesh.b.calls == 0 and mesh.decider.retry_picks == []


async def test_a_per_try_timeout_retries_an_idempotent_call(mesh: Mesh) -> None:
    mesh.decider.policy = policy(
        max_attempts=2, idempotent=True, per_try_timeout=0.2, backoff_base=0.001
    )
    mesh.decider.next_replica = lambda failed: "b"  # b is fast (slowness 0)
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        started = time.monotonic()
        responses = await results(
            tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/slow", delay=3), timeout=WAIT
        )
    assert responses[0].result.content[0].text == "b:slept"
    assert time.monotonic() - started < 2
    await asyncio.wait_for(mesh.a.cancelled.wait(), WAIT)  # the timed-out attempt was reset
    (record,) = await wait_records(mesh.plane)
    assert [(a[0], a[1]) for a in record.attempts] == [("a", "per_try_timeout"), ("b", "ok")]


async def test_a_per_try_timeout_without_a_retry_is_deadline_exceeded(mesh: Mesh) -> None:
    mesh.decider.policy = policy(max_attempts=1, per_try_timeout=0.2)
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/slow", delay=3), timeout=WAIT
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "per-try timeout of 0.200s" in caught.value.details()


async def test_retries_stay_within_the_callers_deadline(mesh: Mesh) -> None:
    mesh.plane.set_upstream("dead", f"unix:{mesh.dir}/nobody.sock")
    mesh.decider.policy = policy(max_attempts=5, backoff_base=5.0, backoff_max=5.0)
    mesh.decider.next_replica = lambda failed: "dead"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results(
                tool_pb2_grpc.ToolServiceStub(channel), call_tool("dead/echo"), timeout=1.0
            )
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 1.5


async def test_a_replica_killed_mid_stream_is_unavailable_never_a_truncated_ok(mesh: Mesh) -> None:
    socket_path = mesh.dir / "proc.sock"
    kit = Path(__file__).with_name("dataplanekit.py")
    argv = [sys.executable, str(kit), f"unix:{socket_path}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)  # noqa: ASYNC220
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        mesh.plane.set_upstream("proc", f"unix:{socket_path}")
        request = agent_pb2.InvokeRequest(agent="proc")
        request.input.data.update({"count": 100, "size": 16, "delay": 0.05})
        async with grpc.aio.insecure_channel(mesh.tcp) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Invoke(request, timeout=WAIT)
            for _ in range(3):
                await call.read()
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await drain(call)
    finally:
        proc.kill()
        proc.wait()
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "replica proc exited during the call" in err.details()
    (record,) = await wait_records(mesh.plane)
    assert record.attempts[0][1] == "transport" and record.responses >= 3


async def test_removing_an_upstream_ends_its_calls_unavailable(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        call = tool_pb2_grpc.ToolServiceStub(channel).CallTool(
            call_tool("a/slow", delay=10), timeout=WAIT
        )
        await asyncio.wait_for(mesh.a.started.wait(), WAIT)
        assert mesh.plane.in_flight("a") == 1
        assert mesh.plane.remove_upstream("a")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await results_of(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "removed" in caught.value.details()
    await asyncio.wait_for(mesh.a.cancelled.wait(), WAIT)
    assert not mesh.plane.remove_upstream("a")


async def drain(call: Any) -> int:
    count = 0
    while await call.read() != grpc.aio.EOF:
        count += 1
    return count


async def results_of(call: object) -> list[object]:
    return [r async for r in call]  # type: ignore[attr-defined]


async def test_peer_verification_of_unix_upstreams(mesh: Mesh) -> None:
    import os

    mesh.plane.set_upstream("checked", mesh.a.address, expected_uid=os.getuid(), verify=True)
    mesh.plane.set_upstream("wrong-uid", mesh.a.address, expected_uid=os.getuid() + 1)
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        assert await results(stub, call_tool("checked/echo"))
        assert mesh.decider.peers == [("checked", os.getpid(), os.getuid())]
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await results(stub, call_tool("wrong-uid/echo"))
        mesh.decider.allow_peer = False
        mesh.plane.set_upstream("refused", mesh.a.address, verify=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await results(stub, call_tool("refused/echo"))
    assert (
        wrong.value.code() == grpc.StatusCode.UNAVAILABLE
        and "not the expected uid" in wrong.value.details()
    )
    assert (
        refused.value.code() == grpc.StatusCode.UNAVAILABLE
        and "is not replica refused's" in refused.value.details()
    )


async def test_stop_lets_calls_finish_within_grace_then_ends_the_rest(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        short = asyncio.ensure_future(results(stub, call_tool("a/slow", delay=0.3), timeout=WAIT))
        long = asyncio.ensure_future(results(stub, call_tool("a/slow", delay=30), timeout=WAIT))
        while mesh.plane.in_flight() < 2:
            await asyncio.sleep(0.01)
        stopping = Background(lambda: mesh.plane.stop(1.0))
        done = await short
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await long
        await asyncio.to_thread(stopping.thread.join, WAIT)
    assert done[0].result.content[0].text == "a:slept"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("the mesh is shutting down")
    assert stopping.result == 1
    assert not Path(mesh.unix[len("unix:") :]).exists()  # noqa: ASYNC240
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await results(tool_pb2_grpc.ToolServiceStub(channel), call_tool("a/echo"), timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_sidecar_draining_with_goaway_finishes_its_calls_and_new_ones_go_elsewhere(
    mesh: Mesh,
) -> None:
    mesh.decider.policy = policy(max_attempts=2, backoff_base=0.001)
    mesh.decider.next_replica = lambda failed: "b"
    async with grpc.aio.insecure_channel(mesh.tcp) as channel:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        assert await results(stub, call_tool("a/echo"))  # the connection to a is up
        mesh.a.started.clear()
        running = asyncio.ensure_future(results(stub, call_tool("a/slow", delay=0.5), timeout=WAIT))
        await asyncio.wait_for(mesh.a.started.wait(), WAIT)
        assert mesh.a.server is not None
        stopping = asyncio.ensure_future(mesh.a.server.stop(2.0))  # GOAWAY, then drain
        await asyncio.sleep(0.1)
        moved = await results(stub, call_tool("a/echo", payload="m"), timeout=WAIT)
        finished = await running
        await stopping
    assert finished[0].result.content[0].text == "a:slept"  # the call in flight completed
    assert moved[0].result.content[0].text == "b:m"  # the new one never reached a: retried
    records = await wait_records(mesh.plane, 3)
    moved_record = next(r for r in records if r.upstream == "b")
    assert moved_record.attempts[0][:2] == ("a", "never_reached")
