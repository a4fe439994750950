"""Testing plugins: ``PluginHarness`` serves an app in-process behind real gRPC.

```python
from plugins_sdk.testing import PluginHarness

async def test_add():
    async with PluginHarness(app) as h:
        result = await h.client.call_tool("add", a=2, b=3)
        assert result.structured == {"result": 5}
```
"""

from plugins_sdk._harness import PluginHarness

__all__ = ["PluginHarness"]
