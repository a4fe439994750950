"""The operator's mounts: host paths a plugin's sandbox shows it, under ``plugins.<name>.sandbox``.

A manifest cannot know where a repository is on this host; the operator says
so, by name, and the manifest refers to the name (``${mount:repo}``)::

    plugins:
      mcp-git:
        sandbox:
          mounts:
            repo: {source: ~/src/project, target: /mnt/repo, mode: ro}

Like docker compose's bind mounts (``source``, ``target``, ``read_only``), with
podman's ``:U`` as ``chown``. A source that does not exist is a config error,
never a mount silently skipped.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sidemesh.core import SANDBOX_RUN_DIR

#: Sandbox paths a mount may not be at or under: the sandbox's own system view.
RESERVED_TARGETS = (
    "/proc", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
    SANDBOX_RUN_DIR,
)  # fmt: skip


class Mount(BaseModel):
    """One host path the plugin sees, at ``target`` in its sandbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Path = Field(
        description="the host path (a directory or a file; ~ and paths relative to the "
        "config file's directory work), e.g. ~/src/project"
    )
    target: str | None = Field(
        None,
        description="where the plugin sees it, an absolute path, e.g. /mnt/repo "
        "(default: the source's own path)",
    )
    mode: Literal["ro", "rw"] = Field(
        "ro", description="ro (read-only, the default) or rw (the plugin may write)"
    )
    chown: bool = Field(
        False,
        description="for rw: make the source (and what it holds) the plugin's own host uid "
        "before it starts, as podman's :U does (as root; otherwise the plugin writes as the "
        "mesh's own uid)",
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        # `repo: ~/src/project` is `repo: {source: ~/src/project}`.
        return {"source": value} if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _existing_source(cls, source: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        path = Path(os.path.expanduser(source))
        if base is not None:
            path = Path(base, path)
        if not path.is_absolute():
            path = path.absolute()
        try:
            os.stat(path)
        except FileNotFoundError:
            raise ValueError(
                f"the host path {str(path)!r} does not exist: create it, or fix 'source' "
                "(an existing directory or file on this host)"
            ) from None
        except OSError as exc:
            raise ValueError(
                f"the host path {str(path)!r} cannot be reached by uid {os.getuid()}, which "
                f"runs the mesh ({exc.strerror}): let it in, or mount another path"
            ) from None
        return path.resolve()

    @field_validator("target")
    @classmethod
    def _sandbox_path(cls, target: str | None) -> str | None:
        if target is None:
            return None
        pure = PurePosixPath(target)
        if not pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"{target!r} is not an absolute path: write it as /mnt/NAME")
        normal = str(pure)
        if normal == "/":
            raise ValueError("a mount cannot replace the sandbox's root: use /mnt/NAME")
        for reserved in RESERVED_TARGETS:
            if normal == reserved or pure.is_relative_to(reserved):
                raise ValueError(
                    f"{target!r} is inside {reserved}, which the sandbox provides itself: "
                    "use another target, e.g. /mnt/NAME"
                )
        return normal

    @model_validator(mode="after")
    def _chown_rw(self) -> Mount:
        if self.chown and self.mode != "rw":
            raise ValueError("'chown: true' is for mode rw: a read-only mount is not written")
        return self

    @property
    def writable(self) -> bool:
        """The plugin may write it."""
        return self.mode == "rw"

    @property
    def sandbox_path(self) -> str:
        """Where the plugin sees it when its sandbox binds it."""
        return self.target or str(self.source)
