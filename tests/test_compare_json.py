"""compare's streaming JSON, made column by column, is byte for byte what one ``json.dumps`` per
element wrote (the entries path), and bulk decimal strings are :func:`words_decimal`'s."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.jsonutil import jsonable
from fpgrad.model.netfile import load_network
from fpgrad.numbers.decimals import decimal_strings, words_decimal
from scripts.bench_scale import build_mlp
from tests.test_certificates import _relu_net

SHOWCASE = Path(__file__).resolve().parents[1] / "fpgrad/examples/showcase.toml"


def _old_write_json(c: Comparison, fp: io.StringIO, indent: int | None) -> None:
    """write_json as it was before the columnar lines: json.dumps of each entry dict."""
    text = json.dumps(jsonable(c._head()), indent=indent, allow_nan=False)
    fp.write(text[:-1].rstrip() + ",\n" if indent is not None else text[:-1] + ",")
    pad = " " * (indent or 0)
    fp.write(f'{pad}"gradients": [' + ("\n" if indent is not None else ""))
    sep = ",\n" if indent is not None else ","
    items = [
        json.dumps(jsonable(e), allow_nan=False)
        for g in c.grads
        for e in g.entries(np.arange(g.size), c.precisions, c.reference)
    ]
    fp.write(pad * 2 + (sep + pad * 2).join(items) if items else "")
    fp.write(("\n" + pad if indent is not None and items else "") + "],")
    tail = {"attribution": c.attribution, "notes": c.notes}
    rest = json.dumps(jsonable(tail), indent=indent, allow_nan=False)
    fp.write(("\n" if indent is not None else "") + rest[1:].lstrip("\n") + "\n")


CASES = {
    "showcase": lambda: compare(load_network(SHOWCASE), "float16,bfloat16,float32"),
    "rounded": lambda: compare(load_network(SHOWCASE), "float16,bfloat16", reference="rounded"),
    "scaled": lambda: compare(load_network(SHOWCASE), "float16", loss_scale=1024.0),
    "random": lambda: compare(build_mlp((20, 16, 8, 3), 12, seed=5), "float16,bfloat16,float32"),
    "undetermined": lambda: compare(
        _relu_net([1.0, 2.0**-1074, -1.0], [1.0, 2.0**-1074, 1.0]),
        "float16",
        exact_max_bits=256,
        allow_uncertified=True,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_json_is_the_entries_bytes(name: str) -> None:
    c = CASES[name]()
    for indent in (2, None):
        new, old = io.StringIO(), io.StringIO()
        c.write_json(new, indent=indent, chunk=7)  # chunks that split tensors
        _old_write_json(c, old, indent)
        assert new.getvalue() == old.getvalue()
    assert json.loads(new.getvalue()) == json.loads(json.dumps(c.to_dict()))
    if name == "random":  # non-finite values are written as strings
        assert '"inf"' in new.getvalue()


def test_bulk_decimal_strings_match_the_scalar_path() -> None:
    rng = np.random.default_rng(7)
    m = 3000
    hi = rng.standard_normal(m) * 10.0 ** rng.integers(-300, 300, m)
    lo = hi * rng.standard_normal(m) * 2.0**-54
    words = np.stack([hi, lo, lo * rng.standard_normal(m) * 2.0**-54])
    words[:, ::7] *= 2.0**-1000  # subnormal words
    words[1, ::5] = 0.0
    words[:, ::101] = 0.0
    # ties (half to even), carries to the next power of ten, integers, cancellation, 2^-1074
    special = [
        [1.25, 0, 0],
        [0.375, 0, 0],
        [35.0, 0, 0],
        [2.0**60, 1, 0],
        [9.5, 0, 0],
        [99.5, 0, 0],
        [0.95, 0, 0],
        [1.0, -1.0, 0],
        [0.0, 5e-324, 0],
        [-2.5e-300, 0, 0],
    ]
    words = np.concatenate([words, np.array(special, dtype=np.float64).T], axis=1)
    digits = rng.uniform(1, 45, words.shape[1])
    digits[::97] = np.inf
    digits[-len(special) :] = [2, 2, 1, 3, 1, 2, 1, 2, 3, 1]
    got = decimal_strings(words, digits)
    n = np.where(np.isinf(digits), 40, np.maximum(1, np.floor(digits))).astype(int)
    want = [words_decimal(c, int(k)) for c, k in zip(words.T.tolist(), n.tolist(), strict=True)]
    assert got == want
    assert got[-len(special) :] == [
        "1.2e+0",
        "3.8e-1",
        "4.e+1",
        "1.15e+18",
        "1.e+1",
        "1.0e+2",
        "9.e-1",
        "0",
        "4.94e-324",
        "-2.e-300",
    ]
