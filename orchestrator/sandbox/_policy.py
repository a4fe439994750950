"""The effective sandbox of one plugin: what its manifest asks, what the operator grants.

A policy is computed once per plugin; every layer is either active or says
why not (relaxed by the operator, or missing on this host). In strict mode a
layer missing on the host keeps the plugin from starting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sandbox._host import HostSupport
from orchestrator.sandbox._quota import ACCOUNTED, IMAGE, max_files

LAYERS = (
    "namespaces", "filesystem", "network", "rlimits", "cgroups", "seccomp", "landlock",
    "environment",
)  # fmt: skip

#: The uid the plugin has inside its user namespace.
SANDBOX_UID = 65534


@dataclass(frozen=True)
class ResourceLimits:
    """Resource limits of each sidecar process (tree) of a plugin."""

    memory_mb: int
    cpu_seconds: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int
    #: Most the plugin's data dir may hold (all its replicas together); the
    #: launcher passes the manifest's ``sandbox.data_quota_mb`` or the operator's.
    data_quota_mb: int = 256

    @property
    def data_quota_bytes(self) -> int:
        """The data dir quota in bytes."""
        return self.data_quota_mb << 20

    @property
    def address_space_bytes(self) -> int:
        """RLIMIT_AS: generous, since a Python/gRPC process reserves far more than it uses.

        The cgroup enforces ``memory_mb`` on real memory; where there is no cgroup,
        this is the only memory limit there is.
        """
        return max(self.memory_mb * 4, self.memory_mb + 1536) << 20


@dataclass(frozen=True)
class Bind:
    """A host path the operator mounts into the plugin's sandbox (``sandbox.mounts``)."""

    #: The mount's name (``${mount:NAME}``).
    name: str
    #: The host path, and where the plugin sees it.
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class SandboxRequest:
    """Everything the sandbox needs to know about one plugin."""

    plugin: str
    plugin_dir: Path
    data_dir: Path
    limits: ResourceLimits
    #: The manifest asks for network access / the operator grants it.
    wants_network: bool = False
    network_granted: bool = False
    #: Extra host paths the manifest asks for / whether the operator grants them.
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    paths_granted: bool = False
    #: The operator's mounts (``plugins.<name>.sandbox.mounts``).
    mounts: tuple[Bind, ...] = ()
    #: Environment variables declared by the manifest, and how many the operator provides.
    env_declared: tuple[str, ...] = ()
    env_provided: int = 0
    #: The operator turned the sandbox off for this plugin.
    relaxed: bool = False
    #: With network: the operator lets it connect to the mesh's own TCP listeners too.
    mesh_listeners_granted: bool = False
    #: Where the plugin's data image lives, when the host can mount one (see ``_image``).
    data_image: Path | None = None


@dataclass(frozen=True)
class Layer:
    """One layer of a plugin's sandbox: active or not, and what it does or why not."""

    name: str
    active: bool
    detail: str


@dataclass(frozen=True)
class Policy:
    """The sandbox one plugin gets on this host."""

    request: SandboxRequest
    layers: tuple[Layer, ...]
    #: Host uid the plugin runs as (None: the orchestrator's own uid, mapped).
    host_uid: int | None
    #: Layers this host cannot provide, with the reason (for strict mode).
    unavailable: dict[str, str] = field(default_factory=dict)
    #: How the data dir quota is enforced: ``ext4 image``, ``accounted``, or "" (no sandbox).
    data_quota: str = ""

    @property
    def binds_paths(self) -> bool:
        """The sandbox shows the plugin only what it binds (so a mount may move a path)."""
        return self.active("namespaces")

    def mount_path(self, bind: Bind) -> str:
        """Where the plugin sees ``bind``: its target in a sandbox, else the host path."""
        return bind.target if self.binds_paths else str(bind.source)

    def missing_paths(self) -> list[str]:
        """The manifest's granted read_paths and write_paths that do not exist on this host."""
        req = self.request
        if not req.paths_granted:
            return []
        return [p for p in (*req.read_paths, *req.write_paths) if not Path(p).exists()]

    def active(self, name: str) -> bool:
        """Whether layer ``name`` is applied."""
        return any(layer.name == name and layer.active for layer in self.layers)

    @property
    def network(self) -> bool:
        """The plugin gets the host's network."""
        return self.request.wants_network and self.request.network_granted

    def refusal(self) -> str:
        """Why strict mode refuses to start the plugin; empty if it does not."""
        if not self.unavailable:
            return ""
        missing = "; ".join(f"{k}: {v}" for k, v in self.unavailable.items())
        return (
            f"strict sandbox mode: refusing to start plugin {self.request.plugin!r} because "
            f"required sandbox layers are unavailable on this host ({missing})"
        )


def policy(request: SandboxRequest, host: HostSupport, host_uid: int | None) -> Policy:
    """Works out every layer of ``request``'s sandbox on ``host``.

    ``host_uid`` is the plugin's own unprivileged uid when the orchestrator is root.
    """
    if request.relaxed:
        off = "off: the operator disabled the sandbox for this plugin (plugins.<name>.sandbox)"
        return Policy(request, tuple(Layer(n, False, off) for n in LAYERS), None)
    lim = request.limits
    unavailable: dict[str, str] = {}
    bwrap = host.bwrap is not None and not host.bwrap_why
    # Without its own mount namespace, a plugin under another uid could not even reach
    # an interpreter installed in a private home: the uid drop needs bwrap.
    host_uid = host_uid if host.root and bwrap else None
    if not bwrap:
        for name in ("namespaces", "filesystem", "network", "seccomp"):
            unavailable[name] = host.bwrap_why or "bubblewrap is missing"
    if not host.seccomp:
        unavailable["seccomp"] = host.seccomp_why
    if not host.landlock_abi:
        unavailable["landlock"] = host.landlock_why
    if not host.cgroups:
        unavailable["cgroups"] = host.cgroup_why

    uid = f"host uid {host_uid}" if host_uid is not None else "the orchestrator's uid"
    net = request.wants_network and request.network_granted
    if request.wants_network and not request.network_granted:
        net_detail = (
            "none (loopback only): the manifest asks for network access but the operator "
            "has not granted it (plugins.<name>.sandbox.allow_network)"
        )
    elif not net:
        net_detail = "none (loopback only)"
    elif request.mesh_listeners_granted:
        net_detail = "host network (granted by the operator), the mesh's TCP listeners included"
    elif host.landlock_abi >= 4:
        net_detail = (
            "host network (granted by the operator), except the mesh's own TCP listeners "
            "(Landlock refuses connections to their ports)"
        )
    else:
        net_detail = (
            "host network (granted by the operator); WARNING: the mesh's TCP listeners are "
            f"reachable from it (Landlock network rules need ABI 4, the host has "
            f"{host.landlock_abi})"
        )
    writable = ["/tmp (private)", "its data dir"]
    if request.write_paths and request.paths_granted:
        writable += list(request.write_paths)
    writable += [f"mount {m.name}" for m in request.mounts if m.writable]
    fs_detail = f"read-only runtime and plugin dir; writable: {', '.join(writable)}"
    read_only = [f"mount {m.name}" for m in request.mounts if not m.writable]
    if request.read_paths and request.paths_granted:
        read_only[:0] = list(request.read_paths)
    if read_only:
        fs_detail += f"; read-only: {', '.join(read_only)}"
    if (request.read_paths or request.write_paths) and not request.paths_granted:
        fs_detail += "; extra paths requested but not granted (plugins.<name>.sandbox.allow_paths)"
    missing = [
        p
        for p in (*request.read_paths, *request.write_paths)
        if request.paths_granted and not Path(p).exists()
    ]
    if missing:
        fs_detail += f"; MISSING on this host, not bound: {', '.join(missing)}"
    image = request.data_image is not None and not host.data_image_why
    quota = f"data dir quota {lim.data_quota_mb} MiB, {max_files(lim.data_quota_bytes)} files"
    if image:
        fs_detail += f"; {quota} ({IMAGE}: writes past it fail with ENOSPC)"
    else:
        why = host.data_image_why if request.data_image is not None else "no image path"
        fs_detail += f"; {quota} ({ACCOUNTED}, read-only while over; no {IMAGE}: {why})"
    candidates = {
        "namespaces": (
            f"mount, pid, ipc, uts, net, cgroup; runs as {uid}, no capabilities"
            if host_uid is not None
            else f"user, mount, pid, ipc, uts, net, cgroup; uid {SANDBOX_UID} inside; "
            "no capabilities"
        ),
        "filesystem": fs_detail,
        "network": net_detail,
        "rlimits": (
            f"address space {lim.address_space_bytes >> 20} MiB, CPU {lim.cpu_seconds} s, "
            f"{lim.max_processes} processes"
            + ("" if host_uid is not None else " more than its uid (the orchestrator's) runs")
            + f", {lim.max_open_files} files, "
            f"file size {lim.max_file_size_mb} MiB"
        ),
        "cgroups": f"memory {lim.memory_mb} MiB, {lim.max_processes} processes",
        "seccomp": "deny-list of dangerous system calls (EPERM), no_new_privs",
        "landlock": (
            f"ABI {host.landlock_abi}: writes only to writable paths"
            + (
                ""
                if host.landlock_abi < 4
                else ", no TCP to the mesh's listeners"
                if net
                else ", no TCP connect/bind"
            )
            + (", signals scoped" if host.landlock_abi >= 6 else "")
        ),
        "environment": (
            f"scrubbed: Sidemesh's variables plus {request.env_provided} of "
            f"{len(request.env_declared)} declared"
        ),
    }
    layers = tuple(
        Layer(name, False, f"UNAVAILABLE: {unavailable[name]}")
        if name in unavailable
        # A granted network is the isolation deliberately lifted, not a layer in force.
        else Layer(name, not (name == "network" and net), candidates[name])
        for name in LAYERS
    )
    return Policy(request, layers, host_uid, unavailable, IMAGE if image else ACCOUNTED)
