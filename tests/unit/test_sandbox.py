"""The sandbox's pieces: policy, the exec chain, exit reasons, Landlock, uids, seccomp."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import sandbox
from orchestrator.sandbox._command import _LANDLOCK_EXEC
from orchestrator.sandbox._seccomp import DENIED, compiled_filter

FULL = sandbox.HostSupport(
    root=True, bwrap="/usr/bin/bwrap", bwrap_why="", seccomp_why="", landlock_abi=6,
    landlock_why="", cgroup_why="",
)  # fmt: skip
LIMITS = sandbox.ResourceLimits(
    memory_mb=128, cpu_seconds=5, max_processes=32, max_open_files=64, max_file_size_mb=2
)


def _request(tmp_path: Path, **changes: object) -> sandbox.SandboxRequest:
    base = sandbox.SandboxRequest(
        plugin="p", plugin_dir=tmp_path / "plugin", data_dir=tmp_path / "data", limits=LIMITS
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _layers(policy: sandbox.Policy) -> dict[str, tuple[bool, str]]:
    return {layer.name: (layer.active, layer.detail) for layer in policy.layers}


def test_every_layer_is_active_on_a_host_that_has_them(tmp_path: Path) -> None:
    policy = sandbox.policy(_request(tmp_path), FULL, 61000)
    assert [layer.name for layer in policy.layers] == list(sandbox.LAYERS)
    assert all(layer.active for layer in policy.layers)
    assert policy.host_uid == 61000
    assert policy.refusal() == ""
    assert _layers(policy)["network"][1] == "none (loopback only)"


def test_a_missing_layer_is_reported_and_strict_mode_refuses(tmp_path: Path) -> None:
    host = replace(FULL, bwrap=None, bwrap_why="bubblewrap (bwrap) is not installed",
                   landlock_abi=0, landlock_why="the kernel does not provide Landlock")  # fmt: skip
    policy = sandbox.policy(_request(tmp_path), host, 61000)
    layers = _layers(policy)
    for name in ("namespaces", "filesystem", "network", "seccomp", "landlock"):
        assert layers[name][0] is False
        assert layers[name][1].startswith("UNAVAILABLE"), name
    assert layers["rlimits"][0] and layers["cgroups"][0]
    assert policy.host_uid is None  # no private filesystem: no uid drop either
    assert "refusing to start plugin 'p'" in policy.refusal()
    assert "bubblewrap (bwrap) is not installed" in policy.refusal()


def test_network_is_granted_only_by_the_operator(tmp_path: Path) -> None:
    asked = sandbox.policy(_request(tmp_path, wants_network=True), FULL, 61000)
    assert _layers(asked)["network"][0] is True
    assert "not granted it" in _layers(asked)["network"][1]
    granted = sandbox.policy(
        _request(tmp_path, wants_network=True, network_granted=True), FULL, 61000
    )
    assert granted.network
    assert _layers(granted)["network"] == (
        False,
        "host network (granted by the operator), except the mesh's own TCP listeners "
        "(Landlock refuses connections to their ports)",
    )
    listeners = sandbox.policy(
        _request(tmp_path, wants_network=True, network_granted=True,
                 mesh_listeners_granted=True), FULL, 61000,
    )  # fmt: skip
    assert "the mesh's TCP listeners included" in _layers(listeners)["network"][1]


def test_a_relaxed_plugin_has_no_layers(tmp_path: Path) -> None:
    policy = sandbox.policy(_request(tmp_path, relaxed=True), FULL, 61000)
    assert not any(layer.active for layer in policy.layers)
    assert policy.host_uid is None


def _prepare(tmp_path: Path, host: sandbox.HostSupport) -> sandbox.PreparedSidecar:
    for d in ("plugin", "data", "run/r0"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "run" / "mesh.sock").touch()
    policy = sandbox.policy(
        _request(tmp_path), replace(host, cgroup_why="off in unit tests"), 61000
    )
    return sandbox.prepare(
        policy, host, ["my-plugin", "--serve"], replica=0, replica_dir=tmp_path / "run" / "r0",
        mesh_socket=tmp_path / "run" / "mesh.sock", runtime_paths=[Path(sys.prefix)],
    )  # fmt: skip


def test_as_root_the_chain_is_rlimits_bwrap_uid_drop_landlock_plugin(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, FULL)
    try:
        argv = prepared.argv
        order = [
            argv.index(x) for x in ("prlimit", "/usr/bin/bwrap", "setpriv", str(_LANDLOCK_EXEC))
        ]
        assert order == sorted(order)
        assert argv[-2:] == ["my-plugin", "--serve"]
        assert "--unshare-net" in argv and "--new-session" in argv and "--die-with-parent" in argv
        assert "--unshare-user" not in argv  # as root: a real unprivileged host uid instead
        assert "--reuid=61000" in argv and "--bounding-set=-all" in argv
        assert "--cpu=5:7" in argv and "--nproc=32" in argv and "--fsize=2097152" in argv
        assert "--no-tcp" in argv
        assert prepared.listen == "unix:/run/sidemesh/plugin.sock"
        assert len(prepared.pass_fds) >= 5  # bind sources and the seccomp filter
    finally:
        prepared.release()


def test_without_root_bwrap_makes_a_user_namespace_and_drops_capabilities(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, replace(FULL, root=False))
    try:
        argv = prepared.argv
        assert "setpriv" not in argv
        at = argv.index("--unshare-user")
        assert argv[at : at + 5] == ["--unshare-user", "--uid", "65534", "--gid", "65534"]
        assert argv[argv.index("--cap-drop") + 1] == "ALL"
    finally:
        prepared.release()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (152, "killed: CPU time limit (5 s)"),  # 128 + SIGXCPU, as bwrap reports it
        (153, "killed: file size limit (2 MiB)"),  # 128 + SIGXFSZ
        (159, "killed: a system call the sandbox forbids (seccomp)"),  # 128 + SIGSYS
        (137, "killed by SIGKILL"),
        (1, "exit code 1"),
    ],
)
def test_exit_reasons_name_the_limit(tmp_path: Path, code: int, reason: str) -> None:
    prepared = _prepare(tmp_path, FULL)
    prepared.release()
    assert prepared.exit_reason(code) == reason


def _landlocked(tmp_path: Path, code: str, *options: str) -> subprocess.CompletedProcess[str]:
    abi = sandbox.probe().landlock_abi
    assert abi > 0, "this machine kind has Landlock"
    return subprocess.run(
        [sys.executable, "-I", "-S", str(_LANDLOCK_EXEC), "--abi", str(abi),
         "--ro", "/usr", "--ro", "/etc", "--ro", sys.base_prefix, "--ro", sys.prefix,
         "--ro", "/proc", *options, "--", sys.executable, "-I", "-S", "-c", code],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_landlock_lets_the_plugin_write_only_where_it_may(tmp_path: Path) -> None:
    allowed, denied = tmp_path / "rw", tmp_path / "elsewhere"
    allowed.mkdir()
    denied.mkdir()
    code = (
        f"open({str(allowed / 'ok')!r}, 'w').write('x')\n"
        f"try:\n open({str(denied / 'no')!r}, 'w')\nexcept PermissionError: print('denied')\n"
    )
    out = _landlocked(tmp_path, code, "--rw", str(allowed))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "denied"
    assert (allowed / "ok").exists() and not (denied / "no").exists()


def test_landlock_denies_tcp_when_the_plugin_has_no_network(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            "import socket\ns = socket.socket()\n"
            f"try:\n s.connect(('127.0.0.1', {port}))\nexcept PermissionError: print('denied')\n"
        )
        out = _landlocked(tmp_path, code, "--no-tcp")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "denied"


def test_two_meshes_never_get_the_same_uid(tmp_path: Path) -> None:
    first, second = (
        sandbox.UidAllocator(62000, 10, tmp_path),
        sandbox.UidAllocator(62000, 10, tmp_path),
    )
    a, b = first.uid_for("tools-demo"), second.uid_for("tools-demo")
    assert a != b
    assert first.uid_for("tools-demo") == a  # stable for the mesh's life
    first.release()
    assert sandbox.UidAllocator(62000, 10, tmp_path).uid_for("tools-demo") == a  # freed


def test_a_plugin_gets_the_same_uid_every_run(tmp_path: Path) -> None:
    """Derived from its name, remembered in the state dir: its files stay its own."""
    locks, registry = tmp_path / "locks", tmp_path / "state" / sandbox.UID_REGISTRY_FILE
    first = sandbox.UidAllocator(62000, 1000, locks, registry)
    uids = {name: first.uid_for(name) for name in ("mcp-git", "tools-demo", "assistant")}
    assert len(set(uids.values())) == 3
    first.release()
    # Another mesh (its own state dir) holds mcp-git's uid: this one takes the next free.
    other = sandbox.UidAllocator(62000, 1000, locks, tmp_path / "other.json")
    assert other.uid_for("mcp-git") == uids["mcp-git"]
    again = sandbox.UidAllocator(62000, 1000, locks, registry)
    assert again.uid_for("tools-demo") == uids["tools-demo"]  # the same in a new run
    moved = again.uid_for("mcp-git")
    assert moved != uids["mcp-git"] and moved not in uids.values()
    assert json.loads(registry.read_text())["mcp-git"] == moved  # remembered...
    other.release()
    again.release()
    third = sandbox.UidAllocator(62000, 1000, locks, registry)
    assert third.uid_for("mcp-git") == moved  # ...so it stays where it moved
    assert third.uid_for("assistant") == uids["assistant"]
    third.release()
    # Without a state dir the name alone decides.
    assert sandbox.UidAllocator(62000, 1000, locks).uid_for("tools-demo") == uids["tools-demo"]


def test_the_seccomp_filter_compiles_with_the_deny_list() -> None:
    assert {"ptrace", "mount", "bpf", "kexec_load", "keyctl", "perf_event_open", "unshare",
            "setns"} <= set(DENIED)  # fmt: skip
    assert len(compiled_filter()) > 8 * len(DENIED)  # one BPF instruction is 8 bytes
