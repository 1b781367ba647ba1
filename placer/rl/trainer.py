"""The RL search: a seq2seq policy (placer.rl.policy) trained by PPO (or REINFORCE) on
simulated step times, with real measurements of its best candidates deciding the result.

The loop (`train`), in the order it runs:

1. warm start: maximum likelihood on the best heuristic's placement, given every
   micro-batch count the problem allows, until the policy gives it a mean per-group
   probability of 1 - explore_groups / groups, so that the search starts from the
   heuristic, not from random;
2. the first round (placer.rl.starts.seed_candidates) scores the warm start at the other
   counts and interleaved stages, and fills `first_round` batches (at most a quarter of
   max_samples), half with random stage-like candidates (placer.search.random_search.
   block_candidates), half with uniformly random ones; then each count's best so far is
   imitated as in 1. Every count keeps its own
   incumbent (placer.rl.counts): a pipelined plan may want a placement far from an
   unpipelined warm start (spread over every device), which a random one starts nearer.
   Both kinds, because the search, which samples around its incumbents, stays near its
   start: from uniformly random starts alone RL lost to local_search on one seed of
   gpt@8, transformer@4 and mlp@4 (stage-like plans win there), from stage-like ones
   alone it lost to random search on nmt@4 (scattered plans win there);
3. each later round draws a micro-batch count for each of `batch_size` candidates
   (placer.rl.counts.draw_weights: a count whose incumbent is far behind the best one
   is drawn rarely), samples a placement for each from the policy given its count,
   scores them (Scorer.score: simulated step time, inf when infeasible), turns step
   times into rewards by the one reward rule (envs.reward: -log(step / the warm
   start's) by default) and takes a policy-gradient step: `ppo_update` (clipped
   surrogate) or `reinforce_update` (one step, as the paper), with advantages
   normalized among the samples of the same count, each with a self-imitation term
   that pulls each sample toward its count's incumbent. Counts compared only with
   themselves let a pipelined plan improve while the best plan is still unpipelined
   (compared with it, every pipelined sample would only teach the policy to avoid
   the count);
4. exploration is held: after each update the sampling temperature is raised where
   needed so that the policy keeps straying from the incumbent on at least about
   `explore_groups` groups a sample: it never collapses onto it. Mostly the policy is
   flatter than that, and the hold is idle: simulated (s27: the transformer and gpt@8,
   seed 0), samples differed from their count's incumbent on 17 groups on average (a
   round's mean: on gpt@8 43-58 of 85 in the first rounds, 1-4 in the last), and the
   temperature was raised in a few rounds only. The search thus samples around the
   incumbents, widely at first and more narrowly as the policy learns which groups to
   move together and where (a stray group's successors tend to follow it, so whole
   branches and stage boundaries move in one sample, which single-group moves cannot do);
5. restarts: when the best candidate since the last start has stopped improving for
   `restart_patience` rounds and the budget leaves room for another start, the search
   starts again from a fresh first round of random starts (2, without the warm start),
   the policy's weights kept. A local search ends in the basin of its start: on mlp
   (2 devices) RL's curve was flat from about 600 of 1,500 samples on, in the best
   basin on 3 of 6 seeds and 4-8% behind it on the others;
6. every `measure_every` rounds the best kept candidates not measured yet are measured
   and the scorer refits its simulator (placer.search.state: the same bookkeeping as
   random_search and local_search, so budgets compare);
7. at the end the best candidates and the warm start are measured; the final choice
   is the best measured candidate (the best simulated one when nothing is measured).

The search stops at a wall-clock or a sample budget, checkpoints everything it needs to
resume (placer.rl.checkpoint) every few rounds, and on Ctrl-C saves and returns what it
has (interrupted=True) so that the caller writes the best plan.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from envs.reward import RewardRule, reference_ms
from graphs.problem import Candidate, Placement, PlacementProblem
from placer.rl.checkpoint import read_checkpoint, restore, save_checkpoint, save_policy
from placer.rl.counts import Incumbents, best_for, draw_weights, fastest_ms, leader, learn, rescore
from placer.rl.policy import MICROBATCH_CHOICES, Seq2SeqPolicy, microbatch_indices
from placer.rl.starts import seed_candidates
from placer.rl.updates import advantage, ppo_update, reinforce_update
from placer.search.config import SearchConfig, microbatch_options
from placer.search.state import (Clock, SearchResult, SearchState, as_candidate, budget_left, closing_reserve,
                                 final_round, measure_round, refit, round_size)

__all__ = ["TrainConfig", "train", "reward_rule"]

ALGOS = ("reinforce", "ppo")


@dataclass
class TrainConfig(SearchConfig):
    """The RL search's settings: SearchConfig's budget and cadence, and the learner's own."""

    algo: str = "ppo"
    """"reinforce" (one policy-gradient step per batch, as the paper) or "ppo" (clipped surrogate)."""
    lr: float = 3e-3
    """Adam's learning rate; 0 leaves the policy as imitation made it (the ablation's "lr=0")."""
    normalize_advantages: bool = True
    """Advantages are the rewards less the mean of the batch's samples of the same
    micro-batch count, over their standard deviation (at least advantage_floor); False:
    rewards less an exponential moving average of past batch means (the paper's baseline)."""
    advantage_floor: float = 0.01
    """The least spread normalized advantages divide by, in reward units (with reward
    "neg_log", 0.01 is a step 1% faster): differences too small to matter are not blown
    up to whole units, which would make the policy collapse onto noise."""
    baseline_decay: float = 0.9
    """The moving average's decay, with normalize_advantages=False."""
    top_quantile: float | None = None
    """Risk-seeking policy gradient (Petersen et al. 2021): only samples whose reward is above
    this quantile of the batch's count, with the quantile as their baseline, because a
    search is judged by its best candidate, not its mean one. None: every sample counts."""
    self_imitation: float = 5.0
    """Weight of a maximum-likelihood term in every update on the best candidate found so
    far for each sample's micro-batch count (self-imitation, Oh et al. 2018), while the
    policy gives it less than the target per group (explore_groups): keeps the policy
    sampling around the incumbents."""
    first_round: int = 16
    """Batches the first round (placer.rl.starts.seed_candidates: the warm start at the other micro-batch
    counts, interleaved stages, random stage-like and uniformly random candidates) scores. The search stays
    near the start it imitates, so the start decides a seed: with one batch (about 3 starts per micro-batch
    count) RL lost to local_search on 2 of 3 seeds of transformer@4 and 1 of mlp@4; with 4 or 8 batches on one
    of them; with 16 on none (simulated)."""
    restart_patience: int | None = 20
    """Rounds in which the best candidate since the search's last start improves by less than
    restart_gain before the search starts again (module docstring, 5), where the budget still
    leaves the first round and this many rounds after it; None: never. Simulated, 1,500 samples,
    6 seeds (experiments/results/ablation_restarts_*.md): with 10, RL on mlp ended in the best basin
    on 5 seeds (3 without restarts), but on the transformer, whose searches improve after plateaus
    of up to 35 rounds, one seed ended 13% slower than without restarts; with 20, mlp's 5 seeds, gpt
    no seed slower and one 6% faster, the transformer 1-3% slower on 2 seeds (with 30 a restart can
    only begin between 736 and 764 of 1,500 samples, and none did)."""
    restart_gain: float = 0.005
    """The relative improvement (0.005: a step 0.5% faster) that counts as progress for restart_patience.
    Simulated, 1,500 samples, 6 seeds (experiments/results/restart_gain_*.md): with 0.002 a search creeping
    by 0.2-0.4% a few rounds apart never restarted (mlp seed 1 ended 5% behind the best basin, gpt seed 0 6%
    behind); with 0.005 both restarted into it and no seed of mlp, gpt, the transformer or nmt ended more
    than 0.3% slower; with 0.01 a transformer seed restarted out of a basin it would still have improved in
    and ended 3.7% slower."""
    microbatch_spread: float = 0.1
    """How widely micro-batch counts are drawn: a count whose best candidate so far is x
    (relative: log of the ratio) slower than the best of all is drawn with weight
    exp(-x / microbatch_spread) against the best count's 1 (a count not tried yet: 1)."""
    entropy_coef: float = 0.01
    """Bonus on the mean per-group entropy: keeps the policy sampling more than one candidate."""
    ppo_epochs: int = 4
    """PPO: gradient steps on each batch."""
    ppo_clip: float = 0.2
    """PPO: the probability ratio is clipped to [1 - ppo_clip, 1 + ppo_clip]."""
    reward: str = "neg_log"
    """Shaping of step time into reward (envs.reward.SHAPINGS): by default -log(step / the
    warm start's step), 0 at the warm start and +0.01 for a step 1% faster."""
    infeasible_slowdown: float = 10.0
    """An infeasible candidate earns the reward of a step this many times the reference."""
    reference_fallback_ms: float = 1000.0
    """The reward's reference when neither the warm start nor any single device is feasible."""
    imitation_steps: int = 500
    """At most this many maximum-likelihood steps on the warm start."""
    imitation_lr: float = 3e-3
    """Adam's learning rate while imitating (apart from lr, so that lr=0 still imitates)."""
    explore_groups: float = 2.0
    """About how many groups a sample strays from the incumbent on, at least (module docstring, 4):
    imitation aims at, and hold_exploration caps, a mean per-group probability of
    1 - explore_groups / groups (at least 0.5) for the incumbent, unless imitation_target is
    set. With 3, RL stalled on nmt@4 at 326.8-327.7 ms (simulated, 1,000 samples, 3 seeds)
    from 384-640 samples on, behind random search on one seed, while single-group hill climbing from its best still
    found 319.2: a sample that strays on 3 groups rarely beats an incumbent whose every
    better neighbour is one move away. With 2: 319.5-321.8 there, and RL's mean best on
    gpt@8, transformer@4 and mlp@4 3-5% lower, gpt@4's 0.7% higher, every seed ahead of
    local_search and random search (experiments/results/ablation_clusters*.md); with 1, one
    nmt seed stalled at 328.4; falling from 3 (or 2) to 1 as the budget went lost a seed too."""
    imitation_target: float | None = None
    """Imitate the warm start (and hold the incumbent) at this mean per-group probability;
    None: from explore_groups. A sample that strays at one group tends to stray for a run
    of groups after it (the decoder sees its inputs' devices)."""
    temperature: float = 1.0
    """Divides the logits: above 1 samples more widely (the least, with hold_exploration)."""
    hold_exploration: bool = True
    """After every update, raise the temperature (up to 10) where needed so that the policy
    gives the best candidate since the search's last start at most the target per-group probability: however sharp
    the policy grows, its samples keep straying from the incumbent, where it has learned
    to stray (no collapse onto one candidate)."""
    logit_clip: float = 5.0
    """C in C * tanh(logits / C): no device is ever certain."""
    masked_logit: float = -1e9
    """Logit of a forbidden device (memory, colocation): finite, so that 0 * log p stays 0 in the entropy."""
    hidden: int = 64
    """Width of a fresh policy."""
    graph_layers: int = 2
    """Message-passing rounds of a fresh policy's graph encoder (0: the paper's LSTM encoder alone)."""
    max_devices: int = 8
    """Device slots of a fresh policy: max(max_devices, cluster size), so it transfers to clusters up to that size."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.microbatch_spread <= 0:
            raise ValueError(f"microbatch_spread={self.microbatch_spread}: give a relative slowdown > 0")
        if self.first_round < 1:
            raise ValueError(f"first_round={self.first_round}: give a number of batches >= 1")
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}: use 'reinforce' or 'ppo'")
        RewardRule(self.reward, 1.0)  # ValueError for an unknown shaping, before any work


@dataclass
class Learner:
    """The trainer's own scalars, beside SearchState in a checkpoint."""

    imitated: bool = False
    seeded: bool = False  # the first round (seed_candidates) is done
    baseline: float | None = None  # moving average of batch rewards (normalize_advantages=False)
    reference_ms: float | None = None  # the reward's reference, fixed at the start
    temperature: float | None = None  # the sampling temperature (hold_exploration moves it)
    # the best candidate of each micro-batch count since the last start (placer.rl.counts; a restart empties it)
    incumbents: Incumbents = field(default_factory=dict)
    restarts: int = 0
    mark_ms: float = math.inf  # the incumbents' best when it last improved by restart_gain (inf: not yet)
    stalled: int = 0  # rounds since then


def train(problem: PlacementProblem, scorer, config: TrainConfig, warm_start: Candidate | Placement | None = None,
          out_dir: Path | None = None, resume: bool = False, on_progress: Callable[[dict], None] | None = None,
          policy: Seq2SeqPolicy | None = None) -> SearchResult:
    """Search for a fast candidate of `problem` (module docstring) with `scorer`
    (placer.search.Scorer). `policy` starts from given weights (e.g. load_policy of
    another search), attached to `problem`, then imitates `warm_start` as a fresh one
    would; on resume the checkpoint's weights are loaded into it.

    Never raises for a search that finds nothing feasible: the result's `best` is None.
    Raises InfeasibleError when the warm start does not fit, CheckpointError when
    resuming from a checkpoint of another problem."""
    warm_start = as_candidate(problem, warm_start)
    # -- setup: the policy, its optimizer and sampler, from a checkpoint when resuming
    checkpoint = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    saved = read_checkpoint(checkpoint, problem) if resume and checkpoint is not None and checkpoint.exists() else None
    options = config.microbatches or microbatch_options(problem)
    microbatch_indices(options)  # ValueError for a count the policy cannot be given, before any work
    if policy is None and saved is not None:
        policy = Seq2SeqPolicy(**saved["policy"]["config"])
    elif policy is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            policy = Seq2SeqPolicy(max_devices=max(config.max_devices, problem.n_devices), hidden=config.hidden,
                                   graph_layers=config.graph_layers)
    policy.attach(problem)
    policy.logit_clip, policy.masked_logit = config.logit_clip, config.masked_logit
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    state, learner = SearchState(), Learner()
    if saved is not None:
        state, fields = restore(saved, checkpoint, policy, optimizer, generator)
        learner = Learner(**fields)
        if refit(state, scorer):  # the scorer fits every measurement so far, this run's and the checkpoint's
            rescore_incumbents(learner, scorer)
    policy.temperature = learner.temperature or config.temperature
    clock = Clock(state.elapsed_s)

    def save(final: bool = False) -> None:
        """Checkpoint (and, at the end, the policy); a failed write (disk full) is a warning, not the end."""
        state.elapsed_s = clock()
        try:
            save_checkpoint(checkpoint, problem, state, asdict(learner), policy, optimizer, generator,
                            asdict(config))
            if final:
                save_policy(policy, checkpoint.with_name("policy.pt"))
        except OSError as err:
            warnings.warn(f"could not save the search checkpoint in {checkpoint.parent}: {err} (the search "
                          f"goes on; a resume would start from an earlier checkpoint)", stacklevel=2)

    interrupted, times = False, None
    goal = target(config, problem)  # the incumbent's mean per-group probability, held: about explore_groups strays
    try:
        # -- the reward rule (envs.reward), relative to the warm start
        rule = reward_rule(problem, scorer, config, warm_start, learner.reference_ms)
        learner.reference_ms = rule.reference_ms

        # -- warm start: keep it as a candidate, and teach it to the policy
        if warm_start is not None and not state.candidates:
            scored = scorer.score([warm_start])
            state.remember([warm_start], scored, config.keep_top)
            learn(learner.incumbents, [warm_start], scored)
        if warm_start is not None and not learner.imitated:
            counts = sorted({warm_start.microbatches, *options})
            imitate(policy, [Candidate(warm_start.placement, m) for m in counts], config)
            learner.imitated = True

        while budget_left(state, config, clock()):
            seeding = not learner.seeded
            if seeding:  # -- the first round: the warm start at the other counts, random stage-like candidates
                size = round_size(state, replace(config, batch_size=first_round_batches(config) * config.batch_size))
                batch = seed_candidates(problem, warm_start if not learner.restarts else None, options, size,
                                        config.seed, learner.restarts)
            else:  # -- draw micro-batch counts, sample a placement for each
                weights = draw_weights(learner.incumbents, options, config.microbatch_spread,
                                       config.infeasible_slowdown)
                drawn = torch.multinomial(weights, round_size(state, config), replacement=True, generator=generator)
                sample = policy.sample(len(drawn), generator, microbatch_indices([options[int(i)] for i in drawn]))
                batch = [Candidate(tuple(p), MICROBATCH_CHOICES[m])
                         for p, m in zip(sample.placements.tolist(), sample.microbatches.tolist())]
            times = scorer.score(batch)
            state.remember(batch, times, config.keep_top)
            learn(learner.incumbents, batch, times)
            state.rounds += 1
            state.samples += len(batch)

            if seeding:  # -- every count's search starts from its best so far
                starts = (best_for(learner.incumbents, m) for m in options)
                imitate(policy, [c for c in starts if c is not None], config)
                learner.seeded = True
            else:  # -- RL update
                rewards = torch.tensor([rule(t) for t in times], dtype=torch.float32)
                advantages = advantage(rewards, learner, config, sample.microbatches)
                update = reinforce_update if config.algo == "reinforce" else ppo_update
                update(policy, optimizer, sample, advantages, config,
                       [best_for(learner.incumbents, c.microbatches) for c in batch], goal)

            # -- a search stalled in its start's basin starts again
            progress(learner, config)
            if restart_due(learner, state, config, clock()):
                learner.seeded, learner.incumbents, learner.mark_ms, learner.stalled = False, {}, math.inf, 0
                learner.restarts += 1
                policy.temperature = config.temperature  # every start is imitated as the first was

            # -- hold exploration around the incumbent: no collapse onto one candidate
            incumbent = leader(learner.incumbents)
            if config.hold_exploration and incumbent is not None:
                policy.temperature = max(config.temperature, hold_temperature(policy, incumbent, goal))
            learner.temperature = policy.temperature

            # -- measurement bookkeeping (placer.search.state)
            if measure_round(state, scorer, config, clock):
                rescore_incumbents(learner, scorer)

            # -- progress and checkpoint
            row = state.record(times, clock())
            if on_progress is not None:
                on_progress(dict(row))
            if checkpoint is not None and state.rounds % config.checkpoint_every == 0:
                save()
        final_round(state, scorer, config, warm_start, clock)
    except KeyboardInterrupt:
        interrupted = True
        if times is not None and (state.curve[-1]["update"] if state.curve else 0) != state.rounds:
            state.record(times, clock())  # a round cut short after its update is kept; it is measured later
    state.elapsed_s = clock()
    if checkpoint is not None:
        save(final=True)
    return state.result("rl", interrupted, policy)


def reward_rule(problem: PlacementProblem, scorer, config: TrainConfig, warm_start: Candidate | None = None,
                reference: float | None = None) -> RewardRule:
    """The one reward rule (envs.reward) with config's shaping and penalty, against
    `reference` ms when given (a resumed search keeps its own), else the warm start's
    score, else the best single device's (as PlacementEnv's)."""
    if reference is None:
        reference = reference_ms(problem, lambda ps: scorer.score([Candidate(p) for p in ps]),
                                 warm_start.placement if warm_start is not None else None,
                                 config.reference_fallback_ms)
    return RewardRule(config.reward, reference, config.infeasible_slowdown)


def hold_temperature(policy: Seq2SeqPolicy, incumbent: Candidate, target: float, low: float = 0.1,
                     high: float = 10.0, steps: int = 12) -> float:
    """The temperature in [low, high] at which the policy gives `incumbent` a mean per-group
    probability of `target` (bisection on log temperature: the probability falls as it rises)."""
    placement = torch.tensor([incumbent.placement])
    microbatch = microbatch_indices([incumbent.microbatches])
    lo, hi = math.log(low), math.log(high)
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            policy.temperature = math.exp(mid)
            per_group = math.exp(float(policy.log_prob(placement, microbatch)[0][0]) / len(incumbent.placement))
            lo, hi = (mid, hi) if per_group > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def target(config: TrainConfig, problem: PlacementProblem) -> float:
    """The mean per-group probability imitation aims for and exploration holds the incumbent at."""
    if config.imitation_target is not None:
        return config.imitation_target
    return max(0.5, 1.0 - config.explore_groups / max(problem.n_groups, 1))


def rescore_incumbents(learner: Learner, scorer) -> None:
    """The incumbents' times under the refitted simulator; progress is counted on its scale from here."""
    rescore(learner.incumbents, scorer)
    learner.mark_ms = fastest_ms(learner.incumbents)


def progress(learner: Learner, config: TrainConfig) -> None:
    """Count a round without progress (the incumbents' best not restart_gain below the mark), or move the mark."""
    best = fastest_ms(learner.incumbents)
    if best < learner.mark_ms * (1.0 - config.restart_gain):
        learner.mark_ms, learner.stalled = best, 0
    else:
        learner.stalled += 1


def restart_due(learner: Learner, state: SearchState, config: TrainConfig, elapsed_s: float) -> bool:
    """Whether to start again: stalled for restart_patience rounds, with the samples (and, at
    the rate so far, the time before the closing round's reserve) left for a first round and
    restart_patience rounds after it."""
    if config.restart_patience is None or learner.stalled < config.restart_patience:
        return False
    needed = (first_round_batches(config) + config.restart_patience) * config.batch_size
    left = [] if config.max_samples is None else [config.max_samples - state.samples]
    if config.budget_s is not None and elapsed_s > 0:
        left.append((config.budget_s - closing_reserve(state, config) - elapsed_s) * state.samples / elapsed_s)
    return all(n >= needed for n in left)


def first_round_batches(config: TrainConfig) -> int:
    """`first_round`, at most a quarter of `max_samples` in whole batches (rounds left to learn in)."""
    cap = math.inf if config.max_samples is None else math.ceil(config.max_samples / (4 * config.batch_size))
    return max(1, min(config.first_round, cap))


def imitate(policy: Seq2SeqPolicy, candidates: Sequence[Candidate], config: TrainConfig) -> None:
    """Maximum likelihood on candidates, each placement given its micro-batch count, until
    the policy gives every one the target mean per-group probability (or
    config.imitation_steps steps); nothing without candidates."""
    if not candidates:
        return
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.imitation_lr)
    goal = target(config, policy.problem)
    counts = microbatch_indices([c.microbatches for c in candidates])
    placements = torch.tensor([c.placement for c in candidates])
    groups = policy.problem.n_groups
    for _ in range(config.imitation_steps):
        logp, _ = policy.log_prob(placements, counts)
        if math.exp(float(logp.detach().min()) / groups) >= goal:
            return
        optimizer.zero_grad()
        (-logp.mean() / groups).backward()
        optimizer.step()
