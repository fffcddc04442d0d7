"""The simulation's plots (bench/simulate.py): matplotlib is needed only here (`pip install -e '.[bench]'`)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REGION_COLOURS = {
    "us-east": "#d62728", "ca-central": "#ff7f0e", "eu-west": "#1f77b4", "asia-south": "#2ca02c", "oceania": "#9467bd",
}  # fmt: skip
REASONS = {
    "moved": "moved (server out of rotation)",
    "retry": "retry (request failed on a down server)",
    "spill": "spill (nearer regions full)",
    "failback": "failback (home again)",
}
SHADES = {"us-east down": "#f4cccc", "half of us-east down": "#fce5cd", "asia-south slow": "#d9ead3"}


def _phases(axis: Any, summary: dict[str, Any], labels: bool = False) -> None:
    for phase in summary["phases"]:
        colour = SHADES.get(phase["name"])
        if colour is not None:
            axis.axvspan(phase["start"] / 60, phase["end"] / 60, color=colour, alpha=0.6, lw=0)
            if labels:
                axis.text(
                    (phase["start"] + phase["end"]) / 120, 0.97, phase["name"], transform=axis.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8,
                )  # fmt: skip


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    samples = summary["samples"]
    minutes = [s["t"] / 60 for s in samples]
    failover = summary["model"]["failover"]
    figure, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True, constrained_layout=True)
    region_axis, server_axis, home_axis, moves_axis = axes

    _phases(region_axis, summary, labels=True)
    for region, colour in REGION_COLOURS.items():
        region_axis.plot(minutes, [s["region_util"].get(region, 0.0) for s in samples], color=colour, label=region)
    region_axis.axhline(failover["fallback_max_load"], color="grey", ls="--", lw=1)
    region_axis.axhline(failover["home_max_load"], color="grey", ls=":", lw=1)
    region_axis.set_ylabel("region load / capacity")
    region_axis.set_title("Each region's load over its capacity in rotation (dashed: fallback limit; dotted: home)")
    region_axis.legend(loc="upper left", ncol=2, fontsize=8)
    highest = max(max(s["region_util"].values()) for s in samples)
    region_axis.set_ylim(0, max(1.1, highest * 1.05))

    _phases(server_axis, summary)
    server_axis.plot(minutes, [s["server_max"] for s in samples], color="black", label="busiest server")
    server_axis.plot(minutes, [s["server_p99"] for s in samples], color="grey", label="p99 server")
    for region, colour in REGION_COLOURS.items():
        server_axis.plot(minutes, [s["region_max"].get(region, 0.0) for s in samples], color=colour, lw=0.8, alpha=0.7)
    server_axis.axhline(1.0, color="red", ls="--", lw=1)
    server_axis.set_ylabel("server load / capacity")
    server_axis.set_title("Busiest and p99 server (coloured: busiest of each region); red: capacity")
    server_axis.legend(loc="upper left", fontsize=8)
    server_axis.set_ylim(0, max(1.2, max(s["server_max"] for s in samples) * 1.05))

    _phases(home_axis, summary)
    home_axis.plot(minutes, [s["own_share"] for s in samples], color="black", label="all clients")
    home_axis.plot(
        minutes, [s["outage_home_share"] for s in samples], color=REGION_COLOURS["us-east"],
        label="clients whose home is us-east (us-east, us-west)",
    )  # fmt: skip
    home_axis.axhline(0.95, color="grey", ls="--", lw=1)
    home_axis.set_ylabel("served from home region")
    home_axis.set_title("Share of present clients served from their home region")
    home_axis.legend(loc="lower left", fontsize=8)
    home_axis.set_ylim(0, 1.05)

    _phases(moves_axis, summary)
    for reason, colour in (("moved", "#d62728"), ("retry", "#ff7f0e"), ("spill", "#1f77b4"), ("failback", "#2ca02c")):
        per_minute = []
        for before, after in itertools.pairwise(samples):
            span = (after["t"] - before["t"]) / 60
            delta = after["decisions"].get(reason, 0) - before["decisions"].get(reason, 0)
            per_minute.append(delta / span / 1000 if span > 0 else 0.0)
        moves_axis.plot(minutes[1:], per_minute, color=colour, label=REASONS[reason])
    moves_axis.set_ylabel("thousands per minute")
    moves_axis.set_xlabel("simulated minutes")
    moves_axis.set_title("Sessions moved, by reason (lbctl route's reasons)")
    moves_axis.legend(loc="center right", fontsize=8)
    present_axis = moves_axis.twinx()
    present_axis.plot(minutes, [s["present"] / 1000 for s in samples], color="black", lw=0.8, ls=":")
    present_axis.set_ylabel("clients present (thousands, dotted)")
    present_axis.set_ylim(bottom=0)
    timeline = out / "simulation.png"
    figure.suptitle(
        f"lbd dynamic mode, simulated: {summary['model']['servers']:,} servers, {summary['model']['clients']:,} clients"
    )
    figure.savefig(timeline, dpi=80)
    plt.close(figure)
    return [timeline]
