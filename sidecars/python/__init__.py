"""The Python sidecar runtime: ``python -m sidecars.python MODULE:ATTR``.

Run with the working directory set to the plugin's directory, it imports the
``plugins_sdk.Plugin`` at ``MODULE:ATTR`` from there, logs to stderr, and
serves it on ``$SIDEMESH_LISTEN`` until ``PluginService.Shutdown`` or SIGTERM.
A target that cannot be loaded exits with status 2 and says why on stderr,
which the orchestrator shows to the operator. It traces the plugin's calls
with the OpenTelemetry SDK and exports the spans over OTLP to
``$OTEL_EXPORTER_OTLP_ENDPOINT`` (the orchestrator's callback socket); its log
lines inside a call end with the call's ``trace_id`` and ``span_id``.
"""

from sidecars.python._main import main

__all__ = ["main"]
