"""Is a measured verdict between two searches' picks a property of the plans? (s28, issue 16)

Re-measures, in fresh interleaved sessions that alternate the order (A B ... B A), the
mlp seed-3 picks of RL and local_search from `ablation_during_s28_mlp_s3` (confirmed
0.950x, "slower" in both of the ablation's sessions, while the simulator priced them
0.3% apart), with unplaced and three variants of RL's pick (the head on the other
device, the devices swapped, every block cut after its norm). Prints each session's
medians and RL's pick against local_search's (placer.measurements.compare).

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/probe_pair.py   # quiet host, ~6 min
"""

from __future__ import annotations

import json
from pathlib import Path

from envs.sim import Calibration, Simulator
from graphs.problem import Candidate, build_problem
from graphs.workload import load_workload
from placer.book import MeasurementBook
from placer.measurements import UNPLACED, Measurer, Protocol, compare

RUN = Path(__file__).resolve().parent / "results" / "ablation_during_s28_mlp_s3.json"
SESSIONS, CAP_S = 4, 100.0


def main() -> None:
    entry = json.loads(RUN.read_text())["problems"][0]
    loaded = load_workload(entry["workload"], seed=0)
    problem = build_problem(loaded, entry["devices"], max_groups=256)
    rl = "".join(map(str, entry["runs"]["rl"][0]["candidate"][0]))
    local = "".join(map(str, entry["runs"]["local_search"][0]["candidate"][0]))
    swapped = "".join("1" if d == "0" else "0" for d in rl)
    after_norm = "".join("110" if k % 2 == 0 else "001" for k in range(16)) + "0"  # 16 blocks of 3 groups, the head
    plans = {"rl3": rl, "ls3": local, "rl3_head0": rl[:-1] + "0", "rl3_flip": swapped, "blocks_gelu_cut": after_norm}
    candidates = {label: Candidate(tuple(int(d) for d in p), 2) for label, p in plans.items()}
    simulator = Simulator(problem, Calibration.from_json(entry["calibration"]))
    for label, c in candidates.items():
        print(label, plans[label], f"{simulator.simulate(c.placement, 2).step_ms:.1f} ms simulated", flush=True)
    entries, medians = list(candidates.items()), []
    for n in range(SESSIONS):
        measurer = Measurer(loaded, problem, MeasurementBook({"probe": "pair"}), Protocol(cap_s=CAP_S))
        out = measurer.session([(UNPLACED, None), *(entries if n % 2 == 0 else entries[::-1])], f"probe {n}")
        medians.append({label: m.median_ms for label, m in out.items()})
        print(n, {label: round(ms, 1) for label, ms in medians[-1].items()}, flush=True)
        print("   rl3 vs ls3", compare(out["rl3"], out["ls3"], "ls3"), flush=True)
    for label in candidates:
        print(label, "/ ls3 per session:", [round(m[label] / m["ls3"], 3) for m in medians])


if __name__ == "__main__":
    main()
