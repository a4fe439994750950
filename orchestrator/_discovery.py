"""Finding plugins: directories with a ``plugin.yaml``, and Python entry points."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator._config import MeshConfig
from orchestrator._manifest import MANIFEST_FILE, PluginManifest, load_manifest
from orchestrator._yaml_models import ConfigError, Problem, validate_model

log = logging.getLogger("sidemesh.discovery")

#: Packages register plugins under this entry point group; the value names a
#: module whose directory holds a ``plugin.yaml``.
ENTRY_POINT_GROUP = "sidemesh.plugins"


@dataclass(frozen=True)
class DiscoveredPlugin:
    """A plugin directory, with its manifest or the reason it cannot be used."""

    directory: Path
    manifest: PluginManifest | None
    error: ConfigError | None = None
    #: The name the plugin goes by when its manifest is broken (default: its directory's).
    fallback_name: str = ""

    @property
    def name(self) -> str:
        """The manifest's name, or the fallback when the manifest is broken."""
        if self.manifest:
            return self.manifest.name
        return self.fallback_name or self.directory.name


def plugin_directories(config: MeshConfig) -> list[Path]:
    """Every directory that holds a ``plugin.yaml``, in a stable order."""
    found: list[Path] = []
    for root in config.plugin_dirs:
        if (root / MANIFEST_FILE).is_file():
            found.append(root)
        elif root.is_dir():
            found += sorted(d for d in root.iterdir() if (d / MANIFEST_FILE).is_file())
        else:
            log.warning("plugin directory %s does not exist; skipping it", root)
    if config.entry_points:
        found += _entry_point_directories()
    return found


def _entry_point_directories() -> list[Path]:
    out: list[Path] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # Find the module's directory without importing (and so running) plugin code.
        spec = importlib.util.find_spec(ep.value.split(":")[0])
        if spec is None or spec.origin is None:
            log.warning("entry point %s = %s: module not found; skipping it", ep.name, ep.value)
            continue
        directory = Path(spec.origin).parent
        if (directory / MANIFEST_FILE).is_file():
            out.append(directory)
        else:
            log.warning(
                "entry point %s: no %s in %s; skipping it", ep.name, MANIFEST_FILE, directory
            )
    return out


def discover(config: MeshConfig) -> list[DiscoveredPlugin]:
    """Loads every plugin's manifest. Broken manifests are returned with their error, not raised."""
    plugins: list[DiscoveredPlugin] = []
    by_name: dict[str, Path] = {}
    for directory in plugin_directories(config):
        try:
            manifest = load_manifest(directory)
        except ConfigError as exc:
            plugins.append(DiscoveredPlugin(directory.resolve(), None, exc))
            continue
        if manifest.name in by_name:
            duplicate = ConfigError(
                directory / MANIFEST_FILE,
                "plugin manifest",
                [
                    Problem(
                        "name",
                        f"plugin name {manifest.name!r} is used by {by_name[manifest.name]} too",
                        "rename one of them, or remove one directory from plugin_dirs",
                    )
                ],
            )
            plugins.append(DiscoveredPlugin(manifest.directory, None, duplicate))
            continue
        by_name[manifest.name] = manifest.directory
        plugins.append(DiscoveredPlugin(manifest.directory, manifest))
    for name, remote in config.remote_plugins.items():
        plugins.append(_remote(name, remote.address, by_name))
    return plugins


def _remote(name: str, address: str, by_name: dict[str, Path]) -> DiscoveredPlugin:
    """A plugin from ``remote_plugins``: a manifest made from its name and address."""
    where = Path(f"remote:{address}")
    try:
        if name in by_name:
            raise ValueError(f"plugin {name!r} is also in {by_name[name]}: rename one of them")
        manifest = validate_model(
            {"name": name, "version": "remote", "runtime": "remote", "address": address,
             "description": f"a sidecar running at {address}"},
            PluginManifest, f"remote_plugins.{name}", "remote plugin",
        )  # fmt: skip
    except (ConfigError, ValueError) as exc:
        error = exc if isinstance(exc, ConfigError) else ConfigError(
            f"remote_plugins.{name}", "remote plugin", [Problem("", str(exc))]
        )  # fmt: skip
        return DiscoveredPlugin(where, None, error, fallback_name=name)
    return DiscoveredPlugin(where, manifest)
