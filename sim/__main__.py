"""`python -m exojet.sim --seed N [--trace]`: replay one seed; `--seeds A-B`: run a range."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from exojet.sim.run import run


def _range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exojet.sim", description=__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="run this seed")
    which.add_argument("--seeds", type=_range, help="run seeds A to B (inclusive), e.g. 0-999")
    parser.add_argument("--trace", action="store_true", help="print every step of the run, not just the last ones")
    args = parser.parse_args(argv)
    seeds = range(args.seed, args.seed + 1) if args.seed is not None else args.seeds
    started = time.perf_counter()
    failed = 0
    counts: Counter[str] = Counter()
    for seed in seeds:
        result = run(seed)
        if not result.ok or args.seed is not None:
            print(result.report(None if args.trace else 60))
        failed += not result.ok
        counts += result.world.counts
    print(f"{len(seeds)} seeds, {failed} failed, {time.perf_counter() - started:.1f} s")
    print("faults and recoveries: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
