"""Unary throughput driven by h2load (nghttp2), so that the load generator is not the limit.

h2load speaks HTTP/2 over TCP and knows nothing of gRPC: it POSTs a fixed
body (one framed ``CallToolRequest``) with the gRPC headers and counts HTTP
statuses. A gRPC error also has HTTP status 200, so a run only counts when
the same body got status OK and the right result from a Python call
(:func:`bench._unary.verify_body`), and every response carried at least as
many DATA bytes as that good response (errors come as trailers only).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PATH = "/sidemesh.v1.ToolService/CallTool"


def h2load_binary() -> str | None:
    """The h2load command, if installed."""
    return shutil.which("h2load")


def h2load_version(binary: str) -> str:
    """``h2load --version`` as ``1.52.0``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    match = re.search(r"nghttp2/(\S+)", out.stdout)
    return match.group(1) if match else "unknown"


@dataclass
class H2loadResult:
    """What one h2load run reports."""

    requests_per_second: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int
    mean_request_ms: float
    duration: float
    connections: int
    streams_per_connection: int
    #: Every response had a body at least as large as a good one (see the module doc).
    bodies_ok: bool
    command: str

    def as_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return asdict(self)


def run_h2load(
    binary: str,
    address: str,
    body_file: Path,
    *,
    connections: int,
    streams: int,
    duration: float,
    warmup: float,
    response_bytes: int,
    headers: tuple[str, ...] | list[str] = (),
) -> H2loadResult:
    """Runs h2load for ``warmup + duration`` seconds against ``address`` (host:port)."""
    argv = [
        binary, f"--duration={round(duration * 1000)}ms",
        f"--warm-up-time={round(warmup * 1000)}ms",
        f"--clients={connections}", f"--max-concurrent-streams={streams}", "--threads=1",
        f"--data={body_file}", "--header=content-type: application/grpc",
        "--header=te: trailers", *(f"--header={h}" for h in headers),
        f"http://{address}{PATH}",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + duration + 30)
    text = out.stdout
    if out.returncode != 0 or "requests:" not in text:
        raise RuntimeError(f"h2load failed ({out.returncode}):\n{text}\n{out.stderr}")
    rps = float(_find(r"finished in [\d.]+\w*, ([\d.]+) req/s", text))
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if req is None:
        raise RuntimeError(f"cannot read h2load's output:\n{text}")
    done, succeeded, failed, errored, timeouts = (int(req.group(i)) for i in range(3, 8))
    data = int(_find(r"traffic: .*?, [\d.]+\w*B \((\d+)\) data", text))
    mean = _find(r"time for request:\s+\S+\s+\S+\s+(\S+)", text)
    return H2loadResult(
        requests_per_second=rps,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeouts,
        status_2xx=int(_find(r"status codes: (\d+) 2xx", text)),
        data_bytes=data,
        mean_request_ms=_milliseconds(mean),
        duration=duration,
        connections=connections,
        streams_per_connection=streams,
        bodies_ok=done > 0 and data >= done * response_bytes,
        command=" ".join(
            a
            if not a.startswith("--header=authorization")
            else "--header=authorization: Bearer ..."
            for a in argv
        ),
    )


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"cannot find {pattern!r} in h2load's output:\n{text}")
    return match.group(1)


def _milliseconds(value: str) -> float:
    """h2load's ``692us`` / ``27.22ms`` / ``1.2s`` in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if match is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale
