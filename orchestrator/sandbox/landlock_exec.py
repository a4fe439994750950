"""Restricts this process with Landlock, then executes the sidecar's command.

Runs inside the sandbox as ``python -I -S landlock_exec.py [options] -- COMMAND...``
(standard library only, so it starts fast and trusts nothing from the plugin's
environment). Landlock is the sandbox's last filesystem layer: even within
what the mount namespace shows, the plugin may write only to its writable
paths, read and execute only the read-only ones; with ``--no-tcp`` it can
neither connect nor bind TCP ports; signals and abstract Unix sockets are
scoped to the sandbox where the kernel supports it.

Options: ``--abi N`` (the kernel's Landlock ABI; 0 or absent: no Landlock),
``--ro PATH`` and ``--rw PATH`` (repeatable), ``--no-tcp``, ``--deny-connect
PORT`` (repeatable: with network, TCP connections to these ports are refused
— the mesh's own client listeners), and ``--pdeathsig`` (the command is killed
when its parent, the orchestrator or bwrap, dies).
Exit status 126 when the restriction cannot be applied.
"""

from __future__ import annotations

import ctypes
import os
import sys

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2

# Filesystem access rights (ABI 1), then REFER (2), TRUNCATE (3), IOCTL_DEV (5).
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ABI1_ALL = (1 << 13) - 1
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_READ = _EXECUTE | _READ_FILE | _READ_DIR
# Network rights (ABI 4) and scopes (ABI 6).
_BIND_TCP, _CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fs_rights(abi: int) -> int:
    rights = _ABI1_ALL
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def restrict(
    abi: int,
    read_only: list[str],
    read_write: list[str],
    no_tcp: bool,
    deny_connect: frozenset[int] = frozenset(),
) -> None:
    """Applies the Landlock ruleset to this process (and what it executes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    all_fs = _fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=all_fs)
    size = ctypes.sizeof(_RulesetAttr)
    if abi >= 4 and no_tcp:
        attr.handled_access_net = _BIND_TCP | _CONNECT_TCP
    elif abi >= 4 and deny_connect:
        attr.handled_access_net = _CONNECT_TCP  # then allowed port by port, but these
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
    if abi < 4:
        size = 8  # only handled_access_fs exists
    elif abi < 6:
        size = 16
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        # /dev nodes (null, urandom, tty) need reading, writing and ioctls.
        device = _READ_FILE | _WRITE_FILE | _READ_DIR | (_IOCTL_DEV if abi >= 5 else 0)
        rules = [(p, _READ) for p in read_only] + [(p, all_fs) for p in read_write]
        rules.append(("/dev", device))
        for path, rights in rules:
            _add_path(libc, ruleset, path, rights)
        if attr.handled_access_net == _CONNECT_TCP:
            _allow_ports_but(libc, ruleset, deny_connect)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _allow_ports_but(libc: ctypes.CDLL, ruleset: int, denied: frozenset[int]) -> None:
    """Allows TCP connections to every port but ``denied`` (Landlock rules only allow)."""
    rule = _NetPortAttr(allowed_access=_CONNECT_TCP)
    ref = ctypes.byref(rule)
    for port in range(1 << 16):
        if port in denied:
            continue
        rule.port = port
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_NET_PORT, ref, 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule(port {port})")


def _add_path(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # not in this sandbox: nothing to allow
    try:
        if not os.path.isdir(path):
            # Rights on a file: only those that apply to files.
            rights &= _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """Parses the options, restricts, executes the command."""
    if "--" not in argv:
        print("landlock_exec: usage: [--ro P] [--rw P] [--no-tcp] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    read_only: list[str] = []
    read_write: list[str] = []
    deny_connect: set[int] = set()
    no_tcp, abi, pdeathsig = False, 0, False
    i = 0
    while i < len(options):
        flag = options[i]
        if flag in ("--ro", "--rw", "--abi", "--deny-connect"):
            value = options[i + 1]
            if flag == "--abi":
                abi = int(value)
            elif flag == "--deny-connect":
                deny_connect.add(int(value))
            else:
                (read_only if flag == "--ro" else read_write).append(value)
            i += 2
        elif flag in ("--no-tcp", "--pdeathsig"):
            no_tcp = no_tcp or flag == "--no-tcp"
            pdeathsig = pdeathsig or flag == "--pdeathsig"
            i += 1
        else:
            print(f"landlock_exec: unknown option {flag}", file=sys.stderr)
            return 2
    try:
        if pdeathsig:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if abi > 0:
            restrict(abi, read_only, read_write, no_tcp, frozenset(deny_connect))
    except OSError as exc:
        print(f"landlock_exec: cannot apply Landlock: {exc}", file=sys.stderr)
        return 126
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        plugin = os.environ.get("SIDEMESH_PLUGIN", "?")  # SidecarEnv.PLUGIN (no imports here)
        print(
            f"landlock_exec: plugin {plugin}: cannot execute {command[0]!r} (from {os.getcwd()}): "
            f"{exc.strerror}; check the command in its plugin.yaml",
            file=sys.stderr,
        )
        return 127
    return 127  # unreachable: execvp replaces the process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
