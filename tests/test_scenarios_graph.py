"""Gallery scenarios on captured models (graph_attention_fp16, graph_norm_fp16): the facts
behind each computed verdict, and what ran natively."""

from __future__ import annotations

import json

from fpgrad.scenarios import graph_attention_fp16 as attention
from fpgrad.scenarios import graph_norm_fp16 as norm


def test_attention_softmax_overflow_and_the_fp32_softmax_policy() -> None:
    r = attention.run(small=True)
    cols = r.data["columns"]
    assert r.holds is True, r.verdict
    assert r.data["largest_score"] > r.data["score_limit"]
    assert cols["float16"]["first_nonfinite"] == "attn.softmax (aten.exp)"
    assert cols["float16"]["nan"] == cols["float16"]["gradients"] > 0
    assert cols["autocast_cpu"]["first_nonfinite"] == "attn.softmax (aten.exp)"
    for p in (attention.FIX, "autocast", "float32"):
        assert cols[p]["first_nonfinite"] is None and cols[p]["nan"] == 0, p
        assert cols[p]["ok"] == cols[p]["gradients"], p
    assert r.runs == {
        "exact": "exact", "float16": "native", "autocast_cpu": "policy",
        "autocast": "cuda_policy", attention.FIX: "policy", "float32": "native",
    }  # fmt: skip
    assert "no GPU ran" in r.markdown() and "the claim holds" in r.markdown()
    json.dumps(r.to_dict(), allow_nan=False)


def test_norm_overflow_zeroes_rows_and_the_fp32_norm_policy() -> None:
    r = norm.run(small=True)
    cols = r.data["columns"]
    assert r.holds is True, r.verdict
    assert r.data["largest_activation"] > 256 and r.data["rows_overflowing"] >= 1
    f16 = cols["float16"]
    assert f16["first_nonfinite"] == "norm (aten.pow)"
    assert f16["nan"] == f16["overflow"] == 0 and f16["wrong_sign"] > 0  # silent: finite, wrong
    assert cols["autocast_cpu"]["first_nonfinite"] == "norm (aten.pow)"
    for p in (norm.FIX, "autocast", "bfloat16", "float32"):
        assert cols[p]["first_nonfinite"] is None and cols[p]["wrong_sign"] == 0, p
    assert r.runs[norm.FIX] == "policy" and r.runs["autocast"] == "cuda_policy"
    assert r.runs["bfloat16"] == "native"
    json.dumps(r.to_dict(), allow_nan=False)
