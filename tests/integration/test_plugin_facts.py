"""Each plugin fact is written once: the smallest plugin, and validate on disagreements."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import ROOT, TEST_PLUGINS, Mesh

from clients import AsyncMeshClient

pytestmark = pytest.mark.integration

HELLO = TEST_PLUGINS / "hello"
GUIDE = ROOT / "docs" / "plugin-guide.md"


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_smallest_plugin_is_one_file_and_a_four_line_manifest() -> None:
    assert sorted(p.name for p in HELLO.iterdir() if p.name != "__pycache__") == [
        "hello.py", "plugin.yaml"
    ]  # fmt: skip
    assert len(HELLO.joinpath("plugin.yaml").read_text().splitlines()) <= 4
    # The guide shows exactly these two files.
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", GUIDE.read_text(), re.S)
    assert HELLO.joinpath("hello.py").read_text() in blocks
    assert HELLO.joinpath("plugin.yaml").read_text() in blocks
    out = validate(HELLO)
    assert out.returncode == 0, out.stderr
    assert "plugin hello 0.1.0" in out.stdout


async def test_the_smallest_plugin_serves_its_tool_in_the_mesh(
    make_mesh: Callable[..., Mesh],
) -> None:
    mesh = make_mesh(plugin_dirs=[str(HELLO)]).start(ready=["hello"])
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.call_tool("hello/greet", {"name": "Ada"})
        (tool,) = await client.list_tools()
    assert result.text == "Hello, Ada!"
    assert tool.description == "Says hello to someone."
    assert mesh.plugin("hello").version == "0.1.0"  # from the manifest, stated nowhere else


def test_validate_says_where_the_code_and_the_manifest_disagree(tmp_path: Path) -> None:
    plugin = tmp_path / "twice"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(
        "name: twice\nversion: 1.0.0\nruntime: python\napp: twice:app\n"
        "provides:\n  tools: [add, gone]\n"
        "config_schema:\n  type: object\n  properties:\n    delay: {type: number}\n"
    )
    (plugin / "twice.py").write_text(
        "from pydantic import BaseModel\nfrom plugins_sdk import Plugin\n\n\n"
        "class Config(BaseModel):\n    pause: float = 0.1\n\n\n"
        "app = Plugin('twice', version='2.0.0', config_model=Config)\n\n\n"
        "@app.tool\ndef add(a: int, b: int) -> int:\n    return a + b\n\n\n"
        "@app.tool\ndef extra() -> str:\n    return 'x'\n"
    )
    out = validate(plugin)
    assert out.returncode == 2
    assert "twice/plugin.yaml" in out.stderr
    assert "field 'version': the manifest says '1.0.0' but the code says '2.0.0'" in out.stderr
    assert "field 'provides.tools': lists gone that the code lacks and omits extra" in out.stderr
    assert "field 'config_schema'" in out.stderr and "pause" in out.stderr
    assert "fix:" in out.stderr
    assert "field 'name'" not in out.stderr  # stated twice, but the same


def test_validate_reports_code_that_cannot_be_imported(tmp_path: Path) -> None:
    plugin = tmp_path / "oops"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(
        "name: oops\nversion: 0.1.0\nruntime: python\napp: oops:app\n"
    )
    (plugin / "oops.py").write_text("raise RuntimeError('no database here')\n")
    out = validate(plugin)
    assert out.returncode == 2
    assert "field 'app': cannot read the plugin's code" in out.stderr
    assert "no database here" in out.stderr


def test_validate_imports_the_code_in_a_sandbox_that_cannot_write(tmp_path: Path) -> None:
    plugin = tmp_path / "writer"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(
        "name: writer\nversion: 0.1.0\nruntime: python\napp: writer:app\n"
    )
    target = plugin / "written-at-import"
    (plugin / "writer.py").write_text(
        "from pathlib import Path\nfrom plugins_sdk import Plugin\n\n"
        f"Path({str(target)!r}).write_text('x')\napp = Plugin()\n"
    )
    out = validate(plugin)
    assert out.returncode == 2
    assert "Read-only file system" in out.stderr
    assert not target.exists()
