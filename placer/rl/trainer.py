"""Training the placement policy: REINFORCE (or PPO) on simulated step times, with
real measurements of the best candidates deciding the final placement.

The loop, in order (`train`):

1. warm start: maximum likelihood on the best heuristic's placement, until the policy
   gives it a mean per-group probability of `imitation_target` (or `imitation_steps`),
   so that search starts from the heuristic, not from random;
2. each update samples a batch of placements, scores them (simulated step time in ms;
   inf when infeasible), and takes one policy-gradient step on reward -sqrt(seconds)
   against an exponential moving-average baseline, with an entropy bonus;
3. every `measure_every` updates, the best distinct not-yet-measured candidates are
   measured on the real runtime, and the optional `recalibrate` hook turns all
   feasible measurements so far into a new score function;
4. at the end the best candidates (and the warm start) are measured, and the final
   choice is the best measured placement (the best simulated one without `measure`).

The search stops at a wall-clock budget or a sample budget, checkpoints everything
it needs to resume (atomically) every few updates, and on Ctrl-C saves and returns
what it has (interrupted=True) so that the caller writes the best plan.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from graphs.errors import PlanError
from graphs.problem import Placement, PlacementProblem
from graphs.files import write_atomically
from placer.rl.policy import Seq2SeqPolicy, save_policy

ScoreFn = Callable[[Sequence[Placement]], list[float]]
MeasureFn = Callable[[Placement], "float | None"]
RecalibrateFn = Callable[[list[Placement], list[float]], ScoreFn]

CHECKPOINT_FORMAT = "placer.search/v2"  # v2: the problem's identity includes the devices and their caps
CURVE_FIELDS = ("update", "samples", "elapsed_s", "mean_ms", "best_sim_ms", "best_measured_ms")


@dataclass
class TrainConfig:
    seed: int = 0
    budget_s: float | None = 300.0  # wall clock, imitation and measurements included
    max_samples: int | None = None  # sampled placements; with budget_s=None the run is reproducible
    batch_size: int = 16  # placements sampled per update
    lr: float = 3e-3  # Adam
    entropy_coef: float = 0.01  # bonus on the mean per-group entropy
    baseline_decay: float = 0.9  # exponential moving average of the batch's mean reward
    temperature: float = 1.0
    logit_clip: float = 5.0  # C in C * tanh(logits / C)
    hidden: int = 64  # policy width, when train builds the policy
    algo: str = "reinforce"  # or "ppo"
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    imitation_steps: int = 500  # at most, on the warm start
    # Stop imitating at this mean per-group probability of the warm start. High: a sample
    # that strays from the warm start at one group tends to stray for a run of groups.
    imitation_target: float = 0.99
    reward: str = "neg_sqrt"  # -sqrt(step seconds) as in the paper, or "neg_log": -log(step seconds)
    infeasible_factor: float = 2.0  # an infeasible placement scores as this times the slowest feasible seen
    measure_every: int = 25  # updates between measurement rounds
    measure_top_k: int = 2  # candidates measured per round
    keep_top: int = 64  # distinct best simulated placements kept as candidates
    checkpoint_every: int = 10  # updates


@dataclass
class TrainResult:
    """What a search found; `measured` holds every measurement (inf where infeasible).

    `best` is None when the search found no feasible placement (every sample scored
    inf, no warm start, nothing measured finite); best_sim_ms is then inf."""

    best: Placement | None  # the final choice: best feasible measured, else best feasible simulated, else None
    best_sim_ms: float  # inf when no feasible placement was simulated
    best_measured_ms: float | None
    measured: list[tuple[Placement, float]]
    curve: list[dict]
    samples: int
    updates: int
    elapsed_s: float
    interrupted: bool
    policy: Seq2SeqPolicy = field(repr=False)


@dataclass
class _State:
    """Everything the loop changes, besides the policy and optimizer: what a checkpoint holds."""

    updates: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    imitated: bool = False
    baseline: float | None = None
    slowest_ms: float | None = None  # slowest feasible step time seen: the infeasible penalty's scale
    candidates: dict[Placement, float] = field(default_factory=dict)  # best simulated, at most keep_top
    measured: dict[Placement, float] = field(default_factory=dict)  # inf where infeasible
    curve: list[dict] = field(default_factory=list)

    def best_sim(self) -> tuple[Placement | None, float]:
        """The fastest feasible candidate, or (None, inf): an infeasible one is never "best"."""
        feasible = [(p, ms) for p, ms in self.candidates.items() if math.isfinite(ms)]
        return min(feasible, key=lambda kv: kv[1], default=(None, math.inf))

    def best_measured(self) -> tuple[Placement | None, float]:
        return min(self.measured.items(), key=lambda kv: kv[1], default=(None, math.inf))


def train(problem: PlacementProblem, score: ScoreFn, config: TrainConfig, measure: MeasureFn | None = None,
          warm_start: Placement | None = None, out_dir: Path | None = None, resume: bool = False,
          on_progress: Callable[[dict], None] | None = None, policy: Seq2SeqPolicy | None = None,
          recalibrate: RecalibrateFn | None = None) -> TrainResult:
    """Search for a fast placement of `problem` (module docstring). `score` gives the
    step times (ms, inf when infeasible) of a batch of placements; `measure` one
    placement's measured step time (None or inf when infeasible).

    `recalibrate(placements, times)` is called after every measurement round that
    leaves at least one feasible measurement (and once on resume), with every feasible
    measured pair so far, this run's and the resumed checkpoint's, in measurement order
    (infeasible ones are left out); it returns the score function to use from then on,
    and the kept candidates are re-scored with it.

    `policy` starts the search from given weights, e.g. load_policy of another
    workload's search: it is attached to `problem` (its max_devices must cover the
    cluster), then imitates `warm_start` like a fresh one would. Without it, train
    builds a fresh policy seeded from config.seed. On resume the checkpoint's weights
    are loaded into either.

    Never raises for a search that finds nothing feasible: the result's `best` is None."""
    if config.algo not in ("reinforce", "ppo"):
        raise ValueError(f"unknown algo {config.algo!r}: use 'reinforce' or 'ppo'")
    if config.reward not in ("neg_sqrt", "neg_log"):
        raise ValueError(f"unknown reward {config.reward!r}: use 'neg_sqrt' or 'neg_log'")
    if warm_start is not None:
        warm_start = problem.check(warm_start)  # InfeasibleError: imitating it would teach infeasibility
    checkpoint = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    saved = _read_checkpoint(checkpoint, problem) if resume and checkpoint is not None and checkpoint.exists() else None
    if policy is None and saved is not None:
        policy = Seq2SeqPolicy(**saved["policy"]["config"])
    elif policy is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            policy = Seq2SeqPolicy(max_devices=max(8, problem.n_devices), hidden=config.hidden)
    policy.attach(problem)
    policy.temperature, policy.logit_clip = config.temperature, config.logit_clip
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    state = _State()
    if saved is not None:
        state = _restore(saved, checkpoint, policy, optimizer, generator)
    started = time.monotonic() - state.elapsed_s

    def elapsed() -> float:
        return time.monotonic() - started

    def budget_left() -> bool:
        return ((config.budget_s is None or elapsed() < config.budget_s)
                and (config.max_samples is None or state.samples < config.max_samples))

    def recalibrate_score() -> None:
        """Take the score that recalibrate fits to every feasible measurement so far, and
        re-score the candidates with it."""
        nonlocal score
        pairs = _finite(state.measured)
        if recalibrate is not None and pairs is not None:
            score = recalibrate(*pairs)
            state.candidates = dict(zip(state.candidates, score(list(state.candidates))))

    def measure_round(placements: list[Placement]) -> None:
        for p in placements:
            ms = measure(p)
            state.measured[p] = math.inf if ms is None else float(ms)
        recalibrate_score()

    def unmeasured_best() -> list[Placement]:
        ranked = sorted(state.candidates, key=state.candidates.get)
        fresh = [p for p in ranked if p not in state.measured and math.isfinite(state.candidates[p])]
        return fresh[:config.measure_top_k]

    if saved is not None:
        recalibrate_score()
    interrupted = False
    try:
        if warm_start is not None and not state.candidates:
            _remember(state, [warm_start], score([warm_start]), config.keep_top)
        if warm_start is not None and not state.imitated:
            _imitate(policy, optimizer, warm_start, config)
            state.imitated = True
        while budget_left():
            n = config.batch_size
            if config.max_samples is not None:
                n = min(n, config.max_samples - state.samples)
            times = _update(policy, optimizer, generator, score, n, state, config)
            state.updates += 1
            state.samples += n
            if measure is not None and state.updates % config.measure_every == 0:
                measure_round(unmeasured_best())
            finite = [t for t in times if math.isfinite(t)]
            row = {"update": state.updates, "samples": state.samples, "elapsed_s": elapsed(),
                   "mean_ms": sum(finite) / len(finite) if finite else None,
                   "best_sim_ms": _or_none(state.best_sim()[1]), "best_measured_ms": _or_none(state.best_measured()[1])}
            state.curve.append(row)
            if on_progress is not None:
                on_progress(dict(row))
            if checkpoint is not None and state.updates % config.checkpoint_every == 0:
                state.elapsed_s = elapsed()
                _save_checkpoint(checkpoint, problem, state, policy, optimizer, generator, config)
        if measure is not None:
            final = unmeasured_best()
            if warm_start is not None and warm_start not in state.measured and warm_start not in final:
                final.append(warm_start)  # so the result is never worse than the heuristic, measured
            measure_round(final)
    except KeyboardInterrupt:
        interrupted = True
    state.elapsed_s = elapsed()
    if out_dir is not None:
        _save_checkpoint(checkpoint, problem, state, policy, optimizer, generator, config)
        save_policy(policy, Path(out_dir) / "policy.pt")

    best_sim, best_sim_ms = state.best_sim()
    best_measured, best_measured_ms = state.best_measured()
    return TrainResult(
        best=best_measured if best_measured is not None and math.isfinite(best_measured_ms) else best_sim,
        best_sim_ms=best_sim_ms, best_measured_ms=_or_none(best_measured_ms),
        measured=list(state.measured.items()), curve=list(state.curve), samples=state.samples,
        updates=state.updates, elapsed_s=state.elapsed_s, interrupted=interrupted, policy=policy)


def _imitate(policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer, placement: Placement,
             config: TrainConfig) -> None:
    """Maximum likelihood on one placement, until the policy has learned it firmly enough."""
    target = torch.tensor([placement])
    for _ in range(config.imitation_steps):
        logp, _ = policy.log_prob(target)
        if math.exp(float(logp.detach()[0]) / len(placement)) >= config.imitation_target:
            return
        optimizer.zero_grad()
        (-logp[0] / len(placement)).backward()
        optimizer.step()


def _update(policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer, generator: torch.Generator, score: ScoreFn,
            n: int, state: _State, config: TrainConfig) -> list[float]:
    """Sample n placements, score them, take one policy-gradient step; return their step times."""
    placements, old_logp, _ = policy.sample(n, generator)
    batch = [tuple(p) for p in placements.tolist()]
    times = [float(t) for t in score(batch)]
    _remember(state, batch, times, config.keep_top)

    finite = [t for t in times if math.isfinite(t)]
    if finite:
        state.slowest_ms = max(finite + [state.slowest_ms or 0.0])
    penalty_ms = config.infeasible_factor * (state.slowest_ms or 1000.0)
    rewards = torch.tensor([_reward(t if math.isfinite(t) else penalty_ms, config.reward) for t in times])
    if state.baseline is None:
        state.baseline = float(rewards.mean())
    advantages = rewards - state.baseline
    state.baseline = config.baseline_decay * state.baseline + (1 - config.baseline_decay) * float(rewards.mean())
    groups = placements.shape[1]

    # REINFORCE is one step on the policy gradient; PPO takes several on the clipped surrogate.
    for _ in range(1 if config.algo == "reinforce" else config.ppo_epochs):
        logp, entropy = policy.log_prob(placements)
        if config.algo == "reinforce":
            objective = advantages * logp
        else:
            ratio = torch.exp(logp - old_logp)
            clipped = torch.clamp(ratio, 1 - config.ppo_clip, 1 + config.ppo_clip)
            objective = torch.min(ratio * advantages, clipped * advantages)
        loss = -objective.mean() - config.entropy_coef * entropy.mean() / groups
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return times


def _reward(step_ms: float, kind: str) -> float:
    seconds = step_ms / 1000.0
    return -math.sqrt(seconds) if kind == "neg_sqrt" else -math.log(seconds)


def _remember(state: _State, placements: list[Placement], times: list[float], keep: int) -> None:
    """Add scored placements to the candidates, keeping the `keep` fastest distinct ones."""
    state.candidates.update(zip(placements, times))
    if len(state.candidates) > keep:
        state.candidates = dict(sorted(state.candidates.items(), key=lambda kv: kv[1])[:keep])


def _finite(measured: dict[Placement, float]) -> tuple[list[Placement], list[float]] | None:
    pairs = [(p, ms) for p, ms in measured.items() if math.isfinite(ms)]
    return ([p for p, _ in pairs], [ms for _, ms in pairs]) if pairs else None


def _or_none(ms: float) -> float | None:
    return ms if math.isfinite(ms) else None


# --------------------------------------------------------------------------- files
def _save_checkpoint(path: Path, problem: PlacementProblem, state: _State, policy: Seq2SeqPolicy,
                     optimizer: torch.optim.Optimizer, generator: torch.Generator, config: TrainConfig) -> None:
    """Write the checkpoint and the learning curve; atomically, so a kill never leaves half a file."""
    data = {
        "format": CHECKPOINT_FORMAT,
        "problem": _identity(problem),
        "config": asdict(config),
        "policy": {"config": policy.config, "state_dict": policy.state_dict()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "state": {**asdict(state), "candidates": [[list(p), ms] for p, ms in state.candidates.items()],
                  "measured": [[list(p), ms] for p, ms in state.measured.items()]},
    }
    write_atomically(path, lambda f: torch.save(data, f))
    write_atomically(path.with_name("curve.json"), lambda f: f.write(json.dumps(state.curve, indent=1).encode()))

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(state.curve)
    write_atomically(path.with_name("curve.csv"), lambda f: f.write(table.getvalue().encode()))


def _identity(problem: PlacementProblem) -> dict:
    """What a checkpoint must match to be resumed: the grouped graph and the devices with their caps."""
    return {"fingerprint": problem.fingerprint, "groups": problem.n_groups, "devices": problem.cluster.spec(),
            "memory_caps": [dev.memory_bytes for dev in problem.cluster.devices]}


def _read_checkpoint(path: Path, problem: PlacementProblem) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PlanError(f"{path}: cannot read the search checkpoint ({type(exc).__name__}: {exc})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise PlanError(f"{path}: a search checkpoint of format {found!r}, not {CHECKPOINT_FORMAT!r}: "
                        f"start without --resume or use another --out")
    saved, now = data["problem"], _identity(problem)
    if saved["fingerprint"] != now["fingerprint"] or saved["groups"] != now["groups"]:
        raise PlanError(f"{path}: the checkpoint is of another problem ({saved['groups']} groups, "
                        f"fingerprint {saved['fingerprint']!r}); delete it or drop --resume")
    if saved["devices"] != now["devices"] or saved["memory_caps"] != now["memory_caps"]:
        raise PlanError(f"checkpoint in {path.parent} was made for devices {saved['devices']} "
                        f"(caps {_caps(saved['memory_caps'])}), not {now['devices']} "
                        f"(caps {_caps(now['memory_caps'])}): start without --resume or use another --out")
    return data


def _caps(caps: list[int | None]) -> str:
    return ", ".join("none" if cap is None else f"{cap}B" for cap in caps)


def _restore(data: dict, path: Path, policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer,
             generator: torch.Generator) -> _State:
    """Load a checkpoint's weights and RNG into the live objects; return the loop's state."""
    if data["policy"]["config"] != policy.config:
        raise PlanError(f"{path}: the checkpoint's policy {data['policy']['config']} differs from {policy.config}")
    policy.load_state_dict(data["policy"]["state_dict"])
    optimizer.load_state_dict(data["optimizer"])
    generator.set_state(data["generator"])
    fields = data["state"]
    return _State(**{**fields, "candidates": {tuple(p): ms for p, ms in fields["candidates"]},
                     "measured": {tuple(p): ms for p, ms in fields["measured"]}})
