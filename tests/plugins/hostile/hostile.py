"""Test plugin: a third-party plugin that tries to escape its sandbox.

Each tool is one attack. It reports what happened as a dict (``ok``, the
errno's name, what it saw) instead of raising, so that
``tests/integration/test_sandbox_attacks.py`` can assert that the attack was
contained. Attacks that could harm the process serving the call (raw
syscalls, ptrace) run in a fresh interpreter (``python hostile.py ATTACK``).
Blocking tools are plain functions: the SDK runs them in a worker thread, so
the sidecar keeps answering health checks meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from clients import SidemeshError
from plugins_sdk import Plugin, ToolContext

app = Plugin()  # named by its plugin.yaml

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: Syscall numbers of the attacks, per machine (from the kernel's syscall tables).
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"ptrace": 101, "mount": 165, "umount2": 166, "keyctl": 250, "unshare": 272,
               "perf_event_open": 298, "setns": 308, "bpf": 321},
    "aarch64": {"ptrace": 117, "mount": 40, "umount2": 39, "keyctl": 219, "unshare": 97,
                "perf_event_open": 241, "setns": 268, "bpf": 280},
}  # fmt: skip
_NR = _SYSCALLS.get(platform.machine(), {})

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
PTRACE_TRACEME = 0
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
WALL = 0x40000000  # __WALL: wait for tracees that are not our children too
KEYCTL_JOIN_SESSION_KEYRING = 1
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _oserror(exc: BaseException) -> str:
    """``ENOENT``-style name of an OSError, else the exception's type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _errname(exc.errno)
    return type(exc).__name__


def _syscall(name: str, *args: Any) -> tuple[int, str | None]:
    """Calls a syscall by number; returns (result, errno name or None)."""
    if name not in _NR:
        return -1, f"unknown syscall {name} on {platform.machine()}"
    # Every integer as a C long: variadic ints would only fill half a 64-bit register.
    c_args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(_NR[name]), *c_args))
    return result, (_errname(ctypes.get_errno()) if result == -1 else None)


def _isolated(attack: str) -> dict[str, Any]:
    """Runs one of ``_ISOLATED`` in a fresh interpreter: ``python hostile.py ATTACK``.

    Whatever the attack changes (namespaces, a mount, a tracer) dies with that
    process; and unlike a fork of the sidecar, it holds no gRPC state.
    """
    try:
        out = subprocess.run(
            [sys.executable, __file__, attack], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"child_error": f"cannot run it: {_oserror(exc)}"}
    if out.returncode != 0 or not out.stdout.strip():
        stderr = out.stderr.decode(errors="replace")[-800:]
        return {"child_error": f"exit status {out.returncode}: {stderr}"}
    data: dict[str, Any] = json.loads(out.stdout)
    return data


# -- the filesystem --------------------------------------------------------------------------


@app.tool()
def read_file(path: str) -> dict[str, Any]:
    """Reads the start of any file: a host secret, /etc/shadow, another plugin's data."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(200)
    except Exception as exc:
        return {"ok": False, "error": _oserror(exc), "content_prefix": ""}
    return {"ok": True, "error": None, "content_prefix": prefix.decode(errors="replace")}


@app.tool()
def write_file(path: str, text: str) -> dict[str, Any]:
    """Writes a file anywhere: the plugin dir, the project's code, the host's /tmp."""
    try:
        Path(path).write_text(text)
    except Exception as exc:
        return {"ok": False, "error": _oserror(exc)}
    return {"ok": True, "error": None}


@app.tool()
def list_dir(path: str) -> dict[str, Any]:
    """Lists a directory: the orchestrator's runtime dir, the other plugins' data."""
    try:
        entries = sorted(os.listdir(path))
    except Exception as exc:
        return {"ok": False, "error": _oserror(exc), "entries": []}
    return {"ok": True, "error": None, "entries": entries}


# -- processes ---------------------------------------------------------------------------------


@app.tool()
def list_processes() -> dict[str, Any]:
    """Every process visible in /proc, with its command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = ""
        found.append({"pid": int(entry.name), "cmdline": cmdline.strip()})
    return {"processes": sorted(found, key=lambda p: p["pid"])}


@app.tool()
def signal_process(pid: int) -> dict[str, Any]:
    """Probes a process with signal 0, then tries to SIGTERM it."""
    if pid in (0, -1, os.getpid()):
        return {"probe": "refused: not a single other process", "terminate": None}
    outcome: dict[str, Any] = {}
    for step, sig in (("probe", 0), ("terminate", signal.SIGTERM)):
        try:
            os.kill(pid, sig)
            outcome[step] = None
        except OSError as exc:
            outcome[step] = _oserror(exc)
    return outcome


@app.tool()
def ptrace_attach(pid: int = 0) -> dict[str, Any]:
    """PTRACE_ATTACH to ``pid`` (0: to a child of its own), and PTRACE_TRACEME in a child.

    Attaching to its own child proves the ptrace syscall itself is denied,
    not merely that the target is out of sight.
    """
    child = None
    if pid == 0:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
        pid = child.pid
    try:
        result, error = _syscall("ptrace", PTRACE_ATTACH, pid, None, None)
        if result == 0:  # attached: let it go again
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, WALL)
            _syscall("ptrace", PTRACE_DETACH, pid, None, None)
    finally:
        if child is not None:
            child.kill()
            child.wait()
    traceme = _isolated("traceme")
    return {
        "target": pid,
        "attach": error or "ok",
        "traceme": traceme.get("error", "ok") if "child_error" not in traceme else traceme,
    }


def _traceme() -> dict[str, Any]:
    """PTRACE_TRACEME: asks to be traced by its parent."""
    return {"error": _syscall("ptrace", PTRACE_TRACEME, 0, None, None)[1] or "ok"}


# -- the kernel --------------------------------------------------------------------------------


def _dangerous_syscalls() -> dict[str, Any]:
    """Each syscall's errno name, or "ok" when the kernel allowed it (run by ``_isolated``).

    The namespace syscalls come last: once one succeeds, the child is no
    longer where it started.
    """
    out: dict[str, Any] = {}
    out["keyctl"] = _syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)[1] or "ok"

    attr = (ctypes.c_uint32 * 18)(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    result, error = _syscall("bpf", BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    out["bpf"] = error or "ok"
    if result >= 0:
        os.close(result)

    perf = (ctypes.c_uint64 * 16)()
    perf[0] = 1 | (ctypes.sizeof(perf) << 32)  # type PERF_TYPE_SOFTWARE, size: the struct's
    perf[5] = 1 | 1 << 5 | 1 << 6  # disabled, exclude_kernel, exclude_hv
    result, error = _syscall("perf_event_open", ctypes.byref(perf), 0, -1, -1, 0)
    out["perf_event_open"] = error or "ok"
    if result >= 0:
        os.close(result)

    target = os.path.join(os.environ.get("SIDEMESH_DATA_DIR", "/tmp"), "mountpoint")
    with contextlib.suppress(OSError):
        os.makedirs(target, exist_ok=True)
    result, error = _syscall("mount", b"none", target.encode(), b"tmpfs", 0, None)
    out["mount"] = error or "ok"
    if result == 0:  # it worked: take it away again at once
        _syscall("umount2", target.encode(), MNT_DETACH)

    try:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    except OSError as exc:
        out["setns"] = f"cannot open /proc/self/ns/net: {_oserror(exc)}"
    else:
        out["setns"] = _syscall("setns", fd, CLONE_NEWNET)[1] or "ok"
        os.close(fd)
    out["unshare_user"] = _syscall("unshare", CLONE_NEWUSER)[1] or "ok"
    out["unshare_net"] = _syscall("unshare", CLONE_NEWNET)[1] or "ok"
    out["unshare_mount"] = _syscall("unshare", CLONE_NEWNS)[1] or "ok"
    return out


@app.tool()
def syscalls() -> dict[str, Any]:
    """Tries unshare, setns, mount, bpf, keyctl and perf_event_open; their errno names."""
    return _isolated("syscalls")


# -- the network -------------------------------------------------------------------------------


@app.tool()
def connect_tcp(host: str, port: int) -> dict[str, Any]:
    """Opens a TCP connection (2 s timeout): a host service, the orchestrator's port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except Exception as exc:
        return {"ok": False, "error": "timeout" if isinstance(exc, TimeoutError) else _oserror(exc)}
    return {"ok": True, "error": None}


@app.tool()
def connect_unix(path: str) -> dict[str, Any]:
    """Connects to a Unix socket (``@name``: an abstract one): other plugins, the orchestrator."""
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
    except Exception as exc:
        return {"ok": False, "error": "timeout" if isinstance(exc, TimeoutError) else _oserror(exc)}
    return {"ok": True, "error": None}


@app.tool()
def network_interfaces() -> dict[str, Any]:
    """The interfaces, IPv4 routes and IPv6 addresses it can see."""

    def lines(path: str) -> list[str]:
        with contextlib.suppress(OSError):
            return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        return []

    return {
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "routes": lines("/proc/net/route")[1:],  # without the header
        "inet6": lines("/proc/net/if_inet6"),
    }


# -- identity, environment, the mesh ---------------------------------------------------------


@app.tool()
def env() -> dict[str, str]:
    """Its whole environment."""
    return dict(os.environ)


@app.tool()
def whoami() -> dict[str, Any]:
    """Its uid and gid, capabilities, no_new_privs, seccomp mode, uid map and namespaces."""
    keys = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            status[key] = value.strip()
    namespaces = {}
    for ns in ("mnt", "pid", "ipc", "uts", "net", "user", "cgroup"):
        with contextlib.suppress(OSError):
            namespaces[ns] = os.readlink(f"/proc/self/ns/{ns}")
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "status": status,
        "uid_map": Path("/proc/self/uid_map").read_text().split(),
        "hostname": socket.gethostname(),
        "namespaces": namespaces,
    }


@app.tool()
async def call_tool(tool: str, arguments: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    """Calls a tool through the mesh: its status code's name, or its result."""
    try:
        result = await ctx.mesh.call_tool(tool, arguments, timeout=10)
    except SidemeshError as exc:
        return {"ok": False, "code": exc.code.name, "message": exc.message}
    return {"ok": True, "code": "OK", "structured": result.structured, "is_error": result.is_error}


_ISOLATED = {"syscalls": _dangerous_syscalls, "traceme": _traceme}

if __name__ == "__main__":  # an attack in a process of its own, for _isolated
    print(json.dumps(_ISOLATED[sys.argv[1]]()))
