"""Running the mesh as an unprivileged user from tests that run as root.

The user needs an interpreter it can run and read, with this venv's packages.
The venv's own interpreter usually does (a venv in a home directory others
may enter); when it does not (a root-only Python install, say), an
interpreter of the same version from the system gets a venv shim whose
site-packages are this venv's (``meshproc.unprivileged_python``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshproc import unprivileged_python

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


def user_python(uid: int, workdir: Path) -> str:
    """An interpreter with this venv's packages that ``uid`` can use.

    Fails (rather than skipping) when there is none: a test skipped on CI checks
    nothing, and the Makefile installs what the shim needs.
    """
    if can_use(uid, sys.executable):
        return sys.executable
    python = str(unprivileged_python())  # raises, saying what is missing
    assert can_use(uid, python), f"uid {uid} cannot run {python} with this venv's packages"
    return python
