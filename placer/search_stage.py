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

import zipfile
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import CheckpointError, PlacerError
from graphs.problem import Candidate, PlacementProblem
from placer.results import MethodResult, Progress, Results, Stage
from placer.scorer import Scorer

__all__ = ["SEARCHES", "SearchOptions", "SearchOutcome", "run_search"]

SEARCHES = ("rl", "random_search", "local_search")  # placer.search.METHODS (imported late: it pulls in torch)
KINDS = {"rl": "rl"}  # a search's row kind; the others are "search"
FEW_ROUNDS = 3  # a search that ends with fewer rounds says so on its row


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
            The file is missing or not a policy (its one-line reason; a file that is not
            a torch.save archive at all, a workload file say, is told so before torch
            reads it, whose refusal runs to several sentences).
        """
        if self.policy_path is None:
            return None
        from placer.rl import load_policy
        if self.policy_path.is_file() and not zipfile.is_zipfile(self.policy_path):
            raise CheckpointError(f"--policy {self.policy_path}: not a placer policy file (not a torch.save archive); "
                                  f"give the search/policy.pt an earlier placer optimize wrote")
        return load_policy(self.policy_path)


@dataclass
class SearchOutcome:
    """What one search stage adds to the results.

    Attributes
    ----------
    row : the search's row (its best candidate); None when it found nothing feasible.
    curve : its rounds, each with its `method`, the calibration it was scored under
        (`calibration`: refits so far) and the best measurement's CI.
    recalibrations : the refits it made, stamped with the round they happened in.
    best_measured : each improvement of its best measurement (median, CI), stamped alike.
    interrupted : Ctrl-C (or SIGTERM) cut it short; it saved itself, the row is its best so far.
    """

    row: MethodResult | None
    curve: list[dict]
    recalibrations: list[dict]
    best_measured: list[dict]
    interrupted: bool


def run_search(method: str, problem: PlacementProblem, scorer: Scorer, budget_s: float, seed: int,
               options: SearchOptions, policy: object | None, warm_start: Candidate | None, resume: bool,
               out: Path, progress: Progress) -> SearchOutcome:
    """Run search `method` for `budget_s` seconds from `warm_start` (the best measured
    so far) and return what it adds to the results (SearchOutcome). On --resume, the
    earlier run's curve rows and marks of this search (from out/results.json) are kept.
    """
    from graphs.timing import cpu_threads
    from placer.search import run

    config = options.config(budget_s, seed)
    earlier = _earlier(out) if resume and method == "rl" else Results()
    annotated: dict[int, dict] = {}
    refits_before, best_before = len(scorer.refits), len(scorer.best_measured)
    scorer.begin(budget_s)

    def on_progress(row: dict) -> None:
        annotated[row["update"]] = scorer.on_round({**row, "method": method})
        progress(Stage("search", min(row["elapsed_s"], budget_s), budget_s, {**row, "method": method}))

    # The policy's ops on one intra-op thread: on a quiet 2-core host an RL search of gpt-medium took 7% longer
    # (6.74 against 6.31 s), beside another process's two threads 10x less (8.4 against 85 s; new-user trial 12
    # saw 0-1 updates in 4x the budget). Measurements set their CPU devices' counts (placer.runtime.timing).
    with cpu_threads(1):
        result = run(method, problem, scorer, config, warm_start, out_dir=out / "search" if method == "rl" else None,
                     resume=resume and method == "rl", on_progress=on_progress,
                     policy=policy if method == "rl" else None)
    scorer.finish()
    before = {row.get("update"): row for row in earlier.curve if row.get("method", method) == method}
    curve = [annotated.get(row["update"]) or before.get(row["update"]) or {**row, "method": method}
             for row in result.curve]
    marks = [*(m for m in earlier.recalibrations if m.get("method") == method), *scorer.refits[refits_before:]]
    best = [*(m for m in earlier.best_measured if m.get("method") == method), *scorer.best_measured[best_before:]]
    row = None
    if result.best is not None:
        allowed = tuple(config.microbatches or ())
        kept = (result.best == warm_start and bool(allowed) and result.best.microbatches not in allowed)
        notes = [f"no candidate at microbatches {', '.join(map(str, allowed))} measured faster than the search's "
                 f"warm start (microbatches {result.best.microbatches}), which it keeps so that its result is never "
                 f"worse"] if kept else []
        if result.enumerated is not None:
            note = (f"the problem has {result.enumerated} candidates, no more than the search may sample: it scored "
                    f"every one instead of sampling (placer.search.exhaustive)")
            if method == "rl":
                note += "; no policy was trained"
                if policy is not None:
                    note += ", and the starting policy (--policy) was not used"
            notes.append(note)
        elif result.rounds < FEW_ROUNDS and config.max_samples is not None and result.samples >= config.max_samples:
            notes.append(f"{result.rounds} round(s): the sample budget (max_samples={config.max_samples}) ended the "
                         f"search, too few rounds for it to move; give a larger --search max_samples")
        elif result.rounds < FEW_ROUNDS and not result.interrupted:  # trial 12: 0-1 RL updates on a busy host, unsaid
            notes.append(f"{result.rounds} round(s), {result.samples} candidates in {result.elapsed_s:.0f} s of a "
                         f"{budget_s:g}-s budget: too few for the search to move; a busy host slows its rounds (the "
                         f"host-load note says), else give it a larger --budget")
        row = MethodResult(method, KINDS.get(method, "search"), placement=list(result.best.placement),
                           devices=problem.cluster.names, microbatches=result.best.microbatches,
                           schedule="gpipe" if result.best.microbatches > 1 else None, search_s=result.elapsed_s,
                           notes=notes)
    return SearchOutcome(row, curve, marks, best, result.interrupted)


def _earlier(out: Path) -> Results:
    """The earlier run's results in `out` (empty when there are none that can be read)."""
    try:
        return Results.load(out / "results.json")
    except PlacerError:
        return Results()
