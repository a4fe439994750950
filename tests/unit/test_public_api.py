"""Each package's public names are pinned, in this one place: removing or renaming one breaks
users, and adding one is a decision (a client user's surface is not server plumbing)."""

import importlib
from types import ModuleType

import pytest

PUBLIC_NAMES: dict[str, list[str]] = {
    # What a client user calls, catches and reads; the shared vocabulary is sidemesh.core's.
    "clients": [
        *("AsyncMeshClient", "MeshClient", "TlsOptions", "tracing_interceptors"),
        *("AgentReply", "ToolCallResult", "McpToolCall", "McpRequestError"),
        *("AgentStream", "ServerStream", "ToolCallStream", "ChatSession"),
        *("SyncAgentStream", "SyncChatSession", "SyncStream", "SyncToolCallStream"),
        *("SidemeshError", "FieldViolation"),
        *("AbortedError", "AlreadyExistsError", "CallCancelledError", "DataLossError"),
        *("DeadlineExceededError", "FailedPreconditionError", "InternalError"),
        *("InvalidArgumentError", "NotFoundError", "OutOfRangeError"),
        *("PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError"),
        *("UnavailableError", "UnimplementedError", "UnknownError"),
    ],
    "sidemesh.core": [
        # the sidecar contract
        *("CONTRACT_VERSION", "SUPPORTED_CONTRACT_VERSIONS", "SidecarEnv", "SIDECAR_ENVIRONMENT"),
        *("MESH_SOCKET", "REPLICA_SOCKET", "READINESS_STEPS", "contract_refusal"),
        *("SANDBOX_LISTEN", "SANDBOX_MESH_ADDRESS", "SANDBOX_RUN_DIR"),
        # processes, state dir, tokens
        *("Child", "spawn", "default_state_dir", "process_alive", "running_mesh"),
        *("ENDPOINTS_FILE", "TOKEN_FILE", "TOKEN_ENV", "TOKEN_FILE_ENV"),
        # errors
        *("ERROR_DOMAIN", "SidemeshError", "FieldViolation", "from_status"),
        *("AbortedError", "AlreadyExistsError", "CallCancelledError", "DataLossError"),
        *("DeadlineExceededError", "FailedPreconditionError", "InternalError"),
        *("InvalidArgumentError", "NotFoundError", "OutOfRangeError"),
        *("PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError"),
        *("UnavailableError", "UnimplementedError", "UnknownError"),
        # names, structs, addresses, servers, the event loop
        *("PluginName", "ItemName", "is_plugin_name", "is_item_name", "qualify", "split_target"),
        "TargetIndex",
        *("to_struct", "struct_to_dict", "jsonable", "dict_to_struct"),
        *("DEFAULT_TCP_ADDRESS", "normalize_address", "unix_socket_path"),
        *("server_options", "run_loop", "EVENT_LOOP_ENV"),
    ],
    "plugins_sdk": [
        *("Plugin", "CallContext", "ToolContext", "AgentContext", "AgentInput"),
        *("Log", "Progress", "Result", "Blob", "ToolError", "ToolResult", "run", "serve"),
        *("Interceptor", "CallInput"),
    ],
    "plugins_sdk.testing": ["PluginHarness"],
    "plugins_sdk.serving": [
        *("sidecar_server", "listen", "stop_on_signals", "grace_period"),
        *("MAX_MESSAGE_BYTES", "SIGNAL_GRACE"),
        *("CallInfo", "ServerSpans", "CallSpan", "end_call"),
        *("EventPump", "Event", "response"),
        *("Chain", "ServeCall", "Interceptor", "CallInput", "UnaryNext", "StreamNext"),
    ],
    "sidecars.python": ["main"],
    "sidecars.mcp": ["main"],
    "orchestrator.sandbox": [
        *("ACCOUNTED", "Bind", "IMAGE", "INSIDE_LISTEN", "INSIDE_MESH", "LAYERS"),
        "UID_REGISTRY_FILE",
        *("DataAccount", "DataImage", "DataQuota", "DataUsage", "HostSupport"),
        *("ImageUnavailable", "Layer", "ResourceLimits", "Policy", "PreparedSidecar", "QuotaError"),
        *("SandboxRequest", "UidAllocator", "policy", "prepare", "probe", "remove_mesh_cgroups"),
    ],
    "orchestrator": [
        *("CallInput", "CallInterceptor", "CallOutcome", "Interceptor"),
        *("ConfigError", "MeshConfig", "Orchestrator", "PluginManifest"),
        *("load_config", "load_manifest"),
    ],
    "orchestrator.gateway": [
        *("ANONYMOUS", "AllowAll", "Anonymous", "Authenticator", "Authorizer"),
        *("JwtAuthenticator", "McpHttpEndpoint", "MeshMcpServer", "Unauthenticated", "View"),
        *("mcp_name", "stdio_streams"),
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC_NAMES))
def test_public_names_are_pinned(package: str) -> None:
    module: ModuleType = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC_NAMES[package])
    assert len(set(module.__all__)) == len(module.__all__), "a name is listed twice"
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_clients_exports_no_server_plumbing() -> None:
    import clients

    plumbing = {"server_options", "run_loop", "normalize_address", "unix_socket_path"}
    assert plumbing.isdisjoint(clients.__all__)
    assert plumbing <= set(importlib.import_module("sidemesh.core").__all__)


def test_clients_errors_are_the_core_classes() -> None:
    import clients
    import sidemesh.core

    for name in clients.__all__:
        if name.endswith("Error") and name != "McpRequestError":
            assert getattr(clients, name) is getattr(sidemesh.core, name)
