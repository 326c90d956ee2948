"""The simulator's command line: a soak over many seeds, or the replay of one.

    python -m tests.sim --seeds 0:100000 --jobs 2    # soak; prints each failing seed
    python -m tests.sim --seed 1234 --trace          # replay one seed, print its whole trace
    python -m tests.sim --mutants                    # each fix reverted: where the soak finds it
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time

from tests.sim.workload import run_seed


def _one(args: tuple[int, int]) -> tuple[int, bool, str, int]:
    seed, max_ops = args
    ok, trace, message = run_seed(seed, max_ops=max_ops)
    steps = sum(1 for line in trace if " step " in line)
    return seed, ok, message, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seed", type=int, help="replay this seed")
    parser.add_argument("--seeds", default="0:100", help="soak over START:END (END exclusive)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--max-ops", type=int, default=40)
    parser.add_argument("--trace", action="store_true", help="print the whole trace of --seed")
    parser.add_argument("--stop-at-first", action="store_true")
    parser.add_argument("--mutants", nargs="*", metavar="NAME",
                        help="revert each named fix (all when none is named) and report where the soak finds it")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the code under test logs every injected fault
    if args.mutants is not None:
        from tests.sim import mutants

        missed = 0
        for name in args.mutants or mutants.NAMES:
            found = mutants.find(name, args.seeds if args.seeds != "0:100" else "0:5000", jobs=args.jobs)
            print(f"{found.line()}    [{mutants.describe(name)}]", flush=True)
            missed += found.seed is None
        return 1 if missed else 0
    if args.seed is not None:
        ok, trace, message = run_seed(args.seed, max_ops=args.max_ops)
        lines = trace if args.trace else [line for line in trace if "VIOLATION" in line or " step " in line]
        print("\n".join(lines))
        print(f"seed {args.seed}: {'ok' if ok else 'FAILED: ' + message}")
        return 0 if ok else 1
    start, end = (int(x) for x in args.seeds.split(":"))
    t0 = time.monotonic()
    failures = 0
    done = 0
    work = [(s, args.max_ops) for s in range(start, end)]
    pool = multiprocessing.Pool(args.jobs) if args.jobs > 1 else None
    results = pool.imap_unordered(_one, work, chunksize=16) if pool else map(_one, work)
    try:
        for seed, ok, message, steps in results:
            done += 1
            if not ok:
                failures += 1
                print(f"seed {seed} FAILED after {steps} steps: {message}", flush=True)
                if args.stop_at_first:
                    break
            if done % 1000 == 0:
                print(f"... {done} workloads, {failures} failed, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.terminate()
    print(f"{done} workloads (seeds {start}..{start + done - 1}), {failures} with a violated invariant, "
          f"{time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
