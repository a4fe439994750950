"""The benchmark sidecar the harness starts itself: every topology reaches this one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._process import Process, free_port, wait_for

#: The benchmark plugin (``plugin.yaml`` and ``bench_plugin.py``).
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
APP = "bench_plugin:app"
PLUGIN = "bench"


class BenchSidecar(Process):
    """``python -m sidecars.python bench_plugin:app`` serving on ``127.0.0.1:PORT``.

    It is unsandboxed and exports no spans (no ``OTEL_EXPORTER_OTLP_ENDPOINT``),
    like any remote plugin the orchestrator did not launch.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": root,
            "SIDEMESH_LISTEN": self.address,
            "SIDEMESH_PLUGIN": PLUGIN,
            "SIDEMESH_LOG_LEVEL": "WARNING",
            "OTEL_SDK_DISABLED": "true",
            # Marks the process as this run's, for anyone looking for leftovers.
            "SIDEMESH_BENCH_RUN": str(workdir),
        }
        argv = [sys.executable, "-m", "sidecars.python", APP]
        super().__init__("bench sidecar", argv, workdir / "sidecar.log", cwd=PLUGIN_DIR, env=env)

    def start_and_wait(self, timeout: float = 20.0) -> None:
        """Starts the sidecar and waits until its health check says ``SERVING``."""
        self.start()
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool | None:
                self.check_alive()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return None
                return True if reply.status == health_pb2.HealthCheckResponse.SERVING else None

            wait_for(serving, timeout, lambda: f"the bench sidecar on {self.address}")
