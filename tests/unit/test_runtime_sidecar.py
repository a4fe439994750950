"""sidecars.python as the orchestrator runs it: a real process on a temp Unix socket."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from clients import AsyncMeshClient, UnknownError
from sidecars._telemetry import Tracing
from sidemesh.v1 import plugin_pb2, plugin_pb2_grpc

tracer = trace.get_tracer("tests")
ROOT = Path(__file__).resolve().parents[2]
TOOLS_DEMO = ROOT / "examples" / "plugins" / "tools-demo"


@dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    address: str
    started: float

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def sidecar_env(address: str, plugin: str) -> dict[str, str]:
    """The environment the orchestrator gives a sidecar: only the contract's variables."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "SIDEMESH_LISTEN": address,
        "SIDEMESH_MESH_ADDRESS": address.replace("p.sock", "mesh.sock"),
        "SIDEMESH_PLUGIN": plugin,
        "SIDEMESH_REPLICA": "0",
        "SIDEMESH_LOG_LEVEL": "INFO",
    }


async def start(
    target: str,
    cwd: Path,
    socket_dir: str,
    plugin: str = "tools-demo",
    env: dict[str, str] | None = None,
) -> Sidecar:
    address = f"unix:{socket_dir}/p.sock"
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecars.python",
        target,
        cwd=cwd,
        env=sidecar_env(address, plugin) | (env or {}),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return Sidecar(process, address, started)


async def wait_serving(sidecar: Sidecar, timeout: float = 15) -> float:
    """Polls health like the orchestrator; returns seconds from process start to SERVING."""
    fast_reconnect = [
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    async with grpc.aio.insecure_channel(sidecar.address, options=fast_reconnect) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert sidecar.process.returncode is None, await sidecar.stderr()
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - sidecar.started
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("the sidecar did not report SERVING")


@pytest.fixture
async def tools_demo(socket_dir: str) -> AsyncIterator[Sidecar]:
    sidecar = await start("tools_demo:app", TOOLS_DEMO, socket_dir)
    try:
        yield sidecar
    finally:
        if sidecar.process.returncode is None:
            sidecar.process.kill()
            await sidecar.process.wait()


async def test_serves_then_exits_0_on_sigterm(tools_demo: Sidecar) -> None:
    await wait_serving(tools_demo)
    async with AsyncMeshClient(tools_demo.address) as client:
        assert (await client.call_tool("add", a=2, b=3)).structured == {"result": 5}
    tools_demo.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(tools_demo.process.wait(), 10) == 0
    stderr = await tools_demo.stderr()
    assert "INFO plugins_sdk: plugin tools-demo 0.1.0 serving 4 tools and 0 agents" in stderr
    assert "got SIGTERM" in stderr


async def test_shutdown_rpc_makes_the_process_exit_0(tools_demo: Sidecar) -> None:
    await wait_serving(tools_demo)
    async with grpc.aio.insecure_channel(tools_demo.address) as channel:
        stub = plugin_pb2_grpc.PluginServiceStub(channel)
        described = await stub.Describe(plugin_pb2.DescribeRequest())
        assert described.plugin.name == "tools-demo"
        await stub.Configure(plugin_pb2.ConfigureRequest())
        await stub.Shutdown(
            plugin_pb2.ShutdownRequest(grace_period=duration_pb2.Duration(seconds=2))
        )
    assert await asyncio.wait_for(tools_demo.process.wait(), 10) == 0


@pytest.mark.parametrize(
    ("target", "files", "message"),
    [
        ("nope:app", {}, "cannot import 'nope': no such module in"),
        ("plug:missing", {"plug.py": "from plugins_sdk import Plugin\napp = Plugin('p')\n"},
         "module 'plug' has no attribute 'missing'; its Plugin objects: app"),
        ("plug:app", {"plug.py": "app = 42\n"}, "plug:app is a int, not a plugins_sdk.Plugin"),
        ("plug:app", {"plug.py": "import missing_dependency\n"},
         "importing 'plug' raised ModuleNotFoundError: No module named 'missing_dependency'"),
        ("plug:app", {"plug.py": "raise RuntimeError('bad config file')\n"},
         "importing 'plug' raised RuntimeError: bad config file at"),
        ("no-colon", {}, "'no-colon' is not MODULE:ATTR"),
    ],
)  # fmt: skip
async def test_an_app_that_cannot_load_exits_2_and_says_why(
    tmp_path: Path, socket_dir: str, target: str, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    sidecar = await start(target, tmp_path, socket_dir, plugin="p")
    assert await asyncio.wait_for(sidecar.process.wait(), 15) == 2
    stderr = await sidecar.stderr()
    assert "sidecar: cannot load the plugin app: " + message in stderr


async def test_plugin_logs_go_to_stderr_one_line_per_record(
    tmp_path: Path, socket_dir: str
) -> None:
    (tmp_path / "plug.py").write_text(
        "import logging\n"
        "from plugins_sdk import Plugin\n"
        "app = Plugin('p')\n"
        "@app.tool()\n"
        "async def boom() -> str:\n"
        "    logging.getLogger('p.boom').warning('about to fail')\n"
        "    raise ValueError('x')\n"
    )
    sidecar = await start("plug:app", tmp_path, socket_dir, plugin="p")
    try:
        await wait_serving(sidecar)
        async with AsyncMeshClient(sidecar.address) as client:
            with tracer.start_as_current_span("test") as root, pytest.raises(UnknownError):
                await client.call_tool("boom")
        sidecar.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sidecar.process.wait(), 10) == 0
    finally:
        if sidecar.process.returncode is None:
            sidecar.process.kill()
    lines = (await sidecar.stderr()).splitlines()
    # Lines logged during the call end with its trace context, even without an SDK.
    ids = re.escape(f" trace_id={root.get_span_context().trace_id:032x} span_id=") + "[0-9a-f]{16}$"
    warning = [line for line in lines if line.startswith("WARNING p.boom")]
    assert len(warning) == 1 and re.fullmatch("WARNING p.boom: about to fail" + ids, warning[0])
    failure = [line for line in lines if line.startswith("ERROR plugins_sdk: tool 'boom' failed")]
    assert len(failure) == 1
    assert "Traceback" in failure[0] and "ValueError: x" in failure[0]
    assert re.search(ids, failure[0])
    assert not re.search("trace_id", lines[0])  # "serving ...": not in a call


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("", "SIDEMESH_LISTEN is unusable: empty address"),
        ("unix:/nonexistent-dir/p.sock", "cannot listen on unix:/nonexistent-dir/p.sock"),
    ],
)
async def test_an_unusable_listen_address_exits_2(listen: str, message: str) -> None:
    env = sidecar_env("unix:/unused/p.sock", "tools-demo") | {"SIDEMESH_LISTEN": listen}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecars.python",
        "tools_demo:app",
        cwd=TOOLS_DEMO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2
    assert f"sidecar: {message}" in stderr.decode()


# -- tracing -----------------------------------------------------------------------------


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP receiver: keeps what sidecars export."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(  # type: ignore[override]
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, str], Any]]:
        """Every span received, with its resource's string attributes."""
        return [
            ({a.key: a.value.string_value for a in rs.resource.attributes}, span)
            for request in self.requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


@pytest.fixture
async def collector(socket_dir: str) -> AsyncIterator[tuple[str, Collector]]:
    servicer = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    address = f"unix:{socket_dir}/otlp.sock"
    server.add_insecure_port(address)
    await server.start()
    yield address, servicer
    await server.stop(None)


def otlp_env(endpoint: str, **extra: str) -> dict[str, str]:
    """What the orchestrator adds for tracing; a long batch delay leaves spans to the exit."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        **extra,
    }


async def stop_sidecar(sidecar: Sidecar, how: str) -> None:
    if how == "sigterm":
        sidecar.process.send_signal(signal.SIGTERM)
    else:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            await plugin_pb2_grpc.PluginServiceStub(channel).Shutdown(plugin_pb2.ShutdownRequest())
    assert await asyncio.wait_for(sidecar.process.wait(), 10) == 0


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
async def test_the_sidecar_exports_its_spans_over_otlp_when_it_exits(
    socket_dir: str, collector: tuple[str, Collector], how: str
) -> None:
    endpoint, received = collector
    sidecar = await start(
        "tools_demo:app",
        TOOLS_DEMO,
        socket_dir,
        env=otlp_env(endpoint, OTEL_RESOURCE_ATTRIBUTES="sidemesh.replica=0"),
    )
    try:
        await wait_serving(sidecar)
        async with AsyncMeshClient(sidecar.address) as client:
            with tracer.start_as_current_span("test") as root:
                assert (await client.call_tool("add", a=2, b=3)).structured == {"result": 5}
        assert received.requests == []  # batched until the exit
        await stop_sidecar(sidecar, how)
    finally:
        if sidecar.process.returncode is None:
            sidecar.process.kill()
    servers = [(resource, s) for resource, s in received.spans() if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == 1, await sidecar.stderr()
    resource, span = servers[0]
    assert span.name == "sidemesh.v1.ToolService/CallTool"
    assert resource["service.name"] == "tools-demo"  # $SIDEMESH_PLUGIN when not set otherwise
    assert resource["sidemesh.replica"] == "0"
    assert span.trace_id.hex() == f"{root.get_span_context().trace_id:032x}"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["sidemesh.target"].string_value == "add"
    assert attributes["rpc.grpc.status_code"].int_value == 0


async def test_an_unreachable_otlp_endpoint_blocks_neither_calls_nor_exit(socket_dir: str) -> None:
    env = otlp_env(f"unix:{socket_dir}/nobody.sock", OTEL_EXPORTER_OTLP_TIMEOUT="0.5")
    sidecar = await start("tools_demo:app", TOOLS_DEMO, socket_dir, env=env)
    try:
        await wait_serving(sidecar)
        async with AsyncMeshClient(sidecar.address) as client:
            with tracer.start_as_current_span("test"):
                assert (await client.call_tool("add", a=2, b=3)).structured == {"result": 5}
        started = time.monotonic()
        await stop_sidecar(sidecar, "sigterm")
        assert time.monotonic() - started < 5
    finally:
        if sidecar.process.returncode is None:
            sidecar.process.kill()


def test_shutdown_gives_up_on_an_endpoint_that_is_down(socket_dir: str) -> None:
    exporter = OTLPSpanExporter(endpoint=f"unix:{socket_dir}/nobody.sock", insecure=True)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider.get_tracer("tests").start_span("lost").end()
    started = time.monotonic()
    Tracing(provider, exporter).shutdown(timeout=0.2)
    assert time.monotonic() - started < 1.5  # the exporter alone would retry for 10 s
