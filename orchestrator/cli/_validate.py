"""``sidemesh validate``: check plugin directories and config files without starting the mesh."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from orchestrator._config import load_config
from orchestrator._discovery import discover
from orchestrator._host_paths import mount_problems
from orchestrator._manifest import MANIFEST_FILE, PluginManifest, load_manifest, start_problem
from orchestrator._plugin import PluginRuntime
from orchestrator._yaml_models import ConfigError, Problem
from orchestrator.cli._code_facts import CodeUnreadable, code_facts, disagreements
from orchestrator.cli._common import EXIT_OK, EXIT_USAGE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``validate``."""
    p = sub.add_parser(
        "validate",
        help="check plugin directories (plugin.yaml) or a sidemesh.yaml, without starting anything",
        description="Check plugin directories and Sidemesh config files. Exit code 0 when all "
        "are valid, 2 otherwise; each problem names the file, the field and the fix.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a plugin directory, a plugin.yaml, or a sidemesh.yaml")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validates each path; prints what is wrong, or a one-line summary of what is right."""
    failures = 0
    for path in args.paths:
        try:
            if path.is_dir() or path.name == MANIFEST_FILE:
                print(f"ok: {_check_plugin(path if path.is_dir() else path.parent)}")
            else:
                print(f"ok: {_check_config(path)}")
        except ConfigError as exc:
            failures += 1
            print(exc, file=sys.stderr)
    return EXIT_USAGE if failures else EXIT_OK


def _check_plugin(directory: Path) -> str:
    manifest = load_manifest(directory)
    problem = start_problem(manifest)
    if problem:
        raise ConfigError(directory / MANIFEST_FILE, "plugin manifest", [problem])
    facts = _code_facts(manifest, directory)
    declared = {"agents": manifest.provides.agents, "tools": manifest.provides.tools}
    provides = []
    for kind in ("agents", "tools"):
        if declared[kind]:
            provides.append(f"{kind}: {', '.join(declared[kind])}")
        elif facts.get(kind):
            provides.append(f"{kind}: {', '.join(facts[kind])} (from the code)")
    if manifest.provides.mcp:
        provides.append("an MCP server")
    summary = "; ".join(provides) or "provides nothing declared"
    return f"{directory}: plugin {manifest.name} {manifest.version} ({summary})"


def _code_facts(manifest: PluginManifest, directory: Path) -> dict[str, Any]:
    """A Python plugin's facts from its code, checked against its manifest; {} for others."""
    if manifest.runtime != "python":
        return {}
    try:
        facts = code_facts(manifest)
    except CodeUnreadable as exc:
        problem = Problem("app", f"cannot read the plugin's code: {exc}",
                          "fix the module, or 'app' in plugin.yaml")  # fmt: skip
        raise ConfigError(directory / MANIFEST_FILE, "plugin manifest", [problem]) from None
    problems = disagreements(manifest, facts)
    if problems:
        raise ConfigError(directory / MANIFEST_FILE, "plugin manifest", problems)
    return facts


def _check_config(path: Path) -> str:
    config = load_config(path)
    plugins = discover(config)
    broken = [p for p in plugins if p.error is not None]
    for found in broken:
        print(found.error, file=sys.stderr)
    for found in plugins:
        if found.manifest is None:
            continue
        override = config.override(found.name)
        missing = mount_problems(found.manifest, override) if override.enabled else []
        if missing:
            manifest_file = found.manifest.directory / MANIFEST_FILE
            raise ConfigError(path, "Sidemesh config", [
                Problem(f"plugins.{found.name}.sandbox.mounts", f"{manifest_file}: {p}")
                for p in missing
            ])  # fmt: skip
        runtime = PluginRuntime(found.name, found.manifest, override,
                                config, None, str(found.directory))  # fmt: skip
        try:
            runtime.effective_config()
        except ValueError as exc:
            raise ConfigError(path, "Sidemesh config", [Problem(f"plugins.{found.name}.config",
                                                                str(exc))]) from None  # fmt: skip
    if broken:
        raise ConfigError(path, "Sidemesh config", [
            Problem("plugin_dirs", f"{len(broken)} plugin(s) have invalid manifests (above)")
        ])  # fmt: skip
    return f"{path}: config with {len(plugins)} plugin(s): {', '.join(p.name for p in plugins)}"
