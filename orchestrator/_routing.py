"""Python decides, Rust forwards: the decision for each routed call, and the rare callbacks.

The native data plane (``sidemesh_dataplane``, ``orchestrator/dataplane``) owns
the listeners and forwards calls as bytes. For each routed call, once its first
request message is in, it calls :meth:`Decider.decide` on one of its own
threads (holding the GIL only for the call): resolve the target in the catalog,
check the caller may call it and the tool arguments, pick the replica, rewrite
the target to the plugin-local name. Only when an attempt fails does it call
:meth:`Decider.retry_pick` (budget, another replica) or
:meth:`Decider.upstream_failed` (the error the caller sees).

These run beside the event loop, not on it: they only read the catalog and the
plugins (which the loop replaces rather than edits in place) and append to
thread-safe deques that :mod:`orchestrator._accounting` empties on the loop.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

import sidemesh_dataplane as dp

from orchestrator._access import Access
from orchestrator._authz import AccessDenied
from orchestrator._catalog import Catalog, Entry
from orchestrator._interceptors import CallInput, Chain
from orchestrator._plugin import PluginRuntime
from orchestrator._principals import ANONYMOUS, Principal, TransportIdentity
from orchestrator._process import process_tree
from orchestrator._replica import Replica
from orchestrator._routes import BY_PATH, MCP_SERVICE, NO_FIRST_MESSAGE, ROUTES, Route
from sidemesh.core import (
    InvalidArgumentError,
    ResourceExhaustedError,
    SidemeshError,
    UnauthenticatedError,
    UnavailableError,
)
from sidemesh.v1 import tool_pb2

log = logging.getLogger("sidemesh.router")

#: Span attribute sets kept (one per target and principal) before the cache starts over.
_MAX_ATTRIBUTE_SETS = 4096

#: The routed methods, for the data plane: every other path is the orchestrator's own.
DATAPLANE_ROUTES = [(route.path, route.kind) for route in ROUTES]
#: Routed streams that end with one ``result`` message: once it is forwarded, the call is
#: complete even if the sidecar goes away before its trailers.
COMPLETE_AFTER = {route.path: route.final_tag for route in ROUTES if route.final_tag is not None}


class CallContext:
    """What the mesh remembers of one forwarded call (handed back in its record)."""

    __slots__ = ("caller", "entry", "plugin", "principal", "replica", "route", "tried")

    def __init__(
        self,
        route: Route,
        entry: Entry[Any],
        plugin: PluginRuntime,
        replica: Replica,
        caller: str,
        principal: Principal | None,
    ) -> None:
        self.route = route
        self.entry = entry
        self.plugin = plugin
        self.replica = replica
        self.caller = caller
        #: Who made it; its slot of the caller's limits is given back when it ends.
        self.principal = principal
        #: Replicas an attempt of this call failed on.
        self.tried: list[Replica] = [replica]


class _Resolving:
    """What resolving one call needs: the catalog, and one policy check of its caller."""

    __slots__ = ("_call", "_decider", "catalog", "identity", "principal")

    def __init__(self, decider: Decider, call: dp.Call, identity: TransportIdentity) -> None:
        self.catalog = decider.catalog
        self._decider = decider
        self._call = call
        self.identity = identity
        self.principal: Principal | None = None

    def authorize(self, kind: str, entry: Entry[Any], method: str) -> None:
        """Authenticates the caller, checks it may call ``entry`` and takes a slot of its
        limits; raises UNAUTHENTICATED / PERMISSION_DENIED (reported) / RESOURCE_EXHAUSTED."""
        access = self._decider.access
        if access is None:
            return
        try:
            self.principal = access.admit(
                self.identity, _text(self._call.header("authorization")), kind,
                entry.qualified, method,
            )  # fmt: skip
        except UnauthenticatedError as refused:
            self._decider.unauthenticated.append(
                (entry.plugin, entry.qualified, method, str(refused), self.identity.describe())
            )
            raise
        except AccessDenied as denied:
            caller = self._call.caller
            self._decider.denied.append(
                (caller, entry.plugin, entry.qualified, method, denied.message,
                 denied.principal.name)
            )  # fmt: skip
            raise


class Decider:
    """The data plane's callbacks (see the module docstring); one per orchestrator."""

    def __init__(
        self,
        catalog: Catalog,
        plugins: Mapping[str, PluginRuntime],
        *,
        routed: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self._plugins = plugins
        #: Told (plugin, trace id, calling plugin) of every routed call, before it is
        #: forwarded: the traces a plugin may add spans to (``Telemetry.routed``).
        self._routed = routed
        #: Who may call what (set when the mesh starts; None: anyone, for tests).
        self.access: Access | None = None
        #: Listener id -> ``unix``, ``tls`` or ``tcp``: how its peers are identified.
        self.listeners: dict[str, str] = {}
        #: Calls routed (plugin, call id, path, target, caller, replica, trace id,
        #: principal): the ``call_started`` events, emitted on the loop.
        self.started: collections.deque[tuple[str, str, str, str, str, int, str, str]] = (
            collections.deque()
        )
        #: Calls refused as UNAUTHENTICATED (target plugin, target, method, reason, peer);
        #: bounded, a flood of them drops the oldest.
        self.unauthenticated: collections.deque[tuple[str, str, str, str, str]] = collections.deque(
            maxlen=256
        )
        #: Refused calls (caller plugin, target plugin, target, method, reason, principal).
        self.denied: collections.deque[tuple[str, str, str, str, str, str]] = collections.deque()
        #: Replica by upstream key (kept by the replicas as they come and go).
        self.replicas: dict[str, Replica] = {}
        #: Set when the mesh shuts down: calls cut off then say so.
        self.closing = False
        #: The operator's hooks on every routed call (``interceptors:`` in the config).
        self.interceptors = Chain()
        self._policies: dict[tuple[str, bool, str], dp.RetryPolicy] = {}
        self._attributes: dict[tuple[str, str], dp.SpanAttributes] = {}

    # -- the decision ----------------------------------------------------------

    def decide(self, call: dp.Call) -> dp.Decision | dp.Refusal:
        """Where the call goes, with its first message rewritten; or why it may not."""
        route = BY_PATH[call.path]
        message = call.message
        if message is None:
            text = NO_FIRST_MESSAGE.get(route.method, "the call ended before its request")
            return _refusal(InvalidArgumentError(text))
        resolving = _Resolving(self, call, self.identity(call))
        annotations = None
        try:
            entry, payload = route.resolve(resolving, message)
            if self.interceptors.active:
                annotations = self._intercept(call, entry, resolving.principal, message)
            plugin = self._plugins[entry.plugin]
            replica = plugin.pick()
            key = replica.upstream_key
            if not key:  # picked while being torn down
                raise plugin.unavailable()
        except SidemeshError as err:
            if resolving.principal is not None and self.access is not None:
                self.access.release(resolving.principal)
            return _refusal(err)
        plugin.resilience.budget.deposit()  # each call earns its plugin a share of a retry
        principal = resolving.principal
        name = principal.name if principal is not None else ""
        self.started.append(
            (entry.plugin, call.call_id, call.path, entry.qualified, call.caller,
             replica.index, call.trace_id, name)
        )  # fmt: skip
        if self._routed is not None and call.trace_id:
            self._routed(entry.plugin, int(call.trace_id, 16), call.caller)
        return dp.Decision(
            key,
            message=payload if payload is not message else None,
            context=CallContext(route, entry, plugin, replica, call.caller, principal),
            retry=self._policy(route, entry, plugin),
            span_attributes=self._span_attributes(entry.qualified, name, annotations),
        )

    def _intercept(
        self, call: dp.Call, entry: Entry[Any], principal: Principal | None, message: bytes
    ) -> dict[str, str] | None:
        """Runs the interceptors' ``before_call``; their annotations, or None."""
        hook = CallInput(
            method=call.path, target=entry.qualified, plugin=entry.plugin,
            principal=principal.name if principal is not None else "", caller=call.caller,
            trace_id=call.trace_id or "", header=lambda name: _text(call.header(name)),
            request=message,
        )  # fmt: skip
        self.interceptors.before_call(hook)
        return hook.attributes or None

    def identity(self, call: dp.Call) -> TransportIdentity:
        """What the listener proved about the call's peer."""
        if call.caller:
            return TransportIdentity.plugin(call.caller)
        kind = self.listeners.get(call.listener, "tcp")
        if kind == "unix":
            return TransportIdentity.unix(
                _or(call.peer_uid, -1), _or(call.peer_gid, -1), _or(call.peer_pid, 0)
            )
        loopback = is_loopback_peer(call.peer)
        if kind == "tls":
            certificate = "" if call.principal == ANONYMOUS else call.principal
            return TransportIdentity.tls(certificate, loopback=loopback)
        return TransportIdentity.tcp(loopback=loopback)

    def _policy(self, route: Route, entry: Entry[Any], plugin: PluginRuntime) -> dp.RetryPolicy:
        idempotent = route.kind != "stream_stream" and _idempotent(route, entry)
        key = (plugin.name, idempotent, route.kind)
        policy = self._policies.get(key)
        if policy is None:
            settings = plugin.resilience.retries
            policy = dp.RetryPolicy(
                settings.max_attempts,
                idempotent=idempotent,
                per_try_timeout=settings.per_try_timeout if route.kind != "stream_stream" else None,
                backoff_base=settings.backoff_initial,
                backoff_max=settings.backoff_max,
            )
            self._policies[key] = policy
        return policy

    def _span_attributes(
        self, target: str, principal: str, annotations: dict[str, str] | None = None
    ) -> dp.SpanAttributes:
        if annotations:  # an interceptor's, for this call only
            values = {**annotations, "sidemesh.target": target}
            if principal:
                values["sidemesh.principal"] = principal
            return dp.SpanAttributes(values)
        attributes = self._attributes.get((target, principal))
        if attributes is None:
            values = {"sidemesh.target": target}
            if principal:
                values["sidemesh.principal"] = principal
            attributes = dp.SpanAttributes(values)
            if len(self._attributes) >= _MAX_ATTRIBUTE_SETS:
                self._attributes.clear()
            self._attributes[(target, principal)] = attributes
        return attributes

    # -- when an attempt failed -------------------------------------------------

    def retry_pick(self, context: CallContext, failed: str, reason: str) -> str | None:
        """Another replica for a retry the data plane found safe; None: give up.

        The retry budget is spent here, so retries cannot multiply an outage.
        """
        if self.closing:
            return None
        plugin = context.plugin
        other = plugin.pick_other(context.tried)
        if other is None or not other.upstream_key:
            log.info("%s: call not retried (%s): no other replica takes calls", plugin.name,
                     reason)  # fmt: skip
            return None
        if not plugin.resilience.budget.try_spend():
            log.info("%s: retry budget spent; call not retried (%s)", plugin.name, reason)
            return None
        context.tried.append(other)
        return other.upstream_key

    def upstream_failed(
        self, context: CallContext, key: str, detail: str
    ) -> tuple[int, str, bytes | None]:
        """The status a caller gets when the transport to its replica failed."""
        if self.closing:
            err: SidemeshError = UnavailableError(
                "the mesh is shutting down and its grace period for calls in flight is over; "
                "the call did not complete: retry against the mesh once it is back",
                reason="MESH_SHUTTING_DOWN",
                retry_delay=1.0,
            )
        else:
            replica = self.replicas.get(key, context.replica)
            err = sidecar_gone(context.plugin, replica, detail)
        return err.code.value[0], err.message, _details(err)

    def verify_peer(self, key: str, pid: int, uid: int) -> bool:
        """Whether a new connection to a replica's socket reached a process of the replica."""
        replica = self.replicas.get(key)
        if replica is None or replica.process is None:
            return False
        if pid in process_tree(replica.process.pid):
            return True
        log.error(
            "%s: refused a connection to its socket: it is served by pid %d (uid %d), "
            "not by a process of the replica",
            replica.tag, pid, uid,
        )  # fmt: skip
        return False


class Upstreams:
    """The data plane's upstream pool, and the decider's map from its keys to replicas."""

    def __init__(self, plane: dp.DataPlane, decider: Decider) -> None:
        self._plane = plane
        self._decider = decider

    def publish(
        self,
        replica: Replica,
        key: str,
        address: str,
        *,
        verify: bool,
        span_attributes: Mapping[str, str | int | float | bool],
    ) -> None:
        """The replica at ``address`` takes calls as ``key`` (checked on each connection)."""
        self._decider.replicas[key] = replica
        self._plane.set_upstream(key, address, verify=verify, span_attributes=span_attributes)

    def withdraw(self, key: str) -> None:
        """The replica takes no more calls; those in flight end UNAVAILABLE."""
        self._plane.remove_upstream(key)
        self._decider.replicas.pop(key, None)

    def in_flight(self, key: str) -> int:
        """Attempts in flight on the replica."""
        return self._plane.in_flight(key)


def is_loopback_peer(peer: str) -> bool:
    """Whether a TCP peer (``127.0.0.1:5555``, ``[::1]:5555``) is on this machine."""
    host = peer.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def admission_refusal(limit: int) -> tuple[str, bytes | None]:
    """The RESOURCE_EXHAUSTED a call over ``limits.max_concurrent_calls`` gets."""
    err = ResourceExhaustedError(
        f"the mesh is at its limit of {limit} concurrent calls; retry shortly "
        "(operators: raise limits.max_concurrent_calls)",
        reason="CONCURRENCY_LIMIT",
        retry_delay=0.1,
    )
    return err.message, _details(err)


def sidecar_gone(plugin: PluginRuntime, replica: Replica, how: str) -> UnavailableError:
    """The error for a call whose sidecar died or went away while it ran."""
    died = replica.process is None or replica.process.returncode is not None
    what = "exited" if died else "became unreachable"
    return UnavailableError(
        f"plugin {plugin.name!r} replica {replica.index} {what} during the call ({how}); "
        "the call did not complete. The replica is being restarted: retry",
        reason="SIDECAR_UNAVAILABLE",
        metadata={"plugin": plugin.name, "replica": str(replica.index)},
        retry_delay=1.0,
    )


def _idempotent(route: Route, entry: Entry[Any]) -> bool:
    """Whether calling ``entry`` twice is safe: a read-only or idempotent tool, an MCP read."""
    if route.service == MCP_SERVICE and route.kind == "unary_unary":
        return True
    descriptor = entry.descriptor
    if not isinstance(descriptor, tool_pb2.ToolDescriptor):
        return False
    hints = descriptor.annotations
    return hints.read_only or hints.idempotent


def _details(err: SidemeshError) -> bytes | None:
    status = err.to_status_proto()
    return status.SerializeToString() if status.details else None


def _refusal(err: SidemeshError) -> dp.Refusal:
    return dp.Refusal(err.code.value[0], err.message, _details(err))
