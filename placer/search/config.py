"""What every search shares: its budget and its measurement cadence (SearchConfig).

One SearchConfig given to `rl`, `random_search` and `local_search` gives them equal
budgets: the same number of sampled candidates, in rounds of the same size, and the
same candidates measured at the same points. The RL trainer's TrainConfig extends it
with the policy's and the update's fields, and `overrides` sets any field from the
command line's `key=value` pairs.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass

from graphs.bounds import microbatch_table
from graphs.problem import PlacementProblem

__all__ = ["SearchConfig", "RANGES", "overrides", "format_value", "microbatch_options"]


@dataclass
class SearchConfig:
    seed: int = 0
    """Seeds every random choice of the search: the same seed and max_samples (with
    budget_s None) give the same search."""
    budget_s: float | None = 300.0
    """Wall-clock budget in seconds for the whole search, counted from its start: RL's warm start,
    the rounds, the periodic measurements and the closing measurements. Rounds stop being started
    when the expected closing measurements (mean seconds per measured candidate so far times
    measure_top_k + 1, plus finalists + 1, at most half the budget) would no longer fit; a periodic measurement that
    would end past it is skipped, and every measurement session is limited to the time left
    (Scorer.measure's limit_s), so a slower-than-usual measurement is cut short. What can still
    run past the budget: the last round's own compute, and the protocol's fewest steps (warm-up
    and min_runs) of each candidate the closing round and the closing session measure; None: no limit."""
    max_samples: int | None = None
    """Candidates sampled (each scored once); None: no limit. Equal max_samples is how
    searches are compared. A problem with no more candidates than this (without it, 4,096)
    has each scored instead, by every method (placer.search.exhaustive)."""
    batch_size: int = 16
    """Candidates sampled per round (RL: per policy update; local_search: neighbours tried per step)."""
    measure_every: int = 25
    """Rounds between measurement rounds (the kept candidates' best are measured)."""
    measure_top_k: int = 2
    """Best not-yet-measured candidates measured per measurement round, and again at the
    end (with the warm start); 0 never measures (a simulator-only search)."""
    finalists: int = 3
    """Best measured candidates measured again at the end, with the warm start, side by side in
    one closing session, whose times alone choose the search's result (placer.search.state:
    the best of every session's measurements favours whichever was measured in a fast moment
    of the host); 0: the best measurement of the whole search is its result."""
    keep_top: int = 64
    """Distinct best-scoring candidates kept (the ones a measurement round picks from)."""
    microbatches: tuple[int, ...] | None = None
    """Micro-batch counts searched; None: every count the workload's profile allows
    (microbatch_options); 1: no pipelining."""
    checkpoint_every: int = 10
    """Rounds between checkpoints, when the search has an output folder (RL)."""
    anneal: float = 0.02
    """local_search: simulated annealing's starting temperature, as a relative slowdown: at
    the start a neighbour this much slower than the current candidate is accepted with
    probability 1/e. It falls linearly to 0 (pure hill climbing) at the end of the budget."""

    def __post_init__(self) -> None:
        if self.microbatches is not None:
            self.microbatches = tuple(int(m) for m in self.microbatches)
            if not self.microbatches or min(self.microbatches) < 1:
                raise ValueError(f"microbatches={format_value(self.microbatches)}: give counts >= 1")
        names = {f.name for f in dataclasses.fields(self)}
        for name, (low, high, strict) in RANGES.items():
            value = getattr(self, name) if name in names else None
            if value is None:
                continue
            if (value <= low if strict else value < low) or (high is not None and value > high):
                raise ValueError(f"{name}={value}: give {_range_text(low, high, strict)}")


RANGES: dict[str, tuple[float, float | None, bool]] = {
    "budget_s": (0, None, True), "max_samples": (0, None, False), "measure_top_k": (0, None, False),
    "finalists": (0, None, False),
    "batch_size": (1, None, False), "measure_every": (1, None, False), "keep_top": (1, None, False),
    "checkpoint_every": (1, None, False), "anneal": (0, None, False),
    # The RL trainer's TrainConfig fields, in one table with these so that every setting is refused alike
    # (its own __post_init__ checks microbatch_spread and first_round).
    "lr": (0, None, False), "imitation_lr": (0, None, False), "advantage_floor": (0, None, False),
    "baseline_decay": (0, 1, False), "top_quantile": (0, 1, True), "self_imitation": (0, None, False),
    "entropy_coef": (0, None, False), "ppo_epochs": (1, None, False), "ppo_clip": (0, None, True),
    "infeasible_slowdown": (1, None, False), "reference_fallback_ms": (0, None, True),
    "imitation_steps": (0, None, False), "explore_groups": (0, None, False), "imitation_target": (0, 1, False),
    "temperature": (0, None, True), "logit_clip": (0, None, True), "hidden": (1, None, False),
    "graph_layers": (0, None, False), "max_devices": (1, None, False), "restart_patience": (1, None, False),
    "restart_gain": (0, 1, False),
}
"""The values each numeric setting takes, by field name: (low, high or None, whether low
itself is excluded). A field listed here that a config lacks is skipped; None (no limit,
every count) is always accepted."""


def _range_text(low: float, high: float | None, strict: bool) -> str:
    """How a range reads in a refusal: "a value > 0", "a value in [0, 1]"."""
    if high is not None:
        return f"a value in {'(' if strict else '['}{low}, {high}]"
    return f"a value {'>' if strict else '>='} {low}"


C = typing.TypeVar("C", bound=SearchConfig)


def overrides(config: C, pairs: Sequence[str]) -> C:
    """A copy of `config` with fields set from "key=value" strings (the CLI's
    `--search key=value`), each value read as its field's type.

    Raises ValueError naming the pair for an unknown field or an unreadable value (with
    the form to write), and SearchConfig's ValueError for a value out of its field's range
    (RANGES).

    >>> overrides(SearchConfig(), ["batch_size=32", "budget_s=none", "microbatches=1,2,4"]).microbatches
    (1, 2, 4)
    >>> overrides(SearchConfig(), ["microbatches=(1, 2)"]).microbatches
    (1, 2)
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep:
            raise ValueError(f"cannot set {pair!r}: write key=value (`placer search-options` lists every key)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"cannot set {pair!r}: no search setting {key!r}; {hint}"
                             f"`placer search-options` lists every key")
        try:
            changes[key] = _parse(text.strip(), hints[key])
        except ValueError:
            raise ValueError(f"cannot set {pair!r}: {_example(key, hints[key])}") from None
    return dataclasses.replace(config, **changes)


def format_value(value: object) -> str:
    """A setting's value as `--search key=VALUE` takes it back: 1,2 for a tuple, none for None,
    a string without quotes."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _example(key: str, hint: object) -> str:
    """What a value of `key`, of the type `hint`, looks like on the command line, for a refusal."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    kind, value = {int: ("an integer", "4"), float: ("a number", "0.5"), bool: ("true or false", "true"),
                   str: ("a word", "x")}.get(hint, ("counts separated by commas", "1,2,4"))
    return f"{key} takes {kind}{' or none' if optional else ''}, e.g. {key}={value}"


def _parse(text: str, hint: object) -> object:
    """`text` as a value of the type `hint` (int, float, str, bool, tuple[int, ...], or X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() == "none":
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # 1,2 as search-options prints it; (1, 2), [1,2] and 1 2 as Python would
        return tuple(int(part) for part in text.strip("()[] ").replace(",", " ").split())
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    return hint(text)


def microbatch_options(problem: PlacementProblem) -> tuple[int, ...]:
    """The micro-batch counts this problem's profile has step times for on every device
    kind of its cluster (graphs.bounds.microbatch_table: the OpGraph's
    "microbatch_step_ms_by_kind" or "microbatch_step_ms"; a count missing could not run
    at batch/m), always including 1."""
    for graph in (problem.groups, problem.ops):
        tables = [microbatch_table(graph, kind) for kind in problem.cluster.kinds] if graph is not None else [None]
        if all(t is not None for t in tables):
            return tuple(sorted({1}.union(*tables[:1]).intersection(*tables[1:]) | {1}))
    return (1,)
