"""Benchmark: capture + profile + group of a workload, cold (empty profile cache) and warm,
and grouping a synthetic 10,000-node graph (issue 2's targets: inception_v3:paper within
60 s cold and 2 s warm on a 2-core CPU host; 10,000 nodes grouped within 10 s).

    python experiments/bench_capture.py                 # the recorded run
    python experiments/bench_capture.py --quick         # a smoke test of the script

Writes experiments/results/capture.json (or capture-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _record import host_info  # this folder is on sys.path when run as a script
from graphs.capture import capture
from graphs.group import group
from graphs.profile import profile
from graphs.synthetic import random_op_graph
from graphs.workload import load_workload

RESULTS = Path(__file__).parent / "results"


def pipeline(spec: str, cache_dir: str, threads: int | None, repeats: int, max_groups: int) -> dict:
    """Seconds for each stage of load -> capture -> profile -> group."""
    times = {}
    start = time.perf_counter()
    workload = load_workload(spec)
    times["load_s"] = time.perf_counter() - start
    t = time.perf_counter()
    ops = capture(workload)
    times["capture_s"] = time.perf_counter() - t
    t = time.perf_counter()
    profiled = profile(ops, workload, threads=threads, repeats=repeats, cache_dir=cache_dir)
    times["profile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = group(profiled, max_groups)
    times["group_s"] = time.perf_counter() - t
    times["capture_profile_group_s"] = times["capture_s"] + times["profile_s"] + times["group_s"]
    times.update(nodes=ops.number_of_nodes(), groups=groups.number_of_nodes(),
                 compute_ms=sum(d["fwd_ms"]["cpu"] + d["bwd_ms"]["cpu"] for d in profiled.nodes.values()))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default=None, help="default: zoo:inception_v3:paper (small with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads while profiling")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--synthetic-nodes", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="small workload and graph, to check the script works")
    args = parser.parse_args()
    spec = args.workload or ("zoo:inception_v3:small" if args.quick else "zoo:inception_v3:paper")
    synthetic_nodes = 1_000 if args.quick else args.synthetic_nodes
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = pipeline(spec, cache_dir, args.threads, repeats, args.max_groups)
        warm = pipeline(spec, cache_dir, args.threads, repeats, args.max_groups)
    synthetic = random_op_graph(synthetic_nodes)
    t = time.perf_counter()
    synthetic_groups = group(synthetic, args.max_groups)
    group_s = time.perf_counter() - t

    result = {
        "workload": spec, "repeats": repeats, "max_groups": args.max_groups,
        "cold": cold, "warm": warm,
        "synthetic": {"nodes": synthetic_nodes, "groups": synthetic_groups.number_of_nodes(), "group_s": group_s},
        "host": {**host_info(), "torch_threads": args.threads or torch.get_num_threads()},  # experiments/_record.py
        "quick": args.quick,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("capture-quick.json" if args.quick else "capture.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{spec}: cold {cold['capture_profile_group_s']:.2f} s, warm {warm['capture_profile_group_s']:.2f} s "
          f"({cold['nodes']} ops -> {cold['groups']} groups); "
          f"grouping {synthetic_nodes} nodes: {group_s:.2f} s; wrote {out}")


if __name__ == "__main__":
    main()
