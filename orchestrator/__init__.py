"""The Sidemesh orchestrator: discovers plugins, supervises their sidecars, routes calls.

Run it with ``sidemesh serve``; embed it with::

    orchestrator = Orchestrator(load_config(Path("sidemesh.yaml")))
    await orchestrator.start()
    ...
    await orchestrator.stop()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator._config import MeshConfig, load_config
from orchestrator._interceptors import CallInput, CallInterceptor, CallOutcome, Interceptor
from orchestrator._manifest import PluginManifest, load_manifest
from orchestrator._yaml_models import ConfigError

if TYPE_CHECKING:
    from orchestrator._orchestrator import Orchestrator

__all__ = [
    "CallInput",
    "CallInterceptor",
    "CallOutcome",
    "ConfigError",
    "Interceptor",
    "MeshConfig",
    "Orchestrator",
    "PluginManifest",
    "load_config",
    "load_manifest",
]


def __getattr__(name: str) -> Any:
    # The orchestrator itself loads on first use, so that commands that only read a
    # config or a manifest (``sidemesh validate``, ``certs``, ``token``) start quickly.
    if name == "Orchestrator":
        from orchestrator._orchestrator import Orchestrator

        return Orchestrator
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
