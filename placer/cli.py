"""The `placer` command line.

Every failure a user can cause is one line `error: ...` on stderr and exit status 2
(`--debug` shows the traceback); Ctrl-C exits with 130 after saving what was done.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from graphs.errors import PlacerError

console = Console(stderr=True)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

devices_option = click.option("--devices", "-d", default=None,
                              help="Devices, e.g. cpu:0,cpu:1 or cuda:0,cpu (default: every GPU + cpu; "
                                   "two virtual CPU devices without a GPU).")
memory_option = click.option("--memory", "-m", default=None, help="Memory caps, e.g. cuda:0=16GiB,cpu:1=2GiB.")
groups_option = click.option("--max-groups", default=256, show_default=True, type=click.IntRange(min=1),
                             help="Placement groups to coarsen to.")
iters_option = click.option("--iters", default=10, show_default=True, type=click.IntRange(min=1),
                            help="Timed training steps per measurement, after warm-up.")
backend_option = click.option("--backend", type=click.Choice(["local", "distributed"]), default="local",
                              show_default=True,
                              help="local: one process, a worker thread per device; distributed: one "
                                   "torch.distributed rank per device (docs/distributed.md).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="placer")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find a fast placement of a PyTorch model's layers on devices, by reinforcement learning.

    WORKLOAD is a Python file defining build_model() and example_inputs(), or zoo:NAME[:SIZE]
    (zoo: rnnlm, nmt, inception_v3, transformer; sizes small, paper).
    """
    ctx.obj = {"debug": debug}


@contextmanager
def stage_progress():
    """A rich progress display driven by placer.optimize.Stage callbacks."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage) -> None:
            if stage.name not in tasks:
                for task in tasks.values():  # a new stage means the earlier ones are done
                    done = bar.tasks[task].total or 1
                    bar.update(task, total=done, completed=done)
                tasks[stage.name] = bar.add_task(stage.name, total=stage.total, info="")
            info = stage.info
            if stage.name == "search":
                sim, measured = info.get("best_sim_ms"), info.get("best_measured_ms")
                text = ", ".join([f"best sim {sim:.1f} ms" if sim is not None else "no feasible sample yet",
                                  *([f"measured {measured:.1f} ms"] if measured is not None else []),
                                  f"{info.get('samples', 0)} samples"])
            else:
                text = " ".join(f"{v}" for v in info.values())
            bar.update(tasks[stage.name], completed=stage.done, total=stage.total, info=text)

        yield update


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
    from graphs.summary import format_summary, summarize
    from graphs.problem import build_problem

    loaded = _load(workload)
    problem = build_problem(loaded, devices, max_groups=max_groups)
    summary = summarize(problem.ops, problem.groups, [d.kind for d in problem.cluster.devices], notes=loaded.notes)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cli.command()
@click.argument("workload")
@click.option("--method", required=True, help="A baseline name, or `all` for a table of every method.")
@devices_option
@memory_option
@groups_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the plan here (one method).")
@click.option("--measure", is_flag=True, help="Also measure each placement on the real runtime.")
@click.option("--seed", default=0, show_default=True)
def baseline(workload: str, method: str, devices: str | None, memory: str | None, max_groups: int,
             out: Path | None, measure: bool, seed: int) -> None:
    """Compute heuristic placements (single, round_robin, expert, balanced, metis, ...)."""
    from graphs.bounds import lower_bound
    from envs.calibrate import load_calibration
    from envs.sim import Simulator
    from placer.baselines import BASELINES, run_baselines
    from graphs.errors import InfeasibleError
    from placer.plan import make_plan
    from placer.runtime.measure import measure_placement

    names = list(BASELINES) if method == "all" else [method]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise click.UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(BASELINES)} or all")
    if method == "all" and out is not None:
        raise click.UsageError("--out writes one plan: name one --method")
    loaded = _load(workload)
    from graphs.problem import build_problem
    problem = build_problem(loaded, devices, memory, max_groups=max_groups)
    bound = lower_bound(problem.groups, [d.kind for d in problem.cluster.devices]).bound_ms
    sim = Simulator(problem, load_calibration(problem))
    rows = []
    for name in names:
        start = time.perf_counter()
        outcome = run_baselines(problem, [name], seed=seed)[name]
        elapsed = time.perf_counter() - start
        if isinstance(outcome, InfeasibleError):
            if method != "all":
                raise outcome
            rows.append([name, "no", "-", "-", "-", f"{elapsed:.2f}", str(outcome)])
            continue
        simulated = sim.simulate(outcome)
        plan = make_plan(problem, outcome, name, seed=seed, simulated_ms=simulated.step_ms)
        measured = measure_placement(loaded, problem, outcome, name) if measure else None
        if measured is not None and measured.feasible:
            plan.measured_ms = measured.median_ms
        if out is not None:
            plan.save(out)
        shown = measured.median_ms if measured is not None and measured.feasible else simulated.step_ms
        rows.append([name, "yes" if simulated.feasible and (measured is None or measured.feasible) else "no",
                     f"{simulated.step_ms:.2f}", f"{measured.median_ms:.2f}" if measured and measured.feasible else "-",
                     f"{shown / bound:.2f}" if bound > 0 else "-", f"{elapsed:.2f}",
                     (simulated.reason or (measured.reason if measured else None) or "")])
    header = ["method", "feasible", "sim ms", "measured ms", "x bound", "time s", "note"]
    click.echo(_table(header, rows))
    click.echo(f"lower bound: {bound:.2f} ms")
    if out is not None:
        click.echo(f"plan written to {out}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


@cli.command()
@click.argument("workload")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@iters_option
@memory_option
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def measure(workload: str, plan_path: Path, iters: int, memory: str | None, backend: str, as_json: bool) -> None:
    """Time whole training steps of a workload placed by a plan."""
    from graphs.devices import parse_cluster
    from placer.plan import load_plan
    from placer.runtime import measure as measure_plan

    loaded = _load(workload)
    plan = load_plan(plan_path)
    if backend == "distributed":
        from placer.distributed import measure_distributed
        result = measure_distributed(workload, plan, iters=iters)
    else:
        result = measure_plan(loaded, plan, parse_cluster(",".join(plan.devices), memory), iters=iters)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if not result.feasible:
        click.echo(f"infeasible: {result.reason}")
    else:
        click.echo(f"step time: {result.median_ms:.2f} ms median, IQR {result.iqr_ms:.2f} ms over {iters} steps")
    for device, nbytes in result.peak_bytes.items():
        click.echo(f"  {device}: peak {nbytes / 2**20:.1f} MiB")


@cli.command()
@click.argument("workload")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1))
@backend_option
def train(workload: str, plan_path: Path, steps: int, backend: str) -> None:
    """Run real training steps with a placement (the user's loop, shown as a command)."""
    import math

    import placer

    def report(step: int, loss: float, ms: float) -> None:
        click.echo(f"step {step:>4}  loss {loss:.4f}  {ms:8.1f} ms")
        if not math.isfinite(loss):
            raise PlacerError(f"loss became {loss} at step {step}")

    loaded = _load(workload)
    plan = placer.load_plan(plan_path)
    if backend == "distributed":
        from placer.distributed import train_distributed
        train_distributed(workload, plan, steps, on_step=report)
        return
    model = placer.apply(loaded.fresh_model(), plan)
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
@click.option("--budget", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Seconds of RL search (default 120).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default placer-out/<workload>).")
@click.option("--seed", default=0, show_default=True)
@click.option("--reward", type=click.Choice(["sim", "measure"]), default="sim", show_default=True,
              help="Rewards from the calibrated simulator, or measured for every sample (the paper's setting).")
@click.option("--resume", is_flag=True, help="Continue an interrupted search in --out.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Start the search from a policy saved by an earlier search (DIR/search/policy.pt).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure candidates on this many worker processes at once, each with its own share of the "
                   "devices' cores (placer.distributed.MeasurementPool).")
@iters_option
@groups_option
def optimize(workload: str | None, devices: str | None, memory: str | None, budget: float | None, out: Path | None,
             seed: int, reward: str, resume: bool, policy_path: Path | None, workers: int, iters: int,
             max_groups: int) -> None:
    """Profile, run every baseline and the RL search, measure, and write plan.json and a report."""
    from placer import optimize as job
    from placer.report import format_table

    with stage_progress() as progress:
        results = job.optimize(workload, devices, memory, budget_s=job.DEFAULT_BUDGET_S if budget is None else budget,
                               out_dir=out, seed=seed, reward=reward, resume=resume, measure_iters=iters,
                               max_groups=max_groups, policy_path=policy_path, workers=workers, progress=progress,
                               command=" ".join(["placer"] + sys.argv[1:]))
    _print_results(results, format_table)
    if results.get("interrupted"):
        sys.exit(EXIT_INTERRUPTED)


@cli.command()
@click.argument("workload")
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
@iters_option
def compare(workload: str, plans: tuple[Path, ...], out: Path | None, iters: int) -> None:
    """Measure plans side by side and write the same report as optimize."""
    from placer import optimize as job
    from placer.report import format_table

    with stage_progress() as progress:
        results = job.compare(workload, plans, out_dir=out, measure_iters=iters, progress=progress,
                              command=" ".join(["placer"] + sys.argv[1:]))
    _print_results(results, format_table)


def _print_results(results: dict, format_table) -> None:
    for note in results.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(format_table(results))
    for name, path in results["paths"].items():
        click.echo(f"{name}: {path}")


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:  # bad flags or arguments: one line too
        click.echo(f"error: {exc.format_message()} (see placer --help)", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except PlacerError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
