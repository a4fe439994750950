"""The Sidemesh orchestrator: discovers plugins, supervises their sidecars, routes calls.

Run it with ``sidemesh serve``; embed it with::

    orchestrator = Orchestrator(load_config(Path("sidemesh.yaml")))
    await orchestrator.start()
    ...
    await orchestrator.stop()
"""

from orchestrator._config import MeshConfig, load_config
from orchestrator._interceptors import CallInput, CallInterceptor, CallOutcome, Interceptor
from orchestrator._manifest import PluginManifest, load_manifest
from orchestrator._orchestrator import Orchestrator
from orchestrator._yaml_models import ConfigError

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
