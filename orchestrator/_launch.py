"""How a plugin's sidecar is started: its command, its environment, its sandbox."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orchestrator import _variables, sandbox
from orchestrator._config import PluginOverride, SandboxSettings
from orchestrator._host_paths import (
    git_safe_directories,
    granted_paths,
    launch_variables,
    unknown_mounts,
)
from orchestrator._manifest import PluginManifest
from orchestrator._replica import LaunchSpec
from sidemesh.core import REPLICA_SOCKET
from sidemesh.core import SidecarEnv as E
from sidemesh.v1 import mesh_pb2

if TYPE_CHECKING:
    from orchestrator._plugin import PluginRuntime

log = logging.getLogger("sidemesh.launch")

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Packages a Python sidecar imports, wherever they are installed (an editable
#: install keeps them in the source tree): the sandbox must see them.
_RUNTIME_PACKAGES = ("sidecars", "plugins_sdk", "clients", "sidemesh")


class Launcher(Protocol):
    """Starts replicas: plainly, or in a sandbox."""

    def prepare(self, plugin: PluginRuntime) -> str:
        """Works out the plugin's sandbox (``plugin.sandbox_layers``); returns a refusal or ""."""
        ...

    def launch_spec(
        self, plugin: PluginRuntime, replica: int, log_level: str, telemetry_env: Mapping[str, str]
    ) -> LaunchSpec:
        """How to start replica ``replica`` of ``plugin``."""
        ...

    def close(self) -> None:
        """Frees what the launcher holds for the mesh (when it stops)."""
        ...


def plugin_command(
    manifest: PluginManifest, variables: Mapping[str, str] | None = None
) -> list[str]:
    """The sidecar's argv: the SDK's Python runtime, the MCP bridge, or the entrypoint.

    ``variables``: the values of ``${…}`` (:func:`launch_variables`).
    """
    if manifest.runtime == "python":
        assert manifest.app is not None
        return [sys.executable, "-m", "sidecars.python", manifest.app]
    if manifest.runtime == "mcp":
        return [sys.executable, "-m", "sidecars.mcp"]
    assert manifest.entrypoint is not None
    values = variables or launch_variables(manifest, {})
    command = [_variables.expand(arg, values) for arg in manifest.entrypoint]
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
    data_dir: Path,
    mesh_dir: Path,
    log_level: str,
    startup_timeout: float,
    telemetry_env: Mapping[str, str],
    mounts: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The sidecar's whole environment: nothing leaks from the orchestrator's own.

    Only variables the manifest declares in ``sandbox.env`` *and* the operator
    provides under ``plugins.<name>.env`` are passed on, besides Sidemesh's own.
    ``mounts``: the operator's mounts, by name, at the paths the plugin sees
    them (for ``${mount:NAME}``).
    """
    mounts = mounts or {}
    values = launch_variables(manifest, mounts, data_dir)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{_SYSTEM_PATH}",
        "HOME": str(data_dir),
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # glibc reserves 64 MiB of address space per thread arena: keep RLIMIT_AS meaningful.
        "MALLOC_ARENA_MAX": "2",
        # Names the mesh the process belongs to (its run dir), for operators and tests.
        E.MESH: str(mesh_dir),
        E.LISTEN: listen,
        E.MESH_ADDRESS: mesh_address,
        E.PLUGIN: manifest.name,
        E.REPLICA: str(replica),
        E.PLUGIN_DIR: str(manifest.directory),
        E.DATA_DIR: str(data_dir),
        E.LOG_LEVEL: log_level,
        E.STARTUP_TIMEOUT: f"{startup_timeout:g}",
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
            env[name] = _variables.expand(override.env[name], values)
    git_safe_directories(env, list(mounts.values()))
    if manifest.mcp is not None:
        # The bridge's instructions: which MCP server to run, and how.
        spec = manifest.mcp
        spec = spec.model_copy(
            update={
                "command": _variables.expand(spec.command, values),
                "args": [_variables.expand(a, values) for a in spec.args],
                "env": {k: _variables.expand(v, values) for k, v in spec.env.items()},
            }
        )
        env[E.MCP_SERVER] = spec.model_dump_json()
    return env


def undeclared_env(
    manifest: PluginManifest, override: PluginOverride
) -> tuple[list[str], list[str]]:
    """Declared variables with no value, and provided values the manifest does not declare."""
    declared = set(manifest.sandbox.env)
    missing = sorted(declared - set(override.env))
    extra = sorted(set(override.env) - declared)
    return missing, extra


def ensure_private_dir(path: Path, owner: int | None = None) -> Path:
    """Creates ``path`` (mode 0700, owned by ``owner`` when given) if needed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def _layer(name: str, active: bool, detail: str) -> mesh_pb2.SandboxLayer:
    return mesh_pb2.SandboxLayer(name=name, active=active, detail=detail)


class ProcessLauncher:
    """Starts sidecars as plain child processes (``sandbox.mode: off``), killed if we die."""

    def prepare(self, plugin: PluginRuntime) -> str:
        """No sandbox: every layer is off; the plugin sees mounts at their host paths."""
        assert plugin.manifest is not None
        problem = unknown_mounts(plugin.manifest, plugin.override)
        if problem:
            raise ValueError(problem)
        plugin.sandbox_layers = [
            _layer(n, False, "off: sandbox.mode is off") for n in sandbox.LAYERS
        ]
        plugin.mount_paths = {n: str(m.source) for n, m in plugin.override.sandbox.mounts.items()}
        plugin.granted_paths = granted_paths(plugin, None)
        _warn_unmounted_image(plugin, "sandbox.mode is off")
        return ""

    def launch_spec(
        self, plugin: PluginRuntime, replica: int, log_level: str, telemetry_env: Mapping[str, str]
    ) -> LaunchSpec:
        """A launch of the plugin's command with the scrubbed environment."""
        assert plugin.manifest is not None and plugin.paths is not None
        paths = plugin.paths
        replica_dir = ensure_private_dir(paths.replica_dir(replica))
        socket = replica_dir / REPLICA_SOCKET
        env = sidecar_environment(
            plugin.manifest, plugin.override, listen=f"unix:{socket}",
            mesh_address=f"unix:{paths.mesh_socket}", replica=replica, data_dir=paths.data_dir,
            mesh_dir=paths.run_dir.parent, log_level=log_level,
            startup_timeout=plugin.startup_timeout, telemetry_env=telemetry_env,
            mounts=plugin.mount_paths,
        )  # fmt: skip
        variables = launch_variables(plugin.manifest, plugin.mount_paths, paths.data_dir)
        return LaunchSpec(
            argv=plugin_command(plugin.manifest, variables), env=env,
            cwd=plugin.manifest.directory,
            socket_path=socket, socket_owner=os.getuid(),
        )  # fmt: skip

    def close(self) -> None:
        """Nothing to free."""


class SandboxLauncher:
    """Starts each sidecar in its plugin's sandbox (see :mod:`orchestrator.sandbox`)."""

    def __init__(self, settings: SandboxSettings, state_dir: Path | None = None) -> None:
        """``state_dir``: where each plugin's uid is remembered across runs."""
        self._settings = settings
        self._host = sandbox.probe(settings.bwrap)
        self._policies: dict[str, sandbox.Policy] = {}
        self._runtime_paths = _runtime_paths()
        registry = state_dir / sandbox.UID_REGISTRY_FILE if state_dir is not None else None
        self._uids = sandbox.UidAllocator(settings.uid_base, registry=registry)
        #: The mesh's TCP listener ports (set once bound): kept from plugins with network.
        self.mesh_ports: tuple[int, ...] = ()
        self._quotas: list[sandbox.DataQuota] = []

    def prepare(self, plugin: PluginRuntime) -> str:
        """Computes the plugin's sandbox policy; in strict mode, why it may not start."""
        assert plugin.manifest is not None and plugin.paths is not None
        manifest, grant = plugin.manifest, plugin.override.sandbox
        needs = manifest.sandbox
        problem = unknown_mounts(manifest, plugin.override)
        if problem:
            raise ValueError(problem)
        request = sandbox.SandboxRequest(
            plugin=plugin.name,
            plugin_dir=manifest.directory,
            data_dir=plugin.paths.data_dir,
            limits=sandbox.ResourceLimits(
                memory_mb=grant.memory_mb or needs.memory_mb,
                cpu_seconds=grant.cpu_seconds or needs.cpu_seconds,
                max_processes=grant.max_processes or needs.max_processes,
                max_open_files=grant.max_open_files or needs.max_open_files,
                max_file_size_mb=grant.max_file_size_mb or needs.max_file_size_mb,
                data_quota_mb=grant.data_quota_mb or needs.data_quota_mb,
            ),
            wants_network=needs.network,
            network_granted=grant.allow_network,
            read_paths=tuple(needs.read_paths),
            write_paths=tuple(needs.write_paths),
            paths_granted=grant.allow_paths,
            mounts=tuple(
                sandbox.Bind(name, m.source, m.sandbox_path, m.writable)
                for name, m in grant.mounts.items()
            ),
            env_declared=tuple(needs.env),
            env_provided=len(set(needs.env) & set(plugin.override.env)),
            relaxed=not grant.enabled,
            mesh_listeners_granted=grant.allow_mesh_listeners,
            data_image=plugin.paths.data_image,
        )
        uid = self._uids.uid_for(plugin.name) if self._host.root and grant.enabled else None
        policy = sandbox.policy(request, self._host, uid)
        self._check_mounts(plugin, policy)
        if request.relaxed:
            _warn_unmounted_image(plugin, f"plugins.{plugin.name}.sandbox.enabled is false")
        else:
            policy = self._hold_data_dir(plugin, policy)
        self._policies[plugin.name] = policy
        plugin.host_uid = policy.host_uid
        plugin.mount_paths = {m.name: policy.mount_path(m) for m in request.mounts}
        plugin.granted_paths = granted_paths(plugin, policy)
        for missing in policy.missing_paths():
            log.warning(
                "plugin %s: %s in its manifest's sandbox paths does not exist on this host: "
                "it is not bound (create it, or have the operator mount another path with "
                "plugins.%s.sandbox.mounts)", plugin.name, missing, plugin.name,
            )  # fmt: skip
        plugin.sandbox_layers = [_layer(x.name, x.active, x.detail) for x in policy.layers]
        for layer in policy.layers:
            if not layer.active and layer.detail.startswith("UNAVAILABLE"):
                log.warning(
                    "plugin %s: sandbox layer %s is %s", plugin.name, layer.name, layer.detail
                )
        return policy.refusal() if self._settings.mode == "strict" else ""

    def _check_mounts(self, plugin: PluginRuntime, policy: sandbox.Policy) -> None:
        """Refuses mounts the sandbox cannot make; gives rw ``chown`` mounts to the plugin.

        A mount may hold the sandbox's own paths (they are bound over it), never
        be inside one of them (the sandbox would make its mount point in the host
        directory). Raises ``ValueError``.
        """
        assert plugin.paths is not None
        request, name = policy.request, plugin.name
        own = [request.plugin_dir, request.data_dir, *self._runtime_paths]
        for mount in request.mounts:
            field = f"plugins.{name}.sandbox.mounts.{mount.name}"
            if policy.binds_paths:
                target = Path(mount.target)
                inside = next((p for p in own if target.is_relative_to(p)), None)
                # Over its own paths the sandbox would make their mount points in the
                # mount's host directory (unless it is at its own path: they are there).
                holds = next((p for p in own if p.is_relative_to(target)), None)
                if inside is None and target != mount.source:
                    inside = holds
                if inside is not None:
                    raise ValueError(
                        f"{field}: its target {target} overlaps {inside}, which the sandbox "
                        "binds itself: give it another 'target', e.g. /mnt/" + mount.name
                    )
            elif mount.target != str(mount.source) and not request.relaxed:
                log.warning(
                    "plugin %s: %s is seen at %s, not at its target %s: this host's sandbox "
                    "cannot move paths (no bubblewrap)", name, field, mount.source, mount.target,
                )  # fmt: skip
            spec = plugin.override.sandbox.mounts[mount.name]
            if spec.chown and policy.host_uid is not None:
                try:
                    _own_tree(mount.source, policy.host_uid, private=False)
                except OSError as exc:
                    raise ValueError(
                        f"{field}: cannot give it to uid {policy.host_uid}: {exc}"
                    ) from None

    def _hold_data_dir(self, plugin: PluginRuntime, policy: sandbox.Policy) -> sandbox.Policy:
        """Puts the plugin's data dir under its quota; returns the policy that results.

        As root, the data dir becomes its ext4 image, mounted; where that cannot
        be (and the plugin has no image yet), its quota is accounted instead.
        Raises ``ValueError`` when the plugin must not start (its data does not
        fit its quota, another mesh holds it).
        """
        assert plugin.paths is not None and plugin.paths.data_image is not None
        paths, image_path = plugin.paths, plugin.paths.data_image
        quota_bytes = policy.request.limits.data_quota_bytes
        quota: sandbox.DataQuota
        try:
            if policy.data_quota == sandbox.IMAGE:
                try:
                    owner = os.getuid() if policy.host_uid is None else policy.host_uid
                    image = sandbox.DataImage.open(image_path, paths.data_dir, quota_bytes, owner)
                except sandbox.ImageUnavailable as exc:
                    log.warning(
                        "plugin %s: its data dir cannot be an ext4 image (%s): its quota is "
                        "accounted instead", plugin.name, exc,
                    )  # fmt: skip
                    host = dataclasses.replace(self._host, data_image_why=f"{exc}")
                    policy = sandbox.policy(policy.request, host, policy.host_uid)
                else:
                    self._quotas.append(image)
                    for note in image.notes:
                        log.warning("plugin %s: %s", plugin.name, note)
                    log.info(
                        "plugin %s: data dir %s is its ext4 image %s (%d MiB), ready in %.0f ms",
                        plugin.name, paths.data_dir, image_path, quota_bytes >> 20,
                        image.setup_seconds * 1000,
                    )  # fmt: skip
                    quota = image
            if policy.data_quota == sandbox.ACCOUNTED:
                if image_path.exists():
                    raise sandbox.QuotaError(
                        f"its data is in the ext4 image {image_path}, which cannot be "
                        f"mounted here ({self._host.data_image_why or 'see above'}): run the "
                        "mesh as root, or move the image's files to the data dir and remove it"
                    )
                quota = sandbox.DataAccount(paths.data_dir, quota_bytes)
                self._quotas.append(quota)
            if policy.host_uid is not None:
                _own_tree(paths.data_dir, policy.host_uid)
            usage = quota.measure()
        except (sandbox.QuotaError, OSError) as exc:
            raise ValueError(f"its data dir quota cannot be put in force: {exc}") from None
        plugin.data_quota, plugin.data_usage = quota, usage
        if quota.mechanism == sandbox.ACCOUNTED and usage.problem:
            quota.read_only = True
            log.warning("plugin %s: %s: its data dir is read-only", plugin.name, usage.problem)
        return policy

    def launch_spec(
        self, plugin: PluginRuntime, replica: int, log_level: str, telemetry_env: Mapping[str, str]
    ) -> LaunchSpec:
        """The sandboxed launch of one replica."""
        assert plugin.manifest is not None and plugin.paths is not None
        policy = self._policies[plugin.name]
        paths = plugin.paths
        replica_dir = ensure_private_dir(paths.replica_dir(replica), policy.host_uid)
        if policy.host_uid is not None:
            # The sidecar, as its own uid, must be able to connect to its callback socket.
            os.chown(paths.mesh_socket, policy.host_uid, policy.host_uid)
        variables = launch_variables(plugin.manifest, plugin.mount_paths, paths.data_dir)
        prepared = sandbox.prepare(
            policy, self._host, plugin_command(plugin.manifest, variables), replica=replica,
            replica_dir=replica_dir, mesh_socket=paths.mesh_socket,
            runtime_paths=self._runtime_paths, mesh_ports=self.mesh_ports,
            data_read_only=plugin.data_quota is not None and plugin.data_quota.read_only,
        )  # fmt: skip
        env = sidecar_environment(
            plugin.manifest, plugin.override, listen=prepared.listen,
            mesh_address=prepared.mesh_address, replica=replica, data_dir=paths.data_dir,
            mesh_dir=paths.run_dir.parent, log_level=log_level,
            startup_timeout=plugin.startup_timeout, telemetry_env=telemetry_env,
            mounts=plugin.mount_paths,
        )  # fmt: skip
        # die_with_parent: bwrap's outer process dies with us; its sandbox dies with it.
        owner = policy.host_uid if policy.host_uid is not None else os.getuid()
        return LaunchSpec(
            argv=prepared.argv, env=env, cwd=plugin.manifest.directory,
            socket_path=prepared.socket_path, pass_fds=prepared.pass_fds, sandbox=prepared,
            socket_owner=owner,
        )  # fmt: skip

    def close(self) -> None:
        """Unmounts the plugins' data images, frees the uids the mesh's plugins held."""
        quotas, self._quotas = self._quotas, []
        for quota in quotas:
            quota.close()
        self._uids.release()


def _warn_unmounted_image(plugin: PluginRuntime, why: str) -> None:
    image = plugin.paths.data_image if plugin.paths is not None else None
    if image is not None and image.exists():
        log.warning(
            "plugin %s: its data is in the ext4 image %s, which is not mounted (%s): it sees "
            "its data dir without it", plugin.name, image, why,
        )  # fmt: skip


def _own_tree(path: Path, uid: int, *, private: bool = True) -> None:
    """Makes ``path`` and everything in it the plugin's (its uid may differ from last run).

    ``private``: ``path`` is a directory of the plugin's own (made, mode 0700);
    otherwise (an operator's mount) its modes stay as they are.
    The tree is the plugin's, hostile: never follows a symlink, takes no
    recursion however deep it is, and skips what it cannot reach.
    """
    if os.lstat(path).st_uid == uid:
        if private:
            ensure_private_dir(path, uid)
        return  # already the plugin's: a plugin cannot give a file away to another uid
    if private:
        ensure_private_dir(path, uid)
    else:
        os.lchown(path, uid, uid)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return
    todo = [str(path)]
    while todo:
        directory = todo.pop()
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    os.lchown(entry.path, uid, uid)
                    if stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode):
                        todo.append(entry.path)


def _runtime_paths() -> list[Path]:
    """What a sidecar needs to see: the interpreter, the venv, the mesh's packages, and
    the sandbox's own entry point."""
    import importlib.util
    import site

    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    paths.add(Path(sys.executable).resolve().parent.parent)
    # A venv's site-packages may be a link to elsewhere: what it links to must be seen too.
    paths.update(Path(p).resolve() for p in site.getsitepackages())
    for name in _RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths.update(Path(p).resolve() for p in spec.submodule_search_locations)
    # The sandbox's own entry point (landlock_exec.py) runs inside it: its directory only,
    # not the rest of the orchestrator.
    paths.add(Path(sandbox.__file__).resolve().parent)
    # What this user cannot read, a sandbox of its own cannot bind (nor would it need it).
    paths = {p for p in paths if os.access(p, os.R_OK | os.X_OK)}
    # A path inside another is already visible.
    ordered = sorted(paths, key=lambda p: len(p.parts))
    return [p for i, p in enumerate(ordered) if not any(p.is_relative_to(q) for q in ordered[:i])]
