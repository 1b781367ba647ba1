"""The search stage of `placer optimize`: run one search on the Scorer, and turn what
it found into a results row and a truthful learning curve.

Every search (placer.search.METHODS: rl, random_search, local_search) runs through
`placer.search.run` on the same Scorer, budget and warm start. `SearchOptions` holds
what the user chose for them: `--search key=value` settings of the one search
configuration (placer.rl.trainer.TrainConfig, which extends SearchConfig: e.g.
`algo=reinforce|ppo`, `reward=neg_sqrt|neg_log`, `batch_size=32`; `placer
search-options` lists every field), a policy to start RL from (`--policy`) and a
sample budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graphs.errors import PlacerError
from graphs.problem import Candidate, PlacementProblem
from placer.results import MethodResult, Progress, Results, Stage
from placer.scorer import Scorer

__all__ = ["SEARCHES", "SearchOptions", "run_search"]

SEARCHES = ("rl", "random_search", "local_search")  # placer.search.METHODS (imported late: it pulls in torch)
KINDS = {"rl": "rl"}  # a search's row kind; the others are "search"


@dataclass(frozen=True)
class SearchOptions:
    """What the user chose for the searches.

    Attributes
    ----------
    overrides : "key=value" settings of the search configuration (`--search`).
    policy_path : a policy saved by an earlier search to start RL from (`--policy`).
    max_samples : candidates sampled at most (None: the time budget alone).
    """

    overrides: tuple[str, ...] = ()
    policy_path: Path | None = None
    max_samples: int | None = None

    def config(self, budget_s: float, seed: int) -> object:
        """The search configuration (a TrainConfig: every search reads its SearchConfig
        fields, RL the rest too) with the overrides applied.

        Raises
        ------
        PlacerError
            An unknown key or a value it cannot take, naming the pair.
        """
        from placer.rl.trainer import TrainConfig
        from placer.search import overrides

        try:
            base = TrainConfig(seed=seed, budget_s=budget_s,
                               **({"max_samples": self.max_samples} if self.max_samples is not None else {}))
            return overrides(base, list(self.overrides))
        except (ValueError, TypeError) as exc:
            raise PlacerError(f"--search: {exc}") from None

    def load_policy(self) -> object | None:
        """The starting policy, read now so that a bad file is found before any work.

        Raises
        ------
        PlacerError
            The file is missing or not a policy (its one-line reason).
        """
        if self.policy_path is None:
            return None
        from placer.rl import load_policy
        return load_policy(self.policy_path)


def run_search(method: str, problem: PlacementProblem, scorer: Scorer, budget_s: float, seed: int,
               options: SearchOptions, policy: object | None, warm_start: Candidate | None, resume: bool,
               out: Path, progress: Progress) -> tuple[MethodResult | None, list[dict], list[dict], bool]:
    """Run search `method` for `budget_s` seconds from `warm_start` (the best measured
    so far).

    Returns
    -------
    Its row (None when it found nothing feasible), its curve (each row with its
    `method`, the calibration it was scored under and the best measurement's CI), the
    recalibrations it made (marks stamped with its rows), and whether Ctrl-C (or SIGTERM) cut it short (the search has
    then saved itself, and the row is its best so far). On --resume, the earlier
    run's curve rows and marks (from out/results.json) are kept.
    """
    from placer.search import run

    config = options.config(budget_s, seed)
    earlier = _earlier(out) if resume and method == "rl" else Results()
    annotated: dict[int, dict] = {}
    refits_before = len(scorer.refits)

    def on_progress(row: dict) -> None:
        annotated[row["update"]] = scorer.on_round({**row, "method": method})
        progress(Stage("search", min(row["elapsed_s"], budget_s), budget_s, {**row, "method": method}))

    result = run(method, problem, scorer, config, warm_start, out_dir=out / "search" if method == "rl" else None,
                 resume=resume and method == "rl", on_progress=on_progress, policy=policy if method == "rl" else None)
    scorer.finish()
    before = {row.get("update"): row for row in earlier.curve if row.get("method", method) == method}
    curve = [annotated.get(row["update"]) or before.get(row["update"]) or {**row, "method": method}
             for row in result.curve]
    marks = [*(m for m in earlier.recalibrations if m.get("method") == method), *scorer.refits[refits_before:]]
    if result.best is None:
        return None, curve, marks, result.interrupted
    row = MethodResult(method, KINDS.get(method, "search"), placement=list(result.best.placement),
                       devices=problem.cluster.names, microbatches=result.best.microbatches,
                       schedule="gpipe" if result.best.microbatches > 1 else None, search_s=result.elapsed_s)
    return row, curve, marks, result.interrupted


def _earlier(out: Path) -> Results:
    """The earlier run's results in `out` (empty when there are none that can be read)."""
    try:
        return Results.load(out / "results.json")
    except PlacerError:
        return Results()
