"""sidemesh.yaml and plugin.yaml: defaults, the annotated example, and errors people can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import ConfigError, load_config, load_manifest
from orchestrator._config import BUNDLED_PLUGINS_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_no_config_serves_the_bundled_plugins_on_the_default_addresses() -> None:
    config = load_config(None)
    assert config.plugin_dirs == [BUNDLED_PLUGINS_DIR]
    addresses = config.listen_addresses()
    assert addresses[0].startswith("unix:") and addresses[0].endswith("/sidemesh.sock")
    assert addresses[1] == "127.0.0.1:50051"


def test_the_annotated_example_config_is_valid_and_paths_are_relative_to_it() -> None:
    config = load_config(ROOT / "examples" / "sidemesh.yaml")
    assert config.plugin_dirs == [ROOT / "examples" / "plugins"]
    assert config.state_dir == ROOT / "examples" / ".sidemesh" / "state"
    assert config.override("tools-demo").replicas == 2
    assert config.override("not-configured").enabled


def test_config_errors_name_the_file_the_field_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "sidemesh.yaml"
    path.write_text(
        "listen: [nowhere]\nsupervisor: {helth_interval: 1}\nlimits: {max_message_bytes: 5}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a valid Sidemesh config:")
    assert "field 'listen': 'nowhere' is not host:port or unix:/path/to/socket" in text
    assert "field 'supervisor.helth_interval': unknown field" in text
    assert "did you mean 'health_interval'?" in text
    assert "field 'limits.max_message_bytes'" in text and "fix: largest gRPC message" in text


def test_yaml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "plugin.yaml").write_text("name: x\nversion: [1\n")
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert "invalid YAML at line 3" in str(info.value)


def test_a_manifest_must_say_how_to_start_the_plugin(tmp_path: Path) -> None:
    (tmp_path / "plugin.yaml").write_text("name: quiet\nversion: 1.0.0\n")
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert "say how to start the plugin" in str(info.value)


def test_manifest_defaults_and_config_defaults() -> None:
    manifest = load_manifest(ROOT / "examples" / "plugins" / "assistant")
    assert manifest.name == "assistant"
    assert manifest.replicas == 1
    assert manifest.sandbox.network is False
    assert manifest.config_schema is None  # its config is the code's config_model
    assert manifest.permissions.tools == ["tools-demo/*"]
