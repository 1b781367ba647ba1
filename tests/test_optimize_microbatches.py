"""placer.optimize on a model that micro-batches would change (batch norm in
training): no search and no baseline proposes m > 1, the run completes, and the
results say why micro-batches were off."""

import json

import pytest

import placer.optimize as job
from graphs.errors import PlacerError
from graphs.problem import build_problem
from graphs.workload import load_workload
from placer.baselines.pipeline import pipeline
from placer.measurements import Measurer, Protocol
from placer.search import microbatch_options
from placer.search_stage import SearchOptions

# Every session stops at min_runs steps each; no reference is too wide to judge by (choose rule 5).
PROTOCOL = Protocol(min_runs=3, max_runs=4, cap_s=0.01, warmup=1, target=100.0)
SEARCH = SearchOptions(max_samples=16, overrides=("measure_every=1", "batch_size=8", "imitation_steps=10"))

NORMED = '''
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(16, 16),)
'''


@pytest.fixture(scope="module")
def normed(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("wl") / "normed.py"
    path.write_text(NORMED)
    return str(path)


def test_batch_norm_turns_micro_batches_off_and_the_run_completes(normed, tmp_path, monkeypatch):
    proposed = []
    real_measure, real_session = Measurer.measure, Measurer.session

    def measure(self, candidates, labels=None, stage=""):
        proposed.extend(c for c in candidates if c is not None)
        return real_measure(self, candidates, labels, stage)

    def session(self, entries, stage=""):
        proposed.extend(c for _, c in entries if c is not None)
        return real_session(self, entries, stage)

    monkeypatch.setattr(Measurer, "measure", measure)
    monkeypatch.setattr(Measurer, "session", session)
    results = job.optimize(normed, devices="cpu:0,cpu:1", budget_s=30.0, out_dir=tmp_path / "out",
                           methods=["single", "balanced", "random_search", "rl"], protocol=PROTOCOL, search=SEARCH,
                           warn=lambda text: None)
    assert results.status == "complete" and (tmp_path / "out" / "plan.json").exists()
    assert proposed and all(c.microbatches == 1 for c in proposed)
    assert all(r.microbatches in (None, 1) for r in results.methods)
    assert results.bounds["microbatches"] == 1
    notes = [n for n in results.notes if n.startswith("micro-batches off: ")]
    assert len(notes) == 1 and "BatchNorm1d" in notes[0] and "microbatch_statistics = True" in notes[0]
    assert notes[0] in json.loads((tmp_path / "out" / "results.json").read_text())["notes"]


def test_only_the_refused_model_loses_its_micro_batch_counts(normed, tmp_path):
    loaded = load_workload(normed)
    problem = build_problem(loaded, "cpu:0,cpu:1")
    assert len(microbatch_options(problem)) > 1  # the profile timed m > 1: the restriction is what removes them
    assert job.microbatches_off(loaded, problem).startswith(f"{normed}: module")
    assert microbatch_options(problem) == (1,) and pipeline(problem).microbatches == 1

    accepting = tmp_path / "accepting.py"
    accepting.write_text(NORMED + "\nmicrobatch_statistics = True\n")
    loaded = load_workload(str(accepting))
    problem = build_problem(loaded, "cpu:0,cpu:1")
    assert job.microbatches_off(loaded, problem) is None and len(microbatch_options(problem)) > 1


def test_asking_for_micro_batches_of_a_refused_model_is_one_line(normed, tmp_path):
    with pytest.raises(PlacerError, match="--search microbatches: .*BatchNorm1d"):
        job.optimize(normed, devices="cpu:0,cpu:1", budget_s=5.0, out_dir=tmp_path / "out", methods=["random_search"],
                     protocol=PROTOCOL, search=SearchOptions(overrides=("microbatches=1,2",)),
                     warn=lambda text: None)


def test_asking_for_a_micro_batch_count_the_profile_did_not_time_is_one_line(normed, tmp_path):
    # new-user trial s25: microbatches=3 was an internal error; a count the profile could not run at batch / m
    # left every RL sample infeasible and the method's row missing without a word
    accepting = tmp_path / "accepting.py"
    accepting.write_text(NORMED + "\nmicrobatch_statistics = True\n")
    with pytest.raises(PlacerError, match=r"--search microbatches: the profile has no step time at m = 3: placer "
                                          r"profiles only 1, 2, 4, 8; choose among 1, 2"):
        job.optimize(str(accepting), devices="cpu:0,cpu:1", budget_s=5.0, out_dir=tmp_path / "out", methods=["rl"],
                     protocol=PROTOCOL, search=SearchOptions(overrides=("microbatches=2,3",)),
                     warn=lambda text: None)


LOSS_INSIDE = '''
import torch
from torch import nn

class WithLoss(nn.Module):  # a loss computed inside the model, as a Hugging Face model given labels does
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, y):
        out = self.body(x)
        return {"loss": nn.functional.mse_loss(out, y), "out": out}

def build_model():
    torch.manual_seed(0)
    return WithLoss()

def example_inputs():
    return (torch.randn(16, 16), torch.randn(16, 4))

def loss_fn(output, x, y):
    return output["loss"]
'''


def test_a_loss_inside_the_model_turns_micro_batches_off_even_with_statistics_accepted(tmp_path):
    # Trial 2 item 9: the bound said "at 2 micro-batches" and no note said they were off, for a model whose loss
    # is computed inside (the runtime refuses micro-batches for it whatever the workload accepts).
    from placer.inspect_workload import bound_as_optimize

    path = tmp_path / "loss_inside.py"
    path.write_text(LOSS_INSIDE + "\nmicrobatch_statistics = True\n")
    loaded = load_workload(str(path))
    problem = build_problem(loaded, "cpu:0,cpu:1")
    assert len(microbatch_options(problem)) > 1
    reason = job.microbatches_off(loaded, problem)
    assert reason.startswith(f"{path}: output '") and "loss computed inside the model" in reason
    assert "compute it in loss_fn" in reason
    assert microbatch_options(problem) == (1,) and pipeline(problem).microbatches == 1
    assert bound_as_optimize(loaded, problem, None).microbatches == 1  # what inspect and results.json report


def test_inspect_notes_why_micro_batches_are_off_and_bounds_at_one(tmp_path):
    from placer.inspect_workload import inspect_summary

    path = tmp_path / "loss_inside.py"
    path.write_text(LOSS_INSIDE)
    summary = inspect_summary(str(path), "cpu:0,cpu:1", 48)
    assert any(n.startswith("micro-batches off: ") and "loss computed inside" in n for n in summary["notes"])
    assert summary["lower_bound_microbatches"] == 1


def test_inspect_notes_which_micro_batch_counts_the_profile_could_not_time_and_why(tmp_path):
    from placer.inspect_workload import inspect_summary

    path = tmp_path / "four_rows.py"  # BatchNorm fails on 1 row, at m = 4; m = 8 does not divide 4 rows
    path.write_text(NORMED.replace("torch.randn(16, 16)", "torch.randn(4, 16)") + "\nmicrobatch_statistics = True\n")
    [note] = [n for n in inspect_summary(str(path), "cpu:0,cpu:1", 48)["notes"] if "micro-batch" in n]
    assert note.startswith("micro-batch counts unavailable: m = 4: a training step at batch / m fails: ValueError: "
                           "Expected more than 1 value per channel")
    assert note.endswith("; m = 8: the batch (4 rows of input 'input', the first with a batch dimension) does not "
                         "divide into m") and "\n" not in note
    full = tmp_path / "full.py"
    full.write_text(NORMED + "\nmicrobatch_statistics = True\n")
    assert not [n for n in inspect_summary(str(full), "cpu:0,cpu:1", 48)["notes"] if "micro-batch" in n]


def test_a_loss_inside_a_model_captured_by_fx_turns_micro_batches_off_too(tmp_path):
    # trial 6: fx records no shapes, so the scalar output went unseen and a search at m > 1 ran on
    path = tmp_path / "loss_inside_fx.py"
    path.write_text(LOSS_INSIDE + "\nleaf_modules = [nn.ReLU]\n")  # a leaf: captured by torch.fx
    loaded = load_workload(str(path))
    problem = build_problem(loaded, "cpu:0,cpu:1")
    assert problem.ops.graph["capture"]["method"] == "fx"
    assert "loss computed inside the model" in job.microbatches_off(loaded, problem)
    assert microbatch_options(problem) == (1,)


ROW_MEAN = '''
import torch
from torch import nn

class Centred(nn.Module):  # a reduction over the batch inside the model: found only when a plan first runs
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(64, 4)

    def forward(self, x):
        x = x - x.mean(0, keepdim=True)
        return self.h(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))

def build_model():
    torch.manual_seed(0)
    return Centred()

def example_inputs():
    return (torch.randn(16, 16),)
'''


def test_candidates_the_runtime_refuses_are_noted_with_the_reason(tmp_path):
    # new-user trial s26: every candidate at m = 2 was refused, and the only word was "none measured faster"
    path = tmp_path / "centred.py"
    path.write_text(ROW_MEAN)
    results = job.optimize(str(path), devices="cpu:0,cpu:1", budget_s=5.0, out_dir=tmp_path / "out",
                           methods=["random_search"], protocol=PROTOCOL,
                           search=SearchOptions(max_samples=16, overrides=("microbatches=2", "measure_every=1")),
                           warn=lambda text: None)
    [note] = [n for n in results.notes if "refused by the runtime" in n]
    assert "reduces over the batch" in note and "\n" not in note
