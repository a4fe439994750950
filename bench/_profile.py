"""How long each phase runs: the full benchmark (``make bench``) and the smoke run (seconds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench._idle import IdlePlan
from bench._token_streams import TokenPlan

#: (payload bytes, concurrent streams) of the agent-stream phases.
STREAM_SHAPES: tuple[tuple[int, int], ...] = ((64, 1), (64, 16), (4096, 1), (4096, 16))


@dataclass(frozen=True)
class Profile:
    """Every count and duration of a run; all recorded in ``latest.json``."""

    name: str
    #: Rounds over all topologies, in alternating order; medians are over rounds.
    rounds: int
    #: Unary latency at concurrency 1: measured calls, and unmeasured warm-up calls before.
    latency_calls: int
    latency_warmup: int
    #: The same through the ``clients`` library, once per run (reference).
    library_calls: int
    #: h2load at 64 streams: seconds of warm-up, then of measurement.
    h2load_warmup: float
    h2load_duration: float
    h2load_connections: int
    h2load_streams: int
    #: The Python client at 64 calls in flight: seconds of warm-up, then of measurement.
    python_concurrency: int
    python_warmup: float
    python_duration: float
    #: Deltas per stream for each (size, streams) shape (a stream asks for exactly this many).
    stream_counts: dict[str, int] = field(default_factory=dict)
    idle: IdlePlan = field(default_factory=lambda: IdlePlan(0, 1, 1, 3, 1.0, 10.0))
    #: Loads of slow token streams, once per run through each of ``token_topologies``.
    tokens: tuple[TokenPlan, ...] = ()
    token_topologies: tuple[str, ...] = ("direct", "nginx", "orchestrator")
    #: Seconds the rounds may take in all: rounds that would not fit are skipped (and reported).
    rounds_budget: float = 600.0
    #: Start the orchestrators at once (faster; their sidecars' start-up times then overlap).
    parallel_start: bool = False
    #: Run the idle streams through an orchestrator of their own (else the "orchestrator"
    #: topology's, whose peak RSS then includes the rounds).
    idle_own_orchestrator: bool = True

    def stream_count(self, size: int, streams: int) -> int:
        """Deltas per stream for a shape."""
        return self.stream_counts[f"{size}x{streams}"]

    def as_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return asdict(self)


FULL = Profile(
    name="full",
    rounds=3,
    latency_calls=2000,
    latency_warmup=200,
    library_calls=1000,
    h2load_warmup=1,
    h2load_duration=4,
    h2load_connections=1,
    h2load_streams=64,
    python_concurrency=64,
    python_warmup=0.5,
    python_duration=3.0,
    # Sized for about 1-2 s per phase at the rates this machine reaches directly.
    stream_counts={"64x1": 12000, "64x16": 1500, "4096x1": 6000, "4096x16": 600},
    # Opening a stream costs the Python servers ~2-4 ms: 10,000 take 20-45 s to open on
    # two cores, so each stream lives 2 x 25 s and all of them are open at once.
    idle=IdlePlan(
        streams=10_000,
        processes=2,
        channels_per_process=4,
        count=3,
        delay=25.0,
        time_limit=150.0,
    ),
    # The Python sidecar spends ~60-90 us of CPU per delta, so 2,000 streams at an LLM's
    # 50 tokens/s (100,000 deltas/s) would need ~8 cores for it alone: on 2 cores, many
    # streams go at 2 tokens/s, and 100 streams at 50 tokens/s (4,000-5,000 deltas/s each).
    tokens=(
        TokenPlan(
            streams=2000,
            processes=2,
            channels_per_process=4,
            count=40,
            size=16,
            delay=0.5,
            window=6.0,
            time_limit=60.0,
        ),
        TokenPlan(
            streams=100,
            processes=2,
            channels_per_process=2,
            count=600,
            size=16,
            delay=0.02,
            window=6.0,
            time_limit=40.0,
        ),
    ),
    rounds_budget=660.0,
)

SMOKE = Profile(
    name="smoke",
    rounds=1,
    latency_calls=40,
    latency_warmup=10,
    library_calls=20,
    h2load_warmup=0.1,
    h2load_duration=0.3,
    h2load_connections=1,
    h2load_streams=64,
    python_concurrency=64,
    python_warmup=0.1,
    python_duration=0.3,
    stream_counts={"64x1": 300, "64x16": 30, "4096x1": 100, "4096x16": 10},
    idle=IdlePlan(
        streams=200, processes=1, channels_per_process=2, count=3, delay=0.3, time_limit=15.0
    ),
    tokens=(
        TokenPlan(
            streams=100,
            processes=1,
            channels_per_process=2,
            count=40,
            size=16,
            delay=0.05,
            window=0.5,
            time_limit=15.0,
        ),
    ),
    rounds_budget=60.0,
    parallel_start=True,
    idle_own_orchestrator=False,
)
