"""Sidecar runtimes: the programs the orchestrator launches, one process per plugin replica.

A sidecar serves, on the Unix socket named by ``SIDEMESH_LISTEN``, the
``PluginService``, ``grpc.health.v1`` and whatever its plugin provides
(``AgentService``, ``ToolService``, ``McpService``); the environment contract
is in ``docs/architecture.md``.

- ``sidecars.python``: runs a ``plugins_sdk.Plugin`` app
  (``python -m sidecars.python module:attr``, for manifests with
  ``runtime: python``).

Still to come here: runtimes for more languages, the MCP bridge (a stdio MCP
server served as a mesh plugin) and the sandbox launcher.
"""
