"""Operator mounts and ``${…}`` variables: what they expand to, and errors people can act on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator import ConfigError, load_config, load_manifest, sandbox
from orchestrator._host_paths import unknown_mounts
from orchestrator._launch import sidecar_environment
from orchestrator._variables import expand, references

ROOT = Path(__file__).resolve().parents[2]
GIT_PLUGIN = ROOT / "tests" / "plugins" / "mcp-git"
MEMORY_PLUGIN = ROOT / "examples" / "plugins" / "mcp-memory"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidemesh.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\nruntime_dir: {tmp_path / 'run'}\n{text}")
    return path


def _manifest(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "plugin"
    directory.mkdir(exist_ok=True)
    (directory / "plugin.yaml").write_text(
        "name: p\nversion: 1.0.0\nruntime: mcp\nprovides: {mcp: true}\n" + text
    )
    return directory


def _environment(manifest_dir: Path, config: Path, mounts: dict[str, str]) -> dict[str, str]:
    manifest = load_manifest(manifest_dir)
    return sidecar_environment(
        manifest, load_config(config).override(manifest.name), listen="unix:/x",
        mesh_address="unix:/y", replica=0, data_dir=Path("/data/p"), mesh_dir=Path("/m"),
        log_level="INFO", startup_timeout=30, telemetry_env={}, mounts=mounts,
    )  # fmt: skip


def test_variables_expand_and_dollar_dollar_is_a_literal() -> None:
    values = {"SIDEMESH_DATA_DIR": "/d", "mount:repo": "/mnt/repo"}
    assert expand("${SIDEMESH_DATA_DIR}/memory.jsonl", values) == "/d/memory.jsonl"
    assert expand("--repository=${mount:repo}", values) == "--repository=/mnt/repo"
    assert expand("$${SIDEMESH_DATA_DIR} costs $5 in $HOME", values) == (
        "${SIDEMESH_DATA_DIR} costs $5 in $HOME"
    )
    assert references("${mount:repo} ${SIDEMESH_PLUGIN}") == ["mount:repo", "SIDEMESH_PLUGIN"]


def test_an_unknown_variable_names_the_manifest_file_and_field(tmp_path: Path) -> None:
    directory = _manifest(tmp_path, "mcp: {command: srv, args: [--db, '${DATA_DIR}/x']}\n")
    with pytest.raises(ConfigError) as info:
        load_manifest(directory)
    text = str(info.value)
    assert text.startswith(f"{directory / 'plugin.yaml'} is not a valid plugin manifest:")
    assert "field 'mcp.args[1]': unknown variable ${DATA_DIR}" in text
    assert "${SIDEMESH_DATA_DIR}, ${SIDEMESH_PLUGIN_DIR}, ${SIDEMESH_PLUGIN} or ${mount:NAME}" in (
        text
    )


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("mcp: {command: srv, env: {DB: '${HOME}/db'}}", "mcp.env.DB"),
        ("mcp: {command: srv, args: ['${mount:repo']}", "mcp.args[0]"),
        ("mcp: {command: '${SIDEMESH_PLUGIN_DIR/srv'}", "mcp.command"),
    ],
)
def test_every_expanded_manifest_field_is_checked(tmp_path: Path, section: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_manifest(_manifest(tmp_path, section + "\n"))
    assert f"field '{field}'" in str(info.value)


def test_the_entrypoint_is_checked_too(tmp_path: Path) -> None:
    directory = tmp_path / "plugin"
    directory.mkdir()
    (directory / "plugin.yaml").write_text(
        "name: p\nversion: 1.0.0\nentrypoint: [./serve, '${SIDEMESH_DATADIR}']\n"
    )
    with pytest.raises(ConfigError, match=r"field 'entrypoint\[1\]': unknown variable"):
        load_manifest(directory)


def test_a_missing_mount_source_is_a_config_error_with_the_fix(tmp_path: Path) -> None:
    path = _config(tmp_path, "plugins:\n  mcp-git:\n    sandbox:\n      mounts:\n"
                   "        repo: {source: ./no-such-repo}\n")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a valid Sidemesh config:")
    assert "field 'plugins.mcp-git.sandbox.mounts.repo.source'" in text
    assert f"the host path '{tmp_path / 'no-such-repo'}' does not exist: create it" in text


def test_mounts_are_relative_to_the_config_and_default_to_their_own_path(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "out").mkdir()
    out = "{source: out, target: /mnt/out/, mode: rw, chown: true}"
    path = _config(
        tmp_path,
        f"plugins:\n  p:\n    sandbox:\n      mounts:\n        repo: repo\n        out: {out}\n",
    )
    mounts = load_config(path).override("p").sandbox.mounts
    assert mounts["repo"].source == tmp_path / "repo" and not mounts["repo"].writable
    assert mounts["repo"].sandbox_path == str(tmp_path / "repo")
    assert mounts["out"].sandbox_path == "/mnt/out" and mounts["out"].writable


@pytest.mark.parametrize(
    ("mount", "error"),
    [
        ("{source: SRC, target: /etc/repo}", "is inside /etc, which the sandbox provides itself"),
        ("{source: SRC, target: mnt/repo}", "is not an absolute path"),
        ("{source: SRC, target: /}", "cannot replace the sandbox's root"),
        ("{source: SRC, chown: true}", "'chown: true' is for mode rw"),
        ("{source: SRC, mode: wr}", "Input should be 'ro' or 'rw'"),
        ("{source: SRC, reed_only: true}", "unknown field"),
    ],
)
def test_bad_mounts_say_what_to_do(tmp_path: Path, mount: str, error: str) -> None:
    (tmp_path / "repo").mkdir()
    mount = mount.replace("SRC", str(tmp_path / "repo"))
    path = _config(
        tmp_path, f"plugins:\n  p:\n    sandbox:\n      mounts:\n        repo: {mount}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "plugins.p.sandbox.mounts.repo" in str(info.value)
    assert error in str(info.value)


def test_two_mounts_at_one_target_and_bad_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = "a: {source: a, target: /mnt/x}\n        b: {source: b, target: /mnt/x}\n"
    path = _config(tmp_path, f"plugins:\n  p:\n    sandbox:\n      mounts:\n        {same}")
    with pytest.raises(ConfigError, match="mounts 'a' and 'b' are both at /mnt/x"):
        load_config(path)
    path = _config(tmp_path, "plugins:\n  p:\n    sandbox:\n      mounts:\n        Repo: a\n")
    with pytest.raises(ConfigError, match="'Repo' is not a mount name"):
        load_config(path)


def test_a_mount_may_not_expose_the_meshs_own_state(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    path = _config(
        tmp_path, f"plugins:\n  p:\n    sandbox:\n      mounts:\n        all: {tmp_path}\n"
    )
    with pytest.raises(ConfigError, match=r"holds or is inside the mesh's own .*state"):
        load_config(path)


def test_the_operators_env_may_use_variables_of_its_own_mounts_only(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    path = _config(tmp_path, "plugins:\n  p:\n    env: {GIT_DIR: '${mount:rpo}/.git'}\n"
                   "    sandbox:\n      mounts: {repo: repo}\n")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "env.GIT_DIR uses ${mount:rpo}, which is not one of this plugin's mounts (repo)" in (
        str(info.value)
    )
    path = _config(tmp_path, "plugins:\n  p:\n    env: {DB: '${DATA}/db'}\n")
    with pytest.raises(ConfigError, match=r"field 'plugins.p.env.DB': unknown variable \$\{DATA\}"):
        load_config(path)


def test_a_manifest_naming_an_unconfigured_mount_says_what_to_add(tmp_path: Path) -> None:
    manifest = load_manifest(GIT_PLUGIN)
    text = unknown_mounts(manifest, load_config(_config(tmp_path, "")).override("mcp-git"))
    assert text.startswith(f"{GIT_PLUGIN / 'plugin.yaml'} is not a valid plugin manifest:")
    assert "field 'mcp.args[3]': ${mount:repo} names a mount the operator has not configured" in (
        text
    )
    assert "fix: add it to the Sidemesh config: plugins.mcp-git.sandbox.mounts.repo:" in text


def test_the_git_manifest_expands_to_the_mount_and_makes_it_a_safe_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "repo").mkdir()
    config = _config(tmp_path, "plugins:\n  mcp-git:\n    sandbox:\n      mounts:\n"
                     "        repo: {source: repo, target: /mnt/repo}\n")  # fmt: skip
    env = _environment(GIT_PLUGIN, config, {"repo": "/mnt/repo"})
    spec = json.loads(env["SIDEMESH_MCP_SERVER"])
    assert spec["command"] == "python"
    assert spec["args"] == ["-m", "mcp_server_git", "--repository", "/mnt/repo"]
    assert (env["GIT_CONFIG_COUNT"], env["GIT_CONFIG_KEY_0"], env["GIT_CONFIG_VALUE_0"]) == (
        "1", "safe.directory", "/mnt/repo",
    )  # fmt: skip


def test_memory_needs_no_shell_and_the_operators_env_expands(tmp_path: Path) -> None:
    manifest = load_manifest(MEMORY_PLUGIN)
    assert manifest.mcp is not None and manifest.mcp.command == "node"
    env = _environment(MEMORY_PLUGIN, _config(tmp_path, ""), {})
    spec = json.loads(env["SIDEMESH_MCP_SERVER"])
    assert spec["env"] == {"MEMORY_FILE_PATH": "/data/p/memory.jsonl"}
    assert "GIT_CONFIG_COUNT" not in env
    directory = _manifest(tmp_path, "mcp: {command: srv}\nsandbox: {env: [DB, NAME]}\n")
    config = _config(tmp_path, "plugins:\n  p:\n    env: {DB: '${SIDEMESH_DATA_DIR}/db', "
                     "NAME: '$${literal}'}\n")  # fmt: skip
    env = _environment(directory, config, {})
    assert env["DB"] == "/data/p/db" and env["NAME"] == "${literal}"


def _prepare(tmp_path: Path, request: sandbox.SandboxRequest) -> sandbox.PreparedSidecar:
    for d in ("plugin", "data", "run/r0"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "mesh.sock").touch()
    host = sandbox.HostSupport(
        root=True, bwrap="/usr/bin/bwrap", bwrap_why="", seccomp_why="", landlock_abi=6,
        landlock_why="", cgroup_why="off in unit tests",
    )  # fmt: skip
    return sandbox.prepare(
        sandbox.policy(request, host, 61000), host, ["srv"], replica=0,
        replica_dir=tmp_path / "run" / "r0", mesh_socket=tmp_path / "run" / "mesh.sock",
        runtime_paths=[Path(sys.prefix)],
    )  # fmt: skip


def _request(tmp_path: Path, **fields: object) -> sandbox.SandboxRequest:
    limits = sandbox.ResourceLimits(
        memory_mb=128, cpu_seconds=5, max_processes=32, max_open_files=64, max_file_size_mb=2
    )
    return sandbox.SandboxRequest(
        plugin="p",
        plugin_dir=tmp_path / "plugin",
        data_dir=tmp_path / "data",
        limits=limits,
        **fields,  # type: ignore[arg-type]
    )


def test_mounts_are_bound_at_their_targets_and_allowed_by_landlock(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "out").mkdir()
    mounts = (
        sandbox.Bind("repo", tmp_path / "repo", "/mnt/repo"),
        sandbox.Bind("out", tmp_path / "out", "/mnt/out", writable=True),
    )
    prepared = _prepare(tmp_path, _request(tmp_path, mounts=mounts))
    try:
        argv = prepared.argv
        ro = argv.index("/mnt/repo")
        assert argv[ro - 2] == "--ro-bind-fd" and int(argv[ro - 1]) in prepared.pass_fds
        rw = argv.index("/mnt/out")
        assert argv[rw - 2] == "--bind-fd"
        at = argv.index("/mnt")  # its parent, made traversable for the plugin's uid
        assert argv[at - 3 : at] == ["--perms", "0755", "--dir"]
        landlock = argv[argv.index(str(sandbox._command._LANDLOCK_EXEC)) :]
        assert landlock[landlock.index("/mnt/repo") - 1] == "--ro"
        assert landlock[landlock.index("/mnt/out") - 1] == "--rw"
        # Bound before the sandbox's own paths, which go over them.
        assert rw < argv.index(str(tmp_path / "plugin"))
        layers = {x.name: x.detail for x in prepared.policy.layers}
        assert "writable: /tmp (private), its data dir, mount out" in layers["filesystem"]
        assert "read-only: mount repo" in layers["filesystem"]
    finally:
        prepared.release()


def test_a_missing_manifest_path_is_reported_not_silently_skipped(tmp_path: Path) -> None:
    request = _request(
        tmp_path, read_paths=(str(tmp_path / "gone"), sys.prefix), paths_granted=True
    )
    prepared = _prepare(tmp_path, request)
    try:
        assert prepared.policy.missing_paths() == [str(tmp_path / "gone")]
        layers = {x.name: x.detail for x in prepared.policy.layers}
        assert f"MISSING on this host, not bound: {tmp_path / 'gone'}" in layers["filesystem"]
        assert str(tmp_path / "gone") not in prepared.argv
    finally:
        prepared.release()


def test_validate_names_the_mount_a_manifest_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    path = _config(tmp_path, f"plugin_dirs: [{GIT_PLUGIN}]\nentry_points: false\n")
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert "field 'plugins.mcp-git.sandbox.mounts'" in err
    assert "plugins.mcp-git.sandbox.mounts.repo: {source: /path/on/host}" in err
    (tmp_path / "repo").mkdir()
    path.write_text(path.read_text() + "plugins: {mcp-git: {sandbox: {mounts: {repo: repo}}}}\n")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
