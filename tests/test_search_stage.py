"""placer.search_stage: the user's search settings, and one search run on the Scorer
turned into a row and an annotated learning curve."""

from dataclasses import replace

import pytest

from graphs.devices import parse_cluster
from graphs.errors import PlacerError
from graphs.problem import Candidate, PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.scorer import Scorer
from placer.search_stage import SearchOptions, run_search
from tests.test_scorer import FakeMeasurer


def test_settings_reach_the_search_configuration():
    config = SearchOptions(overrides=("algo=reinforce", "reward=neg_log", "batch_size=8"), max_samples=40).config(
        30.0, seed=7)
    assert (config.algo, config.reward, config.batch_size, config.max_samples) == ("reinforce", "neg_log", 8, 40)
    assert config.budget_s == 30.0 and config.seed == 7


@pytest.mark.parametrize("setting", ["nosuch=1", "batch_size=many", "algo=sarsa", "reward=joy", "novalue"])
def test_a_bad_setting_is_one_line_naming_it(setting):
    with pytest.raises(PlacerError, match="--search"):
        SearchOptions(overrides=(setting,)).config(10.0, seed=0)


def test_a_missing_policy_is_refused_and_none_is_none(tmp_path):
    assert SearchOptions().load_policy() is None
    with pytest.raises(PlacerError, match="policy"):
        SearchOptions(policy_path=tmp_path / "nope.pt").load_policy()


def test_a_file_that_is_not_a_policy_is_one_short_line(tmp_path):
    workload = tmp_path / "cnn.py"
    workload.write_text("import torch\n")
    with pytest.raises(PlacerError) as caught:
        SearchOptions(policy_path=workload).load_policy()
    message = str(caught.value)
    assert "\n" not in message and "not a placer policy file" in message and "weights_only" not in message


def random_search(measurer: type, overrides: tuple[str, ...], samples: int, tmp_path):
    """(the problem, run_search's outcome): random search from all on device 0 on a
    10-group problem over cpu:0,cpu:1, measured by `measurer`."""
    problem = PlacementProblem(random_grouped_graph(10, seed=1), parse_cluster("cpu:0,cpu:1"))
    scorer = Scorer(problem, measurer(problem), warn=pytest.fail)
    warm = Candidate((0,) * problem.n_groups)
    return problem, run_search("random_search", problem, scorer, 600.0, 0,
                               SearchOptions(overrides=overrides, max_samples=samples), None, warm, False, tmp_path,
                               lambda stage: None)


def test_a_search_gives_a_row_and_a_curve_stamped_with_its_calibration(tmp_path):
    problem, outcome = random_search(FakeMeasurer, ("batch_size=8", "measure_every=1", "measure_top_k=1"), 32, tmp_path)
    row, curve, marks = outcome.row, outcome.curve, outcome.recalibrations
    assert not outcome.interrupted and row.method == "random_search" and row.kind == "search"
    assert len(row.placement) == problem.n_groups and row.devices == ["cpu:0", "cpu:1"]
    assert [r["update"] for r in curve] == [1, 2, 3, 4] and all(r["method"] == "random_search" for r in curve)
    assert row.notes == []  # four rounds: not too few
    assert [r["calibration"] for r in curve] == sorted(r["calibration"] for r in curve) and curve[-1]["calibration"]
    assert marks and all(m["method"] == "random_search" for m in marks)
    best = outcome.best_measured
    assert best and all(m["method"] == "random_search" and m["ci_ms"][0] <= m["median_ms"] for m in best)
    assert [m["median_ms"] for m in best] == sorted((m["median_ms"] for m in best), reverse=True)  # improvements


class SlowMicrobatches(FakeMeasurer):
    """Every pipelined candidate measures 10x slower than its placement alone."""

    def measurement(self, c):
        m = super().measurement(c)
        return replace(m, median_ms=m.median_ms * 10) if c.microbatches > 1 and m.feasible else m


def test_a_warm_start_kept_outside_the_micro_batch_counts_asked_for_is_noted(tmp_path):
    # new-user trial 6: the row showed microbatches 1 after --search microbatches=2,4, unexplained
    problem, outcome = random_search(SlowMicrobatches, ("batch_size=8", "measure_every=1", "microbatches=2,4"), 16,
                                     tmp_path)
    assert outcome.row.microbatches == 1 and outcome.row.placement == [0] * problem.n_groups
    assert outcome.row.notes[0] == ("no candidate at microbatches 2, 4 measured faster than the search's warm start "
                                    "(microbatches 1), which it keeps so that its result is never worse")
    # new-user trial 12: a search with too few rounds to move (here 2, of 8 candidates) says so on its row, and
    # what ended it: here the sample budget, so a larger --budget would not help
    assert outcome.row.notes[1] == ("2 round(s): the sample budget (max_samples=16) ended the search, too few rounds "
                                    "for it to move; give a larger --search max_samples")


def test_an_enumerated_search_says_so_and_that_a_starting_policy_was_not_used(tmp_path):
    from placer.rl import Seq2SeqPolicy

    problem = PlacementProblem(random_grouped_graph(4, seed=1, tied_pairs=0), parse_cluster("cpu:0,cpu:1"))
    scorer = Scorer(problem, FakeMeasurer(problem), warn=pytest.fail)
    outcome = run_search("rl", problem, scorer, 600.0, 0, SearchOptions(overrides=("batch_size=4",)),
                         Seq2SeqPolicy(hidden=8), Candidate((0,) * 4), False, tmp_path, lambda stage: None)
    # 2**4 candidates, no sample budget: scored once each (4 rounds), then the closing round; no policy saved
    assert len(outcome.curve) == 4 and outcome.curve[-1]["samples"] == 16 and not (tmp_path / "search").exists()
    assert outcome.row.notes == ["the problem has 16 candidates, no more than the search may sample: it scored every "
                                 "one instead of sampling (placer.search.exhaustive); no policy was trained, and the "
                                 "starting policy (--policy) was not used"]


def test_a_search_runs_its_own_ops_on_one_thread_and_gives_the_count_back(tmp_path, monkeypatch):
    """On a busy host two intra-op threads stalled RL 10x (new-user trial 12: 0-1 updates in 4x the budget)."""
    import torch

    import placer.search

    seen = []
    real = placer.search.run
    monkeypatch.setattr(placer.search, "run", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        random_search(FakeMeasurer, ("batch_size=8",), 16, tmp_path)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
