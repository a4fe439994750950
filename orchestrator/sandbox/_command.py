"""The command line that starts one sandboxed sidecar, layer by layer.

Every step executes the next in the same process, so the orchestrator's child
*is* the sandbox and the process tree stays simple::

    sh (join the replica's cgroups)
      -> prlimit (rlimits)
      -> bwrap (namespaces, filesystem, network, seccomp)
      -> setpriv (as root: become the plugin's own unprivileged host uid, with no
                  capabilities and an empty bounding set)
      -> python landlock_exec.py (Landlock, parent-death signal)
      -> the plugin's command

When the orchestrator is root, bwrap runs privileged and the plugin gets a real
host uid of its own (so RLIMIT_NPROC counts its processes and host file
permissions apply to it); otherwise bwrap maps uid 65534 in a user namespace
and drops every capability itself. The orchestrator opens the directories to
bind and passes them as descriptors.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sandbox._cgroups import ReplicaCgroup
from orchestrator.sandbox._host import HostSupport
from orchestrator.sandbox._policy import SANDBOX_UID, Policy
from orchestrator.sandbox._quota import ACCOUNTED
from orchestrator.sandbox._seccomp import filter_fd
from sidemesh.core import (
    MESH_SOCKET,
    REPLICA_SOCKET,
    SANDBOX_LISTEN,
    SANDBOX_MESH_ADDRESS,
    SANDBOX_RUN_DIR,
)

#: Where the sidecar finds its sockets inside the sandbox (the sidecar contract's paths).
INSIDE_RUN_DIR = SANDBOX_RUN_DIR
INSIDE_LISTEN = SANDBOX_LISTEN
INSIDE_MESH = SANDBOX_MESH_ADDRESS

_LANDLOCK_EXEC = Path(__file__).with_name("landlock_exec.py")
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
_SYSTEM_ETC = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/alternatives", "/etc/ssl", "/etc/ca-certificates", "/etc/nsswitch.conf",
    "/etc/mime.types",
)  # fmt: skip
_NETWORK_ETC = ("/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf", "/etc/host.conf")


@dataclass
class PreparedSidecar:
    """A sandboxed launch of one replica, and what the orchestrator keeps to watch it."""

    argv: list[str]
    #: Descriptors the child inherits (bind sources, the seccomp filter).
    pass_fds: tuple[int, ...]
    #: The host path of the socket the sidecar will serve on.
    socket_path: Path
    #: Its address and the orchestrator's, as the sidecar sees them.
    listen: str
    mesh_address: str
    policy: Policy
    cgroup: ReplicaCgroup | None = None
    bwrapped: bool = False
    #: The sidecar got its data dir read-only (its quota is accounted and was exceeded).
    data_read_only: bool = False
    _closed: bool = field(default=False, repr=False)

    def close_fds(self) -> None:
        """Closes our copies of the inherited descriptors (once the child has them)."""
        if not self._closed:
            self._closed = True
            for fd in self.pass_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def exit_reason(self, returncode: int | None) -> str:
        """Why the sidecar ended, naming the limit or layer that ended it."""
        if returncode is None:
            return "running"
        sig = -returncode if returncode < 0 else 0
        if self.bwrapped and returncode > 128:
            sig = returncode - 128  # bwrap exits with 128 + the signal that killed its child
        limits = self.policy.request.limits
        if self.cgroup is not None and self.cgroup.killed_by_memory_limit():
            return f"killed: memory limit ({limits.memory_mb} MiB)"
        if sig == signal.SIGXCPU:
            return f"killed: CPU time limit ({limits.cpu_seconds} s)"
        if sig == signal.SIGXFSZ:
            return f"killed: file size limit ({limits.max_file_size_mb} MiB)"
        if sig == signal.SIGSYS:
            return "killed: a system call the sandbox forbids (seccomp)"
        if sig:
            try:
                return f"killed by {signal.Signals(sig).name}"
            except ValueError:
                return f"killed by signal {sig}"
        return f"exit code {returncode}"

    def new_events(self) -> list[str]:
        """ResourceLimits the sidecar ran into since the last call."""
        return self.cgroup.new_events() if self.cgroup is not None else []

    def release(self) -> None:
        """Frees what the launch held (after the process has exited)."""
        self.close_fds()
        if self.cgroup is not None:
            self.cgroup.remove()


def prepare(
    policy: Policy,
    host: HostSupport,
    command: list[str],
    *,
    replica: int,
    replica_dir: Path,
    mesh_socket: Path,
    runtime_paths: list[Path],
    mesh_ports: tuple[int, ...] = (),
    data_read_only: bool = False,
) -> PreparedSidecar:
    """The command line and descriptors that start ``command`` under ``policy``.

    ``mesh_ports``: the mesh's TCP listener ports, refused to a plugin with network;
    ``data_read_only``: the data dir is bound (and allowed by Landlock) read-only.
    """
    req, lim = policy.request, policy.request.limits
    fds: list[int] = []
    argv: list[str] = []
    cgroup = None
    if policy.active("cgroups"):
        cgroup = ReplicaCgroup(f"{req.plugin}-r{replica}", lim.memory_mb << 20, lim.max_processes)
        argv += ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *map(str, cgroup.procs_files), "--"]
    if policy.active("rlimits"):
        fsize = lim.max_file_size_mb << 20
        cpu = f"{lim.cpu_seconds}:{lim.cpu_seconds + 2}"  # SIGXCPU first, SIGKILL 2 s later
        # RLIMIT_NPROC counts every task of the uid. As root each plugin has a uid of its
        # own; otherwise the plugin shares the orchestrator's (with its threads and every
        # other plugin's), so the limit is what runs now plus the plugin's share.
        nproc = lim.max_processes
        if policy.host_uid is None:
            nproc += tasks_of_uid(os.getuid())
        argv += [
            "prlimit", f"--as={lim.address_space_bytes}", f"--cpu={cpu}",
            f"--nproc={nproc}", f"--nofile={lim.max_open_files}",
            f"--fsize={fsize}", "--core=0", "--",
        ]  # fmt: skip
    bwrapped = policy.active("namespaces")
    if bwrapped:
        assert host.bwrap is not None
        argv += [host.bwrap, *_bwrap_options(policy, fds, replica_dir, mesh_socket, runtime_paths,
                                             data_read_only)]  # fmt: skip
        if policy.active("seccomp"):
            # An accounted quota counts written bytes: fallocate, which writes none, is refused.
            fd = filter_fd(no_fallocate=policy.data_quota == ACCOUNTED)
            fds.append(fd)
            argv += ["--seccomp", str(fd)]
        argv += ["--chdir", str(req.plugin_dir), "--"]
        listen, mesh_address = INSIDE_LISTEN, INSIDE_MESH
    else:
        listen, mesh_address = f"unix:{replica_dir / REPLICA_SOCKET}", f"unix:{mesh_socket}"
    if policy.host_uid is not None:
        uid = str(policy.host_uid)
        argv += [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip
    argv += [sys.executable, "-I", "-S", str(_LANDLOCK_EXEC), "--pdeathsig"]
    if policy.active("landlock"):
        argv += _landlock_options(
            policy, host, replica_dir, runtime_paths, bwrapped, data_read_only
        )
        if policy.network and not req.mesh_listeners_granted:
            for port in mesh_ports:
                argv += ["--deny-connect", str(port)]
    argv += ["--", *command]
    return PreparedSidecar(
        argv=argv, pass_fds=tuple(fds), socket_path=replica_dir / REPLICA_SOCKET,
        listen=listen, mesh_address=mesh_address, policy=policy, cgroup=cgroup,
        bwrapped=bwrapped, data_read_only=data_read_only,
    )  # fmt: skip


def tasks_of_uid(uid: int) -> int:
    """Threads of every process of ``uid`` now (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                total += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return total


def _bind_fd(fds: list[int], path: Path | str) -> str:
    """Opens ``path`` (as the orchestrator) for bwrap to bind by descriptor."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    os.set_inheritable(fd, True)
    fds.append(fd)
    return str(fd)


def _bwrap_options(
    policy: Policy,
    fds: list[int],
    replica_dir: Path,
    mesh_socket: Path,
    runtime_paths: list[Path],
    data_read_only: bool,
) -> list[str]:
    req = policy.request
    opts = [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "sidemesh", "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    if policy.host_uid is None:  # not root: a user namespace, and bwrap drops the capabilities
        opts += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                 "--cap-drop", "ALL"]  # fmt: skip
    if not policy.network:
        opts.append("--unshare-net")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            opts += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            opts += ["--ro-bind", top, top]
    binds = [*runtime_paths, req.plugin_dir, req.data_dir, *(Path(m.target) for m in req.mounts)]
    if req.paths_granted:
        binds += [Path(p) for p in (*req.read_paths, *req.write_paths)]
    # Directories bwrap makes on its own are 0700 (as root): the plugin's uid could
    # not pass through them. Make every parent of what is bound traversable first.
    opts += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    parents = {Path("/etc"), Path("/run")} | {a for b in binds for a in b.parents}
    for parent in sorted(parents - {Path("/"), Path("/tmp")}, key=lambda p: len(p.parts)):
        opts += ["--perms", "0755", "--dir", str(parent)]
    for etc in _SYSTEM_ETC + (_NETWORK_ETC if policy.network else ()):
        opts += ["--ro-bind-try", etc, etc]
    # The operator's mounts first: what the sandbox binds itself goes over them.
    for mount in req.mounts:
        opts += ["--bind-fd" if mount.writable else "--ro-bind-fd", _bind_fd(fds, mount.source),
                 mount.target]  # fmt: skip
    for path in runtime_paths:
        opts += ["--ro-bind-fd", _bind_fd(fds, path), str(path)]
    opts += ["--ro-bind-fd", _bind_fd(fds, req.plugin_dir), str(req.plugin_dir)]
    if req.paths_granted:
        for extra in req.read_paths:
            if os.path.exists(extra):
                opts += ["--ro-bind-fd", _bind_fd(fds, extra), extra]
        for extra in req.write_paths:
            if os.path.exists(extra):
                opts += ["--bind-fd", _bind_fd(fds, extra), extra]
    bind = "--ro-bind-fd" if data_read_only else "--bind-fd"
    opts += [bind, _bind_fd(fds, req.data_dir), str(req.data_dir)]
    opts += ["--bind-fd", _bind_fd(fds, replica_dir), INSIDE_RUN_DIR]
    opts += ["--bind-fd", _bind_fd(fds, mesh_socket), f"{INSIDE_RUN_DIR}/{MESH_SOCKET}"]
    return opts


def _landlock_options(
    policy: Policy,
    host: HostSupport,
    replica_dir: Path,
    runtime_paths: list[Path],
    bwrapped: bool,
    data_read_only: bool,
) -> list[str]:
    req = policy.request
    run_dir = INSIDE_RUN_DIR if bwrapped else str(replica_dir)
    read_only = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", str(req.plugin_dir)]
    read_only += [str(p) for p in runtime_paths]
    read_write = ["/tmp", run_dir]
    (read_only if data_read_only else read_write).append(str(req.data_dir))
    if not bwrapped:
        read_only.append(str(replica_dir.parent))  # the mesh socket lives there
    if req.paths_granted:  # the missing ones are reported by the policy, not bound
        read_only += [p for p in req.read_paths if os.path.exists(p)]
        read_write += [p for p in req.write_paths if os.path.exists(p)]
    for mount in req.mounts:
        (read_write if mount.writable else read_only).append(policy.mount_path(mount))
    opts = ["--abi", str(host.landlock_abi)]
    for path in read_only:
        opts += ["--ro", path]
    for path in read_write:
        opts += ["--rw", path]
    if not policy.network:
        opts.append("--no-tcp")
    return opts
