"""The git case: a fixed manifest plus the operator's mount, in a real sandboxed mesh.

``tests/plugins/mcp-git`` runs the reference ``mcp-server-git`` (PyPI) on
``${mount:repo}``: no path in the manifest. The operator mounts a repository
the test makes; git must read it although the plugin's uid owns none of it
(no "dubious ownership"), a read-only mount must stay read-only, and what the
plugin writes to a read-write mount must still be its own after a restart:
the same host uid every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshproc import TEST_PLUGINS, Mesh, plugins_verbose, stop_all
from unprivileged import NOBODY, user_python

from clients import AsyncMeshClient

pytestmark = pytest.mark.integration

GIT_PLUGIN = TEST_PLUGINS / "mcp-git"
#: Where the operator's mount puts the repository in the sandbox.
TARGET = "/mnt/repo"
ROOT = os.geteuid() == 0


def git(repo: Path, *args: str) -> str:
    # The test is not the owner of what the plugin wrote: it trusts the repository.
    argv = ["git", "-c", "safe.directory=*", "-C", str(repo), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Test Operator")
    git(path, "config", "user.email", "operator@example.com")
    (path / "README.md").write_text("# A repository the operator mounts\n")
    git(path, "add", "README.md")
    git(path, "commit", "-q", "-m", "the first commit")
    return path


def git_mesh(workdir: Path, repo: Path, mesh: dict[str, Any] | None = None, **mount: Any) -> Mesh:
    """A mesh of mcp-git on ``repo``; ``mesh``: more of Mesh's arguments (user, state_dir)."""
    return Mesh(
        workdir,
        **(mesh or {}),
        plugin_dirs=[str(GIT_PLUGIN)],
        plugins={"mcp-git": {"sandbox": {"mounts": {
            "repo": {"source": str(repo), "target": TARGET, **mount},
        }}}},
    )  # fmt: skip


@pytest.fixture
def meshes() -> Iterator[list[Mesh]]:
    started: list[Mesh] = []
    yield started
    stop_all(started)


async def call(mesh: Mesh, tool: str, **arguments: Any) -> tuple[bool, str]:
    async with AsyncMeshClient(mesh.address, timeout=30) as client:
        result = await client.call_tool(f"mcp-git/{tool}", {"repo_path": TARGET, **arguments})
    return result.is_error, result.text


async def test_the_git_server_reads_a_mounted_repository(
    tmp_path: Path, meshes: list[Mesh]
) -> None:
    repo = make_repo(tmp_path / "project")
    mesh = git_mesh(tmp_path / "mesh", repo)
    meshes.append(mesh)
    mesh.start(ready=["mcp-git"])
    failed, log = await call(mesh, "git_log")
    assert not failed, log
    assert "the first commit" in log and "dubious" not in log
    failed, status = await call(mesh, "git_status")
    assert not failed and "On branch main" in status, status
    # Read-only: the plugin cannot change the operator's repository.
    failed, text = await call(mesh, "git_create_branch", branch_name="from-the-plugin")
    assert failed and "from-the-plugin.lock' could not be obtained" in text, text
    assert "from-the-plugin" not in git(repo, "branch")
    # The server is confined to the mount (and the sandbox shows it nothing else).
    failed, text = await call(mesh, "git_status", repo_path=str(repo))
    assert failed and "outside the allowed repository '/mnt/repo'" in text, text
    shown = plugins_verbose(mesh)
    assert f"path mount repo: {repo} -> {TARGET} (ro)" in shown
    assert "read-only: mount repo" in shown
    if ROOT:
        uid = mesh.plugin("mcp-git").host_uid
        assert f"runs as host uid {uid} (the same every run)" in shown
        assert os.stat(repo).st_uid == 0  # a read-only mount is not given away


async def test_an_unconfigured_mount_fails_the_plugin_with_the_fix(
    tmp_path: Path, meshes: list[Mesh]
) -> None:
    mesh = Mesh(tmp_path / "mesh", plugin_dirs=[str(GIT_PLUGIN)])
    meshes.append(mesh)
    status = mesh.start().wait_state("mcp-git", "FAILED")
    assert "field 'mcp.args[3]': ${mount:repo} names a mount the operator has not configured" in (
        status.error
    )
    assert "plugins.mcp-git.sandbox.mounts.repo: {source: /path/on/host}" in status.error


async def test_writes_to_an_rw_mount_stay_the_plugins_across_a_restart(
    tmp_path: Path, meshes: list[Mesh]
) -> None:
    repo = make_repo(tmp_path / "project")
    (repo / "one.txt").write_text("written by the operator\n")
    first = git_mesh(tmp_path / "mesh", repo, mode="rw", chown=True)
    meshes.append(first)
    first.start(ready=["mcp-git"])
    uid = first.plugin("mcp-git").host_uid if ROOT else os.getuid()
    assert (await call(first, "git_add", files=["one.txt"]))[0] is False
    failed, text = await call(first, "git_commit", message="the plugin's first commit")
    assert not failed, text
    assert "path mount repo: " in plugins_verbose(first) and f"{TARGET} (rw)" in (
        plugins_verbose(first)
    )
    assert first.stop() == 0
    written = [p for p in (repo / ".git" / "objects").rglob("*") if p.is_file()]
    assert written and all(p.stat().st_uid == uid for p in written)

    # The same state dir, and no chown this time: only the same uid can write again.
    (repo / "two.txt").write_text("written between the runs\n")
    again = git_mesh(tmp_path / "mesh2", repo, {"state_dir": str(first.state_dir)}, mode="rw")
    meshes.append(again)
    again.start(ready=["mcp-git"])
    if ROOT:
        assert again.plugin("mcp-git").host_uid == uid
    assert (await call(again, "git_add", files=["two.txt"]))[0] is False
    failed, text = await call(again, "git_commit", message="the plugin's second commit")
    assert not failed, text
    history = git(repo, "log", "--format=%s")
    assert history.splitlines() == [
        "the plugin's second commit", "the plugin's first commit", "the first commit",
    ]  # fmt: skip


async def test_an_unprivileged_mesh_mounts_too_and_writes_as_its_own_uid(
    meshes: list[Mesh],
) -> None:
    """nobody's mesh: the plugin is uid 65534 in a user namespace, the mesh's uid on the host."""
    if not ROOT:
        pytest.skip("the tests run unprivileged already: the other tests are this case")
    base = Path(tempfile.mkdtemp(prefix="smm", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        python = user_python(NOBODY, base)
        repo = make_repo(base / "project")
        (repo / "one.txt").write_text("written by the operator\n")
        for path in [repo, *repo.rglob("*")]:  # the operator gives it to the mesh's user
            os.lchown(path, NOBODY, NOBODY)
        mesh = git_mesh(base / "mesh", repo, {"user": NOBODY, "python": python}, mode="rw")
        meshes.append(mesh)
        mesh.start(ready=["mcp-git"])
        assert not mesh.plugin("mcp-git").HasField("host_uid")
        failed, log = await call(mesh, "git_log")
        assert not failed and "the first commit" in log, log
        assert (await call(mesh, "git_add", files=["one.txt"]))[0] is False
        failed, text = await call(mesh, "git_commit", message="nobody's commit")
        assert not failed, text
        assert git(repo, "log", "-1", "--format=%s").strip() == "nobody's commit"
        written = [p for p in (repo / ".git" / "objects").rglob("*") if p.is_file()]
        assert {p.stat().st_uid for p in written} == {NOBODY}
    finally:
        for started in meshes:
            started.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_without_a_sandbox_a_mount_is_its_host_path(
    tmp_path: Path, meshes: list[Mesh]
) -> None:
    """``sandbox.mode: off`` moves nothing: ``${mount:repo}`` is the repository's own path."""
    repo = make_repo(tmp_path / "project")
    mesh = git_mesh(tmp_path / "mesh", repo, {"sandbox": {"mode": "off"}})
    meshes.append(mesh)
    mesh.start(ready=["mcp-git"])
    async with AsyncMeshClient(mesh.address, timeout=30) as client:
        log = await client.call_tool("mcp-git/git_log", repo_path=str(repo))
        moved = await client.call_tool("mcp-git/git_log", repo_path=TARGET)
    assert not log.is_error and "the first commit" in log.text, log.text
    assert moved.is_error and "outside the allowed repository" in moved.text
    shown = plugins_verbose(mesh)
    assert f"path mount repo: {repo} (ro): not enforced: the plugin has no sandbox" in shown
