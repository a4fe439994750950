"""``latest.png``: the ratios as grouped bars, with issue 13's nginx target lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._report import THROUGHPUT

_LABELS = {
    "rps_h2load": "RPS@64 h2load",
    "rps_python": "RPS@64 python",
    "msgs_64x1": "64 B x1 stream",
    "msgs_64x16": "64 B x16 streams",
    "msgs_4096x1": "4 KiB x1 stream",
    "msgs_4096x16": "4 KiB x16 streams",
}


def draw(results: dict[str, Any], path: Path) -> None:
    """Draws the throughput ratios of every pair in ``results['ratios']`` into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios: dict[str, dict[str, float | None]] = results["ratios"]
    groups = list(ratios)
    width = 0.8 / len(THROUGHPUT)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    for i, metric in enumerate(THROUGHPUT):
        xs = [g + (i - (len(THROUGHPUT) - 1) / 2) * width for g in range(len(groups))]
        ys = [ratios[name].get(metric) or 0.0 for name in groups]
        bars = ax.bar(xs, ys, width, label=_LABELS.get(metric, metric))
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=6, rotation=90,
                     padding=2)  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(0.9, color="red", linestyle="--", linewidth=1.2,
               label="target: orchestrator unary ≥ 0.9x nginx")  # fmt: skip
    ax.axhline(1.0, color="darkred", linestyle=":", linewidth=1.2,
               label="target: orchestrator streams ≥ 1.0x nginx")  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("throughput ratio (median of rounds)")
    m = results["machine"]
    ax.set_title(
        f"Sidemesh benchmark {results['timestamp']} — {m['cores']} cores {m['cpu_model']}, "
        f"steal {results['host']['steal'] * 100:.1f}%",
        fontsize=9,
    )
    top = max([row.get(m) or 0.0 for row in ratios.values() for m in THROUGHPUT] + [1.2])
    ax.set_ylim(0, min(top * 1.25, 5))
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
