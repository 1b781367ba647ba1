"""Is RL faster than each yardstick on a problem, over every seed measured? (issue 16)

The measured ablation (`ablation.py --measure`) gives one verdict per seed: RL's pick against the
yardstick's in two confirm sessions, "faster" or "slower" only where both agree. That rule still lets a
session lottery of 3-5% through (`probe_pair.py`), and it does not answer the issue's question, which is
per problem. This pools a problem's seeds: per seed s,

    x_s = the mean, over its confirm sessions, of log(the yardstick's median / RL's median)

("same candidate": x_s = 0, an exact tie), then the mean of x_s over seeds with a Student t 95% CI (n - 1
degrees of freedom). The seed is the unit, so the CI holds both what a search finds from seed to seed and
each seed's session noise. Verdict: faster where the CI lies above 1, slower below, else a tie.

Pool runs of one code only: each run's commit is listed (runs recorded before s29 carry none).

    .venv/bin/python experiments/ablation_pool.py --runs ablation_during_s28_mlp_s3 ... --name ablation_pool_s29
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict

from scipy import stats

from placer.runtime.stats import CONFIDENCE
from _record import RESULTS, record  # this folder is on sys.path when run as a script


def seed_log_speedup(ratio: dict) -> float:
    """x_s of one seed's verdict (ablation JSON `rl_vs[yardstick][i]`): the mean of its sessions' log
    speedups, 0 for the same candidate.

    >>> round(seed_log_speedup({"speedup": 1.0, "ci": None, "verdict": "same candidate"}), 6)
    0.0
    >>> round(math.exp(seed_log_speedup({"speedup": 1.05, "ci": [1.0, 1.1], "sessions": [
    ...     {"speedup": 1.1}, {"speedup": 1.0}]})), 4)
    1.0488
    """
    if ratio["ci"] is None:
        return 0.0
    sessions = ratio.get("sessions") or [ratio]
    return statistics.fmean(math.log(s["speedup"]) for s in sessions)


def pool(xs: list[float], level: float = CONFIDENCE) -> dict:
    """Mean speedup over seeds (exp of the mean of `xs`), its Student t CI at placer's coverage, and verdict.

    >>> r = pool([math.log(1.03), math.log(1.05), math.log(1.04)])
    >>> r["verdict"], round(r["speedup"], 3)
    ('faster', 1.04)
    >>> pool([math.log(1.05), math.log(0.95)])["verdict"]
    'tie'
    """
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"seeds": len(xs), "speedup": math.exp(mean), "ci": None, "verdict": "one seed"}
    half = stats.t.ppf(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    low, high = math.exp(mean - half), math.exp(mean + half)
    verdict = "faster" if low > 1 else "slower" if high < 1 else "tie"
    return {"seeds": len(xs), "speedup": math.exp(mean), "ci": [low, high], "verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="ablation results (names in experiments/results)")
    parser.add_argument("--name", required=True, help="write experiments/results/NAME.{json,md}")
    args = parser.parse_args()
    seeds: dict[tuple[str, str], list[tuple[str, int, float, str]]] = defaultdict(list)
    runs = []
    for name in args.runs:
        run = json.loads((RESULTS / f"{name}.json").read_text())
        runs.append({"name": name, "date": run["host"]["date"], "commit": run["host"].get("commit")})
        for problem in run["problems"]:
            for yardstick, ratios in problem.get("rl_vs", {}).items():
                for seed, ratio in zip(run["seeds"], ratios):
                    if ratio is not None:  # an infeasible pick has no speedup
                        seeds[problem["name"], yardstick].append((name, seed, seed_log_speedup(ratio),
                                                                  ratio["verdict"]))
    pooled = [{"problem": problem, "vs": yardstick, **pool([x for _, _, x, _ in rows]),
               "per_seed": [{"run": run, "seed": seed, "speedup": math.exp(x), "verdict": verdict}
                            for run, seed, x, verdict in rows]}
              for (problem, yardstick), rows in sorted(seeds.items())]
    record(args.name, {"runs": runs, "pooled": pooled}, markdown(runs, pooled))


def markdown(runs: list[dict], pooled: list[dict]) -> str:
    lines = ["# RL against the yardsticks, pooled over seeds", "",
             "Per seed: the mean over its confirm sessions of log(yardstick's median / RL's median); per problem: "
             "their mean over seeds with a Student t 95% CI (module doc of `experiments/ablation_pool.py`).", "",
             "| problem | RL vs | seeds | speedup (95% CI) | verdict | per seed (each seed's two-session verdict) |",
             "| --- | --- | ---: | --- | --- | --- |"]
    for p in pooled:
        ci = "-" if p["ci"] is None else f"{p['ci'][0]:.3f}-{p['ci'][1]:.3f}"
        each = "; ".join(f"{s['seed']}: {s['speedup']:.3f}x {s['verdict']}" for s in p["per_seed"])
        lines.append(f"| {p['problem']} | {p['vs']} | {p['seeds']} | {p['speedup']:.3f}x ({ci}) | "
                     f"**{p['verdict']}** | {each} |")
    lines += ["", "Runs pooled:", ""]
    lines += [f"- `{r['name']}`: {r['date']}, commit {r['commit'] or 'not recorded'}" for r in runs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
