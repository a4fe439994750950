"""sidemesh.core: the sidecar contract both sides import, and spawning without fork()."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import grpc
import pytest

from orchestrator._replica import Replica, ReplicaStartError
from sidemesh.core import (
    CONTRACT_VERSION,
    SIDECAR_ENVIRONMENT,
    SidecarEnv,
    contract_refusal,
    spawn,
)
from sidemesh.v1 import plugin_pb2, plugin_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


# -- the contract ---------------------------------------------------------------


def test_the_documented_environment_is_the_contracts() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc.split("## Sidecar environment", 1)[1].split("\n\n", 3)[2]
    documented = set(re.findall(r"^\| `(SIDEMESH_[A-Z_]+)`", table, re.M))
    assert documented == {str(v) for v in SidecarEnv}
    assert set(SIDECAR_ENVIRONMENT) == set(SidecarEnv)
    assert CONTRACT_VERSION in doc


def test_contract_versions() -> None:
    assert contract_refusal(CONTRACT_VERSION) == ""
    assert "set PluginInfo.contract_version to 'sidemesh.v1'" in contract_refusal("")
    assert "'sidemesh.v9', which this orchestrator does not support" in contract_refusal(
        "sidemesh.v9"
    )


class _OldSidecar(plugin_pb2_grpc.PluginServiceServicer):
    async def Describe(self, request: object, context: object) -> plugin_pb2.DescribeResponse:
        info = plugin_pb2.PluginInfo(name="old", version="1", contract_version="sidemesh.v0")
        return plugin_pb2.DescribeResponse(plugin=info)


async def test_an_incompatible_sidecar_is_refused_with_the_reason(tmp_path: Path) -> None:
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(_OldSidecar(), server)
    address = f"unix:{tmp_path}/old.sock"
    server.add_insecure_port(address)
    await server.start()
    try:
        with pytest.raises(ReplicaStartError, match=r"speaks contract 'sidemesh\.v0'"):
            await Replica("old", 0, 1 << 20).connect(address, {}, timeout=5)
    finally:
        await server.stop(0)


# -- spawn ----------------------------------------------------------------------


async def _run(argv: list[str], **kwargs: object) -> tuple[int, str, str]:
    child = spawn(argv, env={"PATH": os.environ["PATH"], "X": "1"}, **kwargs)  # type: ignore[arg-type]
    child.watch()
    assert child.stdout is not None and child.stderr is not None
    out = await asyncio.to_thread(os.read, child.stdout, 65536)
    err = await asyncio.to_thread(os.read, child.stderr, 65536)
    os.close(child.stdout)
    os.close(child.stderr)
    return await child.wait(), out.decode(), err.decode()


async def test_spawn_runs_with_exactly_its_environment_in_its_directory(tmp_path: Path) -> None:
    code, out, err = await _run(
        ["sh", "-c", 'echo "$PWD $X ${HOME-unset}"; echo oops >&2; exit 3'], cwd=tmp_path
    )
    assert (code, out, err) == (3, f"{tmp_path} 1 unset\n", "oops\n")


async def test_spawn_passes_only_the_descriptors_it_is_given(tmp_path: Path) -> None:
    passed = os.open(tmp_path, os.O_RDONLY)
    leaked = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # inheritable, but not passed: closed in the child
    try:
        code, _, _ = await _run(
            ["sh", "-c", f"test -e /proc/self/fd/{passed} && ! test -e /proc/self/fd/{leaked}"],
            pass_fds=(passed,),
        )
    finally:
        os.close(passed)
        os.close(leaked)
    assert code == 0


async def test_spawned_child_leads_its_session_with_default_signals() -> None:
    child = spawn(["sleep", "30"], env={"PATH": os.environ["PATH"]}, capture=False)
    child.watch()
    assert os.getsid(child.pid) == child.pid
    text = Path(f"/proc/{child.pid}/status").read_text()  # noqa: ASYNC240
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    ignored = int(status["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))  # Python ignores SIGPIPE; the child not
    child.send_signal_to_group(signal.SIGTERM)
    assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGTERM
    assert child.returncode == -signal.SIGTERM


def test_spawn_names_a_missing_program() -> None:
    with pytest.raises(FileNotFoundError, match="'no-such-program' is not on PATH"):
        spawn(["no-such-program"], env={"PATH": "/usr/bin"})
