"""Names in the mesh: plugins, agents, tools, and qualified ``plugin/name`` targets."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

PLUGIN_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ITEM_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"

_PLUGIN_NAME = re.compile(PLUGIN_NAME_PATTERN)
_ITEM_NAME = re.compile(ITEM_NAME_PATTERN)

#: A plugin name as pydantic validates it.
PluginName = Annotated[str, StringConstraints(pattern=PLUGIN_NAME_PATTERN)]
#: An agent or tool name as pydantic validates it.
ItemName = Annotated[str, StringConstraints(pattern=ITEM_NAME_PATTERN)]


def is_plugin_name(name: str) -> bool:
    """True for ``[a-z][a-z0-9-]{0,62}``."""
    return _PLUGIN_NAME.match(name) is not None


def is_item_name(name: str) -> bool:
    """True for an agent or tool name, ``[A-Za-z0-9_.-]{1,128}``."""
    return _ITEM_NAME.match(name) is not None


def qualify(plugin: str, name: str) -> str:
    """``plugin/name``."""
    return f"{plugin}/{name}"


def split_target(target: str) -> tuple[str, str]:
    """Splits ``plugin/name`` into its parts; a short name gives ``("", name)``."""
    plugin, _, name = target.rpartition("/")
    return plugin, name
