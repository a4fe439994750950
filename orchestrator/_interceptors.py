"""Interceptors: the operator's hooks on the orchestrator's decision path.

In the style of temporalio's interceptors: an :class:`Interceptor` wraps the
next link of a chain of :class:`CallInterceptor` objects, each of whose hooks
takes one input object and calls ``self.next`` to go on. The chain is built
once, at start, from ``interceptors:`` in the config (outermost first).

- :meth:`CallInterceptor.before_call` runs for every routed call once the
  caller is authenticated and authorized, before a replica is picked. It may
  read the call (:class:`CallInput`), **reject** it by raising a
  ``clients.SidemeshError`` (its code and message are what the caller gets), or
  **annotate** it: ``input.attributes[...] = ...`` lands on the call's span.
  It runs on a data plane thread with the GIL held: keep it to microseconds.
- :meth:`CallInterceptor.after_call` runs on the event loop for every call that
  was forwarded, with its outcome (:class:`CallOutcome`): counting, audit logs.

Interceptors are the operator's code, run inside the orchestrator process like
its config: they are trusted, and unsandboxed. A hook that raises anything but
a ``SidemeshError`` is logged, and its call refused as ``INTERNAL`` (before) or
left as it was (after): a buggy hook never takes the mesh down.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from clients import InternalError, SidemeshError
from orchestrator._config import InterceptorSpec
from orchestrator._yaml_models import ConfigError, Problem

log = logging.getLogger("sidemesh.interceptors")

#: Bounds on what a hook may add to a span.
MAX_ATTRIBUTES = 16
MAX_ATTRIBUTE_BYTES = 1024


@dataclasses.dataclass(slots=True)
class _Call:
    """What both hooks are told of a call."""

    #: The gRPC method, e.g. ``/sidemesh.v1.ToolService/CallTool``.
    method: str
    #: What is called, qualified: ``tools-demo/add``.
    target: str
    #: The plugin that serves it.
    plugin: str
    #: Who calls, as the policy knows it: ``unix:uid:1000``, ``plugin:assistant``, ...
    principal: str
    #: The calling plugin, or "" for a client.
    caller: str
    #: The call's trace id (32 hex digits), or "".
    trace_id: str


@dataclasses.dataclass(slots=True)
class CallInput(_Call):
    """One routed call, before it is forwarded."""

    #: Reads one request header (metadata), e.g. ``header("x-tenant")``.
    header: Callable[[str], str | None]
    #: The first request message as sent, serialized (parse it with the route's type).
    request: bytes
    #: Set entries to annotate the call's span (at most 16, values cut to 1 KiB).
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class CallOutcome(_Call):
    """One forwarded call, once it ended."""

    #: The gRPC status code the caller got (0 is OK), and its message.
    code: int
    message: str
    #: Seconds from the first request message to the trailers.
    duration: float
    #: How many attempts it took (retries + 1).
    attempts: int
    #: Response messages forwarded.
    responses: int


class CallInterceptor:
    """One link of the chain: override a hook, and call ``self.next``'s to go on."""

    def __init__(self, next: CallInterceptor) -> None:
        self.next = next

    def before_call(self, input: CallInput) -> None:
        """Runs before the call is forwarded; raise a ``SidemeshError`` to refuse it."""
        self.next.before_call(input)

    def after_call(self, outcome: CallOutcome) -> None:
        """Runs once the call ended."""
        self.next.after_call(outcome)


class Interceptor:
    """What the config names: it wraps the rest of the chain in its own link."""

    def intercept_call(self, next: CallInterceptor) -> CallInterceptor:
        """Returns the link to run before ``next`` (``next`` itself to add none)."""
        return next


class _End(CallInterceptor):
    """The end of every chain: nothing more to do."""

    def __init__(self) -> None:
        pass

    def before_call(self, input: CallInput) -> None:
        return None

    def after_call(self, outcome: CallOutcome) -> None:
        return None


class Chain:
    """The configured interceptors as one chain, run by the decisions and the accounting."""

    def __init__(self, interceptors: Sequence[Interceptor] = ()) -> None:
        link: CallInterceptor = _End()
        for interceptor in reversed(interceptors):
            link = interceptor.intercept_call(link)
        self._first = link
        #: Whether there is anything to run (no chain: no input objects are built).
        self.active = bool(interceptors)

    def before_call(self, input: CallInput) -> None:
        """Runs the chain's ``before_call``; raises ``SidemeshError`` to refuse the call."""
        try:
            self._first.before_call(input)
        except SidemeshError:
            raise
        except Exception as exc:
            log.exception("an interceptor failed before a call to %s", input.target)
            raise InternalError(
                f"the mesh's interceptors failed on this call ({type(exc).__name__}); "
                "the operator can see why in the orchestrator's log"
            ) from None
        if len(input.attributes) > MAX_ATTRIBUTES:
            input.attributes = dict(list(input.attributes.items())[:MAX_ATTRIBUTES])
        for key, value in input.attributes.items():
            input.attributes[key] = str(value)[:MAX_ATTRIBUTE_BYTES]

    def after_call(self, outcome: CallOutcome) -> None:
        """Runs the chain's ``after_call``; what a hook raises is logged, not raised."""
        try:
            self._first.after_call(outcome)
        except Exception:
            log.exception("an interceptor failed after a call to %s", outcome.target)


def load_interceptors(specs: Sequence[InterceptorSpec], source: str) -> Chain:
    """Imports and makes the configured interceptors; ``ConfigError`` naming the entry."""
    made = []
    for i, spec in enumerate(specs):
        field = f"interceptors[{i}]"
        try:
            made.append(_make(spec))
        except _Unusable as exc:
            raise ConfigError(source, "Sidemesh config", [
                Problem(f"{field}.use", str(exc), exc.fix)
            ]) from None  # fmt: skip
    return Chain(made)


class _Unusable(Exception):
    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def _make(spec: InterceptorSpec) -> Interceptor:
    module_name, _, attribute = spec.use.partition(":")
    if spec.path is not None and str(spec.path) not in sys.path:
        sys.path.insert(0, str(spec.path))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise _Unusable(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}",
            "install the module, or give the directory it is in as 'path'",
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise _Unusable(f"{module_name!r} has no class {attribute!r}", "check 'use'")
    try:
        interceptor = factory(**spec.options)
    except Exception as exc:
        raise _Unusable(
            f"{spec.use}(**options) raised {type(exc).__name__}: {exc}", "check 'options'"
        ) from None
    if not isinstance(interceptor, Interceptor):
        raise _Unusable(
            f"{spec.use} made a {type(interceptor).__name__}, not an orchestrator.Interceptor",
            "subclass orchestrator.Interceptor",
        )
    return interceptor
