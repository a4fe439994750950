"""Names in the mesh: plugins, agents, tools, and qualified ``plugin/name`` targets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Annotated, Generic, TypeVar

from pydantic import StringConstraints

from sidemesh.core._errors import InvalidArgumentError, NotFoundError

V = TypeVar("V")

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


class TargetIndex(Generic[V]):
    """Resolves targets (``plugin/name``, or a short name unique in the index) to values.

    The one resolver of the mesh: the orchestrator's catalog and the SDK's test
    harness both use it, so a target means the same thing, and fails with the
    same errors, in both. ``kind`` (``tool``, ``agent``) names what it indexes.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        #: Values by ``plugin/name``, sorted.
        self.by_qualified: dict[str, V] = {}
        #: ``(plugin/name, value)`` pairs by short name.
        self.by_short: dict[str, list[tuple[str, V]]] = {}

    def rebuild(self, items: Iterable[tuple[str, str, V]]) -> None:
        """Replaces the index with ``(plugin, name, value)`` items."""
        named = sorted(((qualify(p, n), n, v) for p, n, v in items), key=lambda item: item[0])
        self.by_qualified = {qualified: value for qualified, _, value in named}
        self.by_short = {}
        for qualified, name, value in named:
            self.by_short.setdefault(name, []).append((qualified, value))

    def resolve(self, target: str) -> V:
        """The value ``target`` names; INVALID_ARGUMENT when it is malformed or ambiguous,
        NOT_FOUND (with suggestions) when nothing has that name."""
        plugin, name = split_target(target)
        if not target or (plugin and not is_plugin_name(plugin)) or not is_item_name(name):
            raise InvalidArgumentError(
                f"{target!r} is not a {self.kind} name: use plugin/{self.kind} or a unique "
                f"{self.kind} name (letters, digits, '_', '.', '-')",
                reason="MALFORMED_TARGET",
            )
        if plugin:
            if target in self.by_qualified:
                return self.by_qualified[target]
        else:
            matches = self.by_short.get(name, [])
            if len(matches) == 1:
                return matches[0][1]
            if len(matches) > 1:
                choices = ", ".join(qualified for qualified, _ in matches)
                raise InvalidArgumentError(
                    f"{self.kind} name {name!r} is ambiguous: use one of {choices}",
                    reason="AMBIGUOUS_TARGET",
                    metadata={"candidates": choices},
                )
        raise self.not_found(target)

    def not_found(self, target: str) -> NotFoundError:
        """NOT_FOUND for ``target``, with the closest names or the known ones."""
        names = list(self.by_qualified) + list(self.by_short)
        close = difflib.get_close_matches(target, names, n=3, cutoff=0.4)
        if close:
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
        elif names:
            hint = f"; known {self.kind}s: {', '.join(sorted(self.by_qualified)[:10])}"
        else:
            hint = f"; the mesh has no {self.kind}s yet"
        return NotFoundError(
            f"no {self.kind} named {target!r}{hint}",
            reason="TARGET_NOT_FOUND",
            metadata={"suggestions": ",".join(close)},
        )
