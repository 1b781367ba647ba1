"""What the `placer` commands share: placer's own output on stdout (the workload's
prints go to stderr), one-line warnings, the option types and options, and the
progress display driven by placer.results.Stage callbacks."""

from __future__ import annotations

import ast
import inspect
import math
import os
import re
import select
import sys
import textwrap
from contextlib import contextmanager, redirect_stdout

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from graphs.errors import PlacerError

console = Console(stderr=True)
STDOUT = sys.stdout  # placer's own output; sys.stdout itself is stderr while a command runs

EXIT_READER_GONE = 141  # 128 + SIGPIPE: what the shell reports for `seq 1 100000 | head -1`
MAX_CI = 0.5  # --ci: a wider CI target could not tell any speedup from a tie

__all__ = ["STDOUT", "echo", "warn", "PlacerGroup", "PlacerCommand", "PipeBroken", "reader_gone", "leave_quietly", "EXIT_READER_GONE",
           "usage_message", "check_cache", "FiniteFloat", "devices_option", "memory_option", "groups_option", "seed_option",
           "iters_option", "step_timeout_option", "backend_option", "train_backend_option", "protocol_options", "protocol_from_options",
           "warn_wide_cis", "stage_progress", "field_meanings", "MAX_CI"]


def echo(text: str = "") -> None:
    """Print placer's own output on the real stdout."""
    click.echo(text, file=STDOUT)


def warn(text: str) -> None:
    """One line `warning: ...` on stderr."""
    click.echo(f"warning: {text}", err=True)


class PipeBroken(Exception):
    """A write to a pipe whose reader is gone (the BrokenPipeError is the __cause__), raised
    past click: click ends the process with a bare sys.exit(1) on any EPIPE, a closed
    stdout (`placer search-options | head -2`) and a dead worker's pipe alike."""


class PlacerCommand(click.Command):
    """A `placer` command: while it runs, whatever the workload prints goes to stderr
    (placer's own output to STDOUT, through `echo`). Parsing, --help and usage errors
    come before, so that the help is on stdout, as every tool's is."""

    def invoke(self, ctx: click.Context):
        with redirect_stdout(sys.stderr):
            return super().invoke(ctx)


class PlacerGroup(click.Group):
    """The `placer` command group: a broken pipe, in a command or while the group's
    --help or --version is written, reaches main() as PipeBroken; a command's
    KeyboardInterrupt as click's Abort, with an empty line only on a terminal."""

    command_class = PlacerCommand

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError as exc:
            raise PipeBroken() from exc

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise PipeBroken() from exc
        except KeyboardInterrupt as exc:  # as Abort, which click passes on without its blank line
            if sys.stderr.isatty():  # ... which closes the terminal's ^C echo, and only there is one
                click.echo(err=True)
            raise click.exceptions.Abort() from exc


def reader_gone() -> bool:
    """Whether the reader of stdout or stderr went away (the write end of a pipe whose read
    end is closed polls as an error): the user's `| head`, not a fault of placer's."""
    if not hasattr(select, "poll"):  # Windows: no way to ask, so not known to be gone
        return False
    poll = select.poll()
    for fd in (1, 2):
        poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def leave_quietly() -> None:
    """Point stdout and stderr at /dev/null, so that nothing more is written to a closed
    pipe (Python's own flush at exit would print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def usage_message(exc: click.ClickException) -> str:
    """A bad flag or argument as one line that points to the help of the command it was
    given to; `--debug` after the command says where it goes instead."""
    ctx = getattr(exc, "ctx", None)
    command = f"placer {ctx.info_name}" if ctx is not None and ctx.parent is not None else "placer"
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--debug" and command != "placer":
        rest = [a for a in sys.argv[1:] if a != "--debug"]
        return f"--debug goes before the command: placer --debug {' '.join(rest)}"
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # its message is the whole help: one line instead
        return f"no command given: name one of {', '.join(exc.ctx.command.list_commands(exc.ctx))} (see {command} --help)"
    return f"{exc.format_message().rstrip('.')} (see {command} --help)"


def check_cache() -> None:
    """A $PLACER_CACHE that is a file is an error; an unwritable one a warning, and a
    temporary folder is used for this run."""
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


class FiniteFloat(click.ParamType):
    """A finite float > `above` and, with `at_most`, <= it (nan and inf refused); `meaning`
    ends the refusal's line (what the number is, e.g. "+-3% is 0.03")."""

    name = "number"

    def __init__(self, above: float = 0.0, at_most: float | None = None, meaning: str = ""):
        self.above, self.at_most, self.meaning = above, at_most, meaning

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= self.above or (self.at_most is not None and number > self.at_most):
            limit = f" and at most {self.at_most:g}" if self.at_most is not None else ""
            meaning = f" ({self.meaning})" if self.meaning else ""
            self.fail(f"{value!r}: give a finite number above {self.above:g}{limit}{meaning}", param, ctx)
        return number


devices_option = click.option("--devices", "-d", default=None,
                              help="Devices, e.g. cpu:0,cpu:1 or cuda:0,cpu (default: every GPU + cpu; "
                                   "two virtual CPU devices without a GPU).")
memory_option = click.option("--memory", "-m", default=None, help="Memory caps, e.g. cuda:0=16GiB,cpu:1=2GiB.")
groups_option = click.option("--max-groups", default=256, show_default=True, type=click.IntRange(min=1),
                             help="Placement groups to coarsen to.")
seed_option = click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
iters_option = click.option("--iters", default=5, show_default=True, type=click.IntRange(min=1),
                            help="Timed training steps per candidate at least, before its confidence interval "
                                 "is judged.")
step_timeout_option = click.option("--step-timeout", default=120.0, show_default=True, type=FiniteFloat(),
                                   help="Seconds a training step may take; a slower placement is infeasible.")
backend_option = click.option("--backend", type=click.Choice(["local", "distributed"]), default="local",
                              show_default=True,
                              help="local: one process, a worker thread per device; distributed: one "
                                   "torch.distributed rank per device (docs/distributed.md).")
train_backend_option = click.option("--backend", type=click.Choice(["local", "distributed", "pipelining"]),
                                    default="local", show_default=True,
                                    help="local: one process, a worker thread per device; distributed: one "
                                         "torch.distributed rank per device; pipelining: one rank per stage of a "
                                         "contiguous plan on torch.distributed.pipelining (docs/distributed.md).")


_PROGRAM = False  # the `placer` program's own process (as_program), not an in-process caller's


def as_program() -> None:
    """Say that this process is the `placer` program's own (placer.cli.main), which owns its heap."""
    global _PROGRAM
    _PROGRAM = True


def freeze_imports() -> None:
    """Leave every object alive now (torch's and the command's imports, some 370k) out of
    the garbage collector's full passes (gc.freeze), which each measured trial's close
    makes: ~0.4 s a trial here otherwise. Frozen objects are still freed by reference
    counting; a measuring command calls it once its imports are made. Only in the
    `placer` program (as_program): an in-process caller's (CliRunner's, an embedding's)
    cycles alive then would never be collected."""
    if _PROGRAM:
        import gc

        gc.freeze()


def protocol_options(fn):
    """--iters, --ci, --measure-cap and --step-timeout: the measurement protocol."""
    for option in reversed([
        iters_option,
        click.option("--ci", "ci_target", default=0.03, show_default=True, type=FiniteFloat(
                     at_most=MAX_CI, meaning="the CI half-width as a fraction of the median, 0.03 for +-3%; above "
                                             f"+-{MAX_CI:.0%} no speedup could be told from a tie"),
                     help="Measure each candidate until its median's confidence interval is within this "
                          "fraction of the median (0.03: +-3%)..."),
        click.option("--measure-cap", default=6.0, show_default=True, type=FiniteFloat(),
                     help="...or until a session of n candidates has run n times this many seconds."),
        step_timeout_option,
    ]):
        fn = option(fn)
    return fn


def protocol_from_options(iters: int, ci_target: float, measure_cap: float, step_timeout: float):
    """The measurement Protocol of the protocol options (each checked by its option's type)."""
    from placer.measurements import Protocol

    return Protocol(target=ci_target, min_runs=iters, max_runs=max(iters, 200), cap_per_candidate_s=measure_cap,
                    step_timeout_s=step_timeout)


def warn_wide_cis(rows: list[tuple[str, float, float]], target: float, fix: str) -> None:
    """One warning for the figures (name, median ms, CI half-width as a fraction of it)
    whose CI is wider than placer.choose.UNMEASURED_FACTOR times the protocol's `target`
    (the rule by which choose takes no verdict over unplaced): such a median is no
    measurement to rely on. `fix`: the options that take more steps."""
    from placer.choose import UNMEASURED_FACTOR

    wide = [(name, median, half) for name, median, half in rows if half > UNMEASURED_FACTOR * target]
    if wide:
        figures = ", ".join(f"{name} {median:.2f} ms +-{half:.0%}" for name, median, half in wide)
        warn(f"{figures}: a CI over {UNMEASURED_FACTOR}x the +-{target:.0%} target, so not a measurement to rely on "
             f"(likely other processes on the host, or too few steps): measure on an idle host, with {fix}")


@contextmanager
def stage_progress():
    """A rich progress display driven by placer.results.Stage callbacks, on a terminal;
    elsewhere (stderr piped or redirected) none, so that the display leaves no empty line
    before an error or warning. The display is redrawn only from the callbacks, which
    measurement sessions make between steps: rich's own refresh thread would take the
    GIL and a core inside timed steps (0.05 cores while unplaced's steps ran, measured)."""
    if not console.is_terminal:
        yield lambda stage: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, auto_refresh=False) as bar:
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
            bar.refresh()

        yield update


def field_meanings(cls: type) -> dict[str, str]:
    """Each dataclass field's meaning: the first sentence of the string under its
    definition (an attribute docstring), for the class and its bases; a field without
    one is left out.
    """
    meanings = {}
    for klass in reversed(cls.__mro__):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError, SyntaxError):  # a builtin base, no source
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                text = " ".join(after.value.value.split())
                meanings[node.target.id] = re.split(r"(?<=\.)\s+(?=[A-Z(\"])", text, maxsplit=1)[0]
    return meanings
