"""The MCP benchmark's topologies: one FastMCP echo server (stdio) behind each.

| topology | the MCP client speaks | what runs between it and the echo server |
|---|---|---|
| ``direct`` | stdio | nothing (the client spawns the server) |
| ``fastmcp-proxy`` | stdio | FastMCP's proxy (``create_proxy``), one Python process |
| ``mcp-proxy`` | streamable HTTP | mcp-proxy, one Python process (its own venv) |
| ``sidemesh-stdio`` | stdio | ``sidemesh mcp`` -> orchestrator -> MCP bridge sidecar |
| ``sidemesh-http`` | streamable HTTP | orchestrator (its MCP endpoint) -> MCP bridge sidecar |
| ``sidemesh-http-sse`` | streamable HTTP, SSE always | the same, ``mcp.http.responses: sse`` |
| ``sidemesh-grpc`` | gRPC (reference) | orchestrator -> MCP bridge sidecar |

Each topology knows its gateway's processes (for CPU per call) and, for
Sidemesh, the endpoint's own process (the orchestrator, or ``sidemesh mcp``).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mcp import StdioServerParameters

from bench._proc import process_tree
from bench._process import Process
from bench.mcp._peers import mcp_proxy_command

ROOT = Path(__file__).resolve().parent.parent.parent
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
ECHO_SERVER = PLUGIN_DIR / "mcp-echo" / "echo_server.py"
ECHO_MARKER = "echo_server.py"
#: The MCP tool each topology exposes for the echo server's ``echo``.
TOOL = {"sidemesh-stdio": "mcp-echo.echo", "sidemesh-http": "mcp-echo.echo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


@dataclass
class Topology:
    """How the load client reaches the echo server, and which processes are the gateway."""

    name: str
    workdir: Path
    #: ``stdio`` (``server`` is the command the client spawns), ``http`` or ``grpc`` (``url``).
    transport: str = "stdio"
    server: StdioServerParameters | None = None
    url: str = ""
    tool: str = "echo"
    processes: list[Process] = field(default_factory=list)
    #: pids whose CPU is the gateway's (filled once the client has started it for stdio).
    gateway_roots: list[int] = field(default_factory=list)
    endpoint_pid: int | None = None

    def start(self) -> None:
        """Starts what runs before the client connects (HTTP gateways, the mesh)."""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def gateway_pids(self, client_children: list[int]) -> list[int]:
        """The gateway's processes, without the echo server and without the client."""
        if not self.gateway_roots and client_children and self.name != "direct":
            self.endpoint_pid = client_children[0]  # a stdio gateway the client spawned
        roots = self.gateway_roots or client_children
        pids = [p for root in roots for p in process_tree(root)]
        return [p for p in pids if not _is_echo(p)]


def _is_echo(pid: int) -> bool:
    """Whether ``pid`` is the echo server itself (``python .../echo_server.py``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1].endswith(ECHO_MARKER.encode())


def direct(workdir: Path) -> Topology:
    """The client spawns the echo server itself."""
    return Topology(
        "direct", workdir, server=StdioServerParameters(command=sys.executable,
                                                        args=[str(ECHO_SERVER)])
    )  # fmt: skip


def fastmcp_proxy(workdir: Path) -> Topology:
    """FastMCP's proxy on stdio, with the echo server as its stdio backend."""
    script = workdir / "fastmcp_proxy.py"
    script.write_text(
        "from fastmcp.client.transports import StdioTransport\n"
        "from fastmcp.server import create_proxy\n"
        f"backend = StdioTransport(command={sys.executable!r}, args=[{str(ECHO_SERVER)!r}])\n"
        "create_proxy(backend, name='fastmcp-proxy').run(transport='stdio', show_banner=False)\n"
    )
    return Topology(
        "fastmcp-proxy", workdir,
        server=StdioServerParameters(command=sys.executable, args=[str(script)]),
    )  # fmt: skip


class _McpProxy(Topology):
    def start(self) -> None:
        port = _free_port()
        argv = [*mcp_proxy_command(), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "WARNING", "--", sys.executable, str(ECHO_SERVER)]  # fmt: skip
        process = Process("mcp-proxy", argv, self.workdir / "mcp-proxy.log")
        process.start()
        self.processes.append(process)
        _wait(lambda: _listening(port) or process.check_alive(), 60, "mcp-proxy to listen")
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.gateway_roots = [process.pid]
        self.endpoint_pid = process.pid


def mcp_proxy(workdir: Path) -> Topology:
    """mcp-proxy: the echo server behind its streamable-HTTP server."""
    return _McpProxy("mcp-proxy", workdir, transport="http")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Mesh(Topology):
    """``sidemesh serve`` with the echo server bridged in (sandboxed, tracing as configured)."""

    tracing: bool = True
    responses: str = "auto"

    def start(self) -> None:
        runtime_dir = Path(tempfile.mkdtemp(prefix="smm", dir="/tmp"))
        state_dir = self.workdir / "state"
        config: dict[str, Any] = {
            "listen": [f"unix:{runtime_dir / 'mesh.sock'}"],
            "plugin_dirs": [str(PLUGIN_DIR)],
            "entry_points": False,
            "state_dir": str(state_dir),
            "runtime_dir": str(runtime_dir),
            "telemetry": {"enabled": self.tracing},
            "log_level": "WARNING",
            "mcp": {
                "http": {
                    "enabled": self.transport == "http",
                    "listen": "127.0.0.1:0",
                    "responses": self.responses,
                }
            },
        }
        config_path = self.workdir / "sidemesh.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "orchestrator.cli", "serve", "-c", str(config_path)]
        process = Process(f"orchestrator {self.name}", argv, self.workdir / "orchestrator.log",
                          cwd=ROOT)  # fmt: skip
        process.start()
        self.processes.append(process)
        self._runtime_dir = runtime_dir
        endpoints = state_dir / "endpoints.json"
        written = _wait(lambda: _read_json(endpoints) or process.check_alive(), 60,
                        "the orchestrator's endpoints")  # fmt: skip
        address = written["addresses"][0]
        _wait(lambda: _ready(address) or process.check_alive(), 90, "mcp-echo to be READY")
        self.gateway_roots = [process.pid]
        self.endpoint_pid = process.pid
        if self.transport == "http":
            self.url = written["mcp"]["sidemesh"]
        elif self.transport == "grpc":
            self.url = address
        else:
            self.server = StdioServerParameters(
                command=sys.executable,
                args=["-m", "orchestrator.cli", "mcp", "-a", address],
                cwd=str(ROOT),
            )

    def gateway_pids(self, client_children: list[int]) -> list[int]:
        pids = [p for p in process_tree(self.gateway_roots[0]) if not _is_echo(p)]
        if self.transport == "stdio":  # `sidemesh mcp`, spawned by the client, is the endpoint
            self.endpoint_pid = client_children[0] if client_children else None
            pids += [p for c in client_children for p in process_tree(c)]
        return pids

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._runtime_dir, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _ready(address: str) -> bool:
    import grpc

    from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            status = mesh_pb2_grpc.MeshServiceStub(channel).GetPlugin(
                mesh_pb2.GetPluginRequest(name="mcp-echo"), timeout=2
            )
        except grpc.RpcError:
            return False
    return any(r.state == mesh_pb2.REPLICA_STATE_READY for r in status.plugin.replicas)


def sidemesh_stdio(workdir: Path) -> Topology:
    """``sidemesh mcp`` on stdio, the orchestrator, the MCP bridge."""
    return _Mesh("sidemesh-stdio", workdir, tool=TOOL["sidemesh-stdio"])


def sidemesh_http(workdir: Path) -> Topology:
    """The orchestrator's streamable-HTTP MCP endpoint, the MCP bridge."""
    return _Mesh("sidemesh-http", workdir, transport="http", tool=TOOL["sidemesh-http"])


def sidemesh_http_sse(workdir: Path) -> Topology:
    """The HTTP endpoint with ``mcp.http.responses: sse``: every POST answered by a stream."""
    topology = _Mesh("sidemesh-http-sse", workdir, transport="http", tool=TOOL["sidemesh-http"])
    topology.responses = "sse"
    return topology


def sidemesh_grpc(workdir: Path) -> Topology:
    """For reference: a gRPC client (``ToolService.CallTool``), the orchestrator, the bridge."""
    return _Mesh("sidemesh-grpc", workdir, transport="grpc", tool="mcp-echo/echo")


ALL = {
    "direct": direct,
    "fastmcp-proxy": fastmcp_proxy,
    "mcp-proxy": mcp_proxy,
    "sidemesh-stdio": sidemesh_stdio,
    "sidemesh-http": sidemesh_http,
    "sidemesh-http-sse": sidemesh_http_sse,
    "sidemesh-grpc": sidemesh_grpc,
}
