"""The Sidemesh plugin SDK: write tools and agents as decorated Python functions.

```python
from plugins_sdk import Plugin, ToolContext

app = Plugin()  # named, versioned and described by the plugin.yaml beside it

@app.tool(read_only=True)
async def add(a: int, b: int) -> int:
    \"\"\"Adds two integers.\"\"\"
    return a + b
```

The sidecar runtime (``python -m sidecars.python module:app``) serves the app
in the mesh; ``plugins_sdk.testing.PluginHarness`` serves it in tests. Every
call is an OpenTelemetry SERVER span in its caller's trace (the SDK uses the
OpenTelemetry API only; the runtime configures where spans go). See
``docs/plugin-guide.md``. ``Plugin(interceptors=[...])`` adds hooks around
every call (``Interceptor``); ``plugins_sdk.serving`` is the layer sidecar
runtimes serve with.
"""

from plugins_sdk._context import AgentContext, CallContext, ToolContext
from plugins_sdk._events import AgentInput, Log, Progress, Result
from plugins_sdk._interceptors import CallInput, Interceptor
from plugins_sdk._plugin import Plugin
from plugins_sdk._results import Blob, ToolError, ToolResult
from plugins_sdk._runner import run, serve

__all__ = [
    "AgentContext",
    "AgentInput",
    "Blob",
    "CallContext",
    "CallInput",
    "Interceptor",
    "Log",
    "Plugin",
    "Progress",
    "Result",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "run",
    "serve",
]
