"""The processes of a run and the topologies they form, started and always stopped together.

```
direct        client ──────────────────────────────▶ bench sidecar (127.0.0.1:P)
nginx         client ──▶ nginx grpc_pass ──────────▶   the same sidecar
orchestrator  client ──▶ orchestrator (tracing on) ─▶   the same sidecar (remote_plugins)
  tracing off client ──▶ orchestrator (telemetry off) ▶ the same sidecar
sandboxed     client ──▶ orchestrator ──unix──▶ sidecar it launched, sandboxed
unsandboxed   client ──▶ orchestrator ──unix──▶ sidecar it launched, sandbox off
auth_token    client ─token─▶ orchestrator (auth on) ─▶ the same sidecar
auth_mtls     client ─mTLS──▶ orchestrator (auth on, TLS) ─▶ the same sidecar
```

Until the orchestrator has ``remote_plugins``, the two "same sidecar"
orchestrators launch an unsandboxed sidecar of their own; the run records
``same_sidecar: false``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._dial import Dial
from bench._mesh import Orchestrator, remote_plugins_supported
from bench._nginx import WORKER_PROCESSES, Nginx
from bench._proc import memory_kib, process_tree
from bench._sidecar import BenchSidecar


@dataclass
class Topology:
    """A path from the client to a benchmark sidecar."""

    key: str
    label: str
    #: host:port the clients and h2load connect to, and the credentials they show.
    dial: Dial
    #: The forwarding processes (none for direct), for CPU per call.
    proxy_pids: Callable[[], list[int]]
    #: The sidecar process tree the calls end in.
    sidecar_pids: Callable[[], list[int]]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: The phases measured on it (the auth topologies measure only what auth costs per call).
    phases: tuple[str, ...] = ("latency", "h2load", "python", "streams")

    @property
    def address(self) -> str:
        """host:port."""
        return self.dial.address


#: Display order of the topologies.
ORDER = (
    "direct", "nginx", "orchestrator", "tracing_off", "sandboxed", "unsandboxed",
    "auth_token", "auth_mtls",
)  # fmt: skip
#: Phases of the auth topologies: h2load cannot present a client certificate.
AUTH_PHASES = {"auth_token": ("latency", "h2load", "python"), "auth_mtls": ("latency", "python")}


class Lab:
    """Starts the sidecar, nginx and the orchestrators; :meth:`stop` ends them all."""

    def __init__(self, workdir: Path, nginx_binary: str | None) -> None:
        self.workdir = workdir
        self.nginx_binary = nginx_binary
        self.remote = remote_plugins_supported()
        self.sidecar = BenchSidecar(workdir)
        self.nginx: Nginx | None = None
        self.orchestrators: dict[str, Orchestrator] = {}
        self.started: list[Any] = []
        self.startup: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self, parallel: bool = False, idle_orchestrator: bool = True) -> None:
        """Starts every process; one after the other unless ``parallel``.

        Sequential starts keep the launched sidecars' start-to-ready times from
        overlapping (the orchestrators start their plugins as they start).
        ``idle_orchestrator`` adds one kept for the idle-streams phase.
        """
        t0 = time.monotonic()
        self.started.append(self.sidecar)
        self.sidecar.start_and_wait()
        self.startup["bench_sidecar_seconds"] = time.monotonic() - t0
        if self.nginx_binary:
            self.nginx = Nginx(self.nginx_binary, self.workdir, self.sidecar.address)
            self.started.append(self.nginx)
            self.nginx.start_and_wait()
        remote = self.sidecar.address if self.remote else None
        plans = {
            "orchestrator": {"remote": remote, "tracing": True, "sandbox": False},
            "tracing_off": {"remote": remote, "tracing": False, "sandbox": False},
            "sandboxed": {"tracing": True, "sandbox": True},
            "unsandboxed": {"tracing": True, "sandbox": False},
            "auth_token": {"remote": remote, "tracing": True, "sandbox": False, "auth": "token"},
            "auth_mtls": {"remote": remote, "tracing": True, "sandbox": False, "auth": "mtls"},
        }
        if idle_orchestrator:
            # Serves nothing until the idle-streams phase, so its peak RSS is that phase's.
            plans["idle"] = {"remote": remote, "tracing": True, "sandbox": False}
        for key, kwargs in plans.items():
            orchestrator = Orchestrator(key, self.workdir, **kwargs)  # type: ignore[arg-type]
            self.started.append(orchestrator)
            self.orchestrators[key] = orchestrator
            if parallel:
                orchestrator.start()
            else:
                orchestrator.start_and_wait()
        if parallel:
            for orchestrator in self.orchestrators.values():
                orchestrator.wait_ready()

    def stop(self) -> None:
        """Stops everything started, all at once (each drains in parallel); never raises."""
        with ThreadPoolExecutor(max(len(self.started), 1)) as pool:
            for process in reversed(self.started):
                pool.submit(_quietly, process.stop)
        self.started.clear()

    @property
    def idle_orchestrator(self) -> Orchestrator:
        """The orchestrator for the idle-streams phase (default config, tracing on)."""
        return self.orchestrators.get("idle") or self.orchestrators["orchestrator"]

    # -- what was started ----------------------------------------------------

    def sidecar_start(self) -> dict[str, Any]:
        """Start-to-ready time and idle RSS of the launched sidecars (from ListPlugins)."""
        out: dict[str, Any] = {
            "bench_sidecar_spawn_to_serving_seconds": self.startup.get("bench_sidecar_seconds"),
            "bench_sidecar_idle_rss_kib": memory_kib(self.sidecar.pid).get("VmRSS", 0),
        }
        for key in ("sandboxed", "unsandboxed"):
            status = self.orchestrators[key].plugin_status()
            replicas = list(status.replicas) if status else []
            out[key] = {
                "startup_seconds": [r.startup_duration.ToNanoseconds() / 1e9 for r in replicas],
                "rss_bytes": [r.rss_bytes for r in replicas],
                "sandbox_layers": [layer.name for layer in status.sandbox if layer.active]
                if status
                else [],
            }
        return out

    def topologies(self) -> list[Topology]:
        """Every topology this run can measure (nginx only when installed)."""
        sidecar_tree: Callable[[], list[int]] = lambda: process_tree(self.sidecar.pid)  # noqa: E731
        out = [
            Topology("direct", "direct", Dial(self.sidecar.address), list, sidecar_tree,
                     "client → bench sidecar"),
        ]  # fmt: skip
        if self.nginx is not None:
            nginx = self.nginx
            out.append(
                Topology(
                    "nginx",
                    f"nginx ({WORKER_PROCESSES} worker)",
                    Dial(nginx.address),
                    nginx.pids,
                    sidecar_tree,
                    f"nginx {nginx.version} grpc_pass, worker_processes {WORKER_PROCESSES}",
                    {
                        "version": nginx.version,
                        "worker_processes": WORKER_PROCESSES,
                        "config": nginx.config,
                    },
                )
            )
        labels = {
            "orchestrator": "orchestrator",
            "tracing_off": "orchestrator, tracing off",
            "sandboxed": "orchestrator → sandboxed sidecar",
            "unsandboxed": "orchestrator → unsandboxed sidecar",
            "auth_token": "orchestrator, auth: bearer token",
            "auth_mtls": "orchestrator, auth: mTLS",
        }
        for key, orchestrator in self.orchestrators.items():
            if key not in labels:
                continue
            remote = orchestrator.remote is not None
            out.append(
                Topology(
                    key,
                    labels[key],
                    orchestrator.dial,
                    _pids_of(orchestrator),
                    sidecar_tree if remote else _launched_sidecar(orchestrator),
                    "same sidecar (remote_plugins)" if remote else "sidecar launched by it",
                    {"config": orchestrator.config, "same_sidecar": remote},
                    AUTH_PHASES.get(key, Topology.phases),
                )
            )
        return out


def _quietly(action: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        action()


def _pids_of(orchestrator: Orchestrator) -> Callable[[], list[int]]:
    return lambda: [orchestrator.pid]


def _launched_sidecar(orchestrator: Orchestrator) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        return [p for pid in orchestrator.sidecar_pids() for p in process_tree(pid)]

    return pids
