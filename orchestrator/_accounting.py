"""What happened to the calls the data plane forwarded: events, outliers, spans, metrics.

The data plane keeps a record of every finished call and the span rows it made
(SERVER and one CLIENT per attempt). :class:`Accounting` takes them in batches
on the event loop (every ``interval`` seconds): each attempt's outcome feeds
outlier ejection, each call becomes a ``call_finished`` / ``call_failed``
event and a duration, and the span rows go to the trace store (and, encoded
to OTLP, to the configured endpoint). The ``call_started`` events and refused
callbacks the decisions noted are emitted first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping

import sidemesh_dataplane as dp

from orchestrator._events import EventBus
from orchestrator._interceptors import CallOutcome
from orchestrator._plugin import PluginRuntime
from orchestrator._resilience import NEVER_REACHED, TIMEOUT, TRANSPORT
from orchestrator._routing import CallContext, Decider
from orchestrator._telemetry import Telemetry
from sidemesh.v1 import mesh_pb2

log = logging.getLogger("sidemesh.router")

#: An attempt's outcome (the data plane's word) -> the kind of replica failure it is.
_FAILURES = {"never_reached": NEVER_REACHED, "transport": TRANSPORT, "per_try_timeout": TIMEOUT}
_OK = 0


class Accounting:
    """Empties the data plane's records and span rows into the mesh's books."""

    def __init__(
        self,
        plane: dp.DataPlane,
        decider: Decider,
        plugins: Mapping[str, PluginRuntime],
        events: EventBus,
        telemetry: Telemetry,
        interval: float = 0.05,
    ) -> None:
        self._plane = plane
        self._decider = decider
        self._plugins = plugins
        self._events = events
        self._telemetry = telemetry
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._unauthenticated_count = 0  # refused since the last log line about them
        self._unauthenticated_logged = -1.0
        self._unauthenticated_last = ("", "", "", "", "")
        self._durations = (
            telemetry.meter.create_histogram(
                "rpc.server.call.duration", unit="s", description="Duration of routed calls"
            )
            if telemetry.metrics_exported
            else None
        )

    def start(self) -> None:
        """Starts taking the records in, every ``interval`` seconds."""
        self._task = asyncio.create_task(self._run(), name="accounting")

    async def stop(self) -> None:
        """Takes in what is left, then stops."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.drain()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.drain()
            except Exception:  # a bug of ours must not stop the books
                log.exception("taking in the data plane's records failed")

    def drain(self) -> None:
        """Takes in every record and span row the data plane has now."""
        decider = self._decider
        started = decider.started
        while started:
            self._call_started(*started.popleft())
        denied = decider.denied
        while denied:
            self._denied(*denied.popleft())
        unauthenticated = decider.unauthenticated
        if unauthenticated:
            self._unauthenticated(unauthenticated)
        if self._unauthenticated_count:
            self._log_unauthenticated()
        for record in self._plane.take_records():
            context = record.context
            if isinstance(context, CallContext):
                self._ended(record, context)
        rows = self._plane.take_span_rows()
        if rows:
            self._telemetry.add_rows(rows)

    # -- one call ----------------------------------------------------------------

    def _ended(self, record: dp.Record, context: CallContext) -> None:
        plugin = context.plugin
        resilience = plugin.resilience
        replicas = self._decider.replicas
        for key, outcome, _code, _start, _end, _span, _detail in record.attempts:
            replica = replicas.get(key)
            if replica is None:
                continue
            failure = _FAILURES.get(outcome)
            if failure is not None:
                resilience.failed(replica, failure, plugin.ready)
            elif outcome in ("ok", "status"):
                resilience.succeeded(replica)
        code = record.code
        caller = context.caller
        principal = context.principal
        if principal is not None and self._decider.access is not None:
            self._decider.access.release(principal)
        who = principal.name if principal is not None else ""
        target, path, call_id = context.entry.qualified, record.path, record.call_id
        attempts, responses, message = len(record.attempts), record.responses, record.message
        nanos = record.end_ns - record.start_ns
        trace_id = record.trace_id

        def build() -> mesh_pb2.CallEnded:
            ended = mesh_pb2.CallEnded(
                call_id=call_id, method=path, target=target, caller=caller, code=code,
                message=message, responses=responses, attempts=attempts, trace_id=trace_id,
                principal=who,
            )  # fmt: skip
            ended.duration.FromNanoseconds(nanos)
            return ended

        self._events.emit(
            context.entry.plugin,
            "call_finished" if code == _OK else "call_failed",
            build,
            also=(caller,) if caller else (),
        )
        interceptors = self._decider.interceptors
        if interceptors.active:
            interceptors.after_call(CallOutcome(
                method=path, target=target, plugin=context.entry.plugin, principal=who,
                caller=caller, trace_id=trace_id or "", code=code, message=message or "",
                duration=nanos / 1e9, attempts=attempts, responses=responses,
            ))  # fmt: skip
        if self._durations is not None:
            self._durations.record(
                nanos / 1e9,
                {"rpc.method": path, "sidemesh.target": target, "rpc.grpc.status_code": code},
            )

    def _call_started(
        self,
        plugin: str,
        call_id: str,
        method: str,
        target: str,
        caller: str,
        replica: int,
        trace_id: str,
        principal: str,
    ) -> None:
        def build() -> mesh_pb2.CallStarted:
            return mesh_pb2.CallStarted(
                call_id=call_id, method=method, target=target, caller=caller, replica=replica,
                trace_id=trace_id, principal=principal,
            )  # fmt: skip

        self._events.emit(plugin, "call_started", build, also=(caller,) if caller else ())

    def _unauthenticated(self, refused: collections.deque[tuple[str, str, str, str, str]]) -> None:
        self._unauthenticated_count += len(refused)
        self._unauthenticated_last = refused[-1]
        while refused:
            plugin, target, method, reason, peer = refused.popleft()
            self._events.emit(
                plugin,
                "unauthenticated",
                mesh_pb2.Unauthenticated(target=target, method=method, reason=reason, peer=peer),
            )

    def _log_unauthenticated(self) -> None:
        """One line about the refused unauthenticated calls, at most once a second."""
        now = time.monotonic()
        if now - self._unauthenticated_logged < 1.0:
            return
        _, target, _, reason, peer = self._unauthenticated_last
        log.warning(
            "refused %d unauthenticated call(s) (the last from %s to %s: %s)",
            self._unauthenticated_count, peer, target, reason,
        )  # fmt: skip
        self._unauthenticated_count, self._unauthenticated_logged = 0, now

    def _denied(
        self, caller: str, plugin: str, target: str, method: str, reason: str, principal: str
    ) -> None:
        log.warning("permission denied: %s", reason)
        self._events.emit(
            caller or plugin,
            "permission_denied",
            mesh_pb2.PermissionDenied(
                caller=caller, target=target, method=method, reason=reason, principal=principal
            ),
            also=(plugin,) if caller else (),
        )
