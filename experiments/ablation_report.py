"""The ablation's markdown (experiments/ablation.py writes it beside its JSON): the simulated table, RL's
simulated lead per seed, and, for measured problems, the confirm sessions' medians, RL's verdicts and the
simulator's optimism about each shortlist."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from _record import host_lines  # this folder is on sys.path when run as a script
from placer.runtime.timing import Measurement

YARDSTICKS = ("local_search", "random_search")  # what RL is judged against


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"# Ablation ({host['date']})", "",
             f"{results['samples']} sampled candidates per method, seeds {results['seeds']}; every method starts "
             "from the best heuristic (warm start) and scores on the simulator; best simulated step time, mean "
             "(and spread) over the seeds. Lower is better.", "",
             "| problem | groups | warm start (ms) | lower bound (ms) | optimum (ms) | "
             + " | ".join(results["methods"]) + " |", "| --- | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in results["methods"]) + " |"]
    for p in results["problems"]:
        exact = p.get("optimum")
        cells = []
        for method in results["methods"]:
            times = [r["best_ms"] for r in p["runs"][method]]
            mean, spread = statistics.mean(times), max(times) - min(times)
            gap = "" if exact is None else f", {100 * (mean / exact['ms'] - 1):+.1f}% over the optimum"
            cells.append(f"{mean:.2f} ({spread:.2f}, {p['warm_start']['ms'] / mean:.3f}x{gap})")
        optimum_cell = "-" if exact is None else f"{exact['ms']:.2f}"
        lines.append(f"| {p['name']} | {p['groups']} | {p['warm_start']['ms']:.2f} ({p['warm_start']['method']}) | "
                     f"{p['lower_bound_ms']:.2f} | {optimum_cell} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ms (max - min over seeds, speedup over the warm start, and where the problem is small "
              "enough to enumerate, the mean's gap to the exact simulated optimum). Optimum: the fastest of every "
              "candidate, scored (\"-\": more than --optimum-limit candidates). Simulated with the calibration "
              "saved for each model and devices where there is one (`calibrated` in the JSON), else the nominal one."]
    if during := [p["name"] for p in results["problems"] if p.get("measured_during")]:
        lines += ["", f"Measured during the search ({', '.join(during)}): each search measured and refitted as "
                  "placer optimize's do, on its own copy of the heuristics' measurements, so its simulated times are "
                  "under its own last refit (they compare within a run, not across runs), and its choice is the best "
                  "it measured."]
    if enumerated := [f"{p['name']} ({count} candidates)" for p in results["problems"]
                      if (count := p["runs"][results["methods"][0]][0].get("enumerated"))]:
        lines += ["", f"Enumerated ({', '.join(enumerated)}): no more candidates than the sample budget, so every "
                  "method scored each one instead of sampling (placer.search.exhaustive): they ran the same search, "
                  "and differ only where their measurements did."]
    return "\n".join(lines + leads(results) + measured_lines(results) + optimism_lines(results)
                     + ["", *host_lines(host)]) + "\n"


def leads(results: dict) -> list[str]:
    """Markdown: RL's simulated lead over each yardstick, seed by seed (its best ms / RL's best ms - 1)."""
    others = [m for m in YARDSTICKS if m in results["methods"]]
    if "rl" not in results["methods"] or not others:
        return []
    lines = ["", "RL's simulated lead over each yardstick per seed (the yardstick's best / RL's best - 1; "
             "positive: RL found a faster candidate):", "",
             "| problem | " + " | ".join(f"vs {m}" for m in others) + " |", "| --- |" + " --- |" * len(others)]
    for p in results["problems"]:
        cells = ["; ".join(f"{100 * (theirs['best_ms'] / mine['best_ms'] - 1):+.1f}%"
                           for mine, theirs in zip(p["runs"]["rl"], p["runs"][m])) for m in others]
        lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def measured_lines(results: dict) -> list[str]:
    """Markdown: the confirm sessions' medians of every pick, and RL's verdicts against the yardsticks."""
    measured = [p for p in results["problems"] if p.get("rl_vs")]
    if not measured:
        return []
    k = measured[0]["measured"]["top_k"]
    lines = ["", f"## Measured: each method's fastest of its {k} best simulated candidates and the warm start, "
             "confirmed", "",
             f"Selection: every method's {k} best distinct simulated candidates of each seed, its own choice and the "
             "warm start (in every method's pool: each starts there, and placer optimize always measures it), with "
             "unplaced, in an interleaved session per method and seed. Confirm: each method's "
             "fastest of them per seed, the warm start and unplaced in fresh sessions, each in the reverse order of "
             "the one before; the medians (one per confirm session, separated by /) and verdicts below are theirs "
             "only. A verdict of faster or slower needs every confirm session's (in brackets).", "",
             "| problem | unplaced (ms) | warm start (ms) | " + " | ".join(results["methods"]) + " |",
             "| --- | ---: | ---: |" + " ---: |" * len(results["methods"])]
    for p in measured:
        confirms, picks = p["measured"]["confirms"], p["measured"]["picks"]
        cells = [", ".join(_medians(confirms, picks[f"{m}/{i}"]) for i in range(len(p["runs"][m])))
                 for m in results["methods"]]
        lines.append(f"| {p['name']} | {_medians(confirms, 'unplaced')} | {_medians(confirms, picks['warm_start'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| problem | RL vs | speedup (95% CI), verdict [each session's], per seed |", "| --- | --- | --- |"]
    for p in measured:
        for other, ratios in p["rl_vs"].items():
            lines.append(f"| {p['name']} | {other} | {'; '.join(map(_verdict, ratios))} |")
    if earlier := [p for p in measured if p.get("earlier_rl_vs")]:
        lines += ["", f"The same picks' verdicts in the run's own confirm session ({results['reconfirmed']}, "
                  f"{results['earlier_host']['date']}):", "",
                  "| problem | RL vs | speedup (95% CI), verdict, per seed |", "| --- | --- | --- |"]
        lines += [f"| {p['name']} | {other} | {'; '.join(map(_verdict, ratios))} |"
                  for p in earlier for other, ratios in p["earlier_rl_vs"].items()]
    lines += ["", "The sessions' noise: the median, over their candidates, of the CI half-width as a share of the "
              "median (the protocol's target is 3%; a session far above it is no ground for a pick):", ""]
    lines += [f"- {p['name']}: selection {_noise(m for s in p['measured']['selection'].values() for m in s.values())}"
              f", confirm {' / '.join(_noise(c.values()) for c in p['measured']['confirms'])}" for p in measured]
    return lines


def _verdict(ratio: dict | None) -> str:
    """A verdict's cell text: speedup, CI, verdict and, where there were several sessions, each one's verdict."""
    if ratio is None:
        return "infeasible"
    if ratio["ci"] is None:
        return "same candidate"
    sessions = ratio.get("sessions") or []
    each = f" [{', '.join(s['verdict'] for s in sessions)}]" if len(sessions) > 1 else ""
    return f"{ratio['speedup']:.3f}x ({ratio['ci'][0]:.3f}-{ratio['ci'][1]:.3f}) {ratio['verdict']}{each}"


def _noise(measurements: Iterable[dict]) -> str:
    """The median CI half-width of the feasible ones of `measurements` (JSON), as a share of their medians.

    >>> _noise([{"feasible": True, "median_ms": 100.0, "ci_ms": [90.0, 110.0]}, {"feasible": False}])
    '10.0%'
    """
    shares = [share for m in measurements if (share := Measurement.from_json(m).ci_halfwidth) is not None]
    return f"{100 * statistics.median(shares):.1f}%" if shares else "-"


def optimism_lines(results: dict) -> list[str]:
    """Markdown: the simulator's optimism about each method's shortlist relative to the warm start (below). A
    search finds where the simulator errs in its favour: a shortlist that reads high won less when measured."""
    if not (measured := [p for p in results["problems"] if p.get("measured")]):
        return []
    lines = ["", "The simulator's optimism about each shortlist, relative to the warm start: the median, over the "
             "method's candidates of every seed, of log(measured / simulated) less the warm start's in the same "
             "selection session (+0.10: they ran about 10% slower against the warm start than simulated):", "",
             "| problem | " + " | ".join(results["methods"]) + " |", "| --- |" + " ---: |" * len(results["methods"])]
    for p in measured:
        cells = [f"{statistics.median(errors):+.3f}" if (errors := _errors(p, method)) else "-"
                 for method in results["methods"]]
        lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def _errors(problem: dict, method: str) -> list[float]:
    """log(measured / simulated) of each candidate `method` shortlisted, less the warm start's of the same selection
    session; simulated as its run scored it (`top`; the warm start, unless there, as the base calibration did). A
    choice outside `top` has no score and is left out."""
    measured, warm = problem["measured"], problem["measured"]["picks"]["warm_start"]
    errors = []
    for i, run in enumerate(problem["runs"][method]):
        session = measured["selection"][f"{method}/{i}"]
        simulated = {(tuple(c), m): ms for c, m, ms in run["top"]}
        simulated.setdefault((tuple(measured["candidates"][warm][0]), measured["candidates"][warm][1]),
                             problem["warm_start"]["ms"])
        logs = {label: math.log(session[label]["median_ms"] / simulated[key]) for label in session
                if label in measured["candidates"] and session[label]["feasible"]
                and (key := (tuple(measured["candidates"][label][0]), measured["candidates"][label][1])) in simulated}
        if warm in logs:
            errors += [error - logs[warm] for label, error in logs.items() if label != warm]
    return errors


def _medians(sessions: list[dict], label: str | None) -> str:
    """A markdown cell: the medians (ms) of `label`'s measurement in each of `sessions` (JSON), or "infeasible"."""
    return "/".join(f"{m['median_ms']:.1f}" if (m := None if label is None else session[label]) and m["feasible"]
                    else "infeasible" for session in sessions)
