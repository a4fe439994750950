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
- The one exception hierarchy (:class:`SidemeshError` and a class per gRPC
  status code), raised by servers and by clients alike.
- Names (``plugin/name`` targets), ``Struct`` conversion (:func:`to_struct`,
  :func:`struct_to_dict`), addresses and socket paths
  (:func:`normalize_address`), the gRPC options every server uses
  (:func:`server_options`) and the event loop every process runs on
  (:func:`run_loop`).
"""

from sidemesh.core._address import (
    DEFAULT_TCP_ADDRESS,
    normalize_address,
    unix_socket_path,
)
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
from sidemesh.core._errors import (
    ERROR_DOMAIN,
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidemeshError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    from_status,
)
from sidemesh.core._event_loop import EVENT_LOOP_ENV, run_loop
from sidemesh.core._names import (
    ItemName,
    PluginName,
    is_item_name,
    is_plugin_name,
    qualify,
    split_target,
)
from sidemesh.core._server_options import server_options
from sidemesh.core._spawn import Child, spawn
from sidemesh.core._state import (
    ENDPOINTS_FILE,
    TOKEN_ENV,
    TOKEN_FILE,
    TOKEN_FILE_ENV,
    default_state_dir,
    process_alive,
    running_mesh,
)
from sidemesh.core._structs import dict_to_struct, jsonable, struct_to_dict, to_struct

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_TCP_ADDRESS",
    "ENDPOINTS_FILE",
    "ERROR_DOMAIN",
    "EVENT_LOOP_ENV",
    "MESH_SOCKET",
    "READINESS_STEPS",
    "REPLICA_SOCKET",
    "SANDBOX_LISTEN",
    "SANDBOX_MESH_ADDRESS",
    "SANDBOX_RUN_DIR",
    "SIDECAR_ENVIRONMENT",
    "SUPPORTED_CONTRACT_VERSIONS",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "TOKEN_FILE_ENV",
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "Child",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "ItemName",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PluginName",
    "ResourceExhaustedError",
    "SidecarEnv",
    "SidemeshError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "contract_refusal",
    "default_state_dir",
    "dict_to_struct",
    "from_status",
    "is_item_name",
    "is_plugin_name",
    "jsonable",
    "normalize_address",
    "process_alive",
    "qualify",
    "run_loop",
    "running_mesh",
    "server_options",
    "spawn",
    "split_target",
    "struct_to_dict",
    "to_struct",
    "unix_socket_path",
]
