"""Held-out probe: small torch models people write (``scripts/heldout_models_a.py`` to ``_e``),
through ``fpgrad.from_module``.

For each model: (1) capture (or a one-line refusal), (2) native float32 and float64 columns
against torch's own eager autograd bit for bit, (3) the certified exact reference against torch
float64 (every gradient inside its ball plus 1e-9 times the largest loss or gradient
magnitude, float64's own error; zero claims listed with torch's values there;
certified digits >= 17), (4) ``fpgrad.compare(net, "float16,bfloat16,float32")`` with its
render, timed.

    PYTHONPATH=. python scripts/probe_heldout.py [NAME ...] [--part f] [--half] [--no-compare]
        [--json OUT]

``--part f`` probes the models of ``heldout_models_f.py`` only (``--part h``: those of
``heldout_models_h.py``); ``--half`` checks the native
float16 and bfloat16 columns bit for bit too.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import heldout_models_b  # noqa: F401  (registers part 2)
import heldout_models_c  # noqa: F401  (registers part 3)
import heldout_models_d  # noqa: F401  (registers part 4)
import heldout_models_e  # noqa: F401  (registers part 5)
import heldout_models_f  # noqa: F401  (registers part 6)
import heldout_models_h  # noqa: F401  (registers part 8)
import numpy as np
import torch
from heldout_checks import eager, native_checks
from heldout_models_a import MODELS

# ---------------------------------------------------------------- the checks


def probe(name: str, do_compare: bool, half: bool = False) -> dict[str, Any]:
    import fpgrad
    from fpgrad.graph.exact import exact_graph

    rec: dict[str, Any] = {"model": name}
    torch.manual_seed(0)
    m, inputs, targets, loss = MODELS[name]()
    t0 = time.perf_counter()
    try:
        net = fpgrad.from_module(m, inputs, targets, loss)
        rec["capture"] = "ok"
    except Exception as e:  # noqa: BLE001
        kind = type(e).__name__
        msg = str(e).splitlines()[0] if str(e) else kind
        rec["capture"] = f"refused: {msg}" if kind == "InputError" else f"CRASH {kind}: {msg}"
        if kind != "InputError":
            rec["trace"] = traceback.format_exc()
        rec["wall"] = time.perf_counter() - t0
        return rec
    # (2) native columns bit for bit
    dts = [("float32", torch.float32), ("float64", torch.float64)]
    if half:
        dts += [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
    native = native_checks(net, m, inputs, targets, loss, dts, rec, crash="CRASH ")
    rec["native"] = native
    # (3) exact
    try:
        ex = exact_graph(net.graph).result
        el, eg = eager(m, inputs, targets, loss, torch.float64)
        problems, zeros = [], {}
        pairs = [("loss", el)] + [(f"grads/{k}", g) for k, g in eg.items()]
        # float64's own error scales with the largest value it computes, not with a tensor
        # whose exact value is 0 (a structural zero: torch returns rounding noise there)
        scale = max(float(np.abs(r.detach().numpy()).max(initial=0.0)) for _, r in pairs)
        for key, ref in pairs:
            mid, rad = ex.enclosure(key)
            r = ref.detach().numpy().astype(np.float64).reshape(-1)
            mid_f = np.array([float(v) for v in np.asarray(mid, dtype=object).reshape(-1)])
            rad_f = np.asarray(rad, dtype=np.float64).reshape(-1)
            allow = 1e-9 * scale + 1e-300
            off = np.abs(r - mid_f) > rad_f + allow
            if off.any():
                i = int(np.argmax(off))
                problems.append(
                    f"{key}[{i}] torch {r[i]:.17g} mid {mid_f[i]:.17g} rad {rad_f[i]:.3g}"
                )
            z = np.asarray(ex.zero(key)).reshape(-1)
            if z.any():
                zeros[key] = (
                    int(z.sum()),
                    float(np.abs(r[z]).max()),
                    float(np.abs(r).max(initial=0.0)),
                )
        rec["exact"] = "ok" if not problems else "OUTSIDE: " + "; ".join(problems[:3])
        rec["digits"] = float(ex.certified_digits)
        rec["undetermined"] = int(ex.undetermined_count)
        rec["zeros"] = zeros
    except Exception as e:  # noqa: BLE001
        kind = type(e).__name__
        rec["exact"] = (
            f"{'refused' if kind == 'InputError' else 'CRASH ' + kind}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        rec["trace"] = traceback.format_exc()
    # (4) compare
    if do_compare:
        try:
            res = fpgrad.compare(net, "float16,bfloat16,float32")
            text = res.render(max_rows=4)
            rec["compare"] = f"ok ({len(text)} chars)"
        except Exception as e:  # noqa: BLE001
            kind = type(e).__name__
            rec["compare"] = (
                f"{'refused' if kind == 'InputError' else 'CRASH ' + kind}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            rec["trace"] = traceback.format_exc()
    rec["wall"] = time.perf_counter() - t0
    return rec


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:  # the options are read by hand: say them, run nothing
        print(__doc__)
        return 0
    do_compare = "--no-compare" not in argv
    out = None
    if "--json" in argv:
        out = argv[argv.index("--json") + 1]
        argv = [a for a in argv if a != out]
    half = "--half" in argv
    part = None
    if "--part" in argv:
        part = argv[argv.index("--part") + 1]
        argv = [a for a in argv if a != part]
    names = [a for a in argv if not a.startswith("--")] or [
        n for n in MODELS if part is None or MODELS[n].__module__ == f"heldout_models_{part}"
    ]
    torch.set_num_threads(1)
    rows = []
    for name in names:
        rec = probe(name, do_compare, half)
        rows.append(rec)
        flag = "  SLOW" if rec["wall"] > 60 else ""
        print(f"{name:24s} capture={rec['capture'][:110]}", flush=True)
        if "native" in rec:
            print(f"{'':24s} native={rec['native']} exact={rec.get('exact', '')[:200]} "
                  f"digits={rec.get('digits', float('nan')):.1f} und={rec.get('undetermined')} "
                  f"zeros={rec.get('zeros')} compare={rec.get('compare')} wall={rec['wall']:.1f}s{flag}",
                  flush=True)  # fmt: skip
        if "trace" in rec:
            print(rec["trace"], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
