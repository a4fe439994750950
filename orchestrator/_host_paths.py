"""What a plugin sees of the host: the operator's mounts, ``${…}``'s values, granted paths.

The launchers (:mod:`orchestrator._launch`) use these to start a sidecar;
``sidemesh validate`` uses :func:`mount_problems` to check a config before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import _variables
from orchestrator._config import PluginOverride
from orchestrator._manifest import MANIFEST_FILE, PluginManifest
from orchestrator._yaml_models import ConfigError, Problem
from sidecars import sandbox
from sidemesh.core import SidecarEnv as E
from sidemesh.v1 import mesh_pb2

if TYPE_CHECKING:
    from orchestrator._plugin import PluginRuntime


def launch_variables(
    manifest: PluginManifest, mounts: Mapping[str, str], data_dir: Path | None = None
) -> dict[str, str]:
    """The values of ``${…}`` for ``manifest``: its dirs, and ``mounts`` (name -> the
    path the plugin sees)."""
    values = {
        E.DATA_DIR.value: str(data_dir or ""),
        E.PLUGIN_DIR.value: str(manifest.directory),
        E.PLUGIN.value: manifest.name,
    }
    values.update({f"{_variables.MOUNT_PREFIX}{name}": path for name, path in mounts.items()})
    return values


def unknown_mounts(manifest: PluginManifest, override: PluginOverride) -> str:
    """Why the manifest cannot start with the operator's mounts ("" when it can)."""
    problems = mount_problems(manifest, override)
    if not problems:
        return ""
    return str(ConfigError(manifest.directory / MANIFEST_FILE, "plugin manifest", problems))


def mount_problems(manifest: PluginManifest, override: PluginOverride) -> list[Problem]:
    """The manifest's ``${mount:NAME}`` the operator's config gives no mount for."""
    return [
        Problem(
            field,
            f"${{mount:{name}}} names a mount the operator has not configured",
            f"add it to the Sidemesh config: plugins.{manifest.name}.sandbox.mounts.{name}: "
            "{source: /path/on/host}",
        )
        for field, name in manifest.mount_references()
        if name not in override.sandbox.mounts
    ]


def git_safe_directories(env: dict[str, str], paths: list[str]) -> None:
    """Lets git work in the operator's mounts, whoever owns them on the host.

    git refuses a repository its uid does not own ("dubious ownership"), and the
    plugin's uid owns none of the operator's: the operator mounted them for the
    plugin to use, so each is a ``safe.directory`` (given as command-line
    config, which git honours, unlike a repository's own config).
    """
    if not paths or "GIT_CONFIG_COUNT" in env:
        return
    env["GIT_CONFIG_COUNT"] = str(len(paths))
    for i, path in enumerate(paths):
        env[f"GIT_CONFIG_KEY_{i}"] = "safe.directory"
        env[f"GIT_CONFIG_VALUE_{i}"] = path


def granted_paths(
    plugin: PluginRuntime, policy: sandbox.Policy | None
) -> list[mesh_pb2.SandboxPath]:
    """What ``sidemesh plugins -v`` shows of the host paths the plugin sees."""
    assert plugin.manifest is not None and plugin.paths is not None
    P = mesh_pb2.SandboxPath
    manifest, grant = plugin.manifest, plugin.override.sandbox
    granted = policy is None or policy.request.paths_granted or policy.request.relaxed
    paths = [
        P(kind=mesh_pb2.SANDBOX_PATH_KIND_PLUGIN_DIR, host_path=str(manifest.directory),
          sandbox_path=str(manifest.directory), granted=True),
        P(kind=mesh_pb2.SANDBOX_PATH_KIND_DATA_DIR, host_path=str(plugin.paths.data_dir),
          sandbox_path=str(plugin.paths.data_dir), writable=True, granted=True),
    ]  # fmt: skip
    needs = manifest.sandbox
    for path, writable in [(p, False) for p in needs.read_paths] + [
        (p, True) for p in needs.write_paths
    ]:
        problem = "" if os.path.exists(path) else "does not exist on this host: not bound"
        if not granted:
            problem = "not granted (plugins.<name>.sandbox.allow_paths)"
        paths.append(
            P(kind=mesh_pb2.SANDBOX_PATH_KIND_MANIFEST, host_path=path, sandbox_path=path,
              writable=writable, granted=granted, problem=problem)
        )  # fmt: skip
    unsandboxed = policy is None or policy.request.relaxed
    for name, mount in grant.mounts.items():
        paths.append(
            P(kind=mesh_pb2.SANDBOX_PATH_KIND_MOUNT, name=name, host_path=str(mount.source),
              sandbox_path=plugin.mount_paths.get(name, str(mount.source)),
              writable=mount.writable, granted=True,
              problem="not enforced: the plugin has no sandbox" if unsandboxed else "")
        )  # fmt: skip
    return paths
