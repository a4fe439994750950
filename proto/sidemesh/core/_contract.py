"""The sidecar contract: what the orchestrator gives a sidecar, and what it expects back.

Both sides import this module: the orchestrator (which sets the environment,
makes the sockets and checks the version), the SDK and the sidecar runtimes
(which read them), and the test that keeps ``docs/architecture.md``'s table
true. A sidecar in another language follows the same table.
"""

from __future__ import annotations

from enum import StrEnum

#: The contract every sidecar speaks: ``PluginInfo.contract_version`` in its ``Describe``.
CONTRACT_VERSION = "sidemesh.v1"
#: Versions this orchestrator can serve.
SUPPORTED_CONTRACT_VERSIONS = (CONTRACT_VERSION,)


class SidecarEnv(StrEnum):
    """The environment variables the orchestrator starts a sidecar with."""

    MESH = "SIDEMESH_MESH"
    LISTEN = "SIDEMESH_LISTEN"
    MESH_ADDRESS = "SIDEMESH_MESH_ADDRESS"
    PLUGIN = "SIDEMESH_PLUGIN"
    REPLICA = "SIDEMESH_REPLICA"
    PLUGIN_DIR = "SIDEMESH_PLUGIN_DIR"
    DATA_DIR = "SIDEMESH_DATA_DIR"
    STARTUP_TIMEOUT = "SIDEMESH_STARTUP_TIMEOUT"
    LOG_LEVEL = "SIDEMESH_LOG_LEVEL"
    MCP_SERVER = "SIDEMESH_MCP_SERVER"


#: What each variable means (the documentation's table is checked against this).
SIDECAR_ENVIRONMENT: dict[SidecarEnv, str] = {
    SidecarEnv.MESH: "the run directory of the mesh the process belongs to (a label)",
    SidecarEnv.LISTEN: "`unix:/…/plugin.sock`: serve all services here",
    SidecarEnv.MESH_ADDRESS: "`unix:/…/mesh.sock`: the orchestrator's callback socket for "
    "this plugin",
    SidecarEnv.PLUGIN: "the plugin's name (from its manifest)",
    SidecarEnv.REPLICA: "the replica index, from 0",
    SidecarEnv.PLUGIN_DIR: "the plugin's directory",
    SidecarEnv.DATA_DIR: "a writable directory that belongs to this plugin",
    SidecarEnv.STARTUP_TIMEOUT: "seconds the sidecar has to become ready (the manifest's "
    "`startup_timeout`)",
    SidecarEnv.LOG_LEVEL: "`DEBUG`, `INFO`, `WARNING` or `ERROR`",
    SidecarEnv.MCP_SERVER: "only for `runtime: mcp`: the manifest's `mcp` section as JSON",
}

#: The file name of the socket a replica serves on (in its own directory).
REPLICA_SOCKET = "plugin.sock"
#: The file name of a plugin's callback socket, where the orchestrator serves it.
MESH_SOCKET = "mesh.sock"
#: Where a sandboxed sidecar finds both sockets.
SANDBOX_RUN_DIR = "/run/sidemesh"
SANDBOX_LISTEN = f"unix:{SANDBOX_RUN_DIR}/{REPLICA_SOCKET}"
SANDBOX_MESH_ADDRESS = f"unix:{SANDBOX_RUN_DIR}/{MESH_SOCKET}"

#: The steps a replica passes, in order, before it takes calls.
READINESS_STEPS = (
    "PluginService.Describe (its plugin name equals the manifest's, its contract_version "
    "is supported)",
    "PluginService.Configure (the operator's config, validated against config_schema)",
    "grpc.health.v1.Health/Check of service '' answers SERVING",
)


def contract_refusal(version: str) -> str:
    """Why a sidecar speaking ``version`` cannot be served ("" when it can)."""
    if version in SUPPORTED_CONTRACT_VERSIONS:
        return ""
    supported = ", ".join(repr(v) for v in SUPPORTED_CONTRACT_VERSIONS)
    if not version:
        return (
            "its Describe response does not say which contract it speaks: set "
            f"PluginInfo.contract_version to {CONTRACT_VERSION!r}"
        )
    return (
        f"it speaks contract {version!r}, which this orchestrator does not support "
        f"(supported: {supported}): upgrade the plugin's SDK or the mesh"
    )
