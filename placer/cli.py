"""The `placer` command line.

Every failure a user can cause is one line `error: ...` on stderr and exit status 2
(`--debug` shows the traceback). Ctrl-C exits with 130 and SIGTERM with 143, each
after saving what was done. stdout carries only placer's own output (the table, or
the JSON of `--json`): whatever the workload prints goes to stderr.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import click

from graphs.errors import PlacerError
from placer.cli_support import (FiniteFloat, backend_option, devices_option, echo, field_meanings, groups_option,
                                memory_option, protocol_options, protocol_from_options, seed_option, stage_progress,
                                step_timeout_option, train_backend_option, warn)
from placer.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, handle_stop_signals, interruption

EXIT_USER_ERROR = 2
__all__ = ["cli", "main", "FiniteFloat"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="placer")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find a fast placement of a PyTorch model's layers on devices, by reinforcement learning.

    WORKLOAD is a Python file defining build_model() and example_inputs(), or zoo:NAME[:SIZE]
    (zoo: rnnlm, nmt, inception_v3, transformer, mlp, gpt; sizes small, medium, paper).
    """
    ctx.obj = {"debug": debug}


def _load(workload: str):
    from graphs.workload import load_workload
    return load_workload(workload)


@cli.command()
@click.argument("workload")
@devices_option
@groups_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(workload: str, devices: str | None, max_groups: int, as_json: bool) -> None:
    """Summarize a workload: graph, groups, memory, profiled compute, lower bound."""
    from graphs.devices import parse_cluster
    from graphs.problem import build_problem
    from graphs.summary import format_summary, summarize
    from placer.results import strict

    parse_cluster(devices)
    loaded = _load(workload)
    problem = build_problem(loaded, devices, max_groups=max_groups)
    cluster_devices = problem.cluster.devices
    summary = summarize(problem.ops, problem.groups, [d.kind for d in cluster_devices], notes=loaded.notes,
                        device_names=[d.name for d in cluster_devices])
    echo(json.dumps(strict(summary), indent=2, allow_nan=False) if as_json else format_summary(summary))


@cli.command()
@click.argument("workload")
@click.option("--method", required=True, help="A baseline name, or `all` for a table of every method.")
@devices_option
@memory_option
@groups_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the plan here (one method).")
@click.option("--measure", is_flag=True, help="Also measure each placement, with unplaced, interleaved.")
@seed_option
@protocol_options
def baseline(workload: str, method: str, devices: str | None, memory: str | None, max_groups: int,
             out: Path | None, measure: bool, seed: int, iters: int, ci_target: float, measure_cap: float,
             step_timeout: float) -> None:
    """Compute heuristic placements (single, round_robin, expert, balanced, metis, ...)."""
    from envs.calibrate import load_calibration
    from envs.sim import Simulator
    from graphs.bounds import lower_bound
    from graphs.devices import parse_cluster
    from graphs.errors import InfeasibleError
    from graphs.files import folder_problem
    from graphs.problem import build_problem
    from placer.baselines import BASELINES
    from placer.measurements import MeasurementBook, Measurer
    from placer.optimize import baseline_rows, measure_baselines
    from placer.plan import make_plan
    from placer.report import format_table
    from placer.results import Results

    names = list(BASELINES) if method == "all" else [method]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise click.UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(BASELINES)} or all")
    if method == "all" and out is not None:
        raise click.UsageError("--out writes one plan: name one --method")
    parse_cluster(devices, memory)
    if out is not None and (problem := folder_problem(out.parent)):
        raise PlacerError(f"--out {out}: its folder {problem}")
    loaded = _load(workload)
    problem = build_problem(loaded, devices, memory, max_groups=max_groups)
    bound = lower_bound(problem.groups, [d.kind for d in problem.cluster.devices]).bound_ms
    rows, candidates = baseline_rows(problem, names, seed)
    if method != "all" and not rows[0].feasible:
        raise InfeasibleError(rows[0].reason)
    results = Results(command="baseline", workload=workload, devices=problem.cluster.names, methods=rows,
                      bounds={"lower_bound_ms": bound})
    simulator = Simulator(problem, load_calibration(problem))
    for row in rows:
        if row.placement is not None:
            simulated = simulator.simulate(row.placement, microbatches=row.microbatches)
            row.simulated_ms = simulated.step_ms
            row.ratio_to_lower_bound = simulated.step_ms / bound if bound > 0 else None
            if not simulated.feasible:
                row.feasible, row.reason = False, simulated.reason
    if measure:
        protocol = protocol_from_options(iters, ci_target, measure_cap, step_timeout)
        with stage_progress() as progress:
            measurer = Measurer(loaded, problem, MeasurementBook({}), protocol, progress=progress)
            measure_baselines(results, measurer, {m: c for m, c in candidates.items() if results.row(m).feasible})
    if out is not None:
        row = results.row(method)
        plan = make_plan(problem, row.placement, method, seed=seed, simulated_ms=row.simulated_ms,
                         measured_ms=row.measured_ms, microbatches=row.microbatches, schedule=row.schedule)
        plan.save(out)
    echo(format_table(results))
    echo(f"lower bound: {bound:.2f} ms")
    if out is not None:
        echo(f"plan written to {out}")


@cli.command()
@click.argument("workload")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--iters", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed training steps, after warm-up.")
@memory_option
@backend_option
@step_timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def measure(workload: str, plan_path: Path, iters: int, memory: str | None, backend: str, step_timeout: float,
            as_json: bool) -> None:
    """Time whole training steps of a workload placed by a plan."""
    from graphs.devices import parse_cluster
    from placer.plan import load_plan
    from placer.results import strict
    from placer.runtime.timing import measure as measure_plan

    plan = load_plan(plan_path)
    cluster = parse_cluster(",".join(plan.devices), memory)
    loaded = _load(workload)
    if backend == "distributed":
        from placer.distributed import measure_distributed
        result = measure_distributed(workload, plan, iters=iters)
    else:
        result = measure_plan(loaded, plan, cluster, iters=iters, timeout_s=step_timeout)
    if as_json:
        echo(json.dumps(strict(result.to_json()), indent=2, allow_nan=False))
        return
    if not result.feasible:
        echo(f"infeasible: {result.reason}")
    else:
        low, high = result.ci_ms or (result.median_ms, result.median_ms)
        echo(f"step time: {result.median_ms:.2f} ms median (CI {low:.2f}-{high:.2f}), IQR {result.iqr_ms:.2f} ms "
             f"over {result.runs} steps")
    for note in result.notes:
        echo(f"note: {note}")
    for device, nbytes in result.peak_bytes.items():
        echo(f"  {device}: peak {nbytes / 2**20:.1f} MiB")


@cli.command()
@click.argument("workload")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1))
@train_backend_option
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b"]), default=None,
              help="pipelining: the pipeline schedule (default: the plan's).")
@click.option("--microbatches", type=click.IntRange(min=1), default=None,
              help="pipelining: micro-batches per step (default: the plan's).")
def train(workload: str, plan_path: Path, steps: int, backend: str, schedule: str | None,
          microbatches: int | None) -> None:
    """Run real training steps with a placement (the user's loop, shown as a command)."""
    import placer

    def report(step: int, loss: float, ms: float) -> None:
        echo(f"step {step:>4}  loss {loss:.4f}  {ms:8.1f} ms")
        if not math.isfinite(loss):
            raise PlacerError(f"loss became {loss} at step {step}")

    plan = placer.load_plan(plan_path)
    if backend != "pipelining" and (schedule or microbatches):
        raise click.UsageError("--schedule and --microbatches are for --backend pipelining")
    loaded = _load(workload)
    if backend == "distributed":
        from placer.distributed import train_distributed
        train_distributed(workload, plan, steps, on_step=report)
        return
    if backend == "pipelining":
        from placer.distributed import train_pipelined
        train_pipelined(workload, plan, steps, on_step=report, schedule=schedule, microbatches=microbatches)
        return
    model = placer.apply(loaded.fresh_model(), placer.plan.with_workload_options(plan, loaded))
    optimizer = loaded.make_optimizer(model.parameters())
    for step in range(1, steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loaded.loss_fn(model(*loaded.inputs), *loaded.inputs)
        loss.backward()
        optimizer.step()
        value = loss.item()  # waits for the device, so the time is the whole step's
        report(step, value, (time.perf_counter() - start) * 1000)


@cli.command()
@click.argument("workload", required=False)
@devices_option
@memory_option
@click.option("--budget", default=None, type=FiniteFloat(),
              help="Seconds in which each search (rl, random_search, local_search: one after another) may start "
                   "rounds, counted from its start (RL's warm start and the periodic measurements included); the "
                   "round under way at the end and the search's closing measurement of its best candidates run "
                   "past it. Profiling, the baselines and the final measurements are extra (default 120).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default placer-out/<workload>).")
@seed_option
@click.option("--reward", type=click.Choice(["sim", "measure"]), default="sim", show_default=True,
              help="Rewards from the calibrated simulator, or measured for every sample (the paper's setting).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (same workload and devices).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start the search from a policy saved by an earlier search (DIR/search/policy.pt).")
@click.option("--search", "--rl", "search_settings", multiple=True, metavar="KEY=VALUE",
              help="Set a field of the search configuration, e.g. --search algo=ppo --search reward=neg_log "
                   "--search batch_size=32 (repeatable; see `placer search-options`).")
@click.option("--methods", default=None, metavar="A,B,...",
              help="Baselines and searches to run (default: every baseline and rl), e.g. single,metis,rl or "
                   "expert,rl,random_search,local_search.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure a search's candidates on this many worker processes at once, each with its own "
                   "cores (at most one per core).")
@protocol_options
@groups_option
def optimize(workload: str | None, devices: str | None, memory: str | None, budget: float | None, out: Path | None,
             seed: int, reward: str, resume: bool, policy_path: Path | None, search_settings: tuple[str, ...],
             methods: str | None, workers: int, iters: int, ci_target: float, measure_cap: float,
             step_timeout: float, max_groups: int) -> None:
    """Profile, run every baseline and the RL search, measure, and write plan.json and a report."""
    from placer import optimize as job
    from placer.report import format_table
    from placer.search_stage import SearchOptions

    budget_s = job.DEFAULT_BUDGET_S if budget is None else budget
    options = SearchOptions(overrides=search_settings, policy_path=policy_path)
    options.config(budget_s, seed)  # a bad --search setting: refused before any work
    with stage_progress() as progress:
        results = job.optimize(workload, devices, memory, budget_s=budget_s, out_dir=out, seed=seed,
                               reward=reward, resume=resume,
                               methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                               protocol=protocol_from_options(iters, ci_target, measure_cap,
                                                                                step_timeout),
                               max_groups=max_groups, search=options, workers=workers, progress=progress,
                               warn=warn, command=" ".join(["placer"] + sys.argv[1:]))
    _print_results(results, format_table)
    if results.interrupted:
        raise Terminated() if results.status == "terminated" else KeyboardInterrupt()


@cli.command(name="search-options")
def search_options() -> None:
    """List the search configuration's fields (for --search KEY=VALUE): each one's default and meaning."""
    import dataclasses

    from placer.rl.trainer import TrainConfig

    meanings = field_meanings(TrainConfig)
    settings = [(f"{f.name} = {f.default!r}", meanings.get(f.name, "")) for f in dataclasses.fields(TrainConfig)]
    width = max(len(setting) for setting, _ in settings)
    for setting, meaning in settings:
        echo(f"{setting:<{width}}  {meaning}".rstrip())


@cli.command()
@click.argument("workload")
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
@protocol_options
def compare(workload: str, plans: tuple[Path, ...], out: Path | None, iters: int, ci_target: float,
            measure_cap: float, step_timeout: float) -> None:
    """Measure plans, each on its own devices, and the unplaced model side by side, interleaved; write the same
    report as optimize (no plan). The plans must be for WORKLOAD's model, on devices this host has."""
    from placer.compare import compare as run
    from placer.report import format_table

    with stage_progress() as progress:
        protocol = protocol_from_options(iters, ci_target, measure_cap, step_timeout)
        results = run(workload, plans, out_dir=out, protocol=protocol,
                      progress=progress, warn=warn, command=" ".join(["placer"] + sys.argv[1:]))
    _print_results(results, format_table)


@cli.command()
@click.argument("results_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the report (default: the results file's folder).")
def report(results_path: Path, out: Path | None) -> None:
    """Render the report of a results.json again, without running anything."""
    from placer.report import format_table, write_report
    from placer.results import Results

    results = Results.load(results_path)
    paths = write_report(results, out or results_path.parent)
    results.paths = {k: str(v) for k, v in paths.items()}
    _print_results(results, format_table)


def _print_results(results, format_table) -> None:
    from placer.report.document import headline

    echo(headline(results))
    for note in results.notes:
        echo(f"note: {note}")
    echo(format_table(results))
    for name, path in results.paths.items():
        if "." not in name:
            echo(f"{name}: {path}")


def _check_cache() -> None:
    """A $PLACER_CACHE that is a file is an error; an unwritable one a warning, and a
    temporary folder is used for this run."""
    import os
    import tempfile

    from graphs.files import cache_dir_problem

    problem = cache_dir_problem()
    if problem is None:
        return
    kind, message = problem
    if kind == "file":
        raise PlacerError(message)
    os.environ["PLACER_CACHE"] = tempfile.mkdtemp(prefix="placer-cache-")
    warn(f"{message}; caching in {os.environ['PLACER_CACHE']} for this run")


def _first_line(exc: BaseException) -> str:
    """An error's message as one line (a message that quotes a library's long one is cut at its first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _exit(code: int) -> None:
    """Exit, ignoring a further Ctrl-C while the interpreter shuts down (no atexit traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a checkpoint not saved, a library's notice) as one line each."""
    warn(f"{message}")


def main() -> None:
    """The `placer` command: run the CLI, turning every failure into one line and its exit status."""
    import warnings

    debug = "--debug" in sys.argv[1:]
    handle_stop_signals()
    if not debug:
        warnings.showwarning = _show_warning
    try:
        with redirect_stdout(sys.stderr):  # the workload's prints: placer's output goes to STDOUT
            _check_cache()
            cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt (Terminated is one)
        terminated = isinstance(interruption(), Terminated)
        click.echo("terminated" if terminated else "interrupted", err=True)
        _exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    except click.ClickException as exc:  # bad flags or arguments: one line too
        click.echo(f"error: {exc.format_message()} (see placer --help)", err=True)
        _exit(EXIT_USER_ERROR)
    except Terminated:
        click.echo("terminated", err=True)
        _exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        _exit(EXIT_INTERRUPTED)
    except PlacerError as exc:
        if debug:
            raise
        click.echo(f"error: {_first_line(exc)}", err=True)
        _exit(EXIT_USER_ERROR)
    except SystemExit as exc:  # sys.exit() inside the workload's code: placer itself never calls it here
        if debug:
            raise
        click.echo(f"error: the workload called sys.exit({exc.code!r}); a workload must return its model and "
                   f"inputs, not exit", err=True)
        _exit(EXIT_USER_ERROR)
    except OSError as exc:  # the file system refused (disk full, permissions): not a bug
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        _exit(EXIT_USER_ERROR)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {_first_line(exc)} (run with --debug for the "
                   f"traceback)", err=True)
        _exit(1)


if __name__ == "__main__":
    main()
