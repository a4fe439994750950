"""Sidecar runtimes: the programs the orchestrator launches, one process per plugin replica.

A sidecar serves, on the Unix socket named by ``SIDEMESH_LISTEN``, the
``PluginService``, ``grpc.health.v1`` and whatever its plugin provides
(``AgentService``, ``ToolService``, ``McpService``); the environment contract
is in ``docs/architecture.md`` (and in ``sidemesh.core``).

- ``sidecars.python``: runs a ``plugins_sdk.Plugin`` app
  (``python -m sidecars.python module:attr``, for manifests with
  ``runtime: python``).
- ``sidecars.mcp``: the MCP bridge, an existing MCP server (stdio or local
  streamable HTTP) served as a mesh plugin (``python -m sidecars.mcp``, for
  manifests with ``runtime: mcp``).
- ``sidecars.sandbox``: the sandbox every launched sidecar runs in
  (bubblewrap namespaces, seccomp, Landlock, rlimits, cgroups, the data dir's
  quota). It is host-side code: the orchestrator's launcher uses it.

Both runtimes serve with ``plugins_sdk.serving`` and share their logging
(``_logging``: one line per record on stderr, with the trace context) and their
OpenTelemetry SDK set-up (``_telemetry``: spans exported over OTLP to the
mesh). A plugin in another language is any program that serves the same
contracts (``docs/plugin-guide.md``).
"""
