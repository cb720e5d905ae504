"""Scenario cnn_digits_loss_scaling (small configuration): the facts behind its computed
verdict, and that its report says which runs were native torch and which exact."""

from __future__ import annotations

import json
from pathlib import Path

from fpgrad.scenarios import cnn_digits_loss_scaling as cnn


def test_cnn_float16_bits_are_lost_to_rounding_not_underflow(tmp_path: Path) -> None:
    r = cnn.run(small=True)
    d = r.data
    plain, scaled, master = cnn.RUNS
    assert d["certified_digits"]["trajectory"] >= 17 and d["exact_method"] == "fast"
    assert d["certified_digits"]["first_gradient"] >= 17
    assert 0 < d["below_float16_normal"] < d["elements"]
    lost = d["lost_bits_below_normal"]
    assert lost[plain] > d["below_float16_normal"] // 2  # float16 loses bits of most of them
    # neither loss scaling nor float32 gradients recover them: not an underflow loss
    assert min(lost[scaled], lost[master]) > lost[plain] // 10
    assert r.holds is False and "lost to rounding" in r.verdict
    swamp = d["swamped_percent"]  # what master weights do change: the update
    assert swamp[plain] > 50 and swamp[master] < 5
    assert d["distance"][master] < d["distance"][plain]
    assert r.runs == {
        cnn.PRETRAINING: "native",
        plain: "native",
        scaled: "native",
        master: "native",
        "exact": "exact",
    }
    md = r.markdown()
    assert r.verdict in md and "eager torch training of the module on this CPU" in md
    json.dumps(r.to_dict(), allow_nan=False)
    for name, draw in r.figures.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_weights_are_the_float32_pretraining() -> None:
    """The scenario starts from the shipped weights, which are pretrain()'s float32 Adam run up
    to the CPU kernels' order of summation (a few float32 ulps after 200 steps, not a different
    model); loading them is exact and needs no pickle."""
    import numpy as np

    model, x, y = cnn.pretrained()
    fresh = cnn.pretrain().state_dict()
    shipped = model.state_dict()
    assert shipped.keys() == fresh.keys() and x.shape == (cnn.BATCH, 1, 8, 8)
    with np.load(cnn.WEIGHTS, allow_pickle=False) as data:
        for k, v in shipped.items():
            assert np.array_equal(v.numpy(), data[k]) and v.dtype == fresh[k].dtype
            scale = float(fresh[k].abs().max())
            assert float((v - fresh[k]).abs().max()) <= 1e-3 * scale, k
