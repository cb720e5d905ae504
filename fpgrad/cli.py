"""Command-line front over the public API. Exit codes: 0 ok, 2 bad input, 1 internal failure.

Long module: the argument parsers and thin handlers of every command live together, so that the
options' names, bounds and help read as one surface; each handler only parses and calls the
library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fpgrad.errors import SWITCHES, InputError, switch


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see {self.prog} --help)")


def _formats(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from fpgrad.jsonutil import jsonable
    from fpgrad.numbers.formats import CATALOGUE, get_format

    fmts = [get_format(n) for n in args.names] if args.names else list(CATALOGUE.values())
    rows = [f.describe() for f in fmts]
    if args.json:
        print(json.dumps(jsonable(rows), indent=2, allow_nan=False))
        return 0
    cols = [
        "name",
        "bits",
        "exponent_bits",
        "mantissa_bits",
        "eps",
        "smallest_subnormal",
        "smallest_normal",
        "max",
        "overflow",
    ]
    table = [[r[c] if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in cols] for r in rows]
    heads = [
        "format",
        "bits",
        "exp",
        "mant",
        "eps",
        "smallest subnormal",
        "smallest normal",
        "max",
        "overflow",
    ]
    print(tabulate(table, headers=heads, tablefmt="github"))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from fpgrad.jsonutil import jsonable
    from fpgrad.present.explain import explain, render_explain

    result = explain(args.value, args.format or None, mode=args.mode, other=args.with_value)
    if args.json:
        print(json.dumps(jsonable(result), indent=2, allow_nan=False))
    else:
        print(render_explain(result))
    return 0


def _load_network(path: str):  # noqa: ANN202 - a Network; torch stays a deferred import
    """A fpgrad network file, or a model file (a torch state dict and its modules)."""
    from fpgrad.model.from_torch import load_any

    net = load_any(path)
    _warn_double_softmax(net)
    return net


def _warn_double_softmax(net: Any) -> None:
    """One line on stderr when the last layer is a softmax under cross_entropy."""
    from fpgrad.model.network import double_softmax_warning

    twice = double_softmax_warning(net)
    if twice:
        print(f"fpgrad: warning: {twice}", file=sys.stderr)


def _compare(args: argparse.Namespace) -> int:
    from fpgrad.present.report.outdir import check_out_dir

    out = check_out_dir(args.out) if args.out else None  # before any work or heavy import
    from fpgrad.diagnose.comparison import compare
    from fpgrad.graph.script import is_script, load_script
    from fpgrad.present.report.own import write_compare_report
    from fpgrad.reference.exact import DEFAULT_BITS

    verdicts = [v.strip() for v in args.verdict.split(",") if v.strip()] if args.verdict else None
    net = load_script(args.network) if is_script(args.network) else _load_network(args.network)
    result = compare(
        net,
        precisions=_with_policies(args.precisions, args.policy),
        loss_scale=args.loss_scale,
        exact_bits=DEFAULT_BITS if args.exact_bits is None else args.exact_bits,
        reference=args.reference,
        allow_uncertified=args.allow_uncertified,
        exact_max_bits=args.exact_max_bits,
    )
    result.source = args.network
    if out is not None:
        written = write_compare_report(result, out)
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    if args.json:
        result.write_json(sys.stdout)
    else:
        print(result.render(max_rows=args.max_rows or None, verdicts=verdicts, param=args.param))
    return 0


def _with_policies(precisions: str | None, policies: str | None) -> str | None:
    """--precisions plus the columns (runs) named by --policy; --policy alone: just those."""
    if not policies:
        return precisions
    if precisions is None:
        return policies
    return f"{precisions},{policies}"


def _policies(args: argparse.Namespace) -> int:
    from fpgrad.graph.script import is_script, load_script
    from fpgrad.model.policy import BUILTIN, require_policy

    if args.network and is_script(args.network):  # a captured model: precision per op
        from fpgrad.graph.policy import show_plans

        print(show_plans(load_script(args.network), args.names, args.json))
        return 0
    net = _load_network(args.network) if args.network else None
    known = {**BUILTIN, **(net.policies if net is not None else {})}
    names = args.names or list(known)
    for name in names:
        if name not in known:
            require_policy(name, net.policies if net is not None else None)  # raises
    if args.json:
        out = {n: known[n].to_dict() for n in names}
        if net is not None:
            for n in names:
                out[n]["plan"] = known[n].resolve(net).to_dict()
        print(json.dumps(out, indent=2))
        return 0
    from fpgrad.present.render import policy_table

    for n in names:
        pol = known[n]
        origin = "built-in" if n in BUILTIN else "network file"
        print(f"{n} ({origin}): {pol.describe()}")
    if net is not None:
        plans = {n: known[n].resolve(net).to_dict() for n in names}
        print()
        print(f"On {net.name}:")
        print(policy_table(plans, names))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fpgrad.present.report.outdir import check_out_dir

    if args.out:
        check_out_dir(args.out)  # before any work or heavy import: a bad path costs nothing
    from fpgrad.graph.script import is_script, load_script
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    if args.decoupled and not args.weight_decay:
        raise InputError("--decoupled decouples --weight-decay, which is 0 here: give "
                         "--weight-decay WD (AdamW: --optimizer adam --weight-decay 0.01 "
                         "--decoupled), or drop --decoupled")  # fmt: skip
    net = load_script(args.network) if is_script(args.network) else _load_network(args.network)
    cfg = OptimConfig(
        name=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        decoupled=args.decoupled,
    )
    result = train(
        net,
        steps=args.steps,
        cfg=cfg,
        runs=_with_policies(args.precisions, args.policy),
        batch_size=args.batch_size,
        seed=args.seed,
        exact_bits=args.exact_bits,
        verdict_every=args.verdict_every,
        progress=sys.stderr.isatty(),
        exact_method=args.exact_method,
        exact_max_bits=args.exact_max_bits,
    )
    if args.out:
        from fpgrad.present.report.own import write_train_report

        try:
            written = write_train_report(result, args.out)
        except OSError as exc:  # a full disk, or the directory taken away while training
            raise InputError(f"cannot write into --out {args.out!r}: {exc.strerror}") from None
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    print(result.to_json() if args.json else result.render())
    return 0


def _import(args: argparse.Namespace) -> int:
    from fpgrad.model.from_torch import load_model_file, write_network

    imported = load_model_file(args.model)
    _warn_double_softmax(imported.network)
    written = write_network(imported, args.out, data=args.data)
    net = imported.network
    print(
        f"wrote {', '.join(written)}: {len(net.layers)} layers "
        f"({', '.join(ly.kind for ly in net.layers)}), loss {net.loss.kind}, "
        f"{net.x.shape[0]} samples"
    )
    for note in imported.notes:
        print(f"note: {note}")
    return 0


def _advise(args: argparse.Namespace) -> int:
    from fpgrad.diagnose.advisor import advise
    from fpgrad.graph.script import is_script, load_script
    from fpgrad.present.report.own import check_out_dir, write_advise_report
    from fpgrad.reference.exact import DEFAULT_BITS

    out = check_out_dir(args.out) if args.out else None
    net = load_script(args.network) if is_script(args.network) else _load_network(args.network)
    exponents = None
    if args.exponents is not None:
        lo, sep, hi = args.exponents.partition("..")
        try:
            exponents = (int(lo), int(hi))
        except ValueError:
            raise InputError(
                f"--exponents {args.exponents!r}: write LO..HI, e.g. 0..24 (powers of two)"
            ) from None
        if not sep:
            raise InputError(f"--exponents {args.exponents!r}: write LO..HI, e.g. 0..24")
    result = advise(
        net,
        args.format,
        DEFAULT_BITS if args.exact_bits is None else args.exact_bits,
        policy=args.policy,
        scope="all" if args.signals else "gradients",
        headroom=args.headroom,
        exponents=exponents,
        measure=not args.no_measure,
        allow_uncertified=args.allow_uncertified,
        exact_max_bits=args.exact_max_bits,
    )
    if out is not None:
        print(f"wrote {', '.join(write_advise_report(result, out))}", file=sys.stderr)
    print(result.to_json() if args.json else result.render())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fpgrad.sweeps import grid_from_args, options_from_args, summary_line, sweep

    try:
        result = sweep(
            args.network,
            task=args.task,
            grid=grid_from_args(args),
            out_dir=args.out,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=sys.stderr.isatty(),
            restart=args.restart,
            max_cells=args.max_cells,
            **options_from_args(args),
        )
    except KeyboardInterrupt:
        print(
            f"fpgrad: sweep interrupted; finished cells are in {Path(args.out, 'cells.jsonl')}: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    for note in result.notes:  # damaged lines of cells.jsonl, skipped
        print(f"fpgrad: warning: {note}", file=sys.stderr)
    print(result.to_json() if args.json else result.render())
    print(summary_line(result), file=sys.stderr)
    return result.exit_code


def _report(args: argparse.Namespace) -> int:
    from fpgrad.scenarios.gallery import write_reports

    failures = write_reports(args.out, only=args.only)
    if failures:
        print(
            f"fpgrad: {len(failures)} scenario(s) failed: {', '.join(failures)} (see their reports)",
            file=sys.stderr,
        )
    return 1 if failures else 0


def _watch_report(args: argparse.Namespace) -> int:
    from fpgrad.watching.report import write_report

    dest = write_report(args.dir, args.out, args.tensorboard)
    print(f"wrote {dest / 'watch.md'} and {dest / 'watch.html'}")
    if args.tensorboard is not None:
        print(f"wrote TensorBoard scalars to {args.tensorboard}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from fpgrad import scenarios

    rows = []
    for name in scenarios.available():
        try:
            claim = scenarios.get(name).CLAIM
        except Exception as exc:  # noqa: BLE001 - list the others all the same
            claim = f"(cannot be loaded: {type(exc).__name__}: {exc})"
        rows.append([name, claim])
    print(tabulate(rows, headers=["scenario", "claim"], tablefmt="simple", maxcolwidths=[None, 80]))
    return 0


def _run(args: argparse.Namespace) -> int:
    from fpgrad import scenarios
    from fpgrad.present.report.outdir import check_out_dir

    module = scenarios.get(args.name)
    out = check_out_dir(args.out) if args.out else None
    result = module.run()
    if out is not None:  # the Markdown and the figures it links, side by side
        for fname, draw in result.figures.items():
            draw(out / fname)
        (out / f"{result.name}.md").write_text(result.markdown())
        written = [f"{result.name}.md", *result.figures]
        print(f"wrote {', '.join(str(out / n) for n in written)}", file=sys.stderr)
    print(
        json.dumps(result.to_dict(), indent=2, allow_nan=False) if args.json else result.markdown()
    )
    return 0



def _exact_max_bits_option(p: argparse.ArgumentParser) -> None:
    """``--exact-max-bits`` of compare, advise and train (the default is
    :data:`fpgrad.reference.exact.DEFAULT_MAX_BITS`, written out so that building the parser imports no
    numerics; tests/test_certificates.py keeps the two equal)."""
    p.add_argument(
        "--exact-max-bits",
        type=int,
        default=8192,
        help="cap of the exact reference's precision escalation (default 8192); values still "
        "unresolved there are reported undetermined",
    )

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fpgrad", description="A floating-point precision lab for gradient underflow."
    )
    parser.add_argument("--version", action="version", version=f"fpgrad {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("formats", help="the floating-point formats and their constants")
    p.add_argument("names", nargs="*", help="formats to show (default: the catalogue)")
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_formats)

    p = sub.add_parser("explain", help="how a value rounds into each format")
    p.add_argument("value", help="a number: 1e-8, 65520, 1+2**-11, 0x1.8p-3")
    p.add_argument(
        "--format",
        action="append",
        help="format to show (repeatable; default the four native ones)",
    )
    p.add_argument(
        "--mode",
        default="nearest_even",
        help="rounding mode: nearest_even (default), nearest_away, toward_zero, up, down, odd",
    )
    p.add_argument(
        "--with",
        dest="with_value",
        default=None,
        help="a second value b: what a + b (swamping) and a * b (underflow) give in each format",
    )
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_explain)

    p = sub.add_parser(
        "compare", help="gradients of a network in each precision against exact ones"
    )
    p.add_argument(
        "network",
        help="network file or model file (TOML), or path/to/script.py:build: a Python file "
        "whose build() returns (model, inputs, targets, loss); it is user code and runs as "
        "pytest runs test files (imported, its folder first on sys.path)",
    )
    p.add_argument(
        "--precisions",
        default=None,
        help="comma-separated (default float16,bfloat16,float32,float64)",
    )
    p.add_argument(
        "--exact-bits",
        type=int,
        default=None,
        help="starting precision of the certified exact reference (default 150: multi-word "
        "balls; above 150: Arb balls; raised while values are not certified, up to 8192 bits; "
        "at least 64)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="precision policies as extra columns, comma-separated: autocast, autocast_bf16, "
        "autocast_cpu, autocast_cpu_bf16 or a [policy.NAME] of the network file "
        "(alone: only those columns)",
    )
    p.add_argument(
        "--loss-scale",
        type=float,
        default=1.0,
        help="backpropagate S * loss (a power of two) and judge against S * exact",
    )
    p.add_argument(
        "--reference", default="original", choices=None, help="original (default) or rounded"
    )
    p.add_argument(
        "--allow-uncertified", action="store_true", help="accept fewer than 17 certified digits"
    )
    _exact_max_bits_option(p)
    p.add_argument(
        "--max-rows",
        type=int,
        default=60,
        help="gradient rows in the table, the rows that matter first (0: all; default 60)",
    )
    p.add_argument(
        "--verdict",
        default=None,
        help="element table: only rows with these verdicts in some precision (comma-separated: "
        "rounding_zero, inaccurate, ...)",
    )
    p.add_argument("--param", default=None, help="element table: only this parameter's rows")
    p.add_argument(
        "--out",
        default=None,
        help="directory for a report: compare.md, compare.html (plots inside), PNG plots, "
        "compare.json and the per-element arrays as gradients.npz",
    )
    p.add_argument("--json", action="store_true", help="strict JSON output (every element)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("train", help="train side by side in every precision and exactly")
    p.add_argument(
        "network", help="network file or model file (TOML), or a script path/to/model.py:build"
    )
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--optimizer", default="sgd", help="sgd (default) or adam")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD heavy-ball momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--decoupled", action="store_true", help="decoupled weight decay (AdamW style)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="mini-batch size (default: full batch)"
    )
    p.add_argument(
        "--precisions",
        default=None,
        help="runs, comma-separated: float16, bfloat16+master, float16+dynamic, float16+scale=1024, float16+sr, float16+kahan",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="precision policies as extra runs (autocast, autocast_bf16, ... or a "
        "[policy.NAME] of the network file; +dynamic etc. allowed); alone: only those runs",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of batch order and stochastic rounding"
    )
    p.add_argument(
        "--exact-bits", type=int, default=128, help="bits of the exact run (default 128)"
    )
    p.add_argument(
        "--exact-method",
        default="auto",
        choices=("auto", "fast", "arb", "mpmath"),
        help="exact run in multi-word balls (fast, up to 150 bits) or Arb balls at escalating "
        "precision (arb; mpmath is its old name); auto (default): fast when it certifies 17 "
        "digits, else arb",
    )
    _exact_max_bits_option(p)
    p.add_argument(
        "--verdict-every", type=int, default=None, help="steps between gradient verdicts and exact losses at the run's parameters"
    )
    p.add_argument("--out", default=None, help="directory for plots (PNG) and train.json")
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_train)

    p = sub.add_parser("policies", help="the precision policies and what each op computes in")
    p.add_argument("names", nargs="*", help="policies to show (default: all known)")
    p.add_argument(
        "--network", default=None, help="network file or script.py:build: its own policies and each plan on it"
    )
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_policies)

    p = sub.add_parser(
        "import", help="a torch model (model file: state dict + modules) as a fpgrad network file"
    )
    p.add_argument("model", help="model file (TOML with state_dict, modules, [loss], [data])")
    p.add_argument("--out", required=True, help="the fpgrad network file to write (TOML)")
    p.add_argument(
        "--data",
        default="auto",
        choices=("auto", "inline", "npy"),
        help="data inline, or as OUT.x.npy/OUT.y.npy beside it (auto: files above 4096 numbers)",
    )
    p.set_defaults(func=_import)

    p = sub.add_parser("advise", help="loss scales that keep every exact gradient in a format")
    p.add_argument("network", help="network file or model file (TOML)")
    p.add_argument(
        "--format",
        default=None,
        help="format to advise for (default float16, or the policy's narrowest format)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="advise for a precision policy (autocast, ... or a [policy.NAME]): judge the "
        "values it computes in the format, measure torch running it",
    )
    p.add_argument(
        "--signals",
        action="store_true",
        help="the safe range also keeps every backward signal from underflowing",
    )
    p.add_argument(
        "--headroom",
        type=int,
        default=3,
        help="binades kept below overflow by the recommended scale (default 3)",
    )
    p.add_argument(
        "--exponents", default=None, help="table rows as LO..HI powers of two (default: auto)"
    )
    p.add_argument(
        "--exact-bits", type=int, default=None, help="bits of the exact reference (default 150)"
    )
    p.add_argument(
        "--allow-uncertified", action="store_true", help="accept fewer than 17 certified digits"
    )
    _exact_max_bits_option(p)
    p.add_argument(
        "--no-measure",
        action="store_true",
        help="skip torch's backward at each scale and the dynamic scaler",
    )
    p.add_argument(
        "--out",
        default=None,
        help="directory for a report: advise.md, advise.html, lost_share.png, advise.json",
    )
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_advise)

    p = sub.add_parser(
        "sweep", help="a compare or training over a grid; a table and a plot of verdict counts"
    )
    from fpgrad.sweeps import add_arguments

    add_arguments(p)
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="write the gallery of scenario reports")
    p.add_argument("--out", default="reports", help="output directory (default reports)")
    p.add_argument(
        "--only", default=None, help="comma-separated scenario names (no index is written)"
    )
    p.set_defaults(func=_report)

    p = sub.add_parser("watch-report", help="Markdown + HTML report of a fpgrad.watch(..., out=DIR) directory")
    p.add_argument("dir", help="the out= directory of fpgrad.watching (holds records.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: DIR itself)")
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="TB",
        help="also write the per-module and per-parameter series as TensorBoard scalars into "
        "TB (needs pip install tensorboard)",
    )
    p.set_defaults(func=_watch_report)

    p = sub.add_parser("list", help="the scenarios of the gallery and their claims")
    p.set_defaults(func=_list)

    p = sub.add_parser("run", help="run one scenario and print its report")
    p.add_argument("name", help="scenario name (see fpgrad list)")
    p.add_argument(
        "--out", default=None, help="directory for NAME.md and the figures (PNG) it links"
    )
    p.add_argument("--json", action="store_true", help="strict JSON output")
    p.set_defaults(func=_run)
    return parser


def _version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fpgrad")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout without install
        return "(not installed)"


def _negative_values_last(argv: list[str]) -> list[str]:
    """``fpgrad explain -1e-8``: argparse reads -1e-8 as an option; pass it after ``--``."""
    if not argv or argv[0] != "explain" or "--" in argv:
        return argv
    for i, tok in enumerate(argv[1:], start=1):
        if (
            tok.startswith("-")
            and len(tok) > 1
            and (tok[1].isdigit() or tok[1] in ".(" or tok[1:4].lower() in ("inf", "nan", "0x"))
        ):
            return argv[:i] + argv[i + 1 :] + ["--", tok]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    with warnings.catch_warnings():  # library warnings would add lines to the one-line errors
        warnings.simplefilter("ignore")
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    from fpgrad.cli_guard import check_args, join_negative_values, one_line, stdout_closed

    try:
        parser = build_parser()
        args = parser.parse_args(
            join_negative_values(
                _negative_values_last(list(sys.argv[1:] if argv is None else argv))
            )
        )
        if args.command is None:
            parser.print_help()
            return 2
        check_args(args)
        for name in SWITCHES:  # a bad value fails before any work, whichever path reads it
            switch(name)
        return int(args.func(args))
    except InputError as exc:
        print(f"fpgrad: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "fpgrad: error: out of memory: the input asks for more than this machine holds; "
            "use smaller layers, less data or fewer --exact-bits (see docs/reference/bad-input.md)",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into exit 1
        if isinstance(exc, BrokenPipeError) and stdout_closed():  # e.g. piped into head
            from fpgrad.cli_guard import silence_stdout

            silence_stdout()
            return 0
        if os.environ.get("FPGRAD_DEBUG"):
            raise
        print(
            one_line(
                f"fpgrad: internal error: {type(exc).__name__}: {exc} "
                "(set FPGRAD_DEBUG=1 for a traceback)"
            ),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
