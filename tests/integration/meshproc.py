"""A real orchestrator process for integration tests, and a watch for orphaned sidecars."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import yaml

from sidemesh.v1 import mesh_pb2, mesh_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
TEST_PLUGINS = ROOT / "tests" / "plugins"
EXAMPLE_PLUGINS = ROOT / "examples" / "plugins"
#: The two example plugins most tests need (without the MCP ones, which start node).
DEMO_PLUGINS = [str(EXAMPLE_PLUGINS / "tools-demo"), str(EXAMPLE_PLUGINS / "assistant")]

#: Supervisor settings that make failures show up within seconds.
FAST_SUPERVISOR: dict[str, Any] = {
    "health_interval": 0.5,
    "health_timeout": 0.5,
    "health_failures": 2,
    "backoff_initial": 0.2,
    "backoff_max": 1.0,
    "crash_loop_after": 3,
    "min_uptime": 3.0,
    "shutdown_grace": 5.0,
}


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment or command line mentions ``marker``."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in blob and state != "Z":
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a sandboxed sidecar runs below bwrap)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return tree


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> Any:
    """Polls ``predicate`` until it returns something truthy; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


class Mesh:
    """``sidemesh serve`` in a subprocess with its own config, state and sockets."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str] | None = None,
        *,
        user: int | None = None,
        python: str | None = None,
        **config: Any,
    ) -> None:
        """``config`` becomes top-level keys of its sidemesh.yaml; ``env`` is added to the
        orchestrator process's environment. With ``user`` (a uid, when the tests run as
        root) the orchestrator runs as that unprivileged user, with ``python`` (default:
        :func:`unprivileged_python`); a workdir the user cannot enter is replaced by a
        directory of its own."""
        self.user = user
        self.python = python or (sys.executable if user is None else str(unprivileged_python()))
        self._own_workdir = False
        if user is not None and not _enterable(workdir):
            workdir = Path(tempfile.mkdtemp(prefix="smu", dir="/tmp"))
            self._own_workdir = True
        if user is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            os.chown(workdir, user, user)
        self.workdir = workdir
        self.env = dict(env or {})
        # Unix socket paths must stay short: keep the runtime dir directly under /tmp.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smt", dir="/tmp"))
        if user is not None:
            os.chown(self.runtime_dir, user, user)
        self.state_dir = workdir / "state"
        self.socket = self.runtime_dir / "mesh.sock"
        self.address = f"unix:{self.socket}"
        self.log_path = workdir / "orchestrator.log"
        self.config: dict[str, Any] = {
            "listen": [self.address, "127.0.0.1:0"],
            "plugin_dirs": DEMO_PLUGINS,
            "entry_points": False,
            "state_dir": str(self.state_dir),
            "runtime_dir": str(self.runtime_dir),
            "supervisor": dict(FAST_SUPERVISOR),
        }
        if user is not None and "auth" not in config and "policy" not in config:
            # The tests (root) are not the mesh's owner: let them in as a client like any other.
            self.config["auth"] = {"unix": {"allowed_uids": [user, 0]}}
            self.config["policy"] = {"rules": [{
                "principals": ["group:owner", "unix:uid:0"],
                "allow": {"tools": ["*"], "agents": ["*"], "mcp": ["*"], "mesh": ["read", "admin"]},
            }]}  # fmt: skip
        self.config.update(config)
        self.state_dir = Path(self.config["state_dir"])  # another mesh's, to restart it
        self.config_path = workdir / "sidemesh.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self, ready: Iterable[str] = ()) -> Mesh:
        """Starts the orchestrator; waits for its endpoints and for ``ready`` plugins."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = self.log_path.open("wb")
        setpriv = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL"]
        env = {**os.environ, **self.env}
        if self.user is not None:
            setpriv += [f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups"]
            env.update(HOME=str(self.workdir), XDG_STATE_HOME=str(self.workdir))
        self.proc = subprocess.Popen(
            [*setpriv, "--", self.python, "-m", "orchestrator.cli", "serve", "-c",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=ROOT,
        )  # fmt: skip
        log.close()
        wait_until(self._endpoints, 20, lambda: f"the orchestrator to listen\n{self.log()}")
        for name in ready:
            self.wait_state(name, "READY")
        return self

    def _endpoints(self) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the orchestrator exited with {self.proc.returncode}\n{self.log()}"
            )
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "endpoints.json").read_text())
        except (OSError, ValueError):
            return None
        # Not those of an earlier mesh on the same state dir that was killed.
        return data if data.get("pid") == self.proc.pid else None

    @property
    def tcp_address(self) -> str:
        """The orchestrator's TCP address (its port was chosen by the kernel)."""
        endpoints = self._endpoints()
        assert endpoints is not None
        return next(a for a in endpoints["addresses"] if not a.startswith("unix:"))

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        """Signals the orchestrator and waits for it to exit; returns its exit code."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError(f"the orchestrator ignored {sig.name}\n{self.log()}") from None
        return code

    def cleanup(self) -> None:
        """Kills whatever is left (a failed test) and removes the runtime dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in processes_with(str(self.runtime_dir)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def sidecars(self) -> list[int]:
        """Pids of live processes started for this mesh (they carry its runtime dir)."""
        return processes_with(str(self.runtime_dir))

    def log(self) -> str:
        """The orchestrator's output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- state ---------------------------------------------------------------

    def _mesh(self) -> mesh_pb2_grpc.MeshServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return mesh_pb2_grpc.MeshServiceStub(self._channel)

    def plugin(self, name: str) -> mesh_pb2.PluginStatus:
        """The plugin's status, fresh from MeshService.GetPlugin."""
        reply = self._mesh().GetPlugin(mesh_pb2.GetPluginRequest(name=name), timeout=5)
        return reply.plugin

    def state(self, name: str) -> str:
        """The plugin's state name, e.g. ``READY``."""
        return _state_name(self.plugin(name).state)

    def wait_state(self, name: str, *states: str, timeout: float = 30) -> mesh_pb2.PluginStatus:
        """Waits for the plugin to reach one of ``states``; returns its status."""

        def reached() -> mesh_pb2.PluginStatus | None:
            status = self.plugin(name)
            return status if _state_name(status.state) in states else None

        return wait_until(
            reached,
            timeout,
            lambda: (
                f"plugin {name} to be {'/'.join(states)} (it is {self.state(name)})\n" + self.log()
            ),
        )


def _enterable(path: Path) -> bool:
    """Whether any user may pass through every directory above ``path``."""
    for parent in path.resolve().parents:
        try:
            if not parent.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def unprivileged_python() -> Path:
    """A Python any user can run, with this venv's packages: for meshes run unprivileged.

    The venv's interpreter may live where only root can read (a pyenv build in
    /root): then an unprivileged orchestrator could not hand it to its sidecars.
    This makes, once, a venv shim around a system interpreter of the same
    version whose site-packages are this venv's.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    site = Path(sys.prefix) / "lib" / version / "site-packages"
    # One shim per venv: a shim left by another checkout's venv (its packages, its
    # source tree) would run that checkout's code in the sidecars, not this one's.
    venv = hashlib.sha256(str(site.resolve()).encode()).hexdigest()[:12]
    shim = Path(tempfile.gettempdir()) / f"sidemesh-venv-{os.getuid()}-{version}-{venv}"
    python = shim / "bin" / "python"
    if python.exists() and (shim / "lib" / version / "site-packages").resolve() == site.resolve():
        return python
    if not system.exists():
        raise AssertionError(f"{system} is missing: an unprivileged mesh needs a system {version}")
    shutil.rmtree(shim, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="sidemesh-venv-", dir=tempfile.gettempdir()))
    (tmp / "bin").mkdir()
    (tmp / "lib" / version).mkdir(parents=True)
    (tmp / "lib" / version / "site-packages").symlink_to(site)
    (tmp / "bin" / "python").symlink_to(system)
    (tmp / "pyvenv.cfg").write_text(
        f"home = {system.parent}\ninclude-system-site-packages = false\nversion = "
        f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}\n"
    )
    for path in (tmp, tmp / "bin", tmp / "lib", tmp / "lib" / version):
        path.chmod(0o755)
    try:
        tmp.rename(shim)
    except OSError:  # another test made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def _state_name(state: int) -> str:
    return mesh_pb2.PluginState.Name(state).removeprefix("PLUGIN_STATE_")  # type: ignore[arg-type]


def stop_all(meshes: Iterable[Mesh]) -> None:
    """Stops each mesh and cleans up after it; fails when one left processes behind."""
    for mesh in meshes:
        try:
            mesh.stop()
            leftovers = mesh.sidecars()
        finally:
            mesh.cleanup()
        assert leftovers == [], f"processes outlived the mesh: {leftovers}\n{mesh.log()}"


def plugins_verbose(mesh: Mesh) -> str:
    """``sidemesh plugins -v``, as the operator runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plugins", "-a", mesh.address, "-v"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout
