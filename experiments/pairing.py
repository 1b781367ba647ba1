"""What pairing by rounds buys the comparison of two measurements (placer.measurements.compare).

Offline, from a recorded fidelity run whose rows kept their timed steps (`times_ms`;
experiments/fidelity.py `--design one`, recorded since 2026-12-02): all of a model's
candidates were timed in one interleaved session, one step each a round. For every
pair of feasible candidates, the ratio of their medians is compared twice, with the
same steps: paired (the bootstrap resamples whole rounds, as placer does for two
measurements of one session) and unpaired (each sample resampled on its own, as
before). Reported per model: the pairs told apart (the CI excludes 1) each way, the
median CI half-width of the ratio each way, and the pairs whose verdicts differ.
Whether pairing calls identical placements different is what
`experiments/bench_noise.py` checks (a placement and its copy in one session).

    .venv/bin/python experiments/pairing.py --name fidelity_medium_blocks

Writes experiments/results/NAME_pairing.{json,md}. Times nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace

import numpy as np

from _record import RESULTS, host_info, host_lines, record  # this folder is on sys.path when run as a script
from placer.measurements import compare
from placer.runtime.stats import summarize


def pairs(rows: list[dict]) -> dict:
    """The paired and unpaired comparisons of every pair of `rows` (fidelity rows of one
    session, each with "times_ms"), summarized."""
    steps = [r["times_ms"] for r in rows if r["feasible"] and r.get("times_ms")]
    rounds = min(map(len, steps), default=0)
    measured = [summarize(t[:rounds]) for t in steps]  # the rounds every candidate has
    counts = {"pairs": 0, "apart_paired": 0, "apart_unpaired": 0, "verdicts_differ": 0}
    widths = {"paired": [], "unpaired": []}
    for a, b in itertools.combinations(measured, 2):
        paired = compare(replace(a, session="one"), replace(b, session="one"), "b")
        unpaired = compare(a, b, "b")
        counts["pairs"] += 1
        counts["apart_paired"] += paired.verdict != "tie"
        counts["apart_unpaired"] += unpaired.verdict != "tie"
        counts["verdicts_differ"] += paired.verdict != unpaired.verdict
        for key, ratio in (("paired", paired), ("unpaired", unpaired)):
            widths[key].append((ratio.ci[1] - ratio.ci[0]) / 2 / ratio.value)
    return {"candidates": len(measured), "rounds": rounds, **counts,
            **{f"median_halfwidth_{k}": float(np.median(v)) if v else None for k, v in widths.items()}}


def markdown(results: dict) -> str:
    lines = [f"# Paired comparisons, from `{results['source']}`", "",
             "Every pair of a model's candidates, measured in one interleaved session, compared by the ratio of "
             "their medians: paired (whole rounds resampled) and unpaired (each sample on its own). Told apart: "
             "the 95% CI of the ratio excludes 1.", "",
             "| model | candidates | rounds | pairs | told apart, unpaired | paired | median CI half-width, "
             "unpaired | paired |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        p = m["pairing"]
        lines.append(f"| {m['workload']} | {p['candidates']} | {p['rounds']} | {p['pairs']} | {p['apart_unpaired']} | "
                     f"{p['apart_paired']} | {100 * p['median_halfwidth_unpaired']:.1f}% | "
                     f"{100 * p['median_halfwidth_paired']:.1f}% |")
    return "\n".join(lines + ["", "Measured on:", "", *host_lines(results["measured_on"]), "",
                              f"Analysed {results['analysed']}."]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="fidelity_medium_blocks", help="the fidelity results' file stem")
    args = parser.parse_args()
    source = json.loads((RESULTS / f"{args.name}.json").read_text())
    if source.get("design") != "one":
        parser.error(f"{args.name}: the run is not of the one-session design: its candidates were not timed in rounds")
    models = [{"workload": m["workload"], "pairing": pairs(m["rows"])} for m in source["models"]]
    results = {"source": f"{args.name}.json", "measured_on": source["host"], "analysed": host_info()["date"],
               "models": models}
    print(f"wrote {record(f'{args.name}_pairing', results, markdown(results))[1]}")


if __name__ == "__main__":
    main()
