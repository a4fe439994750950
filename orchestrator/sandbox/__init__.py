"""The sidecar sandbox: a plugin gets only what its manifest asks and the operator allows.

Layers, each reported per plugin (``sidemesh plugins -v``):

- ``namespaces``: bubblewrap (user, mount, PID, IPC, UTS, network, cgroup), all
  capabilities dropped, ``--die-with-parent``, ``--new-session``; uid 65534
  inside, and its own unprivileged host uid when the orchestrator is root (the
  same every run: see ``_uids``);
- ``filesystem``: read-only binds of only the interpreter, its packages and
  the plugin's directory, plus the operator's mounts (``sandbox.mounts``, ro or
  rw) and the manifest's granted ``read_paths``/``write_paths``; a private
  ``/tmp`` and the plugin's data directory, held to its quota (an ext4 image
  of that size as root, else accounted: read-only while over);
- ``network``: none (its own loopback) unless the manifest asks and the
  operator grants;
- ``rlimits``: address space, CPU time, processes, open files, file size;
- ``cgroups``: memory and process limits where the host lets us write cgroups;
- ``seccomp``: a deny-list of dangerous system calls, with no_new_privs;
- ``landlock``: filesystem (and TCP) rules enforced by the kernel;
- ``environment``: scrubbed (only what the manifest declares and the operator gives).
"""

from orchestrator.sandbox._accounting import DataAccount
from orchestrator.sandbox._cgroups import remove_mesh_cgroups
from orchestrator.sandbox._command import INSIDE_LISTEN, INSIDE_MESH, PreparedSidecar, prepare
from orchestrator.sandbox._host import HostSupport, probe
from orchestrator.sandbox._image import DataImage, ImageUnavailable
from orchestrator.sandbox._policy import (
    LAYERS,
    Bind,
    Layer,
    Policy,
    ResourceLimits,
    SandboxRequest,
    policy,
)
from orchestrator.sandbox._quota import ACCOUNTED, IMAGE, DataQuota, DataUsage, QuotaError
from orchestrator.sandbox._uids import REGISTRY_FILE as UID_REGISTRY_FILE
from orchestrator.sandbox._uids import UidAllocator

__all__ = [
    "ACCOUNTED",
    "IMAGE",
    "INSIDE_LISTEN",
    "INSIDE_MESH",
    "LAYERS",
    "UID_REGISTRY_FILE",
    "Bind",
    "DataAccount",
    "DataImage",
    "DataQuota",
    "DataUsage",
    "HostSupport",
    "ImageUnavailable",
    "Layer",
    "Policy",
    "PreparedSidecar",
    "QuotaError",
    "ResourceLimits",
    "SandboxRequest",
    "UidAllocator",
    "policy",
    "prepare",
    "probe",
    "remove_mesh_cgroups",
]
