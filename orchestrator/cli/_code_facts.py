"""What a Python plugin's code states about it, checked against its manifest.

Each fact has one home. The manifest holds the plugin's identity (name,
version, description) and what the mesh must know before the code runs; the
code holds what it implements: its tools and agents, and its config model. The
manifest may still list ``provides`` (so the catalog knows them while the plugin
starts) and a ``config_schema`` (for plugins that are not Python); where both
say something, they must agree, and ``sidemesh validate`` says where they don't.

Reading the code means importing it: that runs in a throwaway sandbox (bwrap:
the host read-only, no network, a private /tmp, an unprivileged uid), never in
the validating process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from orchestrator._manifest import PluginManifest
from orchestrator._yaml_models import Problem

#: How long importing the plugin's module may take.
_TIMEOUT = 60.0
#: At most this much of what the import prints is read.
_MAX_OUTPUT = 1 << 20
_SANDBOX = [
    "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
    "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
    "--cap-drop", "ALL", "--die-with-parent", "--new-session",
]  # fmt: skip


class CodeUnreadable(Exception):
    """The plugin's code could not be imported to read its facts; the message says why."""


def code_facts(manifest: PluginManifest) -> dict[str, Any]:
    """``Plugin.facts`` of a ``runtime: python`` plugin's app, read in a sandbox."""
    assert manifest.app is not None
    command = [sys.executable, "-m", "sidecars.python", "--describe", manifest.app]
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        command = [bwrap, *_SANDBOX, "--chdir", str(manifest.directory), "--", *command]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SIDEMESH_PLUGIN": manifest.name,
    }
    try:
        done = subprocess.run(
            command, cwd=manifest.directory, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CodeUnreadable(f"importing {manifest.app} took over {_TIMEOUT:g}s") from None
    except OSError as exc:
        raise CodeUnreadable(f"cannot run the Python runtime: {exc}") from None
    if done.returncode != 0:
        said = done.stderr[-2000:].decode(errors="replace").strip().splitlines()
        raise CodeUnreadable(said[-1] if said else f"exit code {done.returncode}")
    try:
        facts: dict[str, Any] = json.loads(done.stdout[-_MAX_OUTPUT:].splitlines()[-1])
    except (ValueError, IndexError):
        raise CodeUnreadable("the runtime printed no facts (does the module print?)") from None
    return facts


def disagreements(manifest: PluginManifest, facts: dict[str, Any]) -> list[Problem]:
    """Where the manifest and the code state different things, each with its fix."""
    problems = []
    for field in ("name", "version", "description"):
        said = facts.get(field)
        written = getattr(manifest, field)
        if said is not None and said != written:
            problems.append(Problem(
                field, f"the manifest says {written!r} but the code says {said!r}",
                "state it once, in plugin.yaml, and leave it out of Plugin(...) "
                "(the SDK takes it from the manifest)",
            ))  # fmt: skip
    for kind in ("tools", "agents"):
        listed = list(getattr(manifest.provides, kind))
        if not listed:
            continue  # the catalog learns them from the code when the plugin starts
        code = list(facts.get(kind, []))
        missing = [n for n in listed if n not in code]
        unlisted = [n for n in code if n not in listed]
        if missing or unlisted:
            parts = [f"lists {', '.join(missing)} that the code lacks"] if missing else []
            parts += [f"omits {', '.join(unlisted)} that the code has"] if unlisted else []
            problems.append(Problem(
                f"provides.{kind}",
                f"{' and '.join(parts)} (the code has: {', '.join(code) or 'none'})",
                f"list exactly the code's {kind}, or drop provides.{kind} and let the code say",
            ))  # fmt: skip
    problems += _config_disagreement(manifest.config_schema, facts.get("config_schema"))
    return problems


def _config_disagreement(
    manifest_schema: dict[str, Any] | None, model_schema: dict[str, Any] | None
) -> list[Problem]:
    if manifest_schema is None or model_schema is None:
        return []
    written, said = _shape(manifest_schema), _shape(model_schema)
    if written == said:
        return []
    return [Problem(
        "config_schema",
        f"describes fields {_describe(written)} but the code's config_model has {_describe(said)}",
        "declare the config once, as the config_model, and drop config_schema from plugin.yaml "
        "(it is for plugins that are not Python)",
    )]  # fmt: skip


def _shape(schema: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """A schema's field names and its required ones: what must agree."""
    properties = schema.get("properties")
    required = schema.get("required")
    names = frozenset(properties) if isinstance(properties, dict) else frozenset()
    needed = frozenset(required) if isinstance(required, list) else frozenset()
    return names, needed


def _describe(shape: tuple[frozenset[str], frozenset[str]]) -> str:
    names, needed = shape
    listed = ", ".join(f"{n} (required)" if n in needed else n for n in sorted(names))
    return f"[{listed}]"
