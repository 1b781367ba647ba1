"""The profile cache on disk: only a cache.

One JSON file per (graph, device kind, measuring conditions) under the cache folder
(graphs.files.cache_dir). Whatever is wrong with the folder or a file (unreadable,
read-only, not a folder, another graph's nodes, values that are not finite
non-negative numbers) makes a cache miss and, for a file that exists or a write that
fails, one warning line naming the path; never an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

from graphs.files import write_text_atomically

NODE_FIELDS = ("fwd_ms", "bwd_ms", "opt_ms", "param_bytes", "grad_bytes", "opt_bytes", "act_bytes")


def cache_path(cache: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"profile-{key['fingerprint']}-{key['kind']}-{digest}.json"


def load(cache: Path, key: dict, nodes: set[str]) -> dict | None:
    """{"nodes": {node: {field: number}}, "microbatch_step_ms": {m: ms}, "microbatch_absent":
    {m: why} (None in a file written before s26), "profile_scale": number, "whole_step_spread":
    number} cached under `key` for exactly `nodes`, or None (a miss)."""
    path = cache_path(cache, key)
    try:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _warn(f"ignoring the unreadable profile cache {path}: {_reason(exc)}")
        return None
    problem = _problem(data, key, nodes)
    if problem:
        _warn(f"ignoring the profile cache {path}: {problem}")
        return None
    return {"nodes": data["nodes"], "microbatch_step_ms": {int(m): ms for m, ms in data["microbatch_step_ms"].items()},
            "microbatch_absent": ({int(m): why for m, why in data["microbatch_absent"].items()}
                                  if "microbatch_absent" in data else None),
            "profile_scale": data["profile_scale"], "whole_step_spread": data["whole_step_spread"]}


def store(cache: Path, key: dict, result: dict) -> None:
    """Write atomically (a run killed half-way leaves no half-written file); a folder
    that cannot take the file is a warning: the measurements are still used."""
    path = cache_path(cache, key)
    payload = {"key": key, "nodes": result["nodes"],
               "microbatch_step_ms": {str(m): ms for m, ms in result["microbatch_step_ms"].items()},
               "microbatch_absent": {str(m): why for m, why in result["microbatch_absent"].items()},
               "profile_scale": result["profile_scale"], "whole_step_spread": result["whole_step_spread"]}
    try:
        write_text_atomically(path, json.dumps(payload, allow_nan=False))
    except (OSError, ValueError) as exc:
        _warn(f"cannot write the profile cache {path}: {_reason(exc)} (profiling again next time)")


def _problem(data, key: dict, nodes: set[str]) -> str | None:
    """Why a parsed cache file cannot serve, or None."""
    if not isinstance(data, dict) or data.get("key") != key:
        return "made under other conditions or not a profile"
    entries, steps = data.get("nodes"), data.get("microbatch_step_ms")
    if not isinstance(entries, dict) or set(entries) != nodes:
        return "made for another graph"
    for node, entry in entries.items():
        if not isinstance(entry, dict) or any(not _number(entry.get(f)) for f in NODE_FIELDS):
            return f"node {node!r} lacks a finite, non-negative {', '.join(NODE_FIELDS)}"
    if not isinstance(steps, dict) or "1" not in steps or not all(
            m.isdigit() and int(m) >= 1 and _number(ms) for m, ms in steps.items()):
        return "micro-batch step times missing or not finite, non-negative numbers"
    absent = data.get("microbatch_absent", {})  # None on load where absent: made before s26 (graphs.profile)
    if not isinstance(absent, dict) or not all(m.isdigit() and isinstance(why, str) for m, why in absent.items()):
        return "the reasons for absent micro-batch counts missing"
    if not _number(data.get("profile_scale")):
        return "the profile's scale factor missing or not a finite, non-negative number"
    spread = data.get("whole_step_spread")
    if not _number(spread) or spread > 1:
        return "the whole step's spread missing or not a number in [0, 1]"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _reason(exc: BaseException) -> str:
    """The OS's words for an OSError ("Is a directory"), else the message's first line."""
    lines = str(exc).strip().splitlines()
    return getattr(exc, "strerror", None) or (lines[0] if lines else type(exc).__name__)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
