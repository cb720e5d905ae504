"""compare's large-model path: what the 5.8M benchmark found and the columnar shortcuts keep."""

from __future__ import annotations

from fpgrad.compare import compare
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
