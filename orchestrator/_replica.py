"""One replica of a plugin: a sidecar process, its channel, its readiness and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator._output import OutputLimits
from orchestrator._pinned import PinnedSocket, SocketRefused
from orchestrator._process import SidecarProcess, describe_exit
from orchestrator.sandbox import PreparedSidecar
from sidemesh.core import contract_refusal
from sidemesh.v1 import mesh_pb2, plugin_pb2, plugin_pb2_grpc

log = logging.getLogger("sidemesh.supervisor")

_POLL = 0.01


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one sidecar process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    #: The socket the sidecar serves on, as the orchestrator sees it.
    socket_path: Path
    #: False when the launcher itself ties the sidecar's life to ours.
    die_with_parent: bool = True
    #: Descriptors the process inherits (the sandbox's bind sources and filter).
    pass_fds: tuple[int, ...] = ()
    #: The sandbox the process runs in, if any: why it exited, limits it hit.
    sandbox: PreparedSidecar | None = None
    #: The uid the sidecar's socket file must belong to (the plugin's host uid).
    socket_owner: int | None = None
    #: How much of its output is logged.
    output: OutputLimits = field(default_factory=OutputLimits)


class ReplicaStartError(Exception):
    """The replica did not become ready; the message says why, with its stderr tail."""


class Upstreams(Protocol):
    """Where a ready replica is announced for calls: the data plane's upstream pool."""

    def publish(
        self,
        replica: Replica,
        key: str,
        address: str,
        *,
        verify: bool,
        span_attributes: Mapping[str, str | int | float | bool],
    ) -> None: ...

    def withdraw(self, key: str) -> None: ...

    def in_flight(self, key: str) -> int: ...


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options of the orchestrator's channels to its sidecars."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # The sidecar's socket appears moments after the process starts: retry fast.
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 250),
        # Never share a subchannel with another replica's channel.
        ("grpc.use_local_subchannel_pool", 1),
        # No transparent retries: a call whose sidecar died must fail (UNAVAILABLE), not
        # be replayed on whatever listens on the socket next. The router decides retries.
        ("grpc.enable_retries", 0),
        # Bounded buffering: without BDP probing each stream's receive window stays at
        # gRPC's 64 KiB, so a slow caller holds at most that much per stream here (BDP
        # probing on a busy connection grew it to megabytes per stream).
        ("grpc.http2.bdp_probe", 0),
    ]


class Replica:
    """A sidecar process and the channel the router uses to reach it."""

    def __init__(self, plugin: str, index: int, max_message_bytes: int) -> None:
        self.plugin = plugin
        self.index = index
        self.tag = f"{plugin}[{index}]"
        self.state: int = mesh_pb2.REPLICA_STATE_STARTING
        self.process: SidecarProcess | None = None
        self.channel: grpc.aio.Channel | None = None
        self.describe: plugin_pb2.DescribeResponse | None = None
        #: The data plane the replica is announced to when ready (set by the orchestrator).
        self.upstreams: Upstreams | None = None
        #: While it takes calls: its key in the data plane's upstream pool.
        self.upstream_key = ""
        self._dial = ""
        self.restarts = 0
        self.started_at = 0.0
        self.startup_duration = 0.0
        self.last_exit = ""
        #: Counts the replica's processes (and connections, for a remote one).
        self.generation = 0
        # Outlier ejection (see orchestrator._resilience): monotonic times.
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejection_reason = ""
        self.ejection_kind = ""
        self.ejections = 0
        self.last_ejection_end = 0.0
        self._max_message_bytes = max_message_bytes
        self._spec: LaunchSpec | None = None
        self._pinned: PinnedSocket | None = None

    @property
    def in_flight(self) -> int:
        """Attempts the data plane has in flight on this replica."""
        if self.upstreams is None or not self.upstream_key:
            return 0
        return self.upstreams.in_flight(self.upstream_key)

    def publish(self, plugin_version: str) -> None:
        """Announces the ready replica to the data plane: from now on it takes calls."""
        if self.upstreams is None:
            return
        self.upstream_key = f"{self.tag}#{self.generation}"
        launched = self._spec is not None
        self.upstreams.publish(
            self,
            self.upstream_key,
            self._dial,
            verify=launched,
            span_attributes={
                "server.address": self.address or self._dial,
                "network.transport": "unix" if self._dial.startswith("unix:") else "tcp",
                "sidemesh.plugin": self.plugin,
                "sidemesh.replica": self.index,
                "sidemesh.plugin.version": plugin_version,
            },
        )

    def withdraw(self) -> None:
        """Takes the replica out of the data plane: its calls in flight end UNAVAILABLE."""
        key, self.upstream_key = self.upstream_key, ""
        if key and self.upstreams is not None:
            self.upstreams.withdraw(key)

    def ejected(self, now: float) -> bool:
        """True while the replica is out of rotation for failing too often."""
        return self.ejected_until > now

    def eject(self, until: float, reason: str, kind: str) -> None:
        """Takes the replica out of rotation until ``until`` (monotonic)."""
        self.ejected_until = until
        self.ejection_reason = reason
        self.ejection_kind = kind

    def restore(self, now: float) -> None:
        """Puts the replica back into rotation."""
        self.ejected_until = 0.0
        self.last_ejection_end = now

    def _fresh(self) -> None:
        """A new process or connection: its predecessor's failures are not its own."""
        self.generation += 1
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejection_reason = ""

    @property
    def address(self) -> str:
        """The sidecar's socket path (empty before the first start)."""
        return str(self._spec.socket_path) if self._spec else ""

    @property
    def output_dropped(self) -> int:
        """Lines of the current process's output the rate limit dropped."""
        return self.process.budget.dropped if self.process is not None else 0

    @property
    def pid(self) -> int:
        """The sidecar's host pid, or 0."""
        return self.process.pid if self.process and self.process.returncode is None else 0

    # -- start ---------------------------------------------------------------

    async def start(
        self,
        spec: LaunchSpec,
        config: dict[str, Any],
        timeout: float,
        on_spawn: Callable[[int], None] | None = None,
    ) -> plugin_pb2.DescribeResponse:
        """Spawns the sidecar and waits until it is ready; raises :class:`ReplicaStartError`.

        ``on_spawn`` is called with the pid as soon as the process exists.
        """
        self._spec = spec
        self._fresh()
        with contextlib.suppress(FileNotFoundError):
            spec.socket_path.unlink()
        self.started_at = time.time()
        t0 = time.monotonic()
        try:
            self.process = await SidecarProcess.spawn(
                spec.argv, env=spec.env, cwd=spec.cwd, tag=self.tag,
                die_with_parent=spec.die_with_parent, pass_fds=spec.pass_fds,
                output=spec.output,
            )  # fmt: skip
        finally:
            if spec.sandbox is not None:
                spec.sandbox.close_fds()  # the child has its copies
        process = self.process
        if on_spawn is not None:
            on_spawn(process.pid)
        handshake = asyncio.create_task(self._handshake(spec, config))
        exited = asyncio.create_task(process.wait())
        try:
            done, _ = await asyncio.wait({handshake, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if handshake in done:
                describe: plugin_pb2.DescribeResponse = handshake.result()  # may raise
                self.describe = describe
                self.startup_duration = time.monotonic() - t0
                return describe
            if exited in done:
                self.last_exit = self.exit_reason()
                raise ReplicaStartError(
                    f"sidecar exited before it was ready ({self.last_exit})" + _tail(process)
                )
            self.last_exit = "killed: not ready within the startup timeout"
            raise ReplicaStartError(
                f"sidecar was not ready within its startup timeout of {timeout:g}s"
                + _waiting_for(spec)
                + _tail(process)
            )
        except BaseException:
            handshake.cancel()
            await self.kill()
            raise
        finally:
            exited.cancel()

    async def connect(
        self, address: str, config: dict[str, Any], timeout: float
    ) -> plugin_pb2.DescribeResponse:
        """Connects to a sidecar running elsewhere (a remote plugin) and waits until it is ready."""
        self._spec = None
        self._fresh()
        self.started_at = time.time()
        t0 = time.monotonic()
        self._dial = address
        self.channel = grpc.aio.insecure_channel(
            address, options=channel_options(self._max_message_bytes)
        )
        try:
            describe = await asyncio.wait_for(self._describe_and_configure(config), timeout)
        except TimeoutError:
            await self._release()
            raise ReplicaStartError(
                f"the remote sidecar at {address} was not ready within {timeout:g}s: is it "
                "running, and is the address right?"
            ) from None
        except ReplicaStartError:
            await self._release()
            raise
        self.describe = describe
        self.startup_duration = time.monotonic() - t0
        return describe

    async def _handshake(
        self, spec: LaunchSpec, config: dict[str, Any]
    ) -> plugin_pb2.DescribeResponse:
        while not (spec.socket_path.is_symlink() or spec.socket_path.exists()):
            await asyncio.sleep(_POLL)
        try:
            # Dialled by inode from now on: the plugin cannot redirect its reconnections.
            self._pinned = PinnedSocket(spec.socket_path, spec.socket_owner)
        except SocketRefused as refused:
            raise ReplicaStartError(str(refused)) from None
        self._dial = self._pinned.address
        self.channel = grpc.aio.insecure_channel(
            self._dial, options=channel_options(self._max_message_bytes)
        )
        describe = await self._describe_and_configure(config)
        assert self.process is not None
        try:
            await asyncio.to_thread(self._pinned.verify_listener, self.process.pid)
        except SocketRefused as refused:
            raise ReplicaStartError(str(refused)) from None
        return describe

    async def _describe_and_configure(self, config: dict[str, Any]) -> plugin_pb2.DescribeResponse:
        """Describe (checking the name), Configure, then wait for health SERVING."""
        assert self.channel is not None
        stub = plugin_pb2_grpc.PluginServiceStub(self.channel)
        describe: plugin_pb2.DescribeResponse = await _checked(
            "PluginService.Describe",
            stub.Describe(plugin_pb2.DescribeRequest(), wait_for_ready=True),
        )
        if describe.plugin.name != self.plugin:
            raise ReplicaStartError(
                f"the sidecar says it is plugin {describe.plugin.name!r}, but its manifest "
                f"names it {self.plugin!r}: make the names match"
            )
        refusal = contract_refusal(describe.plugin.contract_version)
        if refusal:
            raise ReplicaStartError(f"the sidecar cannot be served: {refusal}")
        request = plugin_pb2.ConfigureRequest()
        json_format.ParseDict(config, request.config)
        await _checked("PluginService.Configure", stub.Configure(request, wait_for_ready=True))
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            reply = await _checked(
                "grpc.health.v1.Health/Check",
                health.Check(health_pb2.HealthCheckRequest(service="")),
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return describe
            await asyncio.sleep(_POLL * 5)

    # -- while running -------------------------------------------------------

    async def healthy(self, timeout: float) -> bool:
        """One health check: True when the sidecar answers SERVING within ``timeout``."""
        if self.channel is None:
            return False
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    # -- stop ----------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Graceful stop: ``Shutdown``, wait up to ``grace``, then SIGTERM/SIGKILL."""
        process = self.process
        if process is not None and process.returncode is None and self.channel is not None:
            request = plugin_pb2.ShutdownRequest(
                grace_period=duration_pb2.Duration(seconds=int(grace), nanos=int(grace % 1 * 1e9))
            )
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await plugin_pb2_grpc.PluginServiceStub(self.channel).Shutdown(request, timeout=1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), grace + 1.0)
        if process is not None:
            await process.terminate(2.0)
        await self._release()

    async def kill(self) -> None:
        """Immediate stop (SIGKILL to the sidecar's session)."""
        if self.process is not None:
            await self.process.terminate(0.0)
        await self._release()

    async def _release(self) -> None:
        self.withdraw()
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.close()
        if self._spec is not None:
            with contextlib.suppress(FileNotFoundError):
                self._spec.socket_path.unlink()
            if self._spec.sandbox is not None:
                await asyncio.to_thread(self._spec.sandbox.release)

    def exit_reason(self) -> str:
        """Why the sidecar's process ended, naming the sandbox limit that ended it, if one did."""
        code = self.process.returncode if self.process else None
        if self._spec is not None and self._spec.sandbox is not None:
            return self._spec.sandbox.exit_reason(code)
        return describe_exit(code)

    def sandbox_events(self) -> list[str]:
        """Sandbox limits the sidecar ran into since the last call."""
        if self._spec is None or self._spec.sandbox is None:
            return []
        return self._spec.sandbox.new_events()


async def _checked(what: str, call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise ReplicaStartError(f"{what} failed: {exc.code().name}: {exc.details()}") from None


def _tail(process: SidecarProcess) -> str:
    tail = process.stderr_tail()
    return (
        f"\n--- last lines of its stderr ---\n{tail}" if tail else "\n(it wrote nothing to stderr)"
    )


def _waiting_for(spec: LaunchSpec) -> str:
    if not spec.socket_path.exists():
        return f"; it never listened on {spec.socket_path} (SIDEMESH_LISTEN)"
    return "; it listened but did not report SERVING on grpc.health.v1"
