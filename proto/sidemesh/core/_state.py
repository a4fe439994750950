"""Where a mesh keeps its state, and how its clients find a mesh running from there.

The orchestrator writes these files; the CLI and ``clients`` read them (as
Jupyter's clients find a running server from its runtime files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: ``{"pid": ..., "addresses": [...]}`` of the mesh running from a state dir.
ENDPOINTS_FILE = "endpoints.json"
#: The owner's bearer token of that mesh (mode 0600).
TOKEN_FILE = "token"
#: A client's bearer token, and the file holding one (read by clients and the CLI).
TOKEN_ENV = "SIDEMESH_TOKEN"
TOKEN_FILE_ENV = "SIDEMESH_TOKEN_FILE"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/sidemesh``, else ``~/.local/state/sidemesh``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "sidemesh"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_mesh(state_dir: Path) -> dict[str, Any] | None:
    """The endpoints a mesh running from ``state_dir`` wrote (pid, addresses), or None."""
    try:
        data = json.loads((state_dir / ENDPOINTS_FILE).read_text())
        pid = int(data["pid"])
        addresses = [a for a in data["addresses"] if isinstance(a, str)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"pid": pid, "addresses": addresses} if process_alive(pid) else None
