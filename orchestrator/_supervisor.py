"""The supervisor: starts every replica, watches its health, restarts it with backoff, stops it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from orchestrator import sandbox
from orchestrator._catalog import Catalog
from orchestrator._config import SupervisorSettings
from orchestrator._events import EventBus
from orchestrator._launch import Launcher
from orchestrator._output import OutputLimits
from orchestrator._plugin import PluginRuntime, duration, state_name
from orchestrator._replica import Replica, ReplicaStartError
from sidemesh.v1 import mcp_pb2, mcp_pb2_grpc, mesh_pb2, plugin_pb2, plugin_pb2_grpc

S = mesh_pb2
log = logging.getLogger("sidemesh.supervisor")

#: Why a replica is restarted once its accounted data dir is back under its quota.
_WRITABLE_AGAIN = "restarted: its data dir is back under its quota (writable again)"


class Supervisor:
    """Runs each plugin's replicas until :meth:`stop`."""

    def __init__(
        self,
        settings: SupervisorSettings,
        catalog: Catalog,
        events: EventBus,
        launcher: Launcher,
        log_level: str,
        telemetry_env: dict[str, str],
        output: OutputLimits | None = None,
    ) -> None:
        self._settings = settings
        self._output = output or OutputLimits()
        self._catalog = catalog
        self._events = events
        self._launcher = launcher
        self._log_level = log_level
        self._telemetry_env = telemetry_env
        self.plugins: dict[str, PluginRuntime] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stopping = False
        # Data dir quotas: a watcher per plugin; whether each replica got its data dir
        # read-only; an event set (and replaced) whenever a plugin's data dir changes mode.
        self._data_watchers: dict[str, asyncio.Task[None]] = {}
        self._launched_read_only: dict[tuple[str, int], bool] = {}
        self._data_flips: dict[str, asyncio.Event] = {}
        # One thread measures every data dir: as an unprivileged user, the orchestrator's
        # threads count toward the sidecars' process limit (RLIMIT_NPROC is per user).
        self._measurer: ThreadPoolExecutor | None = None

    def add(self, plugin: PluginRuntime) -> None:
        """Registers ``plugin``; :meth:`start` runs it."""
        self.plugins[plugin.name] = plugin
        plugin.state = plugin.compute_state()

    def start(self, plugin: PluginRuntime) -> None:
        """Starts a task per replica of ``plugin``, and one to watch its data dir quota."""
        for replica in plugin.replicas:
            key = (plugin.name, replica.index)
            self._tasks[key] = asyncio.create_task(
                self._run_replica(plugin, replica), name=f"replica {replica.tag}"
            )
        if plugin.data_quota is not None and plugin.replicas:
            self._data_watchers[plugin.name] = asyncio.create_task(
                self._watch_data(plugin), name=f"data dir of {plugin.name}"
            )

    async def wait_ready(self, timeout: float) -> bool:
        """Waits until no plugin is STARTING (or ``timeout``); True if all enabled are READY."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.state != S.PLUGIN_STATE_STARTING for p in self.plugins.values()):
                break
            await asyncio.sleep(0.05)
        return all(
            p.state in (S.PLUGIN_STATE_READY, S.PLUGIN_STATE_DISABLED)
            for p in self.plugins.values()
            if p.manifest is not None
        )

    # -- one replica's life --------------------------------------------------

    async def _run_replica(self, plugin: PluginRuntime, replica: Replica) -> None:
        quick_failures = 0
        settings = self._settings
        try:
            while not self._stopping:
                t0 = time.monotonic()
                try:
                    failure = await self._start_once(plugin, replica)
                    if failure is None:  # it was ready; now it has stopped serving
                        reason = await self._watch(plugin, replica)
                        if self._stopping:
                            return
                        if reason == _WRITABLE_AGAIN:  # planned: no failure, no delay
                            self._events.emit(
                                plugin.name, "replica_exited", _exited(replica, reason, True, 0.0)
                            )
                            replica.restarts += 1
                            continue
                        plugin.error = f"replica {replica.index} {reason}" + _tail(replica)
                    else:
                        reason = failure
                except Exception as exc:  # a bug of ours: never let it stall the plugin silently
                    log.exception("%s: supervising the replica failed", replica.tag)
                    self._set_replica(plugin, replica, S.REPLICA_STATE_FAILED)
                    await replica.kill()
                    failure = reason = f"internal error of the supervisor: {exc!r}"
                    plugin.error = f"replica {replica.index}: {reason}"
                if failure is not None or time.monotonic() - t0 < settings.min_uptime:
                    # It never became ready, however long that took, or it crashed soon
                    # after: both count toward a crash loop.
                    quick_failures += 1
                else:  # it served a good while: a fresh failure, not a loop
                    quick_failures = 1
                    plugin.crash_loop = False
                if quick_failures >= settings.crash_loop_after:
                    plugin.crash_loop = True
                # Jitter (before the cap, so delays still grow): replicas that crashed
                # together do not all restart together.
                delay = min(
                    settings.backoff_initial * 2 ** (quick_failures - 1) * random.uniform(0.8, 1.2),
                    settings.backoff_max,
                )
                self._set_replica(
                    plugin,
                    replica,
                    S.REPLICA_STATE_BACKOFF if failure is None else S.REPLICA_STATE_FAILED,
                )
                self._events.emit(
                    plugin.name, "replica_exited", _exited(replica, reason, True, delay)
                )
                log.warning("%s: restarting in %.1fs", replica.tag, delay)
                await asyncio.sleep(delay)
                replica.restarts += 1
        except asyncio.CancelledError:
            await replica.kill()
            raise

    async def _start_once(self, plugin: PluginRuntime, replica: Replica) -> str | None:
        """Spawns the replica and waits for it to be ready; returns why not (None when ready)."""
        assert plugin.manifest is not None
        self._set_replica(plugin, replica, S.REPLICA_STATE_STARTING)

        def spawned(pid: int) -> None:
            self._events.emit(
                plugin.name, "replica_started", S.ReplicaStarted(replica=replica.index, pid=pid)
            )

        try:
            if plugin.manifest.remote:
                assert plugin.manifest.address is not None
                describe = await replica.connect(
                    plugin.manifest.address, plugin.config, plugin.startup_timeout
                )
            else:
                spec = dataclasses.replace(
                    self._launcher.launch_spec(
                        plugin, replica.index, self._log_level, self._telemetry_env
                    ),
                    output=self._output,
                )
                self._launched_read_only[(plugin.name, replica.index)] = bool(
                    spec.sandbox and spec.sandbox.data_read_only
                )
                describe = await replica.start(
                    spec, plugin.config, plugin.startup_timeout, on_spawn=spawned
                )
            _check_provides(plugin, describe)
        except (ReplicaStartError, OSError, RuntimeError) as exc:
            await replica.kill()
            message = f"replica {replica.index} failed to start: {exc}"
            log.error("%s: %s", plugin.name, message)
            plugin.error = message
            return f"failed to start: {str(exc).splitlines()[0]}"
        self._catalog.set_plugin(
            plugin.name,
            describe.agents,
            describe.tools,
            describe.mcp_server if describe.HasField("mcp_server") else None,
        )
        plugin.error = ""
        replica.publish(plugin.version)  # the data plane may send it calls from now on
        self._set_replica(plugin, replica, S.REPLICA_STATE_READY)
        log.info("%s: ready in %.2fs (pid %d)", replica.tag, replica.startup_duration, replica.pid)
        self._events.emit(
            plugin.name,
            "replica_ready",
            S.ReplicaReady(
                replica=replica.index, startup_duration=duration(replica.startup_duration)
            ),
        )
        return None

    async def _watch(self, plugin: PluginRuntime, replica: Replica) -> str:
        """Waits while the replica serves; returns why it stopped serving."""
        settings = self._settings
        # A remote plugin has no process of ours: only its health tells.
        waiting = replica.process.wait() if replica.process else asyncio.Event().wait()
        exited = asyncio.create_task(waiting)
        catalog_watch = None
        if replica.describe is not None and replica.describe.HasField("mcp_server"):
            catalog_watch = asyncio.create_task(self._follow_catalog(plugin, replica))
        data_flip = asyncio.create_task(self._data_flip(plugin).wait())
        failures = 0
        try:
            while True:
                if not exited.done() and self._data_mode_changed(plugin, replica):
                    return await self._restart_for_data(plugin, replica)
                done, _ = await asyncio.wait(
                    {exited, data_flip},
                    timeout=settings.health_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if data_flip in done and exited not in done:
                    data_flip = asyncio.create_task(self._data_flip(plugin).wait())
                    continue  # the loop's first check restarts the replica
                if exited in done:
                    if self._stopping:
                        return "stopped"
                    replica.last_exit = replica.exit_reason()  # before the sandbox is released
                    reason = f"exited: {replica.last_exit}"
                    log.error("%s: %s", replica.tag, reason)
                    plugin.error = f"replica {replica.index} {reason}" + _tail(replica)
                    # Out of rotation before it is torn down: no call may pick it meanwhile.
                    self._set_replica(plugin, replica, S.REPLICA_STATE_BACKOFF)
                    await replica.kill()
                    return reason
                if self._stopping:
                    return "stopped"
                for event in replica.sandbox_events():
                    log.warning("%s: sandbox: %s", replica.tag, event)
                    self._events.emit(
                        plugin.name,
                        "sandbox_violation",
                        S.SandboxViolation(replica=replica.index, detail=event),
                    )
                if await replica.healthy(settings.health_timeout):
                    failures = 0
                    plugin.resilience.health_passed(replica)
                    continue
                failures += 1
                plugin.resilience.health_failed(replica, plugin.ready)
                log.warning(
                    "%s: health check failed (%d/%d)",
                    replica.tag,
                    failures,
                    settings.health_failures,
                )
                if failures >= settings.health_failures:
                    self._set_replica(plugin, replica, S.REPLICA_STATE_UNHEALTHY)
                    await replica.kill()
                    replica.last_exit = f"unhealthy: {failures} health checks failed; replaced"
                    return f"was {replica.last_exit}"
        finally:
            exited.cancel()
            data_flip.cancel()
            if catalog_watch is not None:
                catalog_watch.cancel()

    # -- the data dir quota ----------------------------------------------------

    async def _watch_data(self, plugin: PluginRuntime) -> None:
        """Measures the plugin's data dir; reports going over its quota once per episode.

        An accounted quota's sidecars are restarted with the data dir read-only
        when it goes over, and writable again once it is back under.
        """
        quota = plugin.data_quota
        assert quota is not None
        over = False
        if plugin.data_usage is not None and plugin.data_usage.problem:  # over at start
            over = True
            self._report_data(plugin, plugin.data_usage)
        while not self._stopping:
            await asyncio.sleep(quota.tick)
            if not quota.due((r.pid for r in plugin.replicas if r.pid), time.monotonic()):
                continue
            if self._measurer is None:
                self._measurer = ThreadPoolExecutor(1, thread_name_prefix="sidemesh data dirs")
            try:
                usage = await asyncio.get_running_loop().run_in_executor(
                    self._measurer, quota.measure
                )
            except Exception:  # a bug of ours: keep watching, slowly
                log.exception("plugin %s: measuring its data dir failed", plugin.name)
                await asyncio.sleep(5.0)
                continue
            plugin.data_usage = usage
            if bool(usage.problem) != over:
                over = bool(usage.problem)
                if over:
                    self._report_data(plugin, usage)
                else:
                    log.info(
                        "plugin %s: its data dir is back under its quota (%d bytes, %d files)",
                        plugin.name, usage.used_bytes, usage.files,
                    )  # fmt: skip
            if quota.mechanism == sandbox.ACCOUNTED and quota.read_only != over:
                quota.read_only = over
                flip = self._data_flips.pop(plugin.name, None)
                if flip is not None:
                    flip.set()

    def _report_data(self, plugin: PluginRuntime, usage: sandbox.DataUsage) -> None:
        assert plugin.data_quota is not None
        detail = usage.problem
        if plugin.data_quota.mechanism == sandbox.ACCOUNTED:
            detail += "; its sidecars restart with the data dir read-only"
        log.warning("plugin %s: sandbox: %s", plugin.name, detail)
        # The quota is the plugin's, shared by its replicas: reported as replica 0's.
        self._events.emit(
            plugin.name, "sandbox_violation", S.SandboxViolation(replica=0, detail=detail)
        )

    def _data_flip(self, plugin: PluginRuntime) -> asyncio.Event:
        """Set when the plugin's data dir next turns read-only or writable."""
        return self._data_flips.setdefault(plugin.name, asyncio.Event())

    def _data_mode_changed(self, plugin: PluginRuntime, replica: Replica) -> bool:
        quota = plugin.data_quota
        launched = self._launched_read_only.get((plugin.name, replica.index), False)
        return quota is not None and launched != quota.read_only

    async def _restart_for_data(self, plugin: PluginRuntime, replica: Replica) -> str:
        """Stops a replica whose data dir must change mode; returns why, for its restart."""
        quota = plugin.data_quota
        assert quota is not None
        self._set_replica(plugin, replica, S.REPLICA_STATE_BACKOFF)
        await replica.kill()
        if not quota.read_only:
            replica.last_exit = _WRITABLE_AGAIN
            return _WRITABLE_AGAIN
        replica.last_exit = f"killed: data dir quota ({quota.quota_bytes >> 20} MiB) exceeded"
        log.error("%s: %s", replica.tag, replica.last_exit)
        return f"{replica.last_exit}; restarting it with its data dir read-only"

    async def _follow_catalog(self, plugin: PluginRuntime, replica: Replica) -> None:
        """Re-reads an MCP plugin's catalog whenever its server's tool list changes."""
        if replica.channel is None:
            return
        mcp = mcp_pb2_grpc.McpServiceStub(replica.channel)
        describe = plugin_pb2_grpc.PluginServiceStub(replica.channel).Describe
        try:
            async for event in mcp.Watch(mcp_pb2.WatchRequest(server=plugin.name)):
                if event.HasField("tools_list_changed"):
                    fresh = await describe(plugin_pb2.DescribeRequest(), timeout=10)
                    replica.describe = fresh
                    self._catalog.set_plugin(
                        plugin.name, fresh.agents, fresh.tools, fresh.mcp_server
                    )
                    log.info("%s: tool list changed: %d tools now", replica.tag, len(fresh.tools))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("%s: stopped following its MCP catalog: %s", replica.tag, exc.details())

    # -- state ---------------------------------------------------------------

    def _set_replica(self, plugin: PluginRuntime, replica: Replica, state: int) -> None:
        replica.state = state
        plugin.refresh_ready()
        self.update_state(plugin)

    def update_state(self, plugin: PluginRuntime, reason: str = "") -> None:
        """Recomputes ``plugin``'s state and announces a change."""
        new = plugin.compute_state()
        if new == plugin.state:
            return
        old, plugin.state = plugin.state, new
        why = reason or (plugin.error.splitlines()[0] if plugin.error else "")
        log.info(
            "plugin %s: %s -> %s%s",
            plugin.name,
            state_name(old),
            state_name(new),
            f" ({why})" if why else "",
        )
        self._events.emit(
            plugin.name,
            "plugin_state_changed",
            S.PluginStateChanged(state=new, previous=old, reason=why),  # type: ignore[arg-type]
        )

    # -- stop ----------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Drains and stops every replica: ``Shutdown``, then SIGTERM/SIGKILL."""
        self._stopping = True
        for watcher in self._data_watchers.values():
            watcher.cancel()
        if self._measurer is not None:
            self._measurer.shutdown(wait=False, cancel_futures=True)
        for plugin in self.plugins.values():
            plugin.stopping = True
            self.update_state(plugin)

        async def stop_replica(plugin: PluginRuntime, replica: Replica) -> None:
            task = self._tasks.get((plugin.name, replica.index))
            if replica.state == S.REPLICA_STATE_READY:
                self._set_replica(plugin, replica, S.REPLICA_STATE_STOPPING)
                await replica.stop(grace)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await replica.kill()
            self._events.emit(
                plugin.name, "replica_exited", _exited(replica, "stopped", False, 0.0)
            )
            self._set_replica(plugin, replica, S.REPLICA_STATE_STOPPED)

        await asyncio.gather(
            *(stop_replica(p, r) for p in self.plugins.values() for r in p.replicas)
        )


def _check_provides(plugin: PluginRuntime, describe: plugin_pb2.DescribeResponse) -> None:
    """Raises when the plugin lacks something its manifest's ``provides`` declares."""
    assert plugin.manifest is not None
    declared = plugin.manifest.provides
    agents = {a.name for a in describe.agents}
    tools = {t.name for t in describe.tools}
    missing = [f"agent {a!r}" for a in declared.agents if a not in agents]
    missing += [f"tool {t!r}" for t in declared.tools if t not in tools]
    if declared.mcp and not describe.HasField("mcp_server"):
        missing.append("an MCP server")
    if missing:
        raise ReplicaStartError(
            f"the manifest's 'provides' lists {', '.join(missing)}, but the plugin does not "
            f"provide it (it provides agents {sorted(agents)} and tools {sorted(tools)}): "
            "fix plugin.yaml or the plugin"
        )


def _exited(
    replica: Replica, reason: str, will_restart: bool, delay: float
) -> mesh_pb2.ReplicaExited:
    code = replica.process.returncode if replica.process else None
    return S.ReplicaExited(
        replica=replica.index,
        pid=replica.process.pid if replica.process else 0,
        exit_code=code if code is not None and code >= 0 else -1,
        signal=-code if code is not None and code < 0 else 0,
        reason=reason,
        will_restart=will_restart,
        restart_delay=duration(delay),
    )


def _tail(replica: Replica) -> str:
    tail = replica.process.stderr_tail() if replica.process else ""
    return f"\n--- last lines of its stderr ---\n{tail}" if tail else ""
