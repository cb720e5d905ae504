"""The full hostile-input campaign: N cases (mutated network, data and model files, hostile
option values) through the CLI in this process, each under a time and a memory limit.

    python scripts/fuzz_inputs.py --cases 3000 --seed 0

The known cases (issue 18's inputs) run first.

Prints the counts per kind and outcome and every case that broke the exit-code contract
(exit 0, or exit 2 with one line); exits 1 if any did.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import itertools
import sys
import tempfile
import time
from pathlib import Path

from fpgrad.fuzz import cases, known_cases, run_case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=20.0, help="time limit per case")
    ap.add_argument("--memory-gib", type=float, default=2.0, help="memory limit per case")
    ap.add_argument("--show", type=int, default=20, help="failures shown")
    args = ap.parse_args()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failures = []
    slowest = (0.0, None)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fpgrad-fuzz-") as tmp:
        known = known_cases()
        campaign = itertools.chain(known, cases(args.seed, args.cases))
        for i, case in enumerate(campaign):
            # a hang in C code that SIGALRM cannot interrupt ends the campaign with a traceback
            faulthandler.dump_traceback_later(args.seconds * 5, exit=True)
            d = Path(tmp, str(i))
            d.mkdir()
            outcome = run_case(case, d, args.seconds, int(args.memory_gib * 2**30))
            faulthandler.cancel_dump_traceback_later()
            verdict = outcome.problem or f"exit {outcome.code}"
            counts[(case.kind, verdict)] += 1
            if outcome.seconds > slowest[0]:
                slowest = (outcome.seconds, case.argv)
            if outcome.problem:
                failures.append((i, outcome))
    total = time.monotonic() - start
    kinds = sorted({k for k, _ in counts})
    verdicts = sorted({v for _, v in counts})
    print(
        f"{len(known)} known and {args.cases} drawn cases (seed {args.seed}) in {total:.0f} s; "
        f"slowest {slowest[0]:.1f} s"
    )
    print("kind      " + "".join(f"{v:>12}" for v in verdicts))
    for k in kinds:
        print(f"{k:10}" + "".join(f"{counts[(k, v)]:>12}" for v in verdicts))
    for i, o in failures[: args.show]:
        print(
            f"case {i} ({o.case.kind}) {o.problem}: {' '.join(o.case.argv)[:200]}\n  {o.err[:300]}"
        )
    print(f"{len(failures)} cases broke the contract")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
