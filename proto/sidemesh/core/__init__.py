"""The vocabulary every part of Sidemesh shares, beside the contracts in :mod:`sidemesh.v1`.

The orchestrator, the sidecar runtimes, the plugin SDK and the clients all
import these; none of them imports another's private modules.

- The sidecar contract: the environment a sidecar starts with
  (:class:`SidecarEnv`), its sockets, its readiness steps and
  :data:`CONTRACT_VERSION`.
- :func:`spawn`: starting a process without ``fork()`` (a process running
  gRPC must not fork).
- The mesh's state dir and the files its clients find it by
  (:func:`running_mesh`, :data:`TOKEN_FILE`).
"""

from sidemesh.core._contract import (
    CONTRACT_VERSION,
    MESH_SOCKET,
    READINESS_STEPS,
    REPLICA_SOCKET,
    SANDBOX_LISTEN,
    SANDBOX_MESH_ADDRESS,
    SANDBOX_RUN_DIR,
    SIDECAR_ENVIRONMENT,
    SUPPORTED_CONTRACT_VERSIONS,
    SidecarEnv,
    contract_refusal,
)
from sidemesh.core._spawn import Child, spawn
from sidemesh.core._state import (
    ENDPOINTS_FILE,
    TOKEN_FILE,
    default_state_dir,
    process_alive,
    running_mesh,
)

__all__ = [
    "CONTRACT_VERSION",
    "ENDPOINTS_FILE",
    "MESH_SOCKET",
    "READINESS_STEPS",
    "REPLICA_SOCKET",
    "SANDBOX_LISTEN",
    "SANDBOX_MESH_ADDRESS",
    "SANDBOX_RUN_DIR",
    "SIDECAR_ENVIRONMENT",
    "SUPPORTED_CONTRACT_VERSIONS",
    "TOKEN_FILE",
    "Child",
    "SidecarEnv",
    "contract_refusal",
    "default_state_dir",
    "process_alive",
    "running_mesh",
    "spawn",
]
