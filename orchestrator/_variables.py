"""``${…}`` in manifests and the operator's ``env``: paths that differ from host to host.

A manifest names what it needs without knowing where it is on this host::

    mcp:
      command: mcp-server-git
      args: [--repository, "${mount:repo}"]
      env: {MEMORY_FILE_PATH: "${SIDEMESH_DATA_DIR}/memory.jsonl"}

The variables (as VS Code's ``${env:NAME}`` and docker compose's ``${NAME}``):

- ``${SIDEMESH_DATA_DIR}``: the plugin's data dir;
- ``${SIDEMESH_PLUGIN_DIR}``: the plugin's directory;
- ``${SIDEMESH_PLUGIN}``: the plugin's name;
- ``${mount:NAME}``: where the operator's mount ``plugins.<plugin>.sandbox.mounts.NAME``
  is inside the sandbox.

Only the braced form is expanded (``$NAME`` stays as it is); ``$${`` is a literal
``${``. Anything else in braces is an error, found when the file is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator

from sidemesh.core import SidecarEnv

#: The plain variables (the mount ones are ``mount:NAME``).
BUILTIN = (SidecarEnv.DATA_DIR.value, SidecarEnv.PLUGIN_DIR.value, SidecarEnv.PLUGIN.value)
MOUNT_PREFIX = "mount:"
#: What a mount's name looks like (``plugins.<name>.sandbox.mounts`` keys).
MOUNT_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"

_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_MOUNT = re.compile(rf"{MOUNT_PREFIX}({MOUNT_NAME})")

KNOWN = (
    "${SIDEMESH_DATA_DIR}, ${SIDEMESH_PLUGIN_DIR}, ${SIDEMESH_PLUGIN} or ${mount:NAME} "
    "(write $${ for a literal ${)"
)


def references(text: str) -> list[str]:
    """The variables ``text`` uses, e.g. ``['SIDEMESH_DATA_DIR', 'mount:repo']``.

    Raises ``ValueError`` naming an unknown or unclosed one and the ones there are.
    """
    found = []
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token == "$${":
            continue
        if token == "${":
            raise ValueError(f"'${{' without its closing '}}' in {text!r}: use {KNOWN}")
        name = match.group(1)
        if name not in BUILTIN and not _MOUNT.fullmatch(name):
            raise ValueError(f"unknown variable ${{{name}}} in {text!r}: use {KNOWN}")
        found.append(name)
    return found


def mounts_named(text: str) -> list[str]:
    """The mount names ``text`` refers to (``${mount:NAME}``)."""
    return [n.removeprefix(MOUNT_PREFIX) for n in references(text) if n.startswith(MOUNT_PREFIX)]


def expand(text: str, values: Mapping[str, str]) -> str:
    """``text`` with its variables replaced by ``values``; raises ``KeyError`` (the name)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        return values[match.group(1)]

    references(text)  # raises ValueError on a malformed one
    return _TOKEN.sub(one, text)


def check(text: str) -> str:
    """A pydantic validator's body: ``text`` if every variable in it is known."""
    references(text)
    return text


#: A string field whose ``${…}`` are checked when the file is loaded (errors name the item).
Expandable = Annotated[str, AfterValidator(check)]
