"""Write the gallery CNN's pretrained weights (fpgrad/scenarios/cnn_digits_pretrained.npz).

The scenario cnn_digits_loss_scaling starts from a small CNN after 200 float32 Adam steps on
scikit-learn's digits (:func:`fpgrad.scenarios.cnn_digits_loss_scaling.pretrain`). torch's CPU
kernels sum in an order that depends on the instruction set (AVX2, AVX-512), so those float32
weights differ in their last bits from one machine to another, and so would every count of the
report. The scenario therefore reads the weights from the shipped file; this script makes them
again on this machine and says whether they equal the shipped ones.

    python scripts/pretrain_cnn_digits.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.scenarios.cnn_digits_loss_scaling import WEIGHTS, pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"overwrite {WEIGHTS.name}")
    args = ap.parse_args()
    state = {k: v.detach().numpy() for k, v in pretrain().state_dict().items()}
    if WEIGHTS.is_file():
        with np.load(WEIGHTS, allow_pickle=False) as old:
            same = set(old.files) == set(state) and all(
                np.array_equal(old[k], state[k]) for k in state
            )
            worst = max(float(np.max(np.abs(old[k] - state[k]))) for k in state)
        print(
            f"{WEIGHTS.name}: {'equal bit for bit' if same else f'differs, max |diff| {worst:.3g}'}"
        )
    if args.write:
        np.savez(WEIGHTS, **state)
        print(f"wrote {WEIGHTS}")


if __name__ == "__main__":
    main()
