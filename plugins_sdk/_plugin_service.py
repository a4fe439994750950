"""``PluginService`` of a sidecar: what the orchestrator asks (Describe, Configure, Shutdown)."""

from __future__ import annotations

from typing import Any

import grpc

from plugins_sdk._runtime import DEFAULT_GRACE, AppRuntime
from sidemesh.core import SidemeshError, struct_to_dict
from sidemesh.v1 import plugin_pb2, plugin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def grace_period(request: plugin_pb2.ShutdownRequest) -> float:
    """Seconds calls in flight get to finish: the request's, else ``DEFAULT_GRACE``."""
    if request.HasField("grace_period"):
        return request.grace_period.ToNanoseconds() / 1e9
    return DEFAULT_GRACE


class PluginServicer(plugin_pb2_grpc.PluginServiceServicer):
    """Serves one plugin's identity, takes its config, and starts its shutdown."""

    def __init__(self, runtime: AppRuntime) -> None:
        self._runtime = runtime
        self._describe = runtime.app.describe()

    async def Describe(
        self, request: plugin_pb2.DescribeRequest, context: Context
    ) -> plugin_pb2.DescribeResponse:
        """The plugin's identity, agents and tools."""
        return self._describe

    async def Configure(
        self, request: plugin_pb2.ConfigureRequest, context: Context
    ) -> plugin_pb2.ConfigureResponse:
        """Validates and applies the config; ``INVALID_ARGUMENT`` names each bad field."""
        try:
            await self._runtime.configure(struct_to_dict(request.config))
        except SidemeshError as error:
            await error.abort(context)
        return plugin_pb2.ConfigureResponse()

    async def Shutdown(
        self, request: plugin_pb2.ShutdownRequest, context: Context
    ) -> plugin_pb2.ShutdownResponse:
        """Starts draining: health turns ``NOT_SERVING``, calls in flight get the grace period."""
        await self._runtime.request_stop(grace_period(request))
        return plugin_pb2.ShutdownResponse()
