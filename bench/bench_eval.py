"""Seconds to score several methods on a whole split with eval.py, one process against ``--jobs``.

    python -m bench.bench_eval --img1 $DATASETS/IVIF/test/ir --img2 $DATASETS/IVIF/test/vi \
        --fused released=out/released shipped=out/shipped run=out/run --jobs 2 --rounds 2

Rounds alternate serial and parallel scoring so that both see the same machine; prints each
round's seconds and the median ratio.
"""
import os
import sys

# runnable as python bench/<script>.py too: the repository root on the path, as python -m has it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import statistics
import time

from eval import parse_methods, score


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img1", required=True)
    parser.add_argument("--img2", required=True)
    parser.add_argument("--fused", required=True, nargs="+", metavar="NAME=DIR")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    methods = parse_methods(args.fused)
    times = {1: [], args.jobs: []}
    for round_ in range(args.rounds):
        for jobs in (1, args.jobs):
            start = time.perf_counter()
            per_pair, errors, _ = score(args.img1, args.img2, methods, jobs=jobs)
            times[jobs].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: --jobs {jobs}: {times[jobs][-1]:.1f} s for {len(per_pair)} pairs "
                  f"x {len(methods)} methods ({len(errors)} failed)", flush=True)
    print(f"median: --jobs 1 {statistics.median(times[1]):.1f} s, --jobs {args.jobs} "
          f"{statistics.median(times[args.jobs]):.1f} s, "
          f"{statistics.median(times[1]) / statistics.median(times[args.jobs]):.2f}x")


if __name__ == "__main__":
    main()
