"""Tool arguments checked against the MCP server's input schema, before they reach it.

Same behaviour and messages as the orchestrator's check (``INVALID_ARGUMENT``
with a ``BadRequest`` naming each bad field as ``arguments.<path>``), so a call
that reaches the sidecar directly is refused the same way. A schema the
validator cannot compile is not enforced (the server still validates).
"""

from __future__ import annotations

import logging
from typing import Any

import jsonschema
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from sidemesh.core import FieldViolation, InvalidArgumentError

log = logging.getLogger("sidecars.mcp")

#: Most violations reported, and most named in the message.
_MAX_VIOLATIONS, _MAX_IN_MESSAGE = 20, 5


def compile_schema(tool: str, schema: dict[str, Any]) -> Validator | None:
    """A validator for ``schema`` (its ``$schema`` dialect, else 2020-12); None if unusable."""
    try:
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        return cls(schema)
    except (jsonschema.SchemaError, TypeError, ValueError) as exc:
        log.warning("tool %r: its input schema is not JSON Schema (%s); not checked", tool, exc)
        return None


def check_arguments(tool: str, validator: Validator | None, arguments: dict[str, Any]) -> None:
    """Raises ``InvalidArgumentError`` naming every field of ``arguments`` the schema rejects."""
    if validator is None:
        return
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return
    violations = [_violation(e) for e in errors[:_MAX_VIOLATIONS]]
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:_MAX_IN_MESSAGE])
    raise InvalidArgumentError(
        f"invalid arguments for tool {tool!r}: {summary}",
        reason="INVALID_TOOL_ARGUMENTS",
        metadata={"tool": tool},
        field_violations=violations,
    )


def _violation(error: jsonschema.ValidationError) -> FieldViolation:
    path = "arguments"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required" and isinstance(error.instance, dict):
        # jsonschema reports a missing property at its parent; name the property itself.
        required = error.validator_value if isinstance(error.validator_value, list) else []
        missing = [p for p in required if p not in error.instance]
        if missing:
            return FieldViolation(f"{path}.{missing[0]}", "required property is missing")
    return FieldViolation(path, error.message)
