"""The auth: and policy: sections: defaults, errors that name the fix, the documented examples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator._auth_config import (
    AuthConfig,
    PluginGrant,
    PolicyConfig,
    listener_problems,
)
from orchestrator._yaml_models import ConfigError, validate_model

ROOT = Path(__file__).resolve().parents[2]


def auth_errors(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_model(data, AuthConfig, "sidemesh.yaml", "Sidemesh config")
    return str(caught.value)


def test_the_defaults_are_on_owner_only() -> None:
    auth = AuthConfig()
    assert auth.on and auth.tls is None and auth.jwt is None
    assert auth.tokens.file is None and auth.tokens.owner_token
    assert auth.unix.allowed_uids is None and auth.unix.socket_mode() == 0o600
    assert PolicyConfig().rules is None


def test_mode_off_written_bare_in_yaml_is_off() -> None:
    data = yaml.safe_load("auth: {mode: off}")
    assert data == {"auth": {"mode": False}}  # YAML 1.1
    assert AuthConfig.model_validate(data["auth"]).mode == "off"
    assert AuthConfig.model_validate(yaml.safe_load("mode: on")).mode == "on"


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    auth = validate_model(
        {"tls": {"cert": "certs/s.pem", "key": "certs/k.pem"}, "tokens": {"file": "t.yaml"},
         "jwt": {"issuer": "i", "audience": "a", "jwks_file": "/abs/jwks.json"}},
        AuthConfig, "x", "Sidemesh config", context={"base_dir": tmp_path},
    )  # fmt: skip
    assert auth.tls is not None and auth.tls.cert == tmp_path / "certs" / "s.pem"
    assert auth.tokens.file == tmp_path / "t.yaml"
    assert auth.jwt is not None and auth.jwt.jwks_file == Path("/abs/jwks.json")
    assert auth.jwt.audience == ["a"]  # one audience or a list


def test_auth_errors_name_the_field_and_the_fix() -> None:
    text = auth_errors({"mode": "maybe"})
    assert "field 'mode'" in text and "on: every call needs an identity" in text
    text = auth_errors({"tls": {"cert": "c", "key": "k", "require_client_cert": True}})
    assert "require_client_cert needs client_ca" in text
    text = auth_errors({"jwt": {"issuer": "i", "audience": "a", "jwks_file": "j",
                                "algorithms": ["none"]}})  # fmt: skip
    assert "field 'jwt.algorithms[0]'" in text
    text = auth_errors({"jwt": {"issuer": "i", "jwks_file": "j"}})
    assert "field 'jwt.audience': required field is missing" in text
    text = auth_errors({"unix": {"alowed_uids": [1]}})
    assert "did you mean 'allowed_uids'?" in text


def test_plain_tcp_beyond_loopback_without_tls_is_a_problem() -> None:
    listen = ["unix:/run/m.sock", "127.0.0.1:50051", "[::1]:50051", "localhost:1", "0.0.0.0:50051"]
    problems = listener_problems(AuthConfig(), listen)
    assert [p.message.split(" ")[0] for p in problems] == ["0.0.0.0:50051"]
    assert "add auth.tls" in problems[0].fix
    assert listener_problems(AuthConfig(mode="off"), listen) == []


def commented_section(text: str, name: str) -> Any:
    """A section shown as comments in examples/sidemesh.yaml, parsed."""
    lines = text.splitlines()
    start = lines.index(f"# {name}:")
    body = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        body.append(line[2:])
    return yaml.safe_load("\n".join(body))[name]


def test_the_annotated_example_config_sections_are_valid() -> None:
    text = (ROOT / "examples" / "sidemesh.yaml").read_text()
    validate_model(commented_section(text, "auth"), AuthConfig, "example", "Sidemesh config")
    policy = validate_model(
        commented_section(text, "policy"), PolicyConfig, "example", "Sidemesh config"
    )
    assert policy.rules is not None and len(policy.rules) == 2
    for override in commented_section(text, "plugins").values():
        PluginGrant.model_validate(override["permissions"])


def test_the_documented_examples_are_valid() -> None:
    doc = (ROOT / "docs" / "auth.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    seen = set()
    for block in blocks:
        data = yaml.safe_load(block)
        if "auth" in data:
            validate_model(data["auth"], AuthConfig, "docs/auth.md", "Sidemesh config")
            seen.add("auth")
        if "policy" in data:
            validate_model(data["policy"], PolicyConfig, "docs/auth.md", "Sidemesh config")
            seen.add("policy")
        for override in data.get("plugins", {}).values():
            PluginGrant.model_validate(override["permissions"])
    assert seen == {"auth", "policy"}
