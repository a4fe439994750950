"""An orchestrator (``sidemesh serve``) the benchmark starts with a config of its own."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench._dial import Dial, Tls
from bench._process import Process, wait_for
from bench._sidecar import PLUGIN, PLUGIN_DIR
from orchestrator._certs import create_ca, issue_client, issue_server
from orchestrator._config import MeshConfig
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

#: How a benchmark orchestrator authenticates its TCP clients: not at all (``auth: {mode:
#: off}``, like the nginx and direct topologies), a bearer token (the owner's token that
#: ``sidemesh serve`` generates), or a client certificate over TLS (mTLS).
AUTH_MODES = ("off", "token", "mtls")
#: The benchmark client's identity in the mTLS topology.
CLIENT_PRINCIPAL = "spiffe://bench.local/client/bench"


def remote_plugins_supported() -> bool:
    """Whether this orchestrator can route to a sidecar it did not launch (``remote_plugins``)."""
    return "remote_plugins" in MeshConfig.model_fields


class Orchestrator(Process):
    """``python -m orchestrator.cli serve`` on a kernel-chosen port of 127.0.0.1.

    ``remote`` is the address of a running benchmark sidecar to route ``bench``
    calls to; without it the orchestrator launches the plugin itself, in a
    sandbox unless ``sandbox`` is False. ``auth`` is one of :data:`AUTH_MODES`.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        remote: str | None = None,
        tracing: bool = True,
        sandbox: bool = True,
        max_concurrent_calls: int | None = None,
        auth: str = "off",
    ) -> None:
        if auth not in AUTH_MODES:
            raise ValueError(f"auth is one of {AUTH_MODES}, not {auth!r}")
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths must stay short: the runtime dir lives directly under /tmp.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smb", dir="/tmp"))
        self.state_dir = self.workdir / "state"
        config: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "plugin_dirs": [] if remote else [str(PLUGIN_DIR)],
            "entry_points": False,
            "state_dir": str(self.state_dir),
            "runtime_dir": str(self.runtime_dir),
            "telemetry": {"enabled": tracing},
            "sandbox": {"mode": "enforce" if sandbox else "off"},
            # Like the nginx and direct topologies, no client auth unless asked (its cost is
            # measured by the auth_token and auth_mtls topologies).
            "auth": {"mode": "off"},
        }
        self.auth = auth
        self.remote = remote
        self.tls: Tls | None = None
        if auth == "token":
            config["auth"] = {"mode": "on"}  # the owner's token, generated into the state dir
        elif auth == "mtls":
            certs = self.workdir / "certs"
            create_ca(certs)
            server = issue_server(certs, dns=["localhost"], ips=["127.0.0.1"])
            client = issue_client(certs, spiffe=CLIENT_PRINCIPAL)
            self.tls = Tls(ca=certs / "ca.pem", cert=client.cert, key=client.key)
            config["auth"] = {
                "mode": "on",
                "tls": {
                    "cert": str(server.cert),
                    "key": str(server.key),
                    "client_ca": str(certs / "ca.pem"),
                    "require_client_cert": True,
                },
            }
            config["policy"] = {
                "rules": [
                    {
                        "principals": [CLIENT_PRINCIPAL],
                        "allow": {
                            "tools": [f"{PLUGIN}/*"],
                            "agents": [f"{PLUGIN}/*"],
                            "mesh": ["read"],  # ListPlugins, to see the plugin READY
                        },
                        "description": "the benchmark client",
                    }
                ]
            }
        if remote:
            config["remote_plugins"] = {PLUGIN: {"address": remote}}
        if max_concurrent_calls is not None:
            config["limits"] = {"max_concurrent_calls": max_concurrent_calls}
        self.config = config
        self.config_path = self.workdir / "sidemesh.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.address = ""
        argv = [sys.executable, "-m", "orchestrator.cli", "serve", "-c", str(self.config_path)]
        root = Path(__file__).resolve().parent.parent
        super().__init__(f"orchestrator {name}", argv, self.workdir / "orchestrator.log", cwd=root)

    def start_and_wait(self, timeout: float = 30.0) -> None:
        """Starts the orchestrator; waits for its TCP address and for ``bench`` to be READY."""
        self.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits for the started orchestrator's TCP address and for ``bench`` to be READY."""

        def endpoint() -> str | None:
            self.check_alive()
            try:
                data = json.loads((self.state_dir / "endpoints.json").read_text())
            except (OSError, ValueError):
                return None
            if data.get("pid") != self.pid:
                return None
            return next((a for a in data["addresses"] if not a.startswith("unix:")), None)

        self.address = wait_for(endpoint, timeout, lambda: f"{self.name} to listen")

        def ready() -> bool | None:
            self.check_alive()
            status = self.plugin_status()
            ok = status is not None and status.state == mesh_pb2.PLUGIN_STATE_READY
            return True if ok else None

        wait_for(ready, timeout, lambda: f"{PLUGIN} READY in {self.name}:\n{self.log_tail()}")

    @property
    def dial(self) -> Dial:
        """How the benchmark's clients reach it over TCP, with the credentials it asks for."""
        if self.auth == "token":
            token = (self.state_dir / "token").read_text().strip()
            return Dial(self.address, token=token)
        return Dial(self.address, tls=self.tls)

    def plugin_status(self) -> mesh_pb2.PluginStatus | None:
        """The ``bench`` plugin's status from ``MeshService.ListPlugins``, if listed."""
        dial = self.dial
        with dial.channel() as channel:
            try:
                reply = mesh_pb2_grpc.MeshServiceStub(channel).ListPlugins(
                    mesh_pb2.ListPluginsRequest(), timeout=5, metadata=dial.metadata
                )
            except grpc.RpcError:
                return None
        return next((p for p in reply.plugins if p.name == PLUGIN), None)

    def sidecar_pids(self) -> list[int]:
        """Host pids of the sidecars it launched (none for a remote plugin)."""
        status = self.plugin_status()
        return [r.pid for r in status.replicas if r.pid] if status else []

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stops the orchestrator (it drains and stops its sidecars), then removes its sockets."""
        try:
            return super().stop(sig, timeout)
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
