"""Hostile plugins in a real mesh: every attack is contained, reported, and harms no one else.

``tests/plugins/hostile`` tries to break out of its sandbox (files, processes,
network, ptrace, syscalls, environment, other plugins, the mesh's permissions).
Each test runs the attack through the mesh like any client would, asserts
what the attacker got (the tools report ``ok``/errno names rather than
raising), asserts on the host that nothing happened, and checks that the
orchestrator still serves another plugin (``tools-demo/add``). A positive
control next to most attacks shows that the tool does work where the sandbox
allows it, so a denial is the sandbox's doing. Resource limits are in
``test_sandbox_limits.py``; strict and enforce modes in ``test_sandbox_policy.py``.

The attacks that cannot harm the orchestrator or the sidecar share one mesh
(``TestHostilePlugin``); the others get a mesh of their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshproc import ROOT, Mesh
from sandboxkit import (
    HOG,
    HOSTILE,
    LAYERS,
    TOOLS_DEMO,
    MakeMesh,
    accepted_connection,
    assert_mesh_serves,
    attack,
    callback_socket,
    host_uid,
    listener,
    next_event,
    plugin_processes,
    replica_sockets,
    sidecar_host_uids,
    watching,
)

pytestmark = pytest.mark.integration

SECRET = f"orchestrator-secret-{secrets.token_hex(8)}"
ORCHESTRATOR_ENV = {"SIDEMESH_TEST_SECRET": SECRET, "DECLARED_VAR": "from-orchestrator-env"}

#: Variables of the sidecar environment contract (docs/architecture.md) and the
#: launcher's Python settings: a sidecar gets them by design, whatever the
#: orchestrator's own values are.
CONTRACT_VARIABLES = {
    *("PATH", "HOME", "LANG", "TMPDIR"),
    *("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"),
}
CONTRACT_PREFIXES = ("SIDEMESH_", "OTEL_")


@pytest.fixture(scope="class")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """hostile and tools-demo, for the attacks that cannot take the mesh down.

    Class-scoped, so that it is gone before the tests that start meshes of
    their own: two meshes share nothing but the host.
    """
    m = Mesh(
        tmp_path_factory.mktemp("attacks"),
        env=ORCHESTRATOR_ENV,
        plugin_dirs=[str(HOSTILE), str(TOOLS_DEMO)],
        plugins={"hostile": {"env": {"DECLARED_VAR": "granted"}}},
    )
    try:
        m.start(ready=["hostile", "tools-demo"])
        yield m
        assert m.stop() == 0
        assert m.sidecars() == []
    finally:
        m.cleanup()


# -- helpers -------------------------------------------------------------------------------------


class TestHostilePlugin:
    """hostile's attacks on the host, the mesh and tools-demo, in one mesh for the class."""

    def test_every_sandbox_layer_is_active_and_shown_by_sidemesh_plugins(self, mesh: Mesh) -> None:
        """The operator sees every layer in force for hostile, in the API and the CLI."""
        layers = {layer.name: layer for layer in mesh.plugin("hostile").sandbox}
        assert sorted(layers) == sorted(LAYERS)
        inactive = {name: layer.detail for name, layer in layers.items() if not layer.active}
        assert inactive == {}, f"layers not in force for hostile: {inactive}"

        out = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "plugins", "-a", mesh.address, "-v"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        table, *blocks = out.stdout.split("\n\n")  # the table, then a block per plugin
        rows = [line for line in table.splitlines() if line.startswith("hostile ")]
        blocks = [b for b in blocks if b.startswith("hostile (")]
        assert len(rows) == 1 and len(blocks) == 1, out.stdout
        row, block = rows[0], blocks[0]
        assert [layer for layer in LAYERS if layer not in row] == [], f"SANDBOX column: {row}"
        for layer in LAYERS:
            assert re.search(rf"^\s+sandbox {layer}: on\b", block, re.M), f"{layer}:\n{block}"

    async def test_the_plugin_runs_unprivileged_in_its_own_namespaces(self, mesh: Mesh) -> None:
        """No root, no capabilities, no way to gain privileges, seccomp on, its own namespaces.

        Seen from the inside (uid, /proc/self/status, its namespaces) and from the
        host (the uids of its process), where it is an unprivileged uid of its own,
        not the one tools-demo runs as.
        """
        who = await attack(mesh, "whoami")
        status = who["status"]
        assert who["uid"] != 0 and who["euid"] != 0, who
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, f"{caps}: {status[caps]}"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # a seccomp filter
        assert host_uid(who["uid_map"], who["uid"]) not in (0, None), f"uid map {who['uid_map']}"

        hostile = sidecar_host_uids(mesh, "hostile")
        assert hostile, "no hostile sidecar process found on the host"
        assert 0 not in hostile, f"host uids of hostile's process: {hostile}"
        if os.getuid() == 0:  # as root, the orchestrator gives each plugin a host uid of its own
            tools_demo = sidecar_host_uids(mesh, "tools-demo")
            assert hostile.isdisjoint(tools_demo), f"hostile: {hostile}, tools-demo: {tools_demo}"

        # As root the plugin is an unprivileged host uid of its own (checked above)
        # instead of uid 0 in a user namespace: the kernel exempts host uid 0 from
        # RLIMIT_NPROC, and host file permissions then apply to the plugin too.
        # Without root, bwrap's user namespace is what makes the plugin unprivileged.
        own = ["mnt", "pid", "ipc", "uts", "net"] + ([] if os.getuid() == 0 else ["user"])
        shared = [
            ns for ns in own if who["namespaces"].get(ns) == os.readlink(f"/proc/self/ns/{ns}")
        ]
        assert shared == [], f"namespaces it shares with the host: {shared}"
        await assert_mesh_serves(mesh)

    async def test_host_secrets_cannot_be_read(self, mesh: Mesh, tmp_path: Path) -> None:
        """A secret on the host, /etc/shadow and the orchestrator's own files are out of reach."""
        secret = tmp_path / "secret.txt"
        secret.write_text(f"host-secret-{secrets.token_hex(8)}")
        targets = [secret, Path("/etc/shadow"), mesh.config_path, mesh.state_dir / "endpoints.json"]
        for target in targets:
            assert target.exists(), target
            got = await attack(mesh, "read_file", path=str(target))
            assert not got["ok"] and got["content_prefix"] == "", f"read {target}: {got}"

        own = await attack(mesh, "read_file", path=str(HOSTILE / "plugin.yaml"))
        expected = (HOSTILE / "plugin.yaml").read_text()[:200]
        assert own["ok"] and own["content_prefix"] == expected, own  # its own dir: readable
        await assert_mesh_serves(mesh)

    async def test_writes_land_only_in_its_data_dir_and_private_tmp(
        self, mesh: Mesh, tmp_path: Path
    ) -> None:
        """Nothing outside its data dir is writable; what it writes there appears on the host.

        Targets: its own plugin dir, the project's code (where it could plant code
        that other plugins import), a host path, and the host's /tmp (its /tmp is a
        private one: the write works there but never reaches the host).
        """
        token = secrets.token_hex(6)
        forbidden = [
            HOSTILE / f"pwned-{token}.txt",
            ROOT / "plugins_sdk" / f"pwned_{token}.py",
            tmp_path / f"pwned-{token}.txt",
        ]
        host_tmp = Path("/tmp") / f"pwned-{token}.txt"
        try:
            for target in forbidden:
                got = await attack(mesh, "write_file", path=str(target), text="pwned")
                assert not got["ok"], f"wrote {target}: {got}"
                assert not target.exists(), f"{target} was created on the host"

            in_tmp = await attack(mesh, "write_file", path=str(host_tmp), text="pwned")
            assert in_tmp["ok"], f"its private /tmp is not writable: {in_tmp}"
            assert not host_tmp.exists(), f"{host_tmp} was created on the host"
        finally:
            for target in [*forbidden, host_tmp]:
                target.unlink(missing_ok=True)

        data_dir = (await attack(mesh, "env"))["SIDEMESH_DATA_DIR"]
        got = await attack(mesh, "write_file", path=f"{data_dir}/proof-{token}.txt", text=token)
        assert got["ok"], got
        on_host = mesh.state_dir / "data" / "hostile" / f"proof-{token}.txt"
        assert on_host.read_text() == token
        await assert_mesh_serves(mesh)

    async def test_other_plugins_files_and_sockets_are_out_of_reach(self, mesh: Mesh) -> None:
        """tools-demo's data, its sockets and the orchestrator's client socket are not visible.

        Connecting to tools-demo's replica socket would let hostile call it without
        the mesh; connecting to the orchestrator's client socket (or to another
        plugin's callback socket) would let it call anything without its
        permissions being checked.
        """
        planted = mesh.state_dir / "data" / "tools-demo" / "secret.txt"
        planted.write_text("tools-demo's own data")
        data_dir = (await attack(mesh, "env"))["SIDEMESH_DATA_DIR"]
        for path in (str(planted), f"{data_dir}/../tools-demo/secret.txt"):
            got = await attack(mesh, "read_file", path=path)
            assert not got["ok"], f"read {path}: {got}"
        siblings = await attack(mesh, "list_dir", path=f"{data_dir}/..")
        assert "tools-demo" not in siblings["entries"], siblings

        sockets = replica_sockets(mesh)
        assert "tools-demo" in sockets, f"cannot find tools-demo's socket on the host: {sockets}"
        targets = [mesh.socket, sockets["tools-demo"]]
        if (callbacks := callback_socket(mesh, sockets["tools-demo"])) is not None:
            targets.append(callbacks)
        for target in targets:
            got = await attack(mesh, "connect_unix", path=str(target))
            assert not got["ok"], f"connected to {target}: {got}"
        runtime = await attack(mesh, "list_dir", path=str(mesh.runtime_dir))
        assert "mesh.sock" not in runtime["entries"], runtime

        listen = (await attack(mesh, "env"))["SIDEMESH_LISTEN"].removeprefix("unix:")
        own = await attack(mesh, "connect_unix", path=listen)
        assert own["ok"], f"cannot reach its own socket {listen}: {own}"  # the tool works
        await assert_mesh_serves(mesh)

    async def test_environment_holds_only_what_the_manifest_declares_and_the_operator_grants(
        self,
        mesh: Mesh,
    ) -> None:
        """The orchestrator's secrets stay with it; DECLARED_VAR has the operator's value."""
        plugin_env = await attack(mesh, "env")
        assert plugin_env.get("DECLARED_VAR") == "granted"
        assert "SIDEMESH_TEST_SECRET" not in plugin_env
        assert [k for k, v in plugin_env.items() if SECRET in v] == []
        orchestrator_env = {**os.environ, **ORCHESTRATOR_ENV}
        leaked = sorted(
            name
            for name, value in orchestrator_env.items()
            if plugin_env.get(name) == value
            and name not in CONTRACT_VARIABLES
            and not name.startswith(CONTRACT_PREFIXES)
        )
        assert leaked == [], f"the orchestrator's variables reached the plugin: {leaked}"
        await assert_mesh_serves(mesh)

    async def test_ptrace_is_denied_even_on_its_own_child(self, mesh: Mesh) -> None:
        """PTRACE_ATTACH to a child of its own and PTRACE_TRACEME fail with EPERM: the syscall
        itself is denied, not merely its targets hidden."""
        got = await attack(mesh, "ptrace_attach", pid=0)
        assert (got["attach"], got["traceme"]) == ("EPERM", "EPERM"), got
        await assert_mesh_serves(mesh)

    async def test_dangerous_syscalls_fail_with_eperm(self, mesh: Mesh) -> None:
        """unshare, setns, mount, bpf, keyctl and perf_event_open are all refused with EPERM."""
        got = await attack(mesh, "syscalls")
        expected = {
            name: "EPERM"
            for name in ("unshare_user", "unshare_net", "unshare_mount", "setns", "mount", "bpf",
                         "keyctl", "perf_event_open")
        }  # fmt: skip
        assert got == expected
        await assert_mesh_serves(mesh)

    async def test_no_connection_reaches_the_hosts_loopback(self, mesh: Mesh) -> None:
        """A TCP server on the host's 127.0.0.1, the orchestrator's TCP port and an abstract
        Unix socket on the host: none can be reached, and the server saw no connection."""
        with listener(socket.AF_INET, ("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            got = await attack(mesh, "connect_tcp", host="127.0.0.1", port=port)
            assert not got["ok"], f"connected to the host's 127.0.0.1:{port}: {got}"
            assert not accepted_connection(server), "the host's server got a connection"

        host, port = mesh.tcp_address.rsplit(":", 1)
        got = await attack(mesh, "connect_tcp", host=host, port=int(port))
        assert not got["ok"], f"connected to the orchestrator's {mesh.tcp_address}: {got}"

        name = f"sidemesh-attack-{secrets.token_hex(6)}"
        with listener(socket.AF_UNIX, f"\0{name}") as server:
            got = await attack(mesh, "connect_unix", path=f"@{name}")
            assert not got["ok"], f"connected to the host's abstract socket @{name}: {got}"
            assert not accepted_connection(server), "the host's abstract socket got a connection"
        await assert_mesh_serves(mesh)

    async def test_its_only_network_interface_is_its_own_loopback(self, mesh: Mesh) -> None:
        """No interface but lo, no IPv4 route, no IPv6 address off lo: there is no way out."""
        got = await attack(mesh, "network_interfaces")
        assert got["interfaces"] == ["lo"], got
        assert got["routes"] == [], got
        assert all(line.split()[-1] == "lo" for line in got["inet6"]), got
        await assert_mesh_serves(mesh)

    async def test_calling_a_tool_outside_its_permissions_is_denied_and_reported(
        self, mesh: Mesh
    ) -> None:
        """Through its callback socket hostile may call tools-demo/add and nothing else; a
        refused call is PERMISSION_DENIED to hostile and a permission_denied event to operators."""
        async with watching(mesh, "hostile") as events:
            allowed = await attack(
                mesh, "call_tool", tool="tools-demo/add", arguments={"a": 1, "b": 2}
            )
            assert allowed["ok"] and allowed["structured"] == {"result": 3}, allowed
            for tool, arguments in (
                ("tools-demo/divide", {"a": 1, "b": 2}),
                ("hostile/whoami", {}),
            ):
                got = await attack(mesh, "call_tool", tool=tool, arguments=arguments)
                assert got["code"] == "PERMISSION_DENIED", f"{tool}: {got}"
            denied = await next_event(
                events, "permission_denied", 10, lambda e: e.target == "tools-demo/divide"
            )
        assert denied.caller == "hostile"
        assert "permissions.tools" in denied.reason
        await assert_mesh_serves(mesh)


async def test_host_processes_cannot_be_seen_signalled_or_traced(make_mesh: MakeMesh) -> None:
    """The orchestrator and tools-demo are invisible to hostile and out of its reach.

    A mesh of its own: were SIGTERM to get through, it would stop the orchestrator.
    """
    mesh = make_mesh(plugin_dirs=[str(HOSTILE), str(TOOLS_DEMO)]).start(
        ready=["hostile", "tools-demo"]
    )
    assert mesh.proc is not None
    orchestrator = mesh.proc.pid
    tools_demo = mesh.plugin("tools-demo").replicas[0].pid
    tools_demo_code = plugin_processes(mesh, "tools-demo")

    seen = (await attack(mesh, "list_processes"))["processes"]
    assert seen, "it cannot even see itself"
    pids = {int(p["pid"]) for p in seen}
    assert pids.isdisjoint({orchestrator, tools_demo, *tools_demo_code}), sorted(pids)
    strangers = [p["cmdline"][:100] for p in seen if "hostile:app" not in p["cmdline"]]
    assert strangers == [], f"it sees {len(strangers)} processes not its own: {strangers[:5]}"

    for pid in {orchestrator, tools_demo, *tools_demo_code}:
        got = await attack(mesh, "signal_process", pid=pid)
        assert got["probe"] in ("ESRCH", "EPERM"), f"signal 0 to {pid}: {got}"
        assert got["terminate"] in ("ESRCH", "EPERM"), f"SIGTERM to {pid}: {got}"
        traced = await attack(mesh, "ptrace_attach", pid=pid)
        assert traced["attach"] in ("ESRCH", "EPERM"), f"ptrace {pid}: {traced}"

    await asyncio.sleep(0.5)  # a SIGTERM that got through would be acted on by now
    assert mesh.proc.poll() is None, f"the orchestrator exited\n{mesh.log()}"
    assert "received SIGTERM" not in mesh.log()
    status = mesh.plugin("tools-demo")
    assert status.replicas[0].pid == tools_demo and status.restarts == 0
    await assert_mesh_serves(mesh)


async def test_plugins_of_two_meshes_never_share_a_host_uid(make_mesh: MakeMesh) -> None:
    """hostile in one mesh and hog in another mesh on the same host run as different uids.

    Sharing one would make them one user to the kernel: one RLIMIT_NPROC count
    (so one plugin's processes use up the other's limit and can keep it from
    starting its threads), and the same owner for every per-uid check.
    """
    first = make_mesh(plugin_dirs=[str(HOSTILE)]).start(ready=["hostile"])
    second = make_mesh(plugin_dirs=[str(HOG)]).start(ready=["hog"])
    hostile, hog = sidecar_host_uids(first, "hostile"), sidecar_host_uids(second, "hog")
    assert hostile and hog, "sidecar processes not found on the host"
    if os.getuid() == 0:
        assert hostile.isdisjoint(hog), f"hostile runs as {hostile}, the other mesh's hog as {hog}"
    else:  # without root every plugin is the orchestrator's uid, kept apart by user namespaces
        assert hostile == hog == {os.getuid()}
