"""The README's "Watching your own training loop" example: the digits classifier
(64-32-10 MLP on scikit-learn's bundled 8x8 digits) trained with an ordinary loop in float16
under torch.autocast with a GradScaler and Adam, watched by fpgrad.watching.

    PYTHONPATH=. python scripts/watch_digits.py --out build/watch-digits
    fpgrad watch-report build/watch-digits

The GradScaler starts at scale 2^24 on purpose (the default 2^16 plus a few growth steps), so the
first steps overflow and are skipped: the report says which op produced the first inf.
Fixed seeds, one torch thread: the same records on every run on this machine.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import fpgrad


def main() -> None:
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/watch-digits", help="watch directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--no-scaler", action="store_true", help="no GradScaler (scale 1): gradients flush"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_all, y_all = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x_all))[:512]
    x = torch.tensor(x_all[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y_all[order], dtype=torch.long)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, enabled=not args.no_scaler)

    with fpgrad.watch(model, opt, scaler, out=args.out) as w:
        for step in range(args.steps):  # the user's loop, unchanged
            batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    steps = [r for r in w.records() if r["kind"] == "step"]
    print(
        f"{len(steps)} steps, {sum(bool(s['skipped']) for s in steps)} skipped, "
        f"final loss {float(loss.detach()):.4f}, final scale {scaler.get_scale():g}; "
        f"records in {args.out}/records.jsonl"
    )


if __name__ == "__main__":
    main()
