"""Sidemesh's benchmark harness (issue 7): the orchestrator's hop against the direct call and nginx.

``python -m bench`` (``make bench``) starts one benchmark sidecar and reaches
it directly, through nginx ``grpc_pass`` and through orchestrators (tracing
on and off), plus orchestrators that launch the plugin sandboxed and
unsandboxed; it measures each in alternating rounds and writes
``bench/results/latest.{json,md,png}``. ``python -m bench --smoke`` does all
of it for seconds and validates the outputs. See ``bench/README.md``.
"""

from bench._cli import main

__all__ = ["main"]
