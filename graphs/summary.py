"""What `placer inspect` shows: the size, cost and memory of a captured workload."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from graphs.bounds import LowerBound, group_compute_ms

HEAVIEST = 10


def summarize(ops: nx.DiGraph, groups: nx.DiGraph, device_kinds: Sequence[str], *, bound: LowerBound,
              notes: Sequence[str] = (), device_names: Sequence[str] | None = None) -> dict:
    """A JSON-ready summary of a profiled OpGraph and its GroupedGraph, for a cluster
    with one entry in `device_kinds` per device (`device_names`: their names, shown
    instead of the kinds). `bound` is the lower bound to show: the caller says which
    (`placer inspect` gives the one optimize reports). `notes` are things the user
    should be told (fallbacks, skipped device kinds, what the bound counts)."""
    cost = group_compute_ms(groups, device_kinds)
    kinds = list(ops.graph.get("device_kinds", []))
    memory = {attr: sum(d.get(attr, 0) for _, d in ops.nodes(data=True))
              for attr in ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes")}

    def group_bytes(data: dict) -> int:
        return data["param_bytes"] + data["grad_bytes"] + data["opt_bytes"] + data["act_bytes"]

    heaviest = sorted(groups.nodes, key=lambda g: (-cost[g], g))[:HEAVIEST]
    return {
        "name": ops.graph.get("name", ""),
        "fingerprint": ops.graph.get("fingerprint", ""),
        "granularity": ops.graph.get("granularity", "op"),
        "capture": ops.graph.get("capture", {}).get("method", "fx"),
        "nodes": ops.number_of_nodes(),
        "edges": ops.number_of_edges(),
        "groups": groups.number_of_nodes(),
        "group_edges": groups.number_of_edges(),
        "colocation_sets": len(groups.graph.get("colocate", [])),
        "param_bytes": memory["param_bytes"],
        "memory": memory,
        "compute_ms": {k: sum(d["fwd_ms"][k] + d["bwd_ms"][k] for _, d in ops.nodes(data=True)) for k in kinds},
        "optimizer_ms": {k: sum(d["opt_ms"][k] for _, d in ops.nodes(data=True)) for k in kinds},
        "devices": list(device_names or device_kinds),
        "critical_path_ms": bound.critical_path_ms,
        "work_ms": bound.work_ms,
        "lower_bound_ms": bound.bound_ms,
        "lower_bound_microbatches": bound.microbatches,
        "heaviest_groups": [{"name": groups.nodes[g]["name"], "ms": cost[g], "bytes": group_bytes(groups.nodes[g])}
                            for g in heaviest],
        "notes": list(notes),
    }


def format_summary(summary: dict) -> str:
    """A readable text block of `summarize`'s result."""
    mem = summary["memory"]
    lines = [
        f"workload     {summary['name']}  (fingerprint {summary['fingerprint']}, {summary['granularity']} granularity, "
        f"captured by torch.{summary['capture']})",
        f"graph        {summary['nodes']} ops, {summary['edges']} edges -> {summary['groups']} groups, "
        f"{summary['group_edges']} group edges, {summary['colocation_sets']} colocation sets",
        f"parameters   {_bytes(summary['param_bytes'])}",
        f"memory       params {_bytes(mem['param_bytes'])}, grads {_bytes(mem['grad_bytes'])}, "
        f"optimizer {_bytes(mem['opt_bytes'])}, activations {_bytes(mem['act_bytes'])}",
    ]
    for kind, ms in summary["compute_ms"].items():
        lines.append(f"compute      {kind}: {ms:.2f} ms fwd+bwd, {summary['optimizer_ms'][kind]:.2f} ms optimizer step")
    lines += [
        f"devices      {', '.join(summary['devices'])}",
        f"lower bound  {summary['lower_bound_ms']:.2f} ms = max(critical path {summary['critical_path_ms']:.2f} ms, "
        f"work / devices {summary['work_ms']:.2f} ms){_at(summary['lower_bound_microbatches'])}",
        "heaviest groups:",
    ]
    width = max((len(h["name"]) for h in summary["heaviest_groups"]), default=0)
    for h in summary["heaviest_groups"]:
        lines.append(f"  {h['name']:<{width}}  {h['ms']:9.3f} ms  {_bytes(h['bytes']):>10}")
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _at(microbatches: int) -> str:
    """Where a bound counts pipelining: ", at m micro-batches" (nothing for m = 1)."""
    return f", at {microbatches} micro-batches" if microbatches > 1 else ""
