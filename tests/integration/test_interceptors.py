"""The operator's interceptors on the decision path: read, reject and annotate calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import DEMO_PLUGINS, Mesh, wait_until

from clients import AsyncMeshClient, PermissionDeniedError

pytestmark = pytest.mark.integration

AUDIT = """
import json
from pathlib import Path

from clients import PermissionDeniedError
from orchestrator import CallInterceptor, Interceptor


class _Link(CallInterceptor):
    def __init__(self, next, deny, log):
        super().__init__(next)
        self.deny, self.log = deny, log

    def before_call(self, input):
        if input.target in self.deny:
            raise PermissionDeniedError(f"{input.target} is closed for maintenance")
        tenant = input.header("x-tenant")
        if tenant:
            input.attributes["audit.tenant"] = tenant
        input.attributes["audit.request_bytes"] = str(len(input.request))
        self.next.before_call(input)

    def after_call(self, outcome):
        with self.log.open("a") as f:
            f.write(json.dumps({"target": outcome.target, "code": outcome.code,
                                "principal": outcome.principal,
                                "trace_id": outcome.trace_id}) + "\\n")
        self.next.after_call(outcome)


class Audit(Interceptor):
    def __init__(self, deny=(), log="audit.jsonl"):
        self.deny, self.log = set(deny), Path(log)

    def intercept_call(self, next):
        return _Link(next, self.deny, self.log)


class Broken(Interceptor):
    def intercept_call(self, next):
        class _Raises(CallInterceptor):
            def before_call(self, input):
                raise KeyError("a bug")
        return _Raises(next)
"""


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    directory = tmp_path / "hooks"
    directory.mkdir()
    (directory / "audit.py").write_text(textwrap.dedent(AUDIT))
    return directory


async def test_an_interceptor_rejects_annotates_and_sees_every_outcome(
    make_mesh: Callable[..., Mesh], hooks: Path, tmp_path: Path
) -> None:
    log = tmp_path / "audit.jsonl"
    mesh = make_mesh(
        plugin_dirs=DEMO_PLUGINS[:1],
        interceptors=[{"use": "audit:Audit", "path": str(hooks),
                       "options": {"deny": ["tools-demo/divide"], "log": str(log)}}],
    ).start(ready=["tools-demo"])  # fmt: skip
    async with AsyncMeshClient(mesh.address) as client:
        with pytest.raises(PermissionDeniedError, match="closed for maintenance"):
            await client.call_tool("tools-demo/divide", {"a": 1, "b": 1})
        result = await client.call_tool(
            "tools-demo/add", {"a": 2, "b": 3}, metadata=[("x-tenant", "acme")]
        )
        assert result.structured == {"result": 5}
        lines = wait_until(lambda: log.exists() and log.read_text().splitlines(), 10, "the audit")
        (ended,) = [json.loads(line) for line in lines]  # the refused call was never forwarded
        assert ended["target"] == "tools-demo/add" and ended["code"] == 0
        assert ended["principal"].startswith("unix:uid:")

        async def server_span() -> dict[str, str] | None:
            spans = await client.get_trace(ended["trace_id"])
            servers = [s for s in spans if s.service == "sidemesh-orchestrator" and s.kind == 2]
            return dict(servers[0].attributes) if servers else None

        attributes = None
        for _ in range(50):
            attributes = await server_span()
            if attributes:
                break
    assert attributes is not None
    assert attributes["audit.tenant"] == "acme"
    assert int(attributes["audit.request_bytes"]) > 0
    assert attributes["sidemesh.target"] == "tools-demo/add"  # the mesh's own still win


async def test_a_failing_interceptor_refuses_its_call_and_the_mesh_keeps_serving(
    make_mesh: Callable[..., Mesh], hooks: Path
) -> None:
    mesh = make_mesh(
        plugin_dirs=DEMO_PLUGINS[:1], interceptors=[{"use": "audit:Broken", "path": str(hooks)}]
    ).start(ready=["tools-demo"])
    async with AsyncMeshClient(mesh.address) as client:
        for _ in range(2):
            with pytest.raises(Exception, match="interceptors failed on this call") as info:
                await client.call_tool("tools-demo/add", {"a": 1, "b": 1})
            assert info.value.code.name == "INTERNAL"  # type: ignore[attr-defined]
        assert await client.list_tools()  # the mesh's own API is not intercepted
    assert "KeyError: 'a bug'" in mesh.log()


def test_an_interceptor_that_cannot_be_loaded_names_the_entry(tmp_path: Path) -> None:
    config = tmp_path / "sidemesh.yaml"
    config.write_text("listen: ['unix:/tmp/x.sock']\ninterceptors:\n  - use: nowhere:Audit\n")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "field 'interceptors[0].use': cannot import 'nowhere'" in out.stderr
    assert "fix:" in out.stderr
