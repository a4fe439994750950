"""A plugin as the orchestrator manages it: manifest, settings, replicas, overall state."""

from __future__ import annotations

import fnmatch
import itertools
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jsonschema
from google.protobuf import duration_pb2, timestamp_pb2

from orchestrator._config import MeshConfig, PluginOverride
from orchestrator._manifest import PluginManifest
from orchestrator._process import tree_rss_bytes
from orchestrator._replica import Replica
from orchestrator._resilience import Resilience
from sidecars import sandbox
from sidemesh.core import MESH_SOCKET, UnavailableError
from sidemesh.v1 import mesh_pb2

S = mesh_pb2


class PluginPaths:
    """Where one plugin's sockets and data live."""

    def __init__(self, run_dir: Path, data_dir: Path, data_image: Path | None = None) -> None:
        #: Short-pathed directory for the plugin's sockets.
        self.run_dir = run_dir
        #: The orchestrator's callback socket for this plugin.
        self.mesh_socket = run_dir / MESH_SOCKET
        #: The plugin's own writable directory (kept across restarts).
        self.data_dir = data_dir
        #: The ext4 image mounted at the data dir, where the host allows one (as root).
        self.data_image = data_image

    def replica_dir(self, index: int) -> Path:
        """The directory replica ``index`` makes its socket in."""
        return self.run_dir / f"r{index}"


class PluginRuntime:
    """Everything the orchestrator knows about one plugin while the mesh runs."""

    def __init__(
        self,
        name: str,
        manifest: PluginManifest | None,
        override: PluginOverride,
        config: MeshConfig,
        paths: PluginPaths | None,
        directory: str,
        index: int = 0,
    ) -> None:
        self.name = name
        #: The plugin's position in the mesh (it picks the plugin's host uid in a sandbox).
        self.index = index
        self.manifest = manifest
        self.override = override
        self.paths = paths
        self.directory = directory
        self.state: int = S.PLUGIN_STATE_STARTING
        self.error = ""
        self.crash_loop = False
        self.stopping = False
        self.routing = override.routing or (manifest.routing if manifest else "round_robin")
        count = override.replicas or (manifest.replicas if manifest else 1)
        self.replicas = [
            Replica(name, i, config.limits.max_message_bytes)
            for i in range(count if manifest else 0)
        ]
        if not override.enabled:
            for replica in self.replicas:
                replica.state = S.REPLICA_STATE_STOPPED  # never started, not "starting"
        self.startup_timeout = override.startup_timeout or (
            manifest.startup_timeout if manifest else 30.0
        )
        #: Replicas that take calls, kept current by :meth:`refresh_ready`.
        self.ready: list[Replica] = []
        self._allowed: dict[str, bool] = {}
        self._rr = itertools.count()
        self.config: dict[str, Any] = {}
        self.sandbox_layers: list[mesh_pb2.SandboxLayer] = []
        #: The host paths its sidecars see (set by the launcher), for ``plugins -v``.
        self.granted_paths: list[mesh_pb2.SandboxPath] = []
        #: The operator's mounts by name, at the paths the plugin sees them.
        self.mount_paths: dict[str, str] = {}
        #: The host uid its sandboxed sidecars run as (None: the orchestrator's own).
        self.host_uid: int | None = None
        #: Its data dir quota in force (set by the launcher), and its last measurement.
        self.data_quota: sandbox.DataQuota | None = None
        self.data_usage: sandbox.DataUsage | None = None
        #: Retry budget and outlier ejection, from the plugin's settings or the mesh's.
        self.resilience = Resilience(
            name,
            override.retries or config.retries,
            override.outlier_detection or config.outlier_detection,
        )

    @property
    def version(self) -> str:
        """The plugin's version, from its manifest."""
        return self.manifest.version if self.manifest else ""

    # -- configuration -------------------------------------------------------

    def effective_config(self) -> dict[str, Any]:
        """Schema defaults overlaid with the operator's values; raises ``ValueError`` if invalid."""
        assert self.manifest is not None
        config = {**self.manifest.default_config(), **self.override.config}
        schema = self.manifest.config_schema
        if schema is not None:
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
            if errors:
                where = [
                    "plugins."
                    + ".".join([self.name, "config", *map(str, e.absolute_path)])
                    + f": {e.message}"
                    for e in errors[:5]
                ]
                raise ValueError(
                    "the config does not match the plugin's config_schema: "
                    + "; ".join(where)
                    + " (fix the values under plugins."
                    + f"{self.name}.config in the Sidemesh config)"
                )
        return config

    # -- permissions ---------------------------------------------------------

    def may_call(self, kind: str, qualified: str) -> bool:
        """Whether this plugin may call ``kind`` (``tool``/``agent``) ``qualified`` back.

        Its manifest's ``permissions``, narrowed to the operator's grant
        (``plugins.<name>.permissions``) when there is one.
        """
        key = f"{kind}:{qualified}"
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = _matches(self.asked(kind), qualified)
            grant = self.override.permissions
            if allowed and grant is not None:
                allowed = _matches(grant.tools if kind == "tool" else grant.agents, qualified)
            self._allowed[key] = allowed
        return allowed

    def asked(self, kind: str) -> list[str]:
        """The patterns its manifest's permissions give for ``kind``."""
        if self.manifest is None:
            return []
        perms = self.manifest.permissions
        return perms.tools if kind == "tool" else perms.agents

    # -- routing -------------------------------------------------------------

    def refresh_ready(self) -> None:
        """Recomputes the list of replicas that take calls."""
        self.ready = [r for r in self.replicas if r.state == S.REPLICA_STATE_READY]

    def pick(self) -> Replica:
        """The replica for the next call; ``UNAVAILABLE`` when none is ready.

        Ejected replicas are skipped, unless every ready one is ejected (then
        they all take calls again, rather than none).
        """
        ready = self.ready
        if not ready:
            raise self.unavailable()
        if len(ready) == 1:
            return ready[0]
        now = time.monotonic()
        serving = [r for r in ready if not r.ejected(now)] or ready
        return self._choose(serving)

    def pick_other(self, tried: Collection[Replica]) -> Replica | None:
        """A ready replica not in ``tried`` and not ejected, for a retry; None if there is none."""
        now = time.monotonic()
        others = [r for r in self.ready if r not in tried and not r.ejected(now)]
        return self._choose(others) if others else None

    def _choose(self, replicas: list[Replica]) -> Replica:
        if self.routing == "least_loaded":
            return min(replicas, key=lambda r: r.in_flight)
        return replicas[next(self._rr) % len(replicas)]

    def unavailable(self) -> UnavailableError:
        """The error for a call when no replica is ready, saying why."""
        state = state_name(self.state)
        why = f" (last error: {self.error.splitlines()[0]})" if self.error else ""
        return UnavailableError(
            f"plugin {self.name!r} has no ready replica: it is {state}{why}",
            reason="NO_READY_REPLICA",
            metadata={"plugin": self.name, "state": state},
            retry_delay=1.0,
        )

    # -- state ---------------------------------------------------------------

    def compute_state(self) -> int:
        """The overall state that follows from the replicas' states."""
        if self.manifest is None:
            return S.PLUGIN_STATE_FAILED
        if not self.override.enabled:
            return S.PLUGIN_STATE_DISABLED
        if not self.replicas:  # refused before it started (bad config, strict sandbox)
            return S.PLUGIN_STATE_FAILED
        states = [r.state for r in self.replicas]
        if self.stopping:
            done = all(s in (S.REPLICA_STATE_STOPPED, S.REPLICA_STATE_FAILED) for s in states)
            return S.PLUGIN_STATE_STOPPED if done else S.PLUGIN_STATE_STOPPING
        ready = states.count(S.REPLICA_STATE_READY)
        if ready == len(states):
            return S.PLUGIN_STATE_READY
        if ready:
            return S.PLUGIN_STATE_DEGRADED
        if self.crash_loop:
            return S.PLUGIN_STATE_CRASH_LOOP
        if S.REPLICA_STATE_FAILED in states:
            return S.PLUGIN_STATE_FAILED
        return S.PLUGIN_STATE_STARTING

    def status(self, agents: list[str], tools: list[str]) -> mesh_pb2.PluginStatus:
        """The plugin's status as ``MeshService`` reports it."""
        manifest = self.manifest
        status = mesh_pb2.PluginStatus(
            name=self.name,
            version=manifest.version if manifest else "",
            description=manifest.description if manifest else "",
            state=self.state,  # type: ignore[arg-type]
            error=self.error,
            restarts=sum(r.restarts for r in self.replicas),
            agents=agents,
            tools=tools,
            mcp=bool(manifest and manifest.provides.mcp),
            directory=self.directory,
            sandbox=self.sandbox_layers,
            routing=self.routing,
            paths=self.granted_paths,
        )
        if self.host_uid is not None:
            status.host_uid = self.host_uid
        if self.data_quota is not None:
            status.data_dir.CopyFrom(self._data_dir_status(self.data_quota))
        for r in self.replicas:
            replica = status.replicas.add(
                index=r.index,
                state=r.state,
                pid=r.pid,
                restarts=r.restarts,
                in_flight=r.in_flight,
                last_exit=r.last_exit,
                rss_bytes=tree_rss_bytes(r.pid),
                ejections=r.ejections,
                output_lines_dropped=r.output_dropped,
                ejection_reason=r.ejection_reason if r.ejected_until else "",
            )
            if r.ejected_until:
                left = r.ejected_until - time.monotonic()
                if left > 0:
                    replica.ejected_until.CopyFrom(_timestamp(time.time() + left))
            if r.pid:
                replica.started_at.CopyFrom(_timestamp(r.started_at))
            if r.state == S.REPLICA_STATE_READY:
                replica.startup_duration.CopyFrom(duration(r.startup_duration))
        return status

    def _data_dir_status(self, quota: sandbox.DataQuota) -> mesh_pb2.DataDirStatus:
        usage = self.data_usage or sandbox.DataUsage(0, 0)
        mechanism = (
            S.DATA_QUOTA_MECHANISM_IMAGE
            if quota.mechanism == sandbox.IMAGE
            else S.DATA_QUOTA_MECHANISM_ACCOUNTED
        )
        return mesh_pb2.DataDirStatus(
            mechanism=mechanism,
            quota_bytes=quota.quota_bytes,
            used_bytes=usage.used_bytes,
            max_files=quota.max_files,
            files=usage.files,
            problem=usage.problem,
            read_only=quota.read_only,
        )


def _matches(patterns: list[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def state_name(state: int) -> str:
    """``READY`` for ``PLUGIN_STATE_READY``: a plugin state as people read it."""
    return S.PluginState.Name(state).removeprefix("PLUGIN_STATE_")  # type: ignore[arg-type]


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    """A ``google.protobuf.Duration`` of ``seconds``."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
