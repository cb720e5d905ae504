"""Build the README's "bring your own model" example: a small classifier on scikit-learn's
bundled digits (8x8 images, 10 classes), trained briefly in float32 with torch, saved as a
state dict with a model file that fpgrad reads.

    python scripts/digits_example.py --out build/digits
    fpgrad compare build/digits/digits.toml --precisions float16,bfloat16,float32
    fpgrad advise build/digits/digits.toml
    fpgrad train build/digits/digits.toml --steps 20 --batch-size 64 --lr 0.1 \
        --precisions float16,float16+master,float16+master+scale=1024

Writes OUT/digits_mlp.pt (torch.save of the state dict), OUT/x.npy and OUT/y.npy (one batch of
training samples: pixels / 16, class indices) and OUT/digits.toml (the model file). Fixed seeds,
one torch thread: the same files on every run on this machine (float32 kernels may differ in the
last bit on other CPUs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

TRAIN = 512  # samples trained on
BATCH = 256  # samples of the analysis batch (the first BATCH training samples)
HIDDEN = 32
STEPS = 300
LR = 0.01

MODEL_FILE = """\
# fpgrad model file: the torch model in digits_mlp.pt, as nn.Sequential(Linear, ReLU, Linear)
name = "digits"
state_dict = "digits_mlp.pt"
modules = ["Linear(64, {hidden})", "ReLU()", "Linear({hidden}, 10)"]

[loss]
type = "cross_entropy"

[data]
x_file = "x.npy"
y_file = "y.npy"
"""


def main() -> None:
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/digits", help="output directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    x_all, y_all = load_digits(return_X_y=True)
    x_all = x_all / 16.0  # pixel values 0..16 -> k/16, exact
    order = np.random.default_rng(0).permutation(len(x_all))
    train, test = order[:TRAIN], order[TRAIN:]
    x = torch.tensor(x_all[train], dtype=torch.float32)
    y = torch.tensor(y_all[train], dtype=torch.int64)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_loss = float(loss_fn(model(x), y))
        xt = torch.tensor(x_all[test], dtype=torch.float32)
        accuracy = float((model(xt).argmax(1) == torch.tensor(y_all[test])).float().mean())

    torch.save(model.state_dict(), out / "digits_mlp.pt")
    np.save(out / "x.npy", x_all[train[:BATCH]])
    np.save(out / "y.npy", y_all[train[:BATCH]].astype(np.int64))
    (out / "digits.toml").write_text(MODEL_FILE.format(hidden=HIDDEN))
    print(
        f"trained a 64-{HIDDEN}-10 ReLU MLP on {TRAIN} digits for {STEPS} Adam steps (lr {LR}, float32): "
        f"train loss {train_loss:.4f}, test accuracy {accuracy:.3f} on {len(test)} digits"
    )
    print(
        f"wrote {out / 'digits_mlp.pt'}, {out / 'x.npy'} and {out / 'y.npy'} ({BATCH} samples), "
        f"{out / 'digits.toml'}"
    )


if __name__ == "__main__":
    main()
