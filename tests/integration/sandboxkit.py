"""What the sandbox tests share: the hostile plugins, driving their attacks, looking at the host."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from meshproc import EXAMPLE_PLUGINS, TEST_PLUGINS, Mesh

from clients import AsyncMeshClient, SidemeshError
from sidemesh.v1 import mesh_pb2, plugin_pb2, plugin_pb2_grpc

MakeMesh = Callable[..., Mesh]
HOSTILE = TEST_PLUGINS / "hostile"
HOG = TEST_PLUGINS / "hog"
TOOLS_DEMO = EXAMPLE_PLUGINS / "tools-demo"

LAYERS = (
    "namespaces", "filesystem", "network", "rlimits", "cgroups", "seccomp", "landlock",
    "environment",
)  # fmt: skip

#: What the orchestrator has in its environment besides the test process's own.


async def attack(mesh: Mesh, tool: str, /, **arguments: Any) -> dict[str, Any]:
    """Calls ``hostile/<tool>`` (or ``plugin/tool``) and returns what it reports."""
    target = tool if "/" in tool else f"hostile/{tool}"
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool(target, arguments, timeout=30)
    assert not result.is_error, f"{target} failed: {result.text}"
    assert result.structured is not None, f"{target} returned no structured result"
    return dict(result.structured)


async def assert_mesh_serves(mesh: Mesh) -> None:
    """The orchestrator is alive and another plugin still answers through it."""
    assert mesh.proc is not None
    assert mesh.proc.poll() is None, f"the orchestrator died\n{mesh.log()}"
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool("tools-demo/add", a=1, b=2, timeout=10)
    assert result.structured == {"result": 3}


@contextlib.asynccontextmanager
async def watching(mesh: Mesh, plugin: str) -> AsyncIterator[list[mesh_pb2.WatchEventsResponse]]:
    """Collects ``plugin``'s mesh events from now on, in the background."""
    events: list[mesh_pb2.WatchEventsResponse] = []
    subscribed = asyncio.Event()
    async with AsyncMeshClient(mesh.address) as client:

        async def watch() -> None:
            # One replayed event proves the subscription is live; it is not collected.
            async for event in client.watch_events(plugin=plugin, replay=1):
                if subscribed.is_set():
                    events.append(event)
                subscribed.set()

        task = asyncio.create_task(watch())
        await asyncio.wait_for(subscribed.wait(), 10)
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, SidemeshError):
                await task


async def next_event(
    events: list[mesh_pb2.WatchEventsResponse],
    kind: str,
    timeout: float,
    where: Callable[[Any], bool] = lambda _: True,
) -> Any:
    """Waits for a collected event of ``kind`` (e.g. ``replica_exited``) matching ``where``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for event in events:
            if event.HasField(kind) and where(getattr(event, kind)):
                return getattr(event, kind)
        if asyncio.get_running_loop().time() > deadline:
            seen = [e.WhichOneof("event") for e in events]
            raise AssertionError(f"no {kind} event within {timeout}s; saw {seen}")
        await asyncio.sleep(0.05)


def state_reasons(events: list[mesh_pb2.WatchEventsResponse]) -> list[str]:
    """The reasons of the plugin state changes among ``events`` (they carry its error)."""
    return [e.plugin_state_changed.reason for e in events if e.HasField("plugin_state_changed")]


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def plugin_processes(mesh: Mesh, plugin: str) -> list[int]:
    """Host pids of the processes running ``plugin``'s code: its sidecars and their forks."""
    found = []
    for replica in mesh.plugin(plugin).replicas:
        if replica.pid <= 0:
            continue
        for pid in descendants(replica.pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[1:3] == [b"-m", b"sidecars.python"]:
                    found.append(pid)
    return found


def sidecar_host_uids(mesh: Mesh, plugin: str) -> set[int]:
    """The host uids (real, effective, saved, fs) of the processes running ``plugin``'s code."""
    uids: set[int] = set()
    for pid in plugin_processes(mesh, plugin):
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("Uid:"))
            uids.update(int(u) for u in line.split()[1:])
    return uids


def host_uid(uid_map: list[str], uid: int) -> int | None:
    """The host uid that ``uid`` is inside a user namespace with this ``/proc/self/uid_map``."""
    numbers = [int(n) for n in uid_map]
    for inside, outside, count in zip(numbers[::3], numbers[1::3], numbers[2::3], strict=True):
        if inside <= uid < inside + count:
            return outside + uid - inside
    return None


def replica_sockets(mesh: Mesh) -> dict[str, Path]:
    """Plugin name -> the host path of the socket its replica serves on (asked by Describe)."""
    found: dict[str, Path] = {}
    for path in mesh.runtime_dir.rglob("*"):
        if not path.is_socket() or path == mesh.socket:
            continue
        with contextlib.suppress(grpc.RpcError):
            with grpc.insecure_channel(f"unix:{path}") as channel:
                stub = plugin_pb2_grpc.PluginServiceStub(channel)
                info = stub.Describe(plugin_pb2.DescribeRequest(), timeout=2)
            found[info.plugin.name] = path
    return found


def callback_socket(mesh: Mesh, replica_socket: Path) -> Path | None:
    """The plugin's own callback socket: the nearest ``mesh.sock`` above its replica socket."""
    directory = replica_socket.parent
    while directory != mesh.runtime_dir and mesh.runtime_dir in directory.parents:
        candidate = directory / "mesh.sock"
        if candidate.is_socket():
            return candidate
        directory = directory.parent
    return None


@contextlib.contextmanager
def listener(family: socket.AddressFamily, address: Any) -> Iterator[socket.socket]:
    """A listening socket on the host; connections queue up in its backlog unaccepted."""
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind(address)
        server.listen(16)
        server.setblocking(False)
        yield server


def accepted_connection(server: socket.socket) -> bool:
    """Whether any connection reached the listener (it would wait in the backlog)."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# -- a hostile plugin in a shared mesh ------------------------------------------------------------
