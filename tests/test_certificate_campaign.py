"""A fast, deterministic sample of issue 12's adversarial campaign (the full one:
``scripts/certificate_campaign.py``).

Hypothesis draws small networks at the extremes (:mod:`tests.oracle.generate`), derandomized so
every run draws the same ones; each goes through ``exact_trace(net, allow_uncertified=True)``
and every value is checked against the independent oracle (:mod:`tests.oracle.claims`): no
wrong certified value, no false exact zero, no enclosure that misses.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.oracle.claims import Tally, run_one
from tests.oracle.generate import REGIMES, networks

PER_REGIME = 6  # networks per regime: 48 in all, about 25 s


@pytest.mark.slow
@pytest.mark.parametrize("regime", REGIMES)
def test_campaign_sample(regime: str) -> None:
    total = Tally()

    @settings(
        max_examples=PER_REGIME,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(networks((regime,)))
    def one(net) -> None:  # noqa: ANN001
        total.add(run_one(net))

    one()
    assert total.networks == PER_REGIME
    assert total.values >= 5 * PER_REGIME
    assert total.oracle_unknown <= total.values // 100, total.line()  # the oracle is conclusive
    assert total.wrong == 0, total.line() + "\n" + "\n".join(total.failures[:10])


def test_oracle_catches_a_planted_error() -> None:
    """The checks can fail: a certified value moved by 1e-30 relative is caught."""
    import numpy as np

    from fpgrad.graph.layers import exact_trace
    from fpgrad.model.network import Layer, Loss, Network
    from tests.oracle.claims import check
    from tests.oracle.reference import oracle

    net = Network(
        (Layer("d0", "dense", {"weight": np.array([[0.75, -0.5]])}), Layer("t", "tanh")),
        Loss("mse"),
        np.array([[1.0, 2.0]]),
        np.array([[0.1]]),
    )
    result = exact_trace(net, allow_uncertified=True)
    ref = oracle(net)
    assert check(result, ref).wrong == 0
    key = "grads/d0.weight"
    value = ref.values[key][0, 0]
    ref.values[key][0, 0] = value * (1 + value.context.mpf(10) ** -30)
    tally = check(result, ref)
    assert tally.wrong_certified == 1, tally.line()
