"""Each package's public names are pinned: removing or renaming one breaks users."""

import orchestrator
import sidecars.python


def test_orchestrator_public_names() -> None:
    assert orchestrator.__all__ == [
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
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None


def test_python_sidecar_public_names() -> None:
    assert sidecars.python.__all__ == ["main"]
