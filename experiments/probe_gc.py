"""How long a `placer` command spends in gc.collect (each measured trial's close runs
one; placer.cli_support.freeze_imports keeps torch's objects out of them).

    python experiments/probe_gc.py optimize experiments/workloads/narrow_towers.py --budget 5 --out /tmp/gcp

Runs the command in this process, as the `placer` script does, and prints the number
of collections and their total seconds on stderr at exit. Printed only.
"""

import atexit
import gc
import sys
import time

real_collect, spent = gc.collect, [0.0, 0]


def timed_collect(*args, **kwargs):
    start = time.perf_counter()
    try:
        return real_collect(*args, **kwargs)
    finally:
        spent[0] += time.perf_counter() - start
        spent[1] += 1


if __name__ == "__main__":
    gc.collect = timed_collect
    atexit.register(lambda: print(f"gc.collect: {spent[1]} calls, {spent[0]:.2f} s", file=sys.__stderr__))
    sys.argv = ["placer", *sys.argv[1:]]
    from placer.cli import main

    main()
