"""``make run``: start a real mesh with the bundled plugins, drive it with the CLI, stop it.

The session runs the same ``sidemesh`` commands a newcomer can type, against an
orchestrator process with a sidecar process per plugin, then shuts the mesh
down with SIGTERM and checks that no process is left behind.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator._config import BUNDLED_PLUGINS_DIR

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".sidemesh" / "demo"

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")

#: (what it shows, the sidemesh command, the exit code it must end with)
SESSION: list[tuple[str, list[str], int]] = [
    ("What the mesh runs: one sidecar process per plugin replica", ["plugins"], 0),
    ("What it offers", ["tools"], 0),
    ("An agent streams its answer token by token, calling a tool through the mesh",
     ["invoke", "assistant", "What is 2 + 3?"], 0),
    ("A tool call with progress events (on stderr) and a typed result",
     ["call", "tools-demo/slow_count", "n=4", "delay=0.15"], 0),
    ("Structured results", ["call", "tools-demo/word_count", "text=the quick brown fox"], 0),
    ("A tool of a third-party MCP server (mcp-server-time), bridged by its manifest alone",
     ["call", "mcp-time/get_current_time", "timezone=Europe/Paris"], 0),
    ("A tool failing at its task is a result, not an error (exit code 3)",
     ["call", "tools-demo/divide", "a=1", "b=0"], 3),
    ("A wrong name is NOT_FOUND, naming the closest (exit code 1)",
     ["call", "tools-demo/ad", "a=1", "b=2"], 1),
]  # fmt: skip


def _tcp_address() -> str:
    """127.0.0.1:50051 when free, else a free port (another mesh may hold 50051)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 50051))
            return "127.0.0.1:50051"
        except OSError:
            return "127.0.0.1:0"


def _banner(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def main() -> int:
    """Runs the demo; exit code 0 when the session and the shutdown went as expected."""
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    runtime = Path(tempfile.mkdtemp(prefix="sidemesh-demo-"))
    socket_path = runtime / "mesh.sock"
    config = STATE / "sidemesh.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": [f"unix:{socket_path}", _tcp_address()],
                "plugin_dirs": [str(BUNDLED_PLUGINS_DIR)],
                "state_dir": str(STATE / "state"),
                "runtime_dir": str(runtime),
            },
            indent=2,
        )
    )
    sidemesh = [sys.executable, "-m", "orchestrator.cli"]
    _banner(f"Starting the mesh: sidemesh serve -c {config.relative_to(ROOT)}")
    orchestrator = subprocess.Popen(
        [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--",
         *sidemesh, "serve", "-c", str(config)],
    )  # fmt: skip
    env = {**os.environ, "SIDEMESH_ADDRESS": f"unix:{socket_path}"}
    failures = 0
    try:
        if not _wait_ready(sidemesh, env, orchestrator):
            return 1
        address = env["SIDEMESH_ADDRESS"]
        print(f"{DIM}(the commands below reach it through SIDEMESH_ADDRESS={address}){RESET}")
        for title, command, expected in SESSION:
            _banner(title)
            print(f"$ sidemesh {shlex.join(command)}", flush=True)
            code = subprocess.run([*sidemesh, *command], env=env, timeout=60).returncode
            if code != expected:
                print(f"!! exit code {code}, expected {expected}", file=sys.stderr)
                failures += 1
        failures += _show_agent_trace(sidemesh, env)
    finally:
        _banner("Stopping the mesh with SIGTERM")
        orchestrator.send_signal(signal.SIGTERM)
        code = orchestrator.wait(30)
        time.sleep(0.2)
        left = _processes_mentioning(str(runtime))
        print(f"orchestrator exit code {code}; processes left behind: {len(left)}")
        shutil.rmtree(runtime, ignore_errors=True)
    return 0 if failures == 0 and code == 0 and not left else 1


def _show_agent_trace(sidemesh: list[str], env: dict[str, str]) -> int:
    """Prints the trace of the session's agent call; returns 1 if it is missing or partial."""
    _banner("The agent call's trace: every process it crossed, from the mesh's trace store")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run([*sidemesh, "traces", "-o", "json", "-n", "50"], env=env,
                             capture_output=True, text=True)  # fmt: skip
        traces = json.loads(out.stdout) if out.returncode == 0 else []
        agent = [t for t in traces if t.get("root_name", "").startswith("sidemesh invoke")]
        if agent and len(agent[0].get("services", [])) >= 4:
            print(f"$ sidemesh trace {agent[0]['trace_id']}", flush=True)
            subprocess.run([*sidemesh, "trace", agent[0]["trace_id"]], env=env, timeout=30)
            return 0
        time.sleep(0.3)
    print("!! the agent call's trace did not reach 4 processes", file=sys.stderr)
    return 1


def _wait_ready(sidemesh: list[str], env: dict[str, str], proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"the orchestrator exited with code {proc.returncode}", file=sys.stderr)
            return False
        out = subprocess.run([*sidemesh, "plugins", "-o", "json"], env=env,
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode == 0:
            states = {p["name"]: p.get("state") for p in json.loads(out.stdout)}
            if states and all(s == "PLUGIN_STATE_READY" for s in states.values()):
                return True
        time.sleep(0.3)
    print("the plugins did not become ready within 60s", file=sys.stderr)
    return False


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


if __name__ == "__main__":
    sys.exit(main())
