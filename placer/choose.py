"""The honest final choice: which plan is written, and the line that says why.

The rules (issue 14, DESIGN.md "Measuring"):

1. Candidates are re-measured together in one fresh interleaved session (`final`);
   the search's own measurements, which picked them, are never the evidence.
2. One candidate beats another only when the confidence interval of their ratio
   says so; otherwise they tie. Among the fastest candidate and every candidate that
   ties with it, the simplest wins (`simplicity`): `unplaced` first, then fewer
   devices, fewer micro-batches, fewer cut edges, a heuristic before a search.
3. The winner is measured once more beside `unplaced` and the best heuristic in
   fresh sessions (`crosscheck`, then `confirm`: rule 8), and every speedup reported
   for it comes from them: the measurements that selected it are not the ones that
   judge it. Only a winner measurably faster than `unplaced` there is written as the plan;
   otherwise `unplaced` wins (the single-device plan for the whole host) and the
   report's first line says that no plan is measurably faster.
   When the fastest candidate of the final session is measurably faster than
   unplaced there, only the candidates that are themselves measurably faster than
   unplaced may win the tie-break: a simpler plan that ties both the fastest and
   unplaced would be confirmed in its place and lose a verdict the session had.
4. A winner measurably slower than the best heuristic in that confirm session is
   not the answer: the heuristic, judged the same way against unplaced from the same
   session, takes its place, and the headline says why. The headline never claims a
   plan that a row of its own session shows measurably slower than another.
5. An unplaced measurement that the protocol could not measure is no reference: it
   timed more than min_runs steps (some CI of its session was not within target, so
   the session kept going) and its own CI is still wider than UNMEASURED_FACTOR times the target (its step
   times vary too much, with no other process on its cores: rule 7 covers those).
   Ratios against it carry the verdict "unmeasured", and no plan
   is chosen against it. A session cut at min_runs by its cap asked for no precision.
6. One verdict per plan: rows of the same candidate (placement and micro-batches)
   all carry the measurement of the most authoritative session that measured it
   (`share_measurements`). Only rows of the session that measured unplaced last keep
   their ratios (`settle_ratios`): another session's compare with an unplaced median
   shown nowhere.
7. An unplaced measurement taken while other processes held its cores is no reference
   either (the same path as rule 5): its steps run torch's intra-op threads on every
   core, and OpenMP teams stall while other processes hold their cores, so it can take
   10-100x its idle time while a one-core plan does not (`Measurement.busy`: the CPU
   time other processes took on those cores during exactly its own timed steps, more
   than half a core on average; the load average where the steps were too short to
   tell: placer.runtime.host_load). Each session judges its own unplaced steps, so a
   burst during the confirm session withholds the plan, and a resumed run's fresh
   sessions drop an earlier session's finding and its note. A ratio over it would be
   a thread effect of those seconds, not a placement's: measure on an idle host, then
   --resume (the final and confirm sessions measure unplaced afresh).
8. Two sessions judge (`confirm`): the crosscheck session measures the winner, the best
   heuristic and unplaced in the reverse order of the confirm session after it, and a
   ratio's verdict is "faster" or "slower" only where both sessions give it, else
   "tie" (`agreed`); the times shown are the confirm session's. One session's CI holds
   the noise within it, not how much a plan's time moves from one session to the next
   on a busy host (experiments/ablation.py: the nmt pick of 2026-12-02 confirmed 0.960x
   against random search's in one session, 1.216x in both of the next day's). Where
   unplaced is no reference in the crosscheck session (rules 5, 7), that session
   decides: no plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from graphs.problem import PlacementProblem
from placer.measurements import UNPLACED, Protocol, compare
from placer.results import SESSIONS, Choice, MethodResult, Ratio, Results, method_name
from placer.runtime.host_load import busy_cause, busy_note
from placer.runtime.timing import Measurement

__all__ = ["simplicity", "pick", "fill", "verdict_choice", "confirm", "agreed", "unmeasured", "plan_key",
           "share_measurements", "current", "settle_ratios", "UNMEASURED_FACTOR"]

_KIND_ORDER = {"unplaced": 0, "baseline": 1, "search": 2, "rl": 3}
UNMEASURED_FACTOR = 10  # unplaced's CI half-width beyond this many times the protocol's target: no reference
_SHARED = ("feasible", "reason", "measured_ms", "ci_ms", "iqr_ms", "runs", "session", "peak_bytes",
           "ratio_to_lower_bound", "vs_unplaced", "vs_best_heuristic")  # what rows of one plan share


def simplicity(row: MethodResult, problem: PlacementProblem | Sequence[PlacementProblem] | None = None) -> tuple:
    """Sort key, simplest first: unplaced; then devices used, micro-batches, edges cut
    between devices, heuristic before search.

    Edges cut are counted on the row's own problem: of `problem` (one, or one per
    device set, as placer compare has), the one on the row's devices whose groups
    its placement indexes; none there counts 0. A row without a placement (a plan
    whose assignment splits a profiled group) has unknown cuts: last among equals."""
    if row.kind == "unplaced":
        return (0,)
    placement = row.placement or []
    problems = [problem] if isinstance(problem, PlacementProblem) else list(problem or [])
    own = next((p for p in problems if p.cluster.names == row.devices and len(placement) == p.n_groups), None)
    cut = (math.inf if row.placement is None
           else 0 if own is None else sum(placement[u] != placement[v] for u, v in own.costs.edges.tolist()))
    used = len(set(placement)) if placement else len(row.devices)
    return (1, used, row.microbatches, cut, _KIND_ORDER.get(row.kind, 9))


def pick(rows: Sequence[MethodResult], measured: Mapping[str, Measurement],
         problem: PlacementProblem | Sequence[PlacementProblem] | None = None,
         protocol: Protocol | None = None) -> MethodResult | None:
    """The simplest of the rows that are not measurably slower than the fastest one
    (rule 2), by their measurements in `measured` (method -> Measurement of one
    session); None when none is feasible. When the fastest is measurably faster than
    `measured["unplaced"]`, only rows measurably faster than it too are eligible (rule
    3). An unplaced the `protocol` could not measure (rule 5), or timed while other
    processes held its cores (rule 7), is no candidate and no reference here beside a
    feasible plan: the confirm session judges the pick.
    `problem`: as `simplicity` reads it."""
    feasible = [r for r in rows if measured.get(r.method) is not None and measured[r.method].feasible]
    unplaced = measured.get(UNPLACED)
    placed = [r for r in feasible if r.kind != "unplaced"]
    if unplaced is not None and placed and _no_reference_in(unplaced, protocol):
        feasible, unplaced = placed, None
    if not feasible:
        return None
    fastest = min(feasible, key=lambda r: measured[r.method].median_ms)
    reference = measured[fastest.method]
    contenders = [r for r in feasible
                  if r is fastest or compare(measured[r.method], reference, fastest.method).verdict != "slower"]
    if fastest.kind != "unplaced" and unplaced is not None and _faster(reference, unplaced):
        contenders = [r for r in contenders if r.kind != "unplaced" and _faster(measured[r.method], unplaced)]
    return min(contenders, key=lambda r: (simplicity(r, problem), measured[r.method].median_ms))


def _faster(this: Measurement, unplaced: Measurement) -> bool:
    ratio = compare(this, unplaced, UNPLACED)
    return ratio is not None and ratio.verdict == "faster"


def _too_wide(halfwidth: float | None, runs: int, protocol: Protocol | None) -> bool:
    """Rule 5: a CI half-width (fraction of the median) of `runs` steps the protocol could not narrow."""
    return (halfwidth is not None and protocol is not None and runs > protocol.min_runs
            and halfwidth > UNMEASURED_FACTOR * protocol.target)


def _no_reference_in(unplaced: Measurement, protocol: Protocol | None) -> bool:
    """Rules 5 and 7: an unplaced measurement the protocol could not narrow, or timed while others held its cores."""
    return unplaced.busy is not None or _too_wide(unplaced.ci_halfwidth, unplaced.runs, protocol)


def fill(row: MethodResult, measurement: Measurement, session: str, unplaced: Measurement | None,
         heuristic: tuple[str, Measurement] | None, bound_ms: float | None,
         protocol: Protocol | None = None) -> None:
    """Write a measurement into a row, with its speedups over `unplaced` and over the
    best heuristic (name, measurement) measured in the same session. A ratio over an
    `unplaced` that the `protocol` could not measure (rule 5) or that was timed while
    other processes held its cores (rule 7) has the verdict "unmeasured". The note of
    the row's earlier busy reading goes: only this measurement's own reading speaks."""
    stale = busy_note(row.method, row.busy) if row.busy is not None else None
    row.session = session
    row.feasible = measurement.feasible
    row.reason = measurement.reason
    row.peak_bytes = dict(measurement.peak_bytes)
    row.notes = list(dict.fromkeys([*(n for n in row.notes if n != stale), *measurement.notes]))
    row.measured_ms = measurement.median_ms if measurement.feasible else None
    row.ci_ms = measurement.ci_ms if measurement.feasible else None
    row.iqr_ms = measurement.iqr_ms if measurement.feasible else None
    row.runs = measurement.runs
    row.busy = dict(measurement.busy) if measurement.busy is not None else None
    row.ratio_to_lower_bound = (row.measured_ms / bound_ms if row.measured_ms is not None and bound_ms else None)
    row.vs_unplaced = None if unplaced is None or row.kind == "unplaced" else compare(measurement, unplaced, UNPLACED)
    if row.vs_unplaced is not None and _no_reference_in(unplaced, protocol):
        row.vs_unplaced = replace(row.vs_unplaced, verdict="unmeasured")
    row.vs_best_heuristic = None
    if heuristic is not None and heuristic[0] != row.method and row.kind != "unplaced":
        row.vs_best_heuristic = compare(measurement, heuristic[1], heuristic[0])


def unmeasured(unplaced: MethodResult | None, protocol: Protocol | None) -> str | None:
    """Why the `unplaced` row cannot serve as the reference (rule 7: other processes held
    its cores while it was timed; rule 5: more than min_runs steps and a CI half-width
    more than UNMEASURED_FACTOR times the `protocol`'s target), or None when it can (or
    is not measured; rule 5 also when `protocol` is None). Rule 5 blames no busy host:
    on the CPU, the session's own reading found none."""
    if unplaced is None or not unplaced.measured or unplaced.ci_ms is None or not unplaced.measured_ms:
        return None
    if unplaced.busy is not None:
        return (f"{busy_cause(unplaced.busy)} while unplaced was timed in the {unplaced.session} session "
                f"({unplaced.measured_ms:.2f} ms): torch's intra-op threads stall while other processes hold their "
                f"cores, so a speedup over it is a thread effect of those seconds, not a placement's, and no verdict")
    low, high = unplaced.ci_ms
    half = (high - low) / 2 / unplaced.measured_ms
    if not _too_wide(half, unplaced.runs, protocol):
        return None
    idle = ", with the host otherwise idle: placer's check found no other process holding its cores while it " \
           "was timed" if unplaced.devices[:1] == ["cpu"] else ""
    return (f"unplaced could not be measured in the {unplaced.session} session (CI {low:.2f}-{high:.2f} ms around "
            f"{unplaced.measured_ms:.2f} ms is +-{half:.0%}, more than {UNMEASURED_FACTOR}x the protocol's "
            f"+-{protocol.target:.0%} target after {unplaced.runs} steps{idle}): its own step times vary too much "
            f"to be a reference, so no speedup over it is a verdict")


def plan_key(row: MethodResult) -> tuple | None:
    """What makes two rows the same plan: devices, placement, micro-batches (None: unplaced, or not placed)."""
    if row.kind == "unplaced" or row.placement is None:
        return None
    return tuple(row.devices), tuple(row.placement), row.microbatches


def current(results: Results, row: MethodResult) -> bool:
    """Whether `row` was measured in the session that measured unplaced last, the only
    session whose ratios are verdicts (unplaced itself, and every row where unplaced
    has no session, count as current)."""
    unplaced = results.unplaced
    return row.kind == "unplaced" or unplaced is None or unplaced.session is None or row.session == unplaced.session


def settle_ratios(results: Results) -> None:
    """Keep only the ratios that are verdicts (rule 6): a row measured in another session
    than unplaced's last loses both (they compare with unplaced as that session found
    it, a median shown nowhere, and contradict the ms column); when the choice has no
    verdict (rules 5, 7), neither has any ratio over unplaced."""
    for row in results.methods:
        if not current(results, row):
            row.vs_unplaced = row.vs_best_heuristic = None
        elif results.choice.verdict == "unmeasured" and row.vs_unplaced is not None:
            row.vs_unplaced = replace(row.vs_unplaced, verdict="unmeasured")


def share_measurements(rows: Sequence[MethodResult]) -> None:
    """One verdict per plan (rule 6): rows of one candidate (devices, placement and
    micro-batches) measured in different sessions all take the measurement of the most
    authoritative of them (SESSIONS, last first): its session, times, speedups."""
    plans: dict[tuple, list[MethodResult]] = {}
    for row in rows:
        if row.session in SESSIONS and (key := plan_key(row)) is not None:
            plans.setdefault(key, []).append(row)
    for group in plans.values():
        source = max(group, key=lambda r: SESSIONS.index(r.session))  # the first of the latest session
        for row in (r for r in group if r.session != source.session):
            for name in _SHARED:
                setattr(row, name, getattr(source, name))


def verdict_choice(winner: MethodResult | None, unplaced: MethodResult | None, session: str | None,
                   shortlist: Sequence[str], unplaced_device: str, confirmed: bool = True,
                   writes_plan: bool = True, heuristic: MethodResult | None = None,
                   protocol: Protocol | None = None) -> Choice:
    """The Choice and its headline from the winner's row (filled from `session`).

    A winner other than unplaced is kept only when it is measurably faster than
    unplaced (or unplaced cannot run); else unplaced is chosen. A winner measurably
    slower than the best heuristic of its session (`heuristic`: that row, filled from
    the same session) gives way to it (rule 4); without that row, the headline says
    that the heuristic is faster instead of claiming the winner. Unconfirmed choices
    (interrupted before the final sessions) say so. `writes_plan`: the run writes
    plan.json (optimize), and the headline says what it holds when unplaced wins.
    An `unplaced` that the `protocol` could not measure (rule 5), or timed while other
    processes held its cores (rule 7), chooses no plan (verdict "unmeasured", method None, the winner its
    contender)."""
    beaten = winner.vs_best_heuristic if confirmed and winner is not None and winner.kind != "unplaced" else None
    if beaten is None or beaten.verdict != "slower":
        return _judged(winner, unplaced, session, shortlist, unplaced_device, confirmed, writes_plan, protocol)
    sessions = "the crosscheck and confirm sessions" if beaten.earlier else f"the {session} session"
    lost = (f"{method_name(winner.method)}, which the final session picked, is {beaten.describe()} the best "
            f"heuristic ({method_name(beaten.reference)}) in {sessions}")
    if heuristic is not None and heuristic.method == beaten.reference and heuristic.measured:
        choice = _judged(heuristic, unplaced, session, shortlist, unplaced_device, True, writes_plan, protocol)
        choice.headline = _line(f"{choice.headline} ({lost}, so {method_name(heuristic.method)} was judged in "
                                f"its place.)")  # the verdict first (trial 9)
        return choice
    choice = _judged(winner, unplaced, session, shortlist, unplaced_device, True, writes_plan, protocol)
    if choice.method == winner.method:  # no claim for it: the faster plan is named first
        choice.headline = _line(f"{lost}: {method_name(beaten.reference)} is the faster plan. {choice.headline}")
    return choice


def confirm(winner: MethodResult, heuristic: MethodResult | None, results: Results,
            measure: Callable[[str, bool], Sequence[MethodResult]], shortlist: Sequence[str], unplaced_device: str,
            writes_plan: bool = True, protocol: Protocol | None = None) -> Choice:
    """Rules 3 and 8: judge `winner` in the crosscheck session, then in the confirm session.

    `measure(session, reverse)` measures the winner, `heuristic` (the best heuristic, or
    None) and unplaced in one fresh session named `session`, in reverse order when
    `reverse`, fills their rows of `results` (`fill`) and returns the placed rows it
    filled. After the confirm session each of those rows' ratios carries the verdict
    both sessions give (`agreed`); the choice is `verdict_choice`'s on them. Where
    unplaced is no reference in the crosscheck session (rules 5, 7), the choice is made
    there (no plan) and the confirm session is not held."""
    def judged(session: str) -> Choice:
        return verdict_choice(winner, results.unplaced, session, shortlist, unplaced_device,
                              writes_plan=writes_plan, heuristic=heuristic, protocol=protocol)

    earlier = {row.method: (row.vs_unplaced, row.vs_best_heuristic) for row in measure("crosscheck", True)}
    if unmeasured(results.unplaced, protocol) is not None:
        return judged("crosscheck")
    for row in measure("confirm", False):
        vs_unplaced, vs_heuristic = earlier.get(row.method, (None, None))
        row.vs_unplaced = agreed(vs_unplaced, row.vs_unplaced)
        row.vs_best_heuristic = agreed(vs_heuristic, row.vs_best_heuristic)
    return judged("confirm")


def agreed(earlier: Ratio | None, last: Ratio | None) -> Ratio | None:
    """Rule 8: `last`, with `earlier` (the same comparison one session before) in its
    `earlier`, and the verdict both give: "unmeasured" where either is, "tie" where
    they differ or `earlier` is missing (its plan did not run there).

    >>> agreed(Ratio(1.1, (1.05, 1.15), "faster", "unplaced"), Ratio(1.02, (0.98, 1.06), "tie", "unplaced")).verdict
    'tie'
    """
    if last is None:
        return None
    verdicts = {last.verdict, earlier.verdict if earlier is not None else "tie"}
    verdict = last.verdict if len(verdicts) == 1 else "unmeasured" if "unmeasured" in verdicts else "tie"
    return replace(last, verdict=verdict, earlier=(*earlier.earlier, replace(earlier, earlier=()))
                   if earlier is not None else last.earlier)


def _judged(winner: MethodResult | None, unplaced: MethodResult | None, session: str | None,
            shortlist: Sequence[str], unplaced_device: str, confirmed: bool, writes_plan: bool,
            protocol: Protocol | None) -> Choice:
    """verdict_choice's rules 1-3 and 5 for `winner` (as it says)."""

    ratio = winner.vs_unplaced if winner is not None else None
    heuristic = winner.vs_best_heuristic if winner is not None else None
    vs_heuristic = "" if heuristic is None else f"; {heuristic.describe()} " + (
        f"the best heuristic ({method_name(heuristic.reference)})" if winner.kind != "baseline" else
        f"{method_name(heuristic.reference)}, the heuristic measured fastest before the final session")
    if winner is None:
        return Choice(None, "none", "No placement could be measured.", None, session, list(shortlist))
    if (reason := unmeasured(unplaced, protocol)) is not None:
        return _no_reference(winner, reason, session, shortlist, confirmed, writes_plan)
    if not confirmed:
        return Choice(winner.method, "unconfirmed", _line(
            f"Interrupted before the final measurements: {method_name(winner.method)} is the fastest measured so far "
            f"({winner.measured_ms:.2f} ms), unconfirmed; its speedups come from the search's own measurements."),
            winner.method, session, list(shortlist), ratio, heuristic)
    unplaced_ok = unplaced is not None and unplaced.measured
    if winner.kind == "unplaced" or (ratio is not None and ratio.verdict != "faster" and unplaced_ok):
        best = "" if winner.kind == "unplaced" else f": the fastest plan, {method_name(winner.method)}, is " \
                                                     f"{ratio.describe()} unplaced"
        verdict = "slower" if ratio is not None and ratio.verdict == "slower" else "tie"
        return Choice(UNPLACED, verdict, _line(
            f"No plan is measurably faster than the model run without placer (unplaced, everything on "
            f"{unplaced_device}, {unplaced.measured_ms:.2f} ms){best}."
            + (f" plan.json runs everything on {unplaced_device}." if writes_plan else "")),
            winner.method, session, list(shortlist))
    if ratio is None:  # unplaced cannot run (memory caps): the fastest feasible plan is the answer
        return Choice(winner.method, "unplaced infeasible", _line(
            f"{method_name(winner.method)}: {winner.measured_ms:.2f} ms per training step; the model does not "
            f"run unplaced on {unplaced_device} ({unplaced.reason if unplaced else 'not measured'}){vs_heuristic}."),
            winner.method, session, list(shortlist), None, heuristic)
    return Choice(winner.method, "faster", _line(
        f"{method_name(winner.method)} is measurably faster than the model run without placer: "
        f"{ratio.describe()} unplaced{vs_heuristic}."), winner.method, session, list(shortlist), ratio, heuristic)


def _no_reference(winner: MethodResult, reason: str, session: str | None, shortlist: Sequence[str],
                  confirmed: bool, writes_plan: bool) -> Choice:
    """The Choice of no plan when unplaced could not be measured (rule 5): why, and what to do."""
    start = "No verdict: " if confirmed else "Interrupted before the final measurements, and "
    written = "; no plan is chosen" + (" and no plan.json is written" if writes_plan else "")
    advice = "Measure on an idle host" if confirmed else "Run the same command again"
    if writes_plan:
        advice += (", then run the same command with --resume: it measures unplaced and the final sessions "
                   "afresh" if confirmed else " with --resume to continue")
    return Choice(None, "unmeasured", _line(f"{start}{reason}{written}. {advice}."), winner.method, session,
                  list(shortlist))


def _line(text: str) -> str:
    """One headline: single spaces, a capital first letter."""
    text = text.replace("  ", " ").strip()
    return text[:1].upper() + text[1:]

