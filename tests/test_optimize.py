"""placer.optimize: the pipeline in-process, on a tiny branchy workload with short
measurement sessions: the rows it makes, the honest choice, resume and interruption."""

import json
from pathlib import Path

import pytest

import placer.optimize as job
from graphs.errors import CheckpointError, DeviceSpecError, InfeasibleError, PlacerError
from placer.book import MeasurementBook, candidate_key
from placer.measurements import Measurer, Protocol
from placer.search_stage import SearchOptions

DEVICES = "cpu:0,cpu:1"
# Every session stops at min_runs steps each; no reference is too wide to judge by (choose rule 5: with 3
# steps of a tiny model on a busy host, unplaced spans 1-200 ms; tests/test_optimize_verdicts.py covers it).
PROTOCOL = Protocol(min_runs=3, max_runs=6, cap_s=0.01, warmup=1, target=100.0)
SEARCH = SearchOptions(max_samples=32, overrides=("measure_every=1", "batch_size=8", "imitation_steps=20"))

WORKLOAD = '''
import torch
from torch import nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(32, 64)
        self.left = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        self.right = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(128, 8)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.cat([self.left(h), self.right(h)], dim=1))

def build_model():
    return Branchy()

def example_inputs():
    return (torch.randn(16, 32),)
'''


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("wl") / "branchy.py"
    path.write_text(WORKLOAD)
    return str(path)


def run(workload: str, out: Path, **kwargs):
    options = dict(devices=DEVICES, budget_s=60.0, out_dir=out, methods=["single", "expert", "round_robin", "rl"],
                   protocol=PROTOCOL, search=SEARCH, warn=lambda text: None)
    return job.optimize(workload, **{**options, **kwargs})


@pytest.fixture(scope="module")
def first(workload, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt")
    return run(workload, out), out


def test_the_pipeline_measures_unplaced_beside_every_row_and_chooses_honestly(first):
    results, out = first
    assert [r.method for r in results.methods] == ["unplaced", "single", "expert", "round_robin", "rl"]
    assert results.status == "complete" and results.unplaced.devices == ["cpu"]
    for row in results.methods:
        assert row.measured and row.session in ("baselines", "final", "confirm") and row.runs >= 3
        # Ratios only beside unplaced's last session (placer.choose.settle_ratios; was: every row, from its own).
        assert (row.vs_unplaced is None) == (row.kind == "unplaced" or row.session != results.unplaced.session)
    chosen = results.row(results.best)
    assert chosen.session == "confirm" and results.choice.session == "confirm"
    assert results.best == "unplaced" or chosen.vs_unplaced.verdict == "faster"
    assert "unplaced" in results.choice.shortlist and "rl" in results.choice.shortlist
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == results.best and plan["measured_ms"] == chosen.measured_ms
    saved = json.loads((out / "results.json").read_text())
    assert saved["run_id"] == results.run_id and saved["choice"]["method"] == results.best
    assert saved["search"]["budget_s"] == 60.0 and saved["search"]["seed"] == 0  # the search configuration used
    assert saved["search"]["batch_size"] == SEARCH.config(60.0, 0).batch_size
    assert results.run_id in (out / "report.md").read_text()


def test_the_learning_curve_marks_recalibrations(first):
    results, _ = first
    assert results.curve and all(row["method"] == "rl" for row in results.curve)
    assert results.recalibrations[0]["stage"] == "baselines"  # fitted on the baselines' measurements first
    calibrations = [row["calibration"] for row in results.curve]
    assert calibrations == sorted(calibrations) and calibrations[-1] >= 1
    search_marks = [m for m in results.recalibrations if "stage" not in m]
    assert search_marks and all(m["method"] == "rl" and m["update"] >= 1 for m in search_marks)
    assert results.best_measured and all(m["method"] == "rl" and len(m["ci_ms"]) == 2 for m in results.best_measured)


def boom(*args, **kwargs):
    raise AssertionError("work started before the inputs were checked")


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(devices="gpu:0"), DeviceSpecError, "gpu:0"),
    (dict(budget_s=float("inf")), PlacerError, "--budget"),
    (dict(methods=["single", "warp"]), PlacerError, "warp"),
    (dict(methods=[]), PlacerError, "--methods names no method: give some of single, "),  # was: every method
    (dict(workers=10_000), DeviceSpecError, "--workers"),
    (dict(search=SearchOptions(overrides=("batch_size=many",))), PlacerError, "batch_size=many"),
])
def test_bad_inputs_are_refused_before_any_work(workload, tmp_path, monkeypatch, kwargs, error, fragment):
    monkeypatch.setattr(job, "load_workload", boom)
    with pytest.raises(error, match=fragment):
        run(workload, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_one_is_refused_first(workload, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "load_workload", boom)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PlacerError, match="is under the file"):
        run(workload, blocker / "out")


def test_caps_that_no_placement_fits_are_refused_before_any_baseline_or_search(workload, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "baseline_rows", boom)
    monkeypatch.setattr(job, "run_search", boom)
    stages = []
    with pytest.raises(InfeasibleError, match=r"no placement could run on these devices: .* \(raise --memory caps"):
        run(workload, tmp_path / "out", memory="cpu:0=1KiB,cpu:1=1KiB",
            progress=lambda stage: stages.append(stage.name))
    assert stages and set(stages) <= {"loading workload", "profiling"}  # no baselines, search or measuring stage
    assert not (tmp_path / "out" / "plan.json").exists() and not (tmp_path / "out" / "results.json").exists()


def test_resume_with_other_devices_is_refused_before_any_work(first, workload, monkeypatch):
    _, out = first
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    monkeypatch.setattr(job, "build_problem", boom)
    with pytest.raises(CheckpointError, match="devices was"):
        run(workload, out, devices="cpu:0,cpu:1,cpu:2", resume=True)
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == before


def test_resume_measures_nothing_twice(first, workload, monkeypatch):
    results, out = first
    measured = []
    real = Measurer.measure

    def counting(self, candidates, labels=None, stage=""):
        measured.extend(c for c in candidates if self.book.get(c) is None)
        return real(self, candidates, labels, stage)

    monkeypatch.setattr(Measurer, "measure", counting)
    again = run(workload, out, resume=True)
    assert measured == []  # the baselines and unplaced came from the book
    assert again.status == "complete" and len(again.curve) >= len(results.curve)


def test_resume_after_ctrl_c_in_the_search_continues_it(workload, tmp_path, monkeypatch):
    """Ctrl-C while the search measures its second round; --resume re-measures none of
    the book (baselines, unplaced, the search's first measurements) and continues the
    search from its checkpoint: the rounds after the saved ones, up to the same sample
    budget, the earlier run's curve kept (the round cut short included)."""
    real, calls, measured = Measurer.measure, [], []

    def interrupted(self, candidates, labels=None, stage=""):
        calls.append(stage)
        if stage.startswith("search") and calls.count(stage) == 2:
            raise KeyboardInterrupt
        return real(self, candidates, labels, stage)

    monkeypatch.setattr(Measurer, "measure", interrupted)
    first = run(workload, tmp_path / "out")
    assert first.status == "interrupted" and first.interrupted_at == "search (rl)"
    book = dict(MeasurementBook(MeasurementBook.last_identity(tmp_path / "out" / "measurements.json"),
                                tmp_path / "out" / "measurements.json").entries)

    def counting(self, candidates, labels=None, stage=""):
        measured.extend((stage, c) for c in candidates if self.book.get(c) is None)
        return real(self, candidates, labels, stage)

    rows = []
    monkeypatch.setattr(Measurer, "measure", counting)
    again = run(workload, tmp_path / "out", resume=True,
                progress=lambda stage: rows.append(stage.info) if stage.name == "search" else None)
    assert again.status == "complete" and all(stage.startswith("search") for stage, _ in measured)
    assert not {candidate_key(c) for _, c in measured} & set(book)
    assert rows[0]["update"] == 3 and rows[-1]["samples"] == SEARCH.max_samples  # after the saved rounds 1-2
    assert [row["update"] for row in again.curve] == [1, 2, 3, 4]  # the interrupted run's rows kept, round 2 too


def test_ctrl_c_in_the_search_keeps_the_best_plan_unconfirmed(workload, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_search", interrupted)
    results = run(workload, tmp_path / "out")
    assert results.status == "interrupted" and results.interrupted_at == "search (rl)"
    assert results.choice.verdict == "unconfirmed" and "Interrupted before the final measurements" in \
        results.choice.headline
    fastest = min((r for r in results.methods if r.measured), key=lambda r: r.measured_ms)
    assert results.best == fastest.method
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["method"] == results.best
    assert json.loads((tmp_path / "out" / "results.json").read_text())["status"] == "interrupted"


def test_ctrl_c_before_anything_is_measured_writes_nothing(workload, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Measurer, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(workload, tmp_path / "out")
    assert not (tmp_path / "out" / "plan.json").exists() and not (tmp_path / "out" / "results.json").exists()
