"""Does a policy trained on three models reach a good plan on an unseen fourth in fewer samples?

Pretrains one Seq2SeqPolicy on three zoo models' placement problems in turn (RL on
the simulator), then searches the unseen model twice per seed with equal samples:
from the pretrained policy and from a fresh one, both warm-started from the best
heuristic (as `placer optimize --policy` does) or, with --no-warm-start, from the
policies alone. The yardstick is the best plan known for the unseen model: the best
simulated candidate of every baseline, of a long local_search, of a long fresh RL
search and of the compared searches themselves. Reported: the learning curves (best
simulated step after each round) and the number of samples each needs to come within
2% of the best plan (never, within the budget, is reported as such, with how far it
ended). Everything is counted in samples and simulated ms: no wall-clock time is
recorded, so the run is valid on a busy host.

    .venv/bin/python experiments/transfer.py            # medium zoo models, 3 seeds
    .venv/bin/python experiments/transfer.py --quick    # small models, few samples, one seed: a check it runs

Writes experiments/results/transfer.{json,md} (transfer_quick.* with --quick) and
docs/img/transfer.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from graphs.errors import InfeasibleError
from graphs.problem import Candidate, PlacementProblem, build_problem
from placer.baselines import run_baselines
from placer.rl import Seq2SeqPolicy, TrainConfig
from placer.search import overrides, run
from placer.search.scorer import SimulatedScorer

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "img"
WITHIN = 0.02  # "within 2% of the best plan"


def best_heuristic(problem: PlacementProblem) -> tuple[str, Candidate, float]:
    scorer = SimulatedScorer(problem)
    scored = [(scorer.score([Candidate(tuple(p))])[0], name, Candidate(tuple(p)))
              for name, p in run_baselines(problem).items() if not isinstance(p, InfeasibleError)]
    ms, name, candidate = min(scored, key=lambda s: s[0])
    return name, candidate, ms


def pretrain(problems: list[PlacementProblem], config: TrainConfig, args: argparse.Namespace) -> Seq2SeqPolicy:
    """Round-robin RL over the problems, each warm-started from its best heuristic."""
    torch.manual_seed(args.seed)
    policy = Seq2SeqPolicy(max_devices=config.max_devices, hidden=config.hidden, graph_layers=config.graph_layers)
    for round_ in range(args.rounds):
        for i, problem in enumerate(problems):
            _, warm, _ = best_heuristic(problem)
            result = run("rl", problem, SimulatedScorer(problem),
                         replace(config, seed=args.seed + 1000 * round_ + i, max_samples=args.pretrain_samples),
                         warm, policy=policy)
            print(f"pretrain round {round_} problem {i}: best {result.best_sim_ms:.2f} ms", flush=True)
    return policy


def best_known(problem: PlacementProblem, config: TrainConfig, args: argparse.Namespace) -> float:
    """The best plan known for the problem: baselines, a long local_search, a long fresh RL search."""
    _, warm, warm_ms = best_heuristic(problem)
    long = replace(config, max_samples=args.reference_samples, seed=args.seed)
    found = [run(method, problem, SimulatedScorer(problem), long, warm).best_sim_ms
             for method in ("local_search", "rl")]
    return min([warm_ms, *found])


def search(problem: PlacementProblem, policy: Seq2SeqPolicy | None, seed: int, config: TrainConfig,
           args: argparse.Namespace) -> dict:
    """One RL search of the unseen problem from `policy` (a copy; None: a fresh policy):
    its curve, [[samples, best simulated ms so far]], and its best."""
    warm = best_heuristic(problem)[1] if args.warm_start else None
    result = run("rl", problem, SimulatedScorer(problem), replace(config, seed=seed, max_samples=args.samples), warm,
                 policy=copy.deepcopy(policy) if policy is not None else None)
    return {"seed": seed, "curve": [[row["samples"], row["best_sim_ms"]] for row in result.curve],
            "final_ms": result.best_sim_ms}


def samples_to_within(curve: list[list], target_ms: float) -> int | None:
    """The samples after which a curve's best is within WITHIN of `target_ms`; None: never.

    >>> samples_to_within([[16, 110.0], [32, 101.5], [48, 100.0]], 100.0)
    32
    """
    return next((s for s, ms in curve if ms is not None and ms <= (1 + WITHIN) * target_ms), None)


def score_runs(results: dict) -> None:
    """The best plan known includes the compared searches' own bests; then each run's
    samples to within 2% of it."""
    runs = results["pretrained"] + results["fresh"]
    test = results["test"]
    test["best_known_ms"] = min([test["best_known_ms"], *(r["final_ms"] for r in runs)])
    for r in runs:
        r["samples_to_within"] = samples_to_within(r["curve"], test["best_known_ms"])


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    target = results["test"]["best_known_ms"]
    for label, colour in (("pretrained", "#C44E52"), ("fresh", "#4C72B0")):
        for i, run_ in enumerate(results[label]):
            xs, ys = zip(*[(s, ms / target) for s, ms in run_["curve"] if ms is not None])
            ax.plot(xs, ys, color=colour, alpha=0.8, label=label if i == 0 else None)
    ax.axhline(1 + WITHIN, color="black", linestyle="--", linewidth=1, label="within 2% of the best plan")
    ax.set_xlabel("samples")
    ax.set_ylabel("best simulated step / best plan")
    ax.set_title(f"Transfer to unseen {results['test']['name']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    test = results["test"]
    lines = [f"# Policy transfer ({results['host']['date']})", "",
             f"Devices `{results['devices']}`; simulated step times (nominal calibration); "
             f"{'warm-started from the best heuristic' if results['warm_start'] else 'no warm start'}.", "",
             f"Pretrained on: {', '.join(results['pretrain'])} ({results['rounds']} round(s) of "
             f"{results['pretrain_samples']} samples each).",
             f"Unseen model: {test['name']} ({test['groups']} groups); best heuristic {test['best_heuristic']} at "
             f"{test['best_heuristic_ms']:.2f} ms; best plan known {test['best_known_ms']:.2f} ms.", "",
             "| policy | samples to within 2% of the best plan, per seed | median | mean best after all samples (ms) |",
             "| --- | --- | ---: | ---: |"]
    for label in ("pretrained", "fresh"):
        runs = results[label]
        reached = [_reached(r, results["samples"]) for r in runs]
        cells = ", ".join("never" if r["samples_to_within"] is None else str(r["samples_to_within"]) for r in runs)
        lines.append(f"| {label} | {cells} | {statistics.median(reached):g} | "
                     f"{statistics.mean(r['final_ms'] for r in runs):.2f} |")
    budget = results["samples"]
    fewer = sum(_reached(p, budget) < _reached(f, budget) for p, f in zip(results["pretrained"], results["fresh"]))
    lines += ["", f"Seeds {[r['seed'] for r in results['fresh']]}; {results['samples']} samples per search. The "
              f"pretrained policy came within 2% in fewer samples than the fresh one on {fewer} of "
              f"{len(results['fresh'])} seeds (\"never\" counts as the budget plus one). "
              "Curves: docs/img/transfer.png."]
    return "\n".join(lines + ["", *host_lines(results["host"])]) + "\n"


def _reached(run_: dict, budget: int) -> int:
    """A run's samples to within 2%, "never" counted as the budget plus one."""
    return run_["samples_to_within"] if run_["samples_to_within"] is not None else budget + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", nargs="*",
                        default=["zoo:rnnlm:medium", "zoo:transformer:medium", "zoo:inception_v3:medium"])
    parser.add_argument("--test", default="zoo:nmt:medium")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pretrain-samples", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=1500, help="samples of each search on the unseen model")
    parser.add_argument("--reference-samples", type=int, default=6000, help="samples of the best-plan searches")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument("--quick", action="store_true", help="small models, few samples, one seed")
    args = parser.parse_args()
    if args.quick:
        args.pretrain = [spec.replace(":medium", ":small") for spec in args.pretrain[:2]]
        args.test = args.test.replace(":medium", ":small")
        args.rounds, args.pretrain_samples, args.samples, args.reference_samples, args.seeds = 1, 32, 48, 96, 1
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    config = overrides(TrainConfig(budget_s=None, measure_top_k=0), args.set)

    host = host_info()
    pretrain_problems = [build_problem(spec, devices=args.devices, max_groups=args.max_groups)
                         for spec in args.pretrain]
    test_problem = build_problem(args.test, devices=args.devices, max_groups=args.max_groups)
    policy = pretrain(pretrain_problems, config, args)
    heuristic, _, heuristic_ms = best_heuristic(test_problem)
    target = best_known(test_problem, config, args)
    seeds = range(args.seed, args.seed + args.seeds)
    results = {
        "host": host, "devices": args.devices, "pretrain": args.pretrain, "rounds": args.rounds,
        "pretrain_samples": args.pretrain_samples, "samples": args.samples,
        "warm_start": args.warm_start,
        "test": {"name": args.test, "groups": test_problem.n_groups, "best_heuristic": heuristic,
                 "best_heuristic_ms": heuristic_ms, "best_known_ms": target},
        "pretrained": [search(test_problem, policy, s, config, args) for s in seeds],
        "fresh": [search(test_problem, None, s, config, args) for s in seeds],
    }
    score_runs(results)
    record("transfer_quick" if args.quick else "transfer", results, markdown(results))
    if not args.quick:
        plot(results, IMAGES / "transfer.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
