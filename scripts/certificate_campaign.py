"""Issue 12's adversarial campaign: fpgrad's exact reference against an independent oracle.

Draws ``--networks`` small networks at the extremes with hypothesis (tests/oracle/generate.py:
ReLU inputs exactly 0 or 2**-k from 0, saturated tanh and sigmoid, logit gaps up to 1e4, soft
targets and label smoothing, values near 2**+-1000, deep chains, wide fan-in with cancellation,
batch norm), runs each through ``fpgrad.reference.exact.exact_trace(net, allow_uncertified=True)`` (or
``--bits``) and checks every value against tests/oracle (exact rationals and mpmath at 4,000+
adaptive bits, confirmed 2,000 bits higher). Prints counts per regime and in total: networks,
values checked, wrong certified values, false zeros, enclosure failures, undetermined values,
values where the oracle was inconclusive, networks refused. Exit status 1 if anything is wrong.

Usage: ``python scripts/certificate_campaign.py [--networks N] [--seed S] [--bits B]
[--regime NAME ...] [--show K] [--every N]`` (run from the repository root).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.oracle.claims import Tally, run_one  # noqa: E402
from tests.oracle.generate import REGIMES, networks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=None, help="exact_trace bits (default: its own)")
    ap.add_argument("--regime", nargs="*", choices=REGIMES, default=list(REGIMES))
    ap.add_argument("--show", type=int, default=10, help="failures to print")
    ap.add_argument("--every", type=int, default=0, help="progress line every N networks")
    args = ap.parse_args(argv)
    per: dict[str, Tally] = {r: Tally() for r in args.regime}
    start = time.perf_counter()

    @seed(args.seed)
    @settings(
        max_examples=args.networks,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(networks(tuple(args.regime)))
    def one(net) -> None:  # noqa: ANN001
        per[net.name.split("-")[0]].add(run_one(net, args.bits))
        done = sum(t.networks for t in per.values())
        if args.every and done % args.every == 0:
            wrong = sum(t.wrong for t in per.values())
            print(f"... {done} networks, {wrong} wrong", file=sys.stderr, flush=True)

    one()
    total = Tally()
    for regime, tally in per.items():
        print(f"{regime:13s} {tally.line()}")
        total.add(tally)
    print(f"{'total':13s} {total.line()}")
    print(f"({time.perf_counter() - start:.0f} s, seed {args.seed})")
    for line in total.failures[: args.show]:
        print("  " + line)
    return 1 if total.wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
