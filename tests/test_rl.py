import copy
import itertools
import math
import re
from dataclasses import replace

import networkx as nx
import pytest
import torch

from graphs.synthetic import random_grouped_graph
from graphs.devices import parse_cluster
from graphs.errors import CheckpointError, DeviceSpecError, InfeasibleError
from graphs.problem import Candidate, PlacementProblem
from placer.rl import Seq2SeqPolicy, TrainConfig, load_policy, save_policy, train
from placer.search.scorer import SimulatedScorer


def synthetic(n=12, devices="cpu:0,cpu:1", memory=None, tied_pairs=0, seed=3):
    return PlacementProblem(random_grouped_graph(n, seed=seed, tied_pairs=tied_pairs), parse_cluster(devices, memory))


def two_chains(length=10):
    """Two independent chains, interleaved in id order (chain A even ids, chain B odd):
    the fastest placement puts one chain on each device. A tensor crossing devices
    costs half a group's forward time, so a chain that switches devices is slow."""
    g = nx.DiGraph(name="two-chains", fingerprint="two-chains", device_kinds=["cpu"], colocate=[])
    for i in range(2 * length):
        g.add_node(i, name=f"chain{i % 2}.{i // 2}", members=[f"n{i}"], fwd_ms={"cpu": 1.0}, bwd_ms={"cpu": 2.0},
                   opt_ms={"cpu": 0.0}, param_bytes=0, grad_bytes=0, opt_bytes=0, act_bytes=0, out_bytes=500_000_000,
                   op_mix={"linear": 1})
    for i in range(2 * length - 2):
        g.add_edge(i, i + 2, bytes=500_000_000)
    return PlacementProblem(g, parse_cluster("cpu:0,cpu:1"))


def sim_score(problem):
    """A Scorer on the nominal simulator that cannot measure."""
    return SimulatedScorer(problem)


class MeasuringScorer(SimulatedScorer):
    """The simulator scores; `measure_fn` stands in for the real machine; refits are counted;
    what it measures is kept in `calls`, what the closing session measures again in `closing`."""

    def __init__(self, problem, measure_fn):
        super().__init__(problem, measure=measure_fn)
        self.calls, self.closing, self.refit_sizes = [], [], []

    def measure(self, candidates, limit_s=None, afresh=False):
        (self.closing if afresh else self.calls).extend(candidates)
        return super().measure(candidates, limit_s)

    def refit(self):
        self.refit_sizes.append(len(self.measured))


def score_of(problem, placement):
    return sim_score(problem).score([Candidate(tuple(placement))])[0]


def policy_for(problem, seed=0):
    torch.manual_seed(seed)
    return Seq2SeqPolicy(problem, max_devices=4, hidden=32)


@pytest.fixture(autouse=True)
def one_thread():
    """The policy's tensors are tiny: extra threads only contend for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUICK = dict(batch_size=8, budget_s=None, hidden=32, imitation_steps=0, measure_every=3, checkpoint_every=2,
             measure_top_k=0, first_round=1)


# ----------------------------------------------------------------------------- policy
def test_sample_shapes_and_teacher_forced_log_probs_match_sampling():
    problem = synthetic(20, devices="cpu:0,cpu:1,cpu:2")
    policy = policy_for(problem)
    placements, microbatches, logp, entropy = policy.sample(5, torch.Generator().manual_seed(0))
    assert placements.shape == (5, 20) and logp.shape == (5,) and entropy.shape == (5,)
    assert (microbatches == 0).all()  # one micro-batch is the only choice by default
    assert placements.min() >= 0 and placements.max() <= 2  # never a padding device
    assert (entropy > 0).all() and (logp < 0).all()
    again, entropy_again = policy.log_prob(placements)
    assert torch.allclose(again, logp, atol=1e-4) and torch.allclose(entropy_again, entropy, atol=1e-4)
    assert len(policy.greedy()) == 20


@pytest.mark.parametrize("tied", [0, 1])
def test_probabilities_of_all_placements_sum_to_one(tied):
    problem = synthetic(4, tied_pairs=tied, seed=5)
    policy = policy_for(problem)
    everything = torch.tensor(list(itertools.product(range(2), repeat=4)))
    with torch.no_grad():
        logp, _ = policy.log_prob(everything)
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    if tied:  # every placement that splits the tied groups has probability 0
        a, b = problem.colocation_sets[0]
        assert float(logp[everything[:, a] != everything[:, b]].exp().sum()) == pytest.approx(0.0, abs=1e-9)


def test_mask_keeps_a_group_off_a_device_it_cannot_fit():
    free = synthetic(12)
    big = int(free.costs.memory_bytes.argmax())
    need = int(free.costs.memory_bytes[big])
    problem = synthetic(12, memory=f"cpu:0={need - 1}B")
    placements = policy_for(problem).sample(64, torch.Generator().manual_seed(1)).placements
    assert (placements[:, big] == 1).all()
    # cpu:0 never holds more than its cap: every group's placement there is checked against what is already on it
    for p in placements.tolist():
        assert problem.memory_per_device(p)[0] <= need - 1


def test_colocated_groups_always_follow_their_leader():
    problem = synthetic(16, tied_pairs=3)
    placements = policy_for(problem).sample(32, torch.Generator().manual_seed(2)).placements
    for members in problem.colocation_sets:
        assert (placements[:, members] == placements[:, members[:1]]).all()


def test_when_no_device_fits_every_device_stays_allowed():
    problem = synthetic(12, memory="cpu:0=1B,cpu:1=1B")
    placements, _, logp, _ = policy_for(problem).sample(16, torch.Generator().manual_seed(3))
    assert set(placements.flatten().tolist()) == {0, 1} and torch.isfinite(logp).all()


def test_saved_policy_transfers_to_another_problem_with_the_same_devices(tmp_path):
    policy = policy_for(synthetic(12))
    save_policy(policy, tmp_path / "policy.pt")
    other = synthetic(30, seed=9)
    loaded = load_policy(tmp_path / "policy.pt").attach(other)
    placements = loaded.sample(3, torch.Generator().manual_seed(0)).placements
    assert torch.allclose(loaded.log_prob(placements)[0], policy.attach(other).log_prob(placements)[0])
    with pytest.raises(DeviceSpecError, match="at most 4 devices"):
        loaded.attach(synthetic(6, devices="cpu:0,cpu:1,cpu:2,cpu:3,cpu:4"))
    (tmp_path / "junk.pt").write_text("not a policy")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_policy(tmp_path / "junk.pt")


def test_a_failed_save_leaves_the_previous_policy_whole(tmp_path, monkeypatch):
    policy = policy_for(synthetic(12))
    save_policy(policy, tmp_path / "policy.pt")

    def killed_midway(obj, f):
        f.write(b"half a policy")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(OSError):
        save_policy(policy_for(synthetic(12), seed=1), tmp_path / "policy.pt")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["policy.pt"]  # no temporary file left behind
    loaded = load_policy(tmp_path / "policy.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), policy.state_dict().values()))


# ----------------------------------------------------------------------------- trainer
def test_imitation_makes_greedy_reproduce_the_warm_start():
    problem = synthetic(16)
    warm = tuple(int(d) for d in torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(4)))
    config = TrainConfig(**{**QUICK, "imitation_steps": 300, "imitation_target": 0.97, "max_samples": 0})
    result = train(problem, sim_score(problem), config, warm_start=warm)
    assert result.policy.greedy() == warm and result.samples == 0
    assert result.best == Candidate(warm)  # the warm start is a candidate from the beginning
    with pytest.raises(InfeasibleError):
        train(synthetic(16, memory="cpu:0=1B,cpu:1=1B"), sim_score(problem), config, warm_start=warm)


@pytest.mark.parametrize("algo, updates", [("reinforce", 60), ("ppo", 30)])
def test_search_finds_the_optimum_of_two_independent_chains(algo, updates):
    problem = two_chains()
    optimum = score_of(problem, [i % 2 for i in range(20)])
    assert optimum < 0.6 * score_of(problem, (0,) * 20)  # the toy problem has a clear optimum
    config = TrainConfig(**{**QUICK, "algo": algo, "max_samples": 8 * updates})
    result = train(problem, sim_score(problem), config)
    assert result.best_sim_ms <= 1.03 * optimum
    means = [row["mean_ms"] for row in result.curve]
    assert sum(means[-5:]) / 5 < sum(means[:5]) / 5  # the policy itself got better, not only lucky


def test_same_seed_same_search():
    problem = synthetic(12)
    config = TrainConfig(**{**QUICK, "max_samples": 40})
    first, second = (train(problem, sim_score(problem), config) for _ in range(2))
    assert first.best == second.best
    assert [r["mean_ms"] for r in first.curve] == [r["mean_ms"] for r in second.curve]


def test_resumed_search_equals_an_uninterrupted_one(tmp_path):
    problem = synthetic(12)
    config = TrainConfig(**{**QUICK, "max_samples": 64})
    straight = train(problem, sim_score(problem), config, out_dir=tmp_path / "straight")
    half = train(problem, sim_score(problem), TrainConfig(**{**QUICK, "max_samples": 32}), out_dir=tmp_path / "split")
    resumed = train(problem, sim_score(problem), config, out_dir=tmp_path / "split", resume=True)
    assert half.rounds == 4 and resumed.rounds == 8 and resumed.samples == 64
    assert resumed.best_sim_ms <= half.best_sim_ms
    strip = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in straight.curve]
    assert [{k: v for k, v in row.items() if k != "elapsed_s"} for row in resumed.curve] == strip
    assert resumed.best == straight.best
    assert (tmp_path / "split" / "curve.csv").read_text().count("\n") == 9  # header + 8 updates
    with pytest.raises(CheckpointError, match="another problem"):
        train(synthetic(13), sim_score(synthetic(13)), config, out_dir=tmp_path / "split", resume=True)


@pytest.mark.parametrize("devices, memory, message", [
    ("cpu:0,cpu:1,cpu:2", None, r"cpu:0,cpu:1 \(caps none, none\), not cpu:0,cpu:1,cpu:2 \(caps none, none, none\)"),
    ("cpu:0,cpu:1", "cpu:0=1GB", r"cpu:0,cpu:1 \(caps none, none\), not cpu:0,cpu:1 \(caps 1000000000B, none\)"),
])
def test_resume_refuses_a_checkpoint_made_for_other_devices(tmp_path, devices, memory, message):
    problem = synthetic(12)
    config = TrainConfig(**{**QUICK, "max_samples": 16})
    train(problem, sim_score(problem), config, out_dir=tmp_path)
    other = synthetic(12, devices=devices, memory=memory)
    assert other.fingerprint == problem.fingerprint and other.n_groups == problem.n_groups  # only the devices differ
    expected = f"checkpoint in {re.escape(str(tmp_path))} was made for devices {message}: start without --resume"
    with pytest.raises(CheckpointError, match=expected):
        train(other, sim_score(other), config, out_dir=tmp_path, resume=True)
    assert train(problem, sim_score(problem), config, out_dir=tmp_path, resume=True).samples == 16


def test_a_search_that_finds_nothing_feasible_returns_no_best(tmp_path):
    problem = synthetic(12, memory="cpu:0=1B,cpu:1=1B")  # every placement exceeds a cap
    scorer = MeasuringScorer(problem, lambda c: pytest.fail("nothing feasible is worth measuring"))
    config = TrainConfig(**{**QUICK, "max_samples": 24, "measure_top_k": 2})
    result = train(problem, scorer, config, out_dir=tmp_path)
    assert result.best is None and result.best_sim_ms == math.inf and result.best_measured_ms is None
    assert result.samples == 24 and scorer.calls == []  # nothing feasible is worth measuring
    assert all(row["best_sim_ms"] is None for row in result.curve)


def test_ctrl_c_returns_the_best_so_far_and_leaves_a_checkpoint(tmp_path):
    problem = synthetic(12)
    score = sim_score(problem)
    calls = []

    class Interrupted(SimulatedScorer):
        def score(self, candidates):
            calls.append(1)
            if len(calls) == 1 + 5:  # the first call scores the single devices: the reward's reference
                raise KeyboardInterrupt
            return super().score(candidates)

    config = TrainConfig(**{**QUICK, "max_samples": 80})
    result = train(problem, Interrupted(problem), config, out_dir=tmp_path)
    assert result.interrupted and result.rounds == 4 and math.isfinite(result.best_sim_ms)
    assert score.score([result.best])[0] == result.best_sim_ms
    other_width = TrainConfig(**{**QUICK, "max_samples": 80, "hidden": 16})
    resumed = train(problem, score, other_width, out_dir=tmp_path, resume=True)
    assert not resumed.interrupted and resumed.samples == 80 and resumed.curve[0]["update"] == 1
    assert resumed.policy.config["hidden"] == 32  # the checkpoint's policy, whatever the new config says
    assert resumed.best_sim_ms <= result.best_sim_ms


def test_a_finished_search_resumed_measures_nothing_until_given_more_budget(tmp_path):
    """The closing round runs once per sample count: a finished search resumed with its
    budget spent measures nothing (its kept candidates not measured yet stay so) and
    returns what it found; given more samples it goes on and closes again, measuring
    only candidates it had not measured."""
    problem = synthetic(12)
    config = TrainConfig(**{**QUICK, "max_samples": 24, "measure_top_k": 2})

    def scorer():
        return MeasuringScorer(problem, lambda c: score_of(problem, c.placement) * (1 + sum(c.placement)))

    first = train(problem, scorer(), config, out_dir=tmp_path)
    again = scorer()
    resumed = train(problem, again, config, out_dir=tmp_path, resume=True)
    assert again.calls == again.closing == [] and resumed.samples == 24
    assert resumed.best == first.best and resumed.measured == first.measured
    more = scorer()
    longer = train(problem, more, TrainConfig(**{**QUICK, "max_samples": 40, "measure_top_k": 2}), out_dir=tmp_path,
                   resume=True)
    assert longer.samples == 40 and more.calls and not set(more.calls) & set(dict(first.measured))


def test_final_choice_is_the_best_measured_placement():
    problem = synthetic(12)
    warm = (0,) * 12

    def measure(candidate):  # the "real" machine disagrees with the simulator: device 1 is slow
        return score_of(problem, candidate.placement) * (1 + sum(candidate.placement))

    scorer = MeasuringScorer(problem, measure)
    config = TrainConfig(**{**QUICK, "max_samples": 48, "measure_top_k": 2})
    result = train(problem, scorer, config, warm_start=warm)
    assert Candidate(warm) in dict(result.measured)  # the heuristic is always measured
    best, best_ms = min(result.measured, key=lambda pm: pm[1])
    assert result.best == best and result.best_measured_ms == best_ms
    assert len(set(scorer.calls)) == len(scorer.calls)  # nothing is measured twice but by the closing session
    assert scorer.closing == [c for c, _ in result.final] and Candidate(warm) in scorer.closing
    recalibrations = scorer.refit_sizes
    assert recalibrations == sorted(recalibrations) and len(recalibrations) == 3  # after updates 3 and 6, and the end


def test_a_policy_saved_by_one_search_starts_the_search_of_another_problem(tmp_path):
    source = synthetic(12)
    train(source, sim_score(source), TrainConfig(**{**QUICK, "max_samples": 16}), out_dir=tmp_path)
    loaded = load_policy(tmp_path / "policy.pt")
    transferred = {k: v.clone() for k, v in loaded.state_dict().items()}

    target = synthetic(20, seed=9)  # another graph, another group count, the same devices
    kept = train(target, sim_score(target), TrainConfig(**{**QUICK, "max_samples": 0}), policy=loaded)
    assert kept.policy is loaded and loaded.problem is target  # attached to the new problem...
    assert all(torch.equal(transferred[k], v) for k, v in loaded.state_dict().items())  # ...with its weights kept

    warm = tuple(int(d) for d in torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(4)))
    config = TrainConfig(**{**QUICK, "imitation_steps": 300, "imitation_target": 0.97, "max_samples": 0})
    result = train(target, sim_score(target), config, warm_start=warm, policy=load_policy(tmp_path / "policy.pt"))
    assert result.policy.greedy() == warm and result.best == Candidate(warm)  # imitation ran on top of the transferred weights


def test_risk_seeking_advantages_count_only_the_top_of_the_batch():
    from placer.rl.trainer import Learner, advantage

    rewards = torch.tensor([-4.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.2, -0.1])
    top = advantage(rewards, Learner(), TrainConfig(top_quantile=0.75))
    threshold = float(torch.quantile(rewards, 0.75))
    assert (top[rewards <= threshold] == 0).all() and (top[rewards > threshold] > 0).all()
    assert float(top.max()) == pytest.approx(1.0)  # scaled: the best sample's advantage is 1
    normalized = advantage(rewards, Learner(), TrainConfig())
    assert float(normalized.mean()) == pytest.approx(0.0, abs=1e-6) and float(normalized.std(unbiased=False)) == pytest.approx(1.0)
    learner = Learner()
    moving = advantage(rewards, learner, TrainConfig(normalize_advantages=False, baseline_decay=0.5))
    assert torch.allclose(moving, rewards - rewards.mean()) and learner.baseline == pytest.approx(float(rewards.mean()))


def test_self_imitation_raises_the_probability_of_the_best_candidate():
    problem = two_chains(6)

    def best_logp(self_imitation):
        config = TrainConfig(**{**QUICK, "max_samples": 64, "self_imitation": self_imitation})
        result = train(problem, sim_score(problem), config)
        with torch.no_grad():
            return float(result.policy.log_prob(torch.tensor([result.best.placement]))[0][0]), result

    plain, _ = best_logp(0.0)
    imitated, result = best_logp(5.0)
    assert imitated > plain


def test_held_exploration_keeps_the_policy_from_collapsing_onto_one_candidate():
    problem = two_chains(8)

    def late_distinct(hold):
        seen = []

        class Counting(SimulatedScorer):
            def score(self, candidates):
                seen.extend(candidates)
                return super().score(candidates)

        config = TrainConfig(**{**QUICK, "max_samples": 400, "hold_exploration": hold, "self_imitation": 5.0})
        result = train(problem, Counting(problem), config)
        return len(set(seen[-200:])), result

    held, result = late_distinct(True)
    collapsed, _ = late_distinct(False)
    assert held > 5 * collapsed  # the last 200 samples: still exploring, against a handful of repeats
    assert result.policy.temperature > 1.0  # raised to keep it so (never lowered below the configured 1.0)


def test_the_exploration_target_follows_the_problem_size():
    from placer.rl.trainer import target

    assert target(TrainConfig(explore_groups=2.0), synthetic(20)) == pytest.approx(0.9)
    assert target(TrainConfig(explore_groups=2.0), synthetic(200)) == pytest.approx(0.99)
    assert target(TrainConfig(explore_groups=8.0), synthetic(10)) == 0.5  # never below one half
    assert target(TrainConfig(imitation_target=0.97), synthetic(10)) == 0.97


# ----------------------------------------------------------------------------- micro-batch counts
def test_a_placement_is_drawn_for_its_microbatch_count():
    from placer.rl.policy import microbatch_indices

    problem = synthetic(20, devices="cpu:0,cpu:1,cpu:2")
    policy = policy_for(problem)
    counts = microbatch_indices([1, 2, 4, 2, 1])
    placements, drawn, logp, _ = policy.sample(5, torch.Generator().manual_seed(0), counts)
    assert torch.equal(drawn, counts)
    again, _ = policy.log_prob(placements, counts)
    assert torch.allclose(again, logp, atol=1e-4)
    other, _ = policy.log_prob(placements, microbatch_indices([4, 4, 2, 8, 2]))
    assert not torch.allclose(other, logp, atol=1e-3)  # the count is an input of every step
    with pytest.raises(ValueError, match=r"micro-batch counts \[3\]"):
        microbatch_indices([1, 3])


def test_advantages_compare_samples_of_the_same_microbatch_count():
    from placer.rl.trainer import Learner, advantage

    rewards = torch.tensor([-1.0, -2.0, -0.1, -0.3, -5.0])
    groups = torch.tensor([0, 0, 1, 1, 2])
    advantages = advantage(rewards, Learner(), TrainConfig(), groups)
    assert advantages[0] > 0 > advantages[1] and advantages[2] > 0 > advantages[3]  # the -1.0 wins its own count
    assert advantages[4] == 0  # alone in its count: nothing to compare with
    for g in range(2):
        assert float(advantages[groups == g].sum()) == pytest.approx(0.0, abs=1e-6)


def test_counts_keep_their_own_incumbent_and_are_drawn_by_how_far_behind_it_is():
    from placer.rl.counts import best_for, draw_weights, learn

    kept = {}
    learn(kept, [Candidate((0, 0), 1), Candidate((0, 1), 2), Candidate((1, 1), 2), Candidate((1, 0), 4)],
          [100.0, 130.0, 110.0, math.inf])
    assert best_for(kept, 2) == Candidate((1, 1), 2) and best_for(kept, 4) is None and best_for(kept, 8) is None
    learn(kept, [Candidate((1, 0), 2)], [120.0])  # slower than the count's incumbent: kept as it was
    assert best_for(kept, 2) == Candidate((1, 1), 2)
    weights = draw_weights(kept, (1, 2, 4, 8), spread=0.1, worst=10.0)
    assert weights[0] == 1.0 and float(weights[1]) == pytest.approx(math.exp(-math.log(1.1) / 0.1))
    assert float(weights[2]) == pytest.approx(math.exp(-math.log(10.0) / 0.1))  # nothing feasible: as bad as worst
    assert weights[3] == 1.0  # not tried yet


class PipelineToy:
    """A Scorer: one micro-batch steps 100 ms wherever the groups are; two micro-batches
    step 200 ms less 3.5 ms per group on device 1, so the best plan is pipelined with
    (nearly) everything on device 1, while a pipelined sample near the warm start (all
    on device 0) or a random one is far slower than the warm start."""

    def __init__(self):
        self.calls = []

    def score(self, candidates):
        self.calls.append(list(candidates))
        return [100.0 if c.microbatches == 1 else 200.0 - 3.5 * sum(c.placement) for c in candidates]

    def measure(self, candidates, limit_s=None, afresh=False):
        raise AssertionError("a simulator-only search measures nothing")

    def refit(self):
        raise AssertionError("a simulator-only search refits nothing")


def test_a_pipelined_count_improves_while_slower_than_the_best_plan():
    problem = synthetic(40)
    warm = (0,) * 40
    scorer = PipelineToy()
    config = TrainConfig(**{**QUICK, "imitation_steps": 200, "microbatches": (1, 2), "max_samples": 480})
    result = train(problem, scorer, config, warm_start=warm)
    first = next(batch for batch in scorer.calls if len(batch) == config.batch_size)
    assert first[0] == Candidate(warm, 2)  # the first round scores the warm start at the other count...
    assert len(set(first[1:])) == config.batch_size - 1 and warm not in first  # ...and random candidates
    assert result.best.microbatches == 2 and result.best_sim_ms < 90.0
    # the pipelined count went on improving past the best pipelined candidate of the first round
    assert result.best_sim_ms < min(ms for c, ms in zip(first, PipelineToy().score(first)) if c.microbatches == 2)


def test_the_first_round_scores_first_round_batches_and_later_rounds_one():
    scorer = PipelineToy()
    config = TrainConfig(**{**QUICK, "first_round": 3, "microbatches": (1, 2), "max_samples": 72})
    train(synthetic(20), scorer, config, warm_start=(0,) * 20)
    assert [len(batch) for batch in scorer.calls if len(batch) > 1] == [24] + [8] * 6
    first = next(batch for batch in scorer.calls if len(batch) > 1)
    assert len(set(first)) == 24  # distinct starts: the warm start at the other count, then random ones
    small = PipelineToy()  # a small budget: the first round takes at most a quarter of it, in whole batches
    train(synthetic(20), small, replace(config, max_samples=40), warm_start=(0,) * 20)
    assert [len(batch) for batch in small.calls if len(batch) > 1] == [16, 8, 8, 8]
    with pytest.raises(ValueError, match="first_round=0"):
        TrainConfig(first_round=0)


class Flat(PipelineToy):
    """A Scorer on which every candidate steps 100 ms: no search ever makes progress."""

    def score(self, candidates):
        self.calls.append(list(candidates))
        return [100.0] * len(candidates)


def test_a_stalled_search_starts_again_while_the_budget_leaves_room():
    problem, warm = synthetic(20), (0,) * 20
    config = TrainConfig(**{**QUICK, "first_round": 2, "restart_patience": 3, "microbatches": (1, 2),
                            "max_samples": 100})
    scorer = Flat()
    result = train(problem, scorer, config, warm_start=warm)
    # a first round (2 batches), 3 rounds without progress, a second first round; then too little budget is
    # left for a third start (2 batches and 3 rounds): the search goes on from the second
    assert [len(batch) for batch in scorer.calls if len(batch) > 1] == [16, 8, 8, 8, 16, 8, 8, 8, 8, 8, 4]
    first, again = [batch for batch in scorer.calls if len(batch) == 16]
    assert Candidate(warm, 2) in first and Candidate(warm, 2) not in again  # the warm start begins the first only
    assert not set(first) & set(again)  # the second start draws other candidates
    assert result.samples == 100 and result.best_sim_ms == 100.0
    never = Flat()
    train(problem, never, replace(config, restart_patience=None), warm_start=warm)
    assert [len(batch) for batch in never.calls if len(batch) > 1] == [16] + [8] * 10 + [4]
    with pytest.raises(ValueError, match="restart_patience=0"):
        replace(config, restart_patience=0)


class FirstStartWins(Flat):
    """Every candidate steps 100 ms but one of the first round's, 50 ms: only the first start finds anything."""

    def score(self, candidates):
        times = super().score(candidates)
        if sum(len(batch) == 16 for batch in self.calls) == 1 and len(candidates) == 16:  # the first first round
            times[3] = 50.0
        return times


def test_a_restart_keeps_what_the_earlier_starts_found():
    config = TrainConfig(**{**QUICK, "first_round": 2, "restart_patience": 3, "microbatches": (1, 2),
                            "max_samples": 100})
    scorer = FirstStartWins()
    result = train(synthetic(20), scorer, config, warm_start=(0,) * 20)
    first, again = [batch for batch in scorer.calls if len(batch) == 16]  # it did start again
    assert result.best == first[3] and result.best_sim_ms == 50.0 and first[3] not in again


def test_a_policy_collapsed_on_another_workload_still_explores_the_new_one():
    """Transfer: a policy that places everything on one device with certainty (as a long
    search can leave it) starts a search of another problem, whose best candidate is that
    same placement. Imitation has nothing to teach it, so only held exploration makes its
    first samples differ; without it every sample is the warm start."""
    from placer.rl.trainer import imitate

    source, target = synthetic(12), synthetic(20, seed=9)
    collapsed = policy_for(source)
    imitate(collapsed, [Candidate((0,) * 12)],
            TrainConfig(**{**QUICK, "imitation_target": 0.9999, "imitation_steps": 400, "imitation_lr": 3e-2}))
    assert collapsed.attach(target).greedy() == (0,) * 20

    def first_sampled_round(hold):
        seen = []

        class OneDeviceBest(SimulatedScorer):
            """Every group off device 0 costs 1 ms: the warm start stays the best candidate."""

            def score(self, candidates):
                seen.append(list(candidates))
                return [10.0 + sum(c.placement) for c in candidates]

        config = TrainConfig(**{**QUICK, "max_samples": 16, "batch_size": 8, "imitation_steps": 200,
                                "hold_exploration": hold})
        train(target, OneDeviceBest(target), config, warm_start=(0,) * 20, policy=copy.deepcopy(collapsed))
        return seen[-1]  # seen: the warm start, the first round (random candidates), the policy's first round

    assert len(set(first_sampled_round(True))) > 1
    assert set(first_sampled_round(False)) == {Candidate((0,) * 20)}


def test_a_foreign_pickle_is_refused_in_one_line(tmp_path):
    """torch's refusal of a pickled class is several lines of advice: the error keeps its first."""
    import argparse

    torch.save(argparse.Namespace(format="placer.policy/v3"), tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a placer policy file") as refused:
        load_policy(tmp_path / "foreign.pt")
    assert len(str(refused.value).splitlines()) == 1
