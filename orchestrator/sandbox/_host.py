"""What this machine offers for sandboxing, found once and cached."""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from orchestrator.sandbox._image import image_support

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_LANDLOCK_CREATE_RULESET_VERSION = 1


@dataclass(frozen=True)
class HostSupport:
    """Which sandbox layers this host can provide; ``*_why`` says why one cannot."""

    root: bool
    bwrap: str | None
    bwrap_why: str
    seccomp_why: str
    landlock_abi: int
    landlock_why: str
    cgroup_why: str
    #: Why data dirs cannot be ext4 images of their quota here (then they are accounted).
    data_image_why: str = "not probed"

    @property
    def seccomp(self) -> bool:
        """libseccomp is loadable, so a filter can be compiled."""
        return not self.seccomp_why

    @property
    def cgroups(self) -> bool:
        """Memory and pids cgroups can be created for sidecars."""
        return not self.cgroup_why


@functools.cache
def probe(bwrap: str = "bwrap") -> HostSupport:
    """Checks bubblewrap, seccomp, Landlock and cgroups on this machine (once per process)."""
    return HostSupport(
        root=os.geteuid() == 0,
        bwrap=_bwrap(bwrap),
        bwrap_why=_bwrap_why(bwrap),
        seccomp_why=_seccomp_why(),
        landlock_abi=_landlock_abi(),
        landlock_why="" if _landlock_abi() > 0 else "the kernel does not provide Landlock",
        cgroup_why=_cgroup_why(),
        data_image_why=image_support(),
    )


def _bwrap(command: str) -> str | None:
    return shutil.which(command)


def _bwrap_why(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        return f"bubblewrap ({command}) is not installed: install the 'bubblewrap' package"
    try:
        # User namespaces are what bwrap needs when it does not run as root.
        subprocess.run(
            [path, "--unshare-user", "--ro-bind", "/", "/", "true"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        return f"bubblewrap cannot create namespaces here: {stderr.decode().strip() or exc}"
    return ""


def _seccomp_why() -> str:
    try:
        import pyseccomp  # noqa: F401  (loads libseccomp.so.2)
    except (ImportError, OSError) as exc:
        return f"libseccomp is not usable: {exc}"
    return ""


@functools.cache
def _landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(int(abi), 0)


def _cgroup_why() -> str:
    from orchestrator.sandbox._cgroups import cgroup_support

    return cgroup_support()
