"""The mesh the chaos run hurts: an orchestrator with the chaos plugin's replicas."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench._process import Process, wait_for
from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CHAOS_PLUGIN = ROOT / "tests" / "plugins" / "chaos"

#: Restarts within a second, so kills every few seconds leave most replicas READY.
SUPERVISOR: dict[str, Any] = {
    "health_interval": 1.0,
    "health_timeout": 1.0,
    "health_failures": 3,
    "backoff_initial": 0.1,
    "backoff_max": 0.5,
    "crash_loop_after": 1000,  # the chaos kills replicas on purpose: never a crash loop
    "min_uptime": 0.5,
    "shutdown_grace": 5.0,
}


class ChaosMesh(Process):
    """``sidemesh serve`` with the chaos plugin (3 replicas, sandboxed) on a Unix socket."""

    def __init__(self, workdir: Path, *, replicas: int = 3, **config: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smc", dir="/tmp"))
        self.state_dir = workdir / "state"
        self.address = f"unix:{self.runtime_dir / 'mesh.sock'}"
        settings: dict[str, Any] = {
            "listen": [self.address],
            "plugin_dirs": [str(CHAOS_PLUGIN)],
            "entry_points": False,
            "state_dir": str(self.state_dir),
            "runtime_dir": str(self.runtime_dir),
            "supervisor": SUPERVISOR,
            "plugins": {"chaos": {"replicas": replicas}},
        }
        settings.update(config)
        path = workdir / "sidemesh.yaml"
        path.write_text(yaml.safe_dump(settings))
        argv = [sys.executable, "-m", "orchestrator.cli", "serve", "-c", str(path)]
        super().__init__("chaos mesh", argv, workdir / "orchestrator.log", cwd=ROOT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the mesh listens and every chaos replica is READY."""

        def ready() -> bool | None:
            self.check_alive()
            if not (self.state_dir / "endpoints.json").exists():
                return None
            if json.loads((self.state_dir / "endpoints.json").read_text()).get("pid") != self.pid:
                return None
            with grpc.insecure_channel(self.address) as channel:
                try:
                    status = (
                        mesh_pb2_grpc.MeshServiceStub(channel)
                        .GetPlugin(mesh_pb2.GetPluginRequest(name="chaos"), timeout=5)
                        .plugin
                    )
                except grpc.RpcError:
                    return None
            return True if status.state == mesh_pb2.PLUGIN_STATE_READY else None

        wait_for(ready, timeout, lambda: f"the chaos plugin READY:\n{self.log_tail()}")

    def close(self) -> None:
        """Stops the mesh and removes its sockets."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
