"""How a plugin's sidecar is started: its command, its environment, its files."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from orchestrator._config import PluginOverride
from orchestrator._manifest import PluginManifest
from orchestrator._replica import LaunchSpec

log = logging.getLogger("sidemesh.launch")

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PluginPaths:
    """Where one plugin's sockets and data live."""

    def __init__(self, run_dir: Path, data_dir: Path) -> None:
        #: Short-pathed directory for the plugin's sockets.
        self.run_dir = run_dir
        #: The orchestrator's callback socket for this plugin.
        self.mesh_socket = run_dir / "mesh.sock"
        #: The plugin's own writable directory (kept across restarts).
        self.data_dir = data_dir

    def replica_socket(self, index: int) -> Path:
        """The socket replica ``index`` serves on."""
        return self.run_dir / f"r{index}.sock"


class Launcher(Protocol):
    """Builds the launch of one replica; the sandbox is a launcher too."""

    def launch_spec(
        self,
        manifest: PluginManifest,
        override: PluginOverride,
        paths: PluginPaths,
        replica: int,
        log_level: str,
        telemetry_env: Mapping[str, str],
    ) -> LaunchSpec: ...


def plugin_command(manifest: PluginManifest) -> list[str]:
    """The sidecar's argv: the SDK's Python runtime, or the manifest's entrypoint."""
    if manifest.runtime == "python":
        assert manifest.app is not None
        return [sys.executable, "-m", "sidecars.python", manifest.app]
    assert manifest.entrypoint is not None
    command = list(manifest.entrypoint)
    if "/" in command[0] and not command[0].startswith("/"):
        command[0] = str(manifest.directory / command[0])
    return command


def sidecar_environment(
    manifest: PluginManifest,
    override: PluginOverride,
    *,
    listen: str,
    mesh_address: str,
    replica: int,
    plugin_dir: Path,
    data_dir: Path,
    log_level: str,
    telemetry_env: Mapping[str, str],
) -> dict[str, str]:
    """The sidecar's whole environment: nothing leaks from the orchestrator's own.

    Only variables the manifest declares in ``sandbox.env`` *and* the operator
    provides under ``plugins.<name>.env`` are passed on, besides Sidemesh's own.
    """
    env = {
        "PATH": f"{Path(sys.executable).parent}:{_SYSTEM_PATH}",
        "HOME": str(data_dir),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SIDEMESH_LISTEN": listen,
        "SIDEMESH_MESH_ADDRESS": mesh_address,
        "SIDEMESH_PLUGIN": manifest.name,
        "SIDEMESH_REPLICA": str(replica),
        "SIDEMESH_PLUGIN_DIR": str(plugin_dir),
        "SIDEMESH_DATA_DIR": str(data_dir),
        "SIDEMESH_LOG_LEVEL": log_level,
    }
    env.update(telemetry_env)
    if env.get("OTEL_SDK_DISABLED") != "true":
        # Sidecars send their spans to the orchestrator, on the same socket as callbacks.
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = mesh_address
        env["OTEL_SERVICE_NAME"] = manifest.name
        env["OTEL_RESOURCE_ATTRIBUTES"] = (
            f"service.version={manifest.version},sidemesh.plugin={manifest.name},"
            f"sidemesh.replica={replica}"
        )
    for name in manifest.sandbox.env:
        if name in override.env:
            env[name] = override.env[name]
    return env


def undeclared_env(
    manifest: PluginManifest, override: PluginOverride
) -> tuple[list[str], list[str]]:
    """Declared variables with no value, and provided values the manifest does not declare."""
    declared = set(manifest.sandbox.env)
    missing = sorted(declared - set(override.env))
    extra = sorted(set(override.env) - declared)
    return missing, extra


class ProcessLauncher:
    """Starts sidecars as plain child processes (no sandbox), killed if we die."""

    def launch_spec(
        self,
        manifest: PluginManifest,
        override: PluginOverride,
        paths: PluginPaths,
        replica: int,
        log_level: str,
        telemetry_env: Mapping[str, str],
    ) -> LaunchSpec:
        """A launch of ``manifest``'s command with the scrubbed environment."""
        socket = paths.replica_socket(replica)
        env = sidecar_environment(
            manifest,
            override,
            listen=f"unix:{socket}",
            mesh_address=f"unix:{paths.mesh_socket}",
            replica=replica,
            plugin_dir=manifest.directory,
            data_dir=paths.data_dir,
            log_level=log_level,
            telemetry_env=telemetry_env,
        )
        return LaunchSpec(
            argv=plugin_command(manifest), env=env, cwd=manifest.directory, socket_path=socket
        )


def ensure_private_dir(path: Path) -> Path:
    """Creates ``path`` (mode 0700) if needed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
