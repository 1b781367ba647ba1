"""What the check before every placed call costs (placer.runtime.model_changes.ModelSnapshot):
`change()` timed on BERT-base's modules (a Hugging Face BertModel built from its default config,
no weights), as PlacedModule takes them, median of --repeats calls, with the entries it compares.

    .venv/bin/python experiments/probe_snapshot.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from _record import host_info, host_lines  # this folder is on sys.path when run as a script
from transformers import BertConfig, BertModel

from placer.runtime.model_changes import ModelSnapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    host = host_info()
    model = BertModel(BertConfig())
    snapshot = ModelSnapshot(list(model.named_modules()))
    assert snapshot.change() is None
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        snapshot.change()
        times.append(time.perf_counter() - start)
    print(f"BERT-base: {len(list(model.modules()))} modules, {len(snapshot._values)} table entries, "
          f"{len(snapshot._attrs)} attributes, {len(snapshot._sized)} dicts sized, {len(snapshot._hooks)} hook tables")
    print(f"change(): median {1e3 * statistics.median(times):.3f} ms, 90th percentile "
          f"{1e3 * sorted(times)[int(0.9 * len(times))]:.3f} ms over {args.repeats} calls")
    print("\n".join(host_lines(host)))


if __name__ == "__main__":
    main()
