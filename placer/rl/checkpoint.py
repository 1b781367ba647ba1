"""The RL search's files: saved policies, and checkpoints that let a search resume.

A checkpoint holds everything the loop needs to continue exactly where it stopped:
the policy's weights, the optimizer's and the sampler's state, the search's
bookkeeping (placer.search.state.SearchState) and the learner's own scalars; beside
it the learning curve as JSON and CSV. Every file is written atomically, so a kill
never leaves half a file where a good one was. Every failure to read one is a
CheckpointError naming the file and what to do.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from graphs.errors import CheckpointError
from graphs.files import write_atomically
from graphs.problem import Candidate, PlacementProblem
from graphs.workload import first_line
from placer.rl.policy import Seq2SeqPolicy
from placer.search.state import CURVE_FIELDS, SearchState

__all__ = ["save_policy", "load_policy", "save_checkpoint", "read_checkpoint", "restore"]

POLICY_FORMAT = "placer.policy/v3"  # v3: placements decoded given the micro-batch count (no micro-batch head)
CHECKPOINT_FORMAT = "placer.search/v4"  # v4: an incumbent per micro-batch count; v3: candidates carry their count


def save_policy(policy: Seq2SeqPolicy, path: Path | str) -> None:
    """Write the policy's weights and constructor arguments (not the problem it is bound to)."""
    saved = {"format": POLICY_FORMAT, "config": policy.config, "state_dict": policy.state_dict()}
    write_atomically(Path(path), lambda f: torch.save(saved, f))


def load_policy(path: Path | str) -> Seq2SeqPolicy:
    """A policy saved by save_policy, unbound (attach it to a problem, or pass it to train).

    Raises CheckpointError when the file is missing, corrupt, or of another format."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such policy file; give the search/policy.pt an earlier placer optimize "
                              f"wrote (an rl search that scored every candidate of a small space trains none)") from None
    except Exception as exc:  # a corrupt or foreign file
        raise CheckpointError(f"{path}: not a placer policy file ({type(exc).__name__}: {first_line(exc)})") from None
    found = saved.get("format") if isinstance(saved, dict) else None
    if found != POLICY_FORMAT:
        raise CheckpointError(f"{path}: not a placer policy file of format {POLICY_FORMAT!r} (found {found!r}); "
                              f"train a new one")
    try:
        policy = Seq2SeqPolicy(**saved["config"])
        policy.load_state_dict(saved["state_dict"])
    except Exception as exc:
        raise CheckpointError(f"{path}: a damaged policy file ({type(exc).__name__}: {first_line(exc)})") from None
    return policy


def save_checkpoint(path: Path, problem: PlacementProblem, state: SearchState, learner: dict,
                    policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    config: dict) -> None:
    """Write the checkpoint, and the learning curve beside it (curve.json, curve.csv).

    `learner`: the trainer's own scalars (JSON-ready); `config`: the TrainConfig as a dict."""
    data = {
        "format": CHECKPOINT_FORMAT,
        "problem": _identity(problem),
        "config": config,
        "policy": {"config": policy.config, "state_dict": policy.state_dict()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "learner": learner,
        "state": {"rounds": state.rounds, "samples": state.samples, "elapsed_s": state.elapsed_s,
                  "curve": state.curve, "candidates": _pack(state.candidates), "measured": _pack(state.measured),
                  "closed_at": state.closed_at, "final": _pack(state.final)},
    }
    write_atomically(path, lambda f: torch.save(data, f))
    write_atomically(path.with_name("curve.json"), lambda f: f.write(json.dumps(state.curve, indent=1).encode()))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(state.curve)
    write_atomically(path.with_name("curve.csv"), lambda f: f.write(table.getvalue().encode()))


def read_checkpoint(path: Path, problem: PlacementProblem) -> dict:
    """The checkpoint at `path`, checked to be of this problem.

    Raises CheckpointError when it cannot be read, is of another format, or was made
    for another model or other devices or memory caps."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the search checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: a search checkpoint of format {found!r}, not {CHECKPOINT_FORMAT!r}: "
                              f"start without --resume or use another --out")
    saved, now = data["problem"], _identity(problem)
    if saved["fingerprint"] != now["fingerprint"] or saved["groups"] != now["groups"]:
        raise CheckpointError(f"{path}: the checkpoint is of another problem ({saved['groups']} groups, "
                              f"fingerprint {saved['fingerprint']!r}); delete it or drop --resume")
    if saved["devices"] != now["devices"] or saved["memory_caps"] != now["memory_caps"]:
        raise CheckpointError(f"checkpoint in {path.parent} was made for devices {saved['devices']} "
                              f"(caps {_caps(saved['memory_caps'])}), not {now['devices']} "
                              f"(caps {_caps(now['memory_caps'])}): start without --resume or use another --out")
    return data


def restore(data: dict, path: Path, policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> tuple[SearchState, dict]:
    """Load a checkpoint's weights and RNG into the live objects; return the search's
    state and the learner's scalars.

    Raises CheckpointError when the checkpoint's policy has other shapes than `policy`."""
    if data["policy"]["config"] != policy.config:
        raise CheckpointError(f"{path}: the checkpoint's policy {data['policy']['config']} differs from "
                              f"{policy.config}")
    policy.load_state_dict(data["policy"]["state_dict"])
    optimizer.load_state_dict(data["optimizer"])
    generator.set_state(data["generator"])
    fields = data["state"]
    state = SearchState(**{**fields, "candidates": _unpack(fields["candidates"]),
                           "measured": _unpack(fields["measured"]), "final": _unpack(fields.get("final", []))})
    return state, dict(data["learner"])


def _pack(scored: dict[Candidate, float]) -> list[list]:
    return [[list(c.placement), c.microbatches, ms] for c, ms in scored.items()]


def _unpack(rows: list[list]) -> dict[Candidate, float]:
    return {Candidate(tuple(p), int(m)): float(ms) for p, m, ms in rows}


def _identity(problem: PlacementProblem) -> dict:
    """What a checkpoint must match to be resumed: the grouped graph and the devices with their caps."""
    return {"fingerprint": problem.fingerprint, "groups": problem.n_groups, "devices": problem.cluster.spec(),
            "memory_caps": [dev.memory_bytes for dev in problem.cluster.devices]}


def _caps(caps: list[int | None]) -> str:
    return ", ".join("none" if cap is None else f"{cap}B" for cap in caps)
