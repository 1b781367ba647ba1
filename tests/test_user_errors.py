"""User mistakes of the second new-user trial (docs/trial2.md items 5, 6, 8), in process where
they can be: each is one line naming the cause and the fix, exit status 2 from the command
line; a closed stdout is no error; placer's own faults stay internal errors (status 1)."""

import json
import signal
import subprocess
import sys
import types
import warnings
from pathlib import Path

import click
import pytest
import torch
from torch import nn

from graphs.capture import NodeFailure, capture, failure_on_inputs
from graphs.errors import DeviceSpecError, PlanError, WorkloadError
from graphs.profile import profile
from graphs.workload import Workload, load_workload
import placer.runtime.timing
from placer import cli as placer_cli
from placer.plan import Plan, load_plan, plan_cluster
from placer.runtime.stats import Measurement

ROOT = Path(__file__).parent.parent
HEAD = "import sys\nimport torch\nfrom torch import nn\n"


def workload_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "w.py"
    path.write_text(HEAD + body)
    return str(path)


def load_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(WorkloadError) as err:
        load_workload(workload_file(tmp_path, body))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Run placer's main() in this process on `args`: (exit status, stdout, stderr). The
    signal handlers and warnings display main installs are restored afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["placer", *args])
        monkeypatch.setattr(placer_cli, "echo", lambda text="": print(text))  # STDOUT was bound at import
        code = 0  # main() returns when the command succeeds
        try:
            placer_cli.main()
        except SystemExit as exited:
            code = exited.code
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def extra_command():
    """Add a command to the `placer` group for one test."""
    added = []

    def add(name: str, fn) -> None:
        placer_cli.cli.add_command(click.Command(name, callback=fn))
        added.append(name)

    yield add
    for name in added:
        del placer_cli.cli.commands[name]


# --- item 5: a closed stdout, and which SystemExit is the workload's -----------------------------

def placer_process(*args: str) -> subprocess.Popen:
    """`placer ARGS` started as a user starts it, its stdout and stderr piped."""
    return subprocess.Popen([sys.executable, "-c", f"import sys; from placer.cli import main; sys.argv = "
                             f"{['placer', *args]!r}; main()"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)


@pytest.mark.parametrize("args", [("search-options",), ("--help",), ("--version",), ("optimize", "--help")])
def test_a_reader_that_goes_away_ends_placer_quietly_with_sigpipes_status(args):
    done = placer_process(*args)
    done.stdout.close()  # `| head -0`: gone before placer writes its first line
    err = done.stderr.read()
    assert done.wait(timeout=300) == placer_cli.EXIT_READER_GONE == 141
    assert err == ""  # not the help again on the terminal, not "the workload called sys.exit(1)", no "Exception ignored"


def test_help_and_version_are_written_once_on_stdout_and_no_command_is_one_line():
    helped, version, bare = (placer_process(*args) for args in (("--help",), ("--version",), ()))
    out, err = helped.communicate(timeout=300)
    assert (helped.returncode, err) == (0, "") and out.startswith("Usage: placer ") and out.count("Usage:") == 1
    out, err = version.communicate(timeout=300)
    assert (version.returncode, err) == (0, "") and out.startswith("placer, version ")
    out, err = bare.communicate(timeout=300)  # click's own usage error: its message is the whole help
    assert (bare.returncode, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: no command given: name one of baseline, ") and err.endswith("(see placer --help)\n")


def test_a_broken_pipe_that_is_not_the_reader_going_away_is_an_internal_error(run_main, extra_command, monkeypatch):
    def worker_died():
        raise BrokenPipeError(32, "Broken pipe")

    extra_command("pipe", worker_died)
    left = []
    monkeypatch.setattr(placer_cli, "leave_quietly", lambda: left.append(True))
    code, _, err = run_main("pipe")  # this test's stdout and stderr are open
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: internal error: BrokenPipeError")
    assert "sys.exit" not in err and not left
    monkeypatch.setattr(placer_cli, "reader_gone", lambda: True)
    code, _, err = run_main("pipe")  # the user's `| head` went away
    assert (code, err, left) == (141, "", [True])


def test_a_sys_exit_that_is_not_the_workloads_is_left_alone(run_main, extra_command):
    extra_command("exits", lambda: sys.exit(3))
    code, _, err = run_main("exits")
    assert code == 3 and "workload" not in err


def test_a_forward_that_calls_sys_exit_is_a_workload_error_when_captured_and_when_timed(tmp_path):
    path = workload_file(tmp_path, """
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(3, 3)
    def forward(self, x):
        sys.exit(4)
def build_model(): return M()
def example_inputs(): return torch.randn(2, 3)
""")
    with pytest.raises(WorkloadError, match=r"the model's forward \(M\) called sys.exit\(4\)"):
        capture(load_workload(path))
    trial = placer.runtime.timing.EagerTrial(load_workload(path), "cpu")
    with pytest.raises(WorkloadError, match=r"the training step called sys.exit\(4\)"):
        trial.open()


# --- item 6: the user's model failing, and a forward placer cannot call ---------------------------

@pytest.mark.parametrize("signature, inputs, wrapper", [
    ("*, x", "torch.randn(3, 4)", "x is keyword-only: wrap the model in a module whose forward takes x positionally, "
                                  "e.g. def forward(self, x): return self.model(x=x)"),
    ("x, *, mask, scale=1.0", "torch.randn(3, 4), torch.ones(3, 4)",
     "mask is keyword-only: wrap the model in a module whose forward takes mask positionally, e.g. "
     "def forward(self, x, mask): return self.model(x, mask=mask)"),
])
def test_a_keyword_only_forward_is_refused_at_load_with_the_wrapper_to_write(tmp_path, signature, inputs, wrapper):
    message = load_error(tmp_path, f"""
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(4, 4)
    def forward(self, {signature}):
        return self.l(x)
def build_model(): return M()
def example_inputs(): return ({inputs},)
""")
    assert f"M.forward({signature}) cannot be called as model(*example_inputs())" in message
    assert wrapper in message


def test_integer_inputs_to_a_linear_layer_are_a_workload_error_naming_the_dtype(tmp_path):
    loaded = Workload(name="t", spec="t.py", model=nn.Linear(3, 3), inputs=(torch.randn(2, 3).long(),))
    with pytest.raises(WorkloadError) as err:  # export accepts it on fake tensors: the profile's real run fails
        profile(capture(loaded), loaded, repeats=1, cache_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("t.py: the model fails on its example inputs at node 'linear'")
    assert "mat1 and mat2 must have the same dtype" in message and "example input 0 is int64" in message


def test_a_model_failing_in_its_own_code_names_the_line(tmp_path):
    path = workload_file(tmp_path, """
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.w = nn.Parameter(torch.randn(5, 2))
    def forward(self, x):
        return x @ self.w
def build_model(): return M()
def example_inputs(): return torch.randn(2, 3)
""")
    with pytest.raises(WorkloadError) as err:
        capture(load_workload(path))
    message = str(err.value)
    assert f"the model fails on its example inputs at {path}:9 (return x @ self.w)" in message
    assert "fix: make example_inputs() return the tensors forward expects" in message


def test_a_layer_of_a_sequential_failing_on_the_inputs_is_named_by_path_and_class(tmp_path):
    # new-user trial 12: "at node '_0' (0)" said little
    path = workload_file(tmp_path, """
def build_model(): return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
def example_inputs(): return torch.randn(8, 15)
""")
    with pytest.raises(WorkloadError, match=r"fails on its example inputs at layer '0' \(Linear\): RuntimeError: "
                                            r"mat1 and mat2 shapes cannot be multiplied"):
        capture(load_workload(path))


def test_a_model_raising_its_own_error_is_named_as_such_not_as_a_tracing_limit(tmp_path):
    # new-user trial 12: export failed with the model's own ValueError, fx on the shape branch, and the
    # fx message led with a fix that could not help ("move the code that branches on tensor values ...")
    path = workload_file(tmp_path, """
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.fc = nn.Linear(4, 4)
    def forward(self, x):
        if x.shape[0] != 7:
            raise ValueError("batch must be 7")
        return self.fc(x)
def build_model(): return M()
def example_inputs(): return torch.randn(8, 4)
""")
    with pytest.raises(WorkloadError) as err:
        capture(load_workload(path))
    message = str(err.value)
    assert f"the model fails on its example inputs at {path}:10 (raise ValueError" in message
    assert "ValueError: batch must be 7; fix: make example_inputs() return the tensors forward expects" in message


def test_a_capture_that_fails_where_the_model_runs_is_placers_error_not_the_users():
    try:
        raise RuntimeError("the capture is wrong")
    except RuntimeError as exc:
        failure = NodeFailure(torch.fx.symbolic_trace(nn.Linear(2, 2)).graph.find_nodes(op="placeholder")[0])
        failure.__cause__ = exc
    assert failure_on_inputs("t.py", nn.Linear(2, 2), (torch.randn(1, 2),), failure) is failure.__cause__


# --- item 8: messages that say what to do -----------------------------------------------------------

def test_a_dict_input_names_the_wrapper_module(tmp_path):
    message = load_error(tmp_path, """
def build_model(): return nn.Linear(2, 2)
def example_inputs(): return ({"x": torch.randn(2, 2), "w": torch.randn(2, 1)},)
""")
    assert "item 0 is dict, not a tensor" in message
    assert "def forward(self, x, w): return self.model({'x': x, 'w': w})" in message


def test_a_loss_fn_that_returns_a_vector_is_told_to_return_a_scalar(tmp_path):
    loaded = load_workload(workload_file(tmp_path, """
def build_model(): return nn.Linear(3, 3)
def example_inputs(): return torch.randn(2, 3)
def loss_fn(out, x): return out
"""))
    x = loaded.inputs[0]
    with pytest.raises(WorkloadError, match=r"loss_fn\(\) returned a tensor of shape \[2, 3\]; loss_fn must return "
                                            r"a scalar tensor: reduce it, e.g. with .mean\(\)"):
        loaded.loss_fn(loaded.model(x), x)
    assert loaded.loss_fn(loaded.model(x).sum(dim=0, keepdim=True)[:, :1], x).numel() == 1  # one element is fine


def test_a_plan_for_devices_this_host_lacks_names_the_plan_and_the_fix_wherever_it_runs(tmp_path, run_main):
    path = Plan(devices=["cpu:0", "cuda:63"], assignment={}, device_map={}, fingerprint="f").save(tmp_path / "gpu.json")
    with pytest.raises(DeviceSpecError) as err:
        plan_cluster(load_plan(path))
    message = str(err.value)
    assert message.startswith("gpu.json places the model on cpu:0, cuda:63, but device 'cuda:63' does not exist on "
                              "this host (")
    assert "; this host has " in message and " CPU cores: make a plan for this host's devices here (placer optimize " \
        "--devices " in message and message.endswith(", or placer baseline --out)")
    assert plan_cluster(Plan(devices=["cpu:0", "cpu:1"], assignment={}, device_map={}, fingerprint="f")).names \
        == ["cpu:0", "cpu:1"]
    with pytest.raises(DeviceSpecError) as applied:  # the API: not a bare device error from torch
        placer.apply(nn.Linear(2, 2), path)
    assert str(applied.value) == message
    workload = workload_file(tmp_path, "def build_model(): return nn.Linear(2, 2)\n"
                                       "def example_inputs(): return torch.randn(2, 2)\n")
    for command in ("measure", "train"):  # the command line: one line, exit status 2
        assert run_main(command, workload, "--plan", str(path)) == (2, "", f"error: {message}\n")


HEADLINE = ("No verdict: the host was busy while unplaced was timed; no plan is chosen and no plan.json is "
            "written. Measure on an idle host, then run the same command with --resume.")


def results_error(folder: Path, **fields) -> str:
    """load_plan's message for a results.json of `fields` in `folder`."""
    path = folder / "results.json"
    path.write_text(json.dumps({"schema": "placer.results/v1", "command": "optimize", "methods": [], **fields}))
    with pytest.raises(PlanError) as err:
        load_plan(path)
    message = str(err.value)
    assert message.startswith(f"{path}: this is a results file (what a run measured), not a plan: ")
    return message


def test_a_results_file_given_as_a_plan_points_to_a_plan_that_exists_or_says_why_there_is_none(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    assert results_error(tmp_path, plan="plan.json").endswith(f"pass the plan beside it, {tmp_path / 'plan.json'}")
    # A run that chose no plan (busy host, no verdict) wrote none: its own headline says why and what to do.
    bare = tmp_path / "bare"
    bare.mkdir()
    message = results_error(bare, plan=None, choice={"verdict": "unmeasured", "headline": HEADLINE})
    assert message.endswith(f"its run wrote no plan: {HEADLINE}") and "plan.json beside" not in message
    (bare / "plan.unconfirmed.json").write_text("{}")  # an earlier plan this run set aside
    assert f"wrote no plan ({bare / 'plan.unconfirmed.json'} is an earlier run's plan that it could not confirm): " \
        in results_error(bare, plan=None, choice={"verdict": "unmeasured", "headline": HEADLINE})
    gone = tmp_path / "gone"
    gone.mkdir()
    assert "the plan its run wrote, " in results_error(gone, plan="plan.json") and "no longer there" \
        in results_error(gone, plan="plan.json")
    compared = results_error(bare, command="compare", plan=None,
                             methods=[{"method": "unplaced"}, {"method": "rl", "plan": str(tmp_path / "plan.json")}])
    assert compared.endswith(f"placer compare writes no plan: pass one of the plans it compared, e.g. "
                             f"{tmp_path / 'plan.json'}")


def test_a_plan_json_that_a_run_did_not_write_says_why_from_the_results_beside_it(tmp_path):
    # Trial 4: `placer optimize m.py && placer train m.py --plan .../plan.json` after a no-verdict run said only
    # "no such plan file".
    (tmp_path / "results.json").write_text(json.dumps({"schema": "placer.results/v1", "command": "optimize",
                                                       "plan": None, "methods": [],
                                                       "choice": {"verdict": "unmeasured", "headline": HEADLINE}}))
    with pytest.raises(PlanError) as err:
        load_plan(tmp_path / "plan.json")
    assert str(err.value) == f"{tmp_path / 'plan.json'}: no such plan file; its run wrote no plan: {HEADLINE}"
    with pytest.raises(PlanError) as err:  # no run beside it: nothing to add
        load_plan(tmp_path / "elsewhere" / "plan.json")
    assert str(err.value) == f"{tmp_path / 'elsewhere' / 'plan.json'}: no such plan file"


@pytest.mark.parametrize("placement, error", [
    ([0], "placement gives 1 devices for 2 groups (one each): the file was cut or edited"),
    ([0, 1, 1], "placement gives 3 devices for 2 groups"),
    ([0, 2], "placement must list a device index from 0 to 1 for each group"),
])
def test_a_placement_that_does_not_match_the_groups_is_refused(tmp_path, placement, error):
    plan = Plan(devices=["cpu:0", "cpu:1"], assignment={}, device_map={}, fingerprint="f", groups=[["a"], ["b"]],
                placement=placement)
    with pytest.raises(PlanError) as err:
        load_plan(plan.save(tmp_path / "plan.json"))
    assert error in str(err.value)


def test_debug_after_the_command_says_where_it_goes_and_option_errors_name_the_commands_help(run_main):
    code, _, err = run_main("inspect", "model.py", "--debug")
    assert (code, err) == (2, "error: --debug goes before the command: placer --debug inspect model.py\n")
    code, _, err = run_main("inspect", "model.py", "--bogus")
    assert (code, err) == (2, "error: No such option '--bogus' (see placer inspect --help)\n")


def test_a_refused_plan_is_named_once(run_main, tmp_path, monkeypatch):
    path = workload_file(tmp_path, "def build_model(): return nn.Linear(2, 2)\n"
                                   "def example_inputs(): return torch.randn(2, 2)\n")
    plan = Plan(devices=["cpu:0", "cpu:1"], assignment={}, device_map={}, fingerprint="f").save(tmp_path / "p2.json")
    refused = types.SimpleNamespace(feasible=False, notes=[], peak_bytes={},
                                    reason="refused: p2.json: output 'loss' is computed inside the model")
    monkeypatch.setattr(placer.runtime.timing, "measure", lambda *args, **kwargs: refused)
    code, _, err = run_main("measure", path, "--plan", str(plan))
    assert (code, err) == (2, f"error: {plan}: infeasible: refused: output 'loss' is computed inside the model\n")


# --- new-user trial 4: a median with a CI far beyond the protocol's target, and --ci's range -------

def wide_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "not a measurement to rely on" in line]


def test_a_measured_median_whose_ci_is_far_beyond_the_target_is_warned_about_once(run_main, tmp_path, monkeypatch):
    path = workload_file(tmp_path, "def build_model(): return nn.Linear(2, 2)\n"
                                   "def example_inputs(): return torch.randn(2, 2)\n")
    plan = Plan(devices=["cpu:0", "cpu:1"], assignment={}, device_map={}, fingerprint="f").save(tmp_path / "p.json")
    lines = []
    for ci in ((40.0, 160.0), (99.0, 101.0)):  # +-60% against the default +-3%; +-1%
        timed = Measurement(feasible=True, median_ms=100.0, iqr_ms=5.0, ci_ms=ci, runs=10)
        monkeypatch.setattr(placer.runtime.timing, "measure", lambda *args, timed=timed, **kwargs: timed)
        for json_flag in ((), ("--json",)):  # under --json too: the warning is on stderr
            code, _, err = run_main("measure", path, "--plan", str(plan), *json_flag)
            assert code == 0, err
            lines.append(wide_warnings(err))
    wide = ("warning: step time 100.00 ms +-60%: a CI over 10x the +-3% target, so not a measurement to rely on "
            "(likely other processes on the host, or too few steps): measure on an idle host, with more --iters")
    assert lines == [[wide], [wide], [], []]


def test_compare_and_optimize_rows_whose_ci_is_far_beyond_the_target_are_one_warning(capsys, monkeypatch):
    from placer.measurements import Protocol
    from placer.report import format_table
    from placer.results import MethodResult, Results

    monkeypatch.setattr(placer_cli, "echo", lambda text="": print(text))
    rows = [MethodResult("unplaced", "unplaced", devices=["cpu"], measured_ms=10.0, ci_ms=(9.9, 10.1), runs=5),
            MethodResult("rl", "rl", measured_ms=100.0, ci_ms=(40.0, 160.0), runs=5),
            MethodResult("metis", "baseline", measured_ms=50.0, ci_ms=(30.0, 70.0), runs=5)]
    placer_cli._print_results(Results(command="compare", methods=rows, protocol=Protocol(target=0.03).to_json()),
                              format_table)
    (line,) = wide_warnings(capsys.readouterr().err)
    assert line.startswith("warning: rl 100.00 ms +-60%, metis 50.00 ms +-40%: a CI over 10x the +-3% target")
    assert "other processes on the host, or too few steps" in line and "--iters" in line and "unplaced" not in line


@pytest.mark.parametrize("command", [("optimize",), ("baseline", "w.py", "--method", "all"),
                                     ("compare", "w.py", "p.json")])
def test_ci_outside_its_range_is_refused_by_the_option_type_of_every_command(run_main, command):
    for ci in ("0.7", "0", "nan"):
        code, _, err = run_main(*command, "--ci", ci)
        assert code == 2 and err == (f"error: Invalid value for '--ci': '{ci}': give a finite number above 0 and at "
                                     f"most 0.5 (the CI half-width as a fraction of the median, 0.03 for +-3%; above "
                                     f"+-50% no speedup could be told from a tie) (see placer {command[0]} --help)\n")


# --- trial4: --search values, Ctrl-C before any output ------------------------------------------

@pytest.mark.parametrize("text", ["1,2", "(1,2)", "(1, 2)", "[1,2]", "1 2", " 1, 2,"])
def test_search_microbatches_takes_the_tuple_forms_a_user_writes(text):
    from placer.search import SearchConfig, overrides

    assert overrides(SearchConfig(), [f"microbatches={text}"]).microbatches == (1, 2)


def test_every_default_search_options_prints_reads_back_through_search():
    from dataclasses import fields

    from placer.rl.trainer import TrainConfig
    from placer.search.config import format_value, overrides

    base = TrainConfig()
    printed = [f"{f.name}={format_value(getattr(base, f.name))}" for f in fields(TrainConfig)]
    assert overrides(base, printed) == base
    assert format_value((1,)) == "1" and format_value(None) == "none"


@pytest.mark.parametrize("pair, error", [
    ("lr=-1", "lr=-1.0: give a value >= 0"), ("top_quantile=2", "top_quantile=2.0: give a value in (0, 1]"),
    ("budget_s=0", "budget_s=0.0: give a value > 0"), ("batch_size=0", "batch_size=0: give a value >= 1"),
    ("microbatches=(0,)", "microbatches=0: give counts >= 1"),
    ("microbatches=x", "cannot set 'microbatches=x': microbatches takes counts separated by commas or none, "
                       "e.g. microbatches=1,2,4"),
    ("seed=1.5", "cannot set 'seed=1.5': seed takes an integer, e.g. seed=4"),
    ("learning_rate=0.1", "cannot set 'learning_rate=0.1': no search setting 'learning_rate'; `placer "
                          "search-options` lists every key"),  # new-user trial s25: was every key, on one line
    ("batchsize=8", "cannot set 'batchsize=8': no search setting 'batchsize'; did you mean batch_size? `placer "
                    "search-options` lists every key"),
    ("lr", "cannot set 'lr': write key=value (`placer search-options` lists every key)"),
    ("LR=-1", "lr=-1.0: give a value >= 0"),  # read as lr (keys ignore case)
])
def test_a_search_setting_out_of_its_range_or_form_is_one_line_naming_field_value_and_range(run_main, tmp_path,
                                                                                            pair, error):
    workload = workload_file(tmp_path, "def build_model(): return nn.Linear(2, 2)\n"
                                       "def example_inputs(): return torch.randn(3, 2)\n")
    code, out, err = run_main("optimize", workload, "--devices", "cpu:0,cpu:1", "--search", pair,
                              "--out", str(tmp_path / "out"))
    assert (code, out, err) == (2, "", f"error: --search: {error}\n")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_a_command_before_any_output_is_the_one_line_interrupted(run_main, extra_command):
    def interrupted():
        raise KeyboardInterrupt

    extra_command("stop", interrupted)
    assert run_main("stop") == (placer_cli.EXIT_INTERRUPTED, "", "interrupted\n")  # no empty line before it


def test_optimize_on_one_device_is_refused_before_any_work(tmp_path):
    # new-user trial 12: `--devices cpu` profiled, searched and measured for minutes to find that all plans tie
    from graphs.errors import DeviceSpecError
    from placer.optimize import optimize

    for devices in ("cpu", "cpu:0"):
        with pytest.raises(DeviceSpecError, match=rf"--devices names one device \({devices}\): every plan runs the "
                                                  rf"model unplaced.*e.g. --devices cpu:0,cpu:1"):
            optimize("zoo:mlp:small", devices, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
