"""The simulation's machinery at small scale (seconds): bench/simulate.py drives lbd's real balancer,
registry, health machine and sessions through the whole scenario and writes its summary. The full run
(10,000 servers, 1,000,000 clients) is `make simulate`."""

from __future__ import annotations

import json
from pathlib import Path

from bench import simulate


def test_a_small_run_goes_through_every_phase_with_lbds_own_decisions(tmp_path: Path) -> None:
    code = simulate.main(["--servers", "200", "--clients", "4000", "--no-plots", "--quiet", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code in (0, 1)  # 1: a target failed, which a run this small may do
    assert [phase["name"] for phase in summary["phases"]] == [name for name, _ in simulate.PHASES_MIN]
    assert len(summary["targets"]) == 5 and all(isinstance(target["pass"], bool) for target in summary["targets"])
    figures = summary["figures"]
    assert figures["requests"] > 50_000 and figures["new_clients"] <= 4000
    decisions = figures["decisions"]  # the balancer's own count of its choices, by route reason
    assert decisions["best_in_region"] > 0 and decisions["moved"] > 0 and decisions["failback"] > 0
    assert figures["failovers"] > 0 and figures["routing_us_per_request"] > 0
    phases = {phase["name"]: phase for phase in summary["phases"]}
    outage, recovered = phases["us-east down"], phases["us-east recovered"]
    samples = summary["samples"]
    during = [s for s in samples if outage["start"] + 120 <= s["t"] < outage["end"]]
    assert during and all(s["region_util"]["us-east"] == 0.0 for s in during)  # nothing served by us-east
    assert all(s["outage_home_share"] < 0.05 for s in during)  # its clients elsewhere
    after = [s for s in samples if s["t"] >= recovered["end"]]
    assert after[0]["outage_home_share"] > 0.9  # and back home after the recovery
    assert figures["us_east_back_in_rotation_after_s"] is not None
