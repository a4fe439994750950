"""YAML files loaded into pydantic models, with errors naming the file, the field and the fix."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file: where, what, and how to fix it."""

    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"field '{self.field}'" if self.field else "the file"
        text = f"{where}: {self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class ConfigError(ValueError):
    """A configuration or manifest file is unusable; ``str()`` says where and how to fix it."""

    def __init__(self, file: Path | str, what: str, problems: list[Problem]) -> None:
        self.file = str(file)
        self.what = what
        self.problems = problems
        lines = [f"{self.file} is not a valid {what}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def load_yaml_model(
    path: Path, model: type[M], what: str, *, context: Mapping[str, Any] | None = None
) -> M:
    """Reads ``path`` and validates it as ``model``; raises :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, what, [Problem("", "file not found", "check the path")]) from None
    except OSError as exc:
        raise ConfigError(path, what, [Problem("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            path, what, [Problem("", f"invalid YAML{where}: {problem}", "fix the YAML syntax")]
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            path,
            what,
            [Problem("", f"expected a mapping of fields, got {type(data).__name__}")],
        )
    return validate_model(data, model, path, what, context=context)


def validate_model(
    data: Mapping[str, Any],
    model: type[M],
    file: Path | str,
    what: str,
    *,
    context: Mapping[str, Any] | None = None,
) -> M:
    """Validates ``data`` as ``model``; raises :class:`ConfigError` naming ``file``."""
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        raise ConfigError(file, what, [_problem(model, e) for e in exc.errors()]) from None


def _problem(model: type[BaseModel], error: Any) -> Problem:
    loc = tuple(error["loc"])
    field = _dotted(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return Problem(
            field,
            "unknown field",
            f"{hint}remove it or use one of: {', '.join(known)}",
        )
    description = _description(model, loc)
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind != "missing" and "input" in error:
        message = f"{message} (got {error['input']!r})"
    if kind == "missing":
        return Problem(field, "required field is missing", f"add it: {description}")
    return Problem(field, message, description)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The candidate types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    """The annotation reached by following ``part`` (a field, key or index) from ``annotation``."""
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            field = candidate.model_fields.get(str(part))
            if field is not None:
                return field
        origin = typing.get_origin(candidate)
        args = typing.get_args(candidate)
        if origin in (dict, Mapping) and len(args) == 2:
            return args[1]
        if origin in (list, tuple, set, frozenset) and args:
            return args[0]
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        nxt = _step(current, part)
        current = getattr(nxt, "annotation", nxt)
    for candidate in _unwrap(current):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _description(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    current: Any = model
    description = ""
    for part in loc:
        nxt = _step(current, part)
        if nxt is None:
            break
        description = getattr(nxt, "description", None) or description
        current = getattr(nxt, "annotation", nxt)
    return description
