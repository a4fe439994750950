"""Running the mesh as an unprivileged user from tests that run as root.

The user needs an interpreter it can run and read, with this venv's packages.
The venv's own interpreter usually does (a venv in a home directory others
may enter); when it does not (a root-only Python install, say), an
interpreter of the same version from the system gets a venv of its own whose
site-packages are hard links to this venv's (same filesystem; a copy otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

#: The unprivileged user the mesh runs as: ``nobody``.
NOBODY = 65534


def as_user(uid: int, *argv: str) -> list[str]:
    """``argv`` run as ``uid``, with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def can_use(uid: int, python: str) -> bool:
    """Whether ``uid`` can run ``python`` and import the mesh with it."""
    check = "import grpc, orchestrator, sys; sys.exit(0)"
    done = subprocess.run(
        as_user(uid, python, "-c", check), capture_output=True, timeout=60, cwd="/"
    )
    if done.returncode != 0:
        return False
    # Its interpreter's real home must be readable too: the sandbox binds it for sidecars.
    real = os.path.realpath(python)
    return subprocess.run(as_user(uid, "test", "-r", real), timeout=10).returncode == 0


def user_python(uid: int, workdir: Path) -> str | None:
    """An interpreter with this venv's packages that ``uid`` can use; None if there is none."""
    if can_use(uid, sys.executable):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = shutil.which(version, path="/usr/bin:/usr/local/bin:/bin")
    if base is None:
        return None
    venv = workdir / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = venv / "lib" / version / "site-packages"
    shutil.rmtree(target)
    source = sysconfig.get_paths()["purelib"]
    linked = subprocess.run(["cp", "-al", source, str(target)], capture_output=True, timeout=300)
    if linked.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True)
    workdir.chmod(0o755)
    python = str(venv / "bin" / "python")
    return python if can_use(uid, python) else None
