"""compare's large-model path: what the 5.8M benchmark found and the columnar shortcuts keep."""

from __future__ import annotations

from pathlib import Path

from fpgrad.diagnose.comparison import compare
from tests.test_certificates import _relu_net


def test_undetermined_gradients_have_no_magnitude() -> None:
    """Balls that still hold 0 (hi = 0, not proven zero) are neither zero nor non-zero: the
    per-parameter summary leaves them out of the magnitudes (log2(0) crashed render() on the
    5.8M MLP), the below-normal counts and the diagnosis's non-zero count."""
    tiny = 2.0**-1074
    net = _relu_net([1.0, tiny, -1.0], [1.0, tiny, 1.0])  # 1 + 2^-2148 - 1: undecided at 256
    c = compare(net, "float16", exact_max_bits=256, allow_uncertified=True)
    assert all(g.exact.undetermined_mask().all() for g in c.grads)
    for r in c.parameter_summary():
        assert r["exact_min"] is None and r["nonzero"] == 0 and r["below_normal"] == 0
    for place in c.attribution["float16"]["places"]:
        assert place["exact_subnormal_range"] == 0
    text = c.render()
    assert "| - .. -" in text and "every one of the 0 non-zero" in text


def test_advisor_values_cache_gives_the_same_advice() -> None:
    """compare's diagnosis shares the advisor's sorted magnitudes between float16 and
    bfloat16: the advice is the one each format gets on its own."""
    from fpgrad.diagnose.advisor import advise
    from fpgrad.graph.layers import exact_trace
    from fpgrad.model.netfile import load_network

    net = load_network(Path(__file__).resolve().parents[1] / "fpgrad/examples/showcase.toml")
    exact = exact_trace(net)
    cache: dict = {}
    for fmt in ("float16", "bfloat16", "float16"):
        shared = advise(net, fmt, measure=False, exact=exact, values_cache=cache)
        alone = advise(net, fmt, measure=False, exact=exact)
        assert shared.to_json() == alone.to_json()
    assert len(cache) == 2  # gradients and signals, built once for both formats
