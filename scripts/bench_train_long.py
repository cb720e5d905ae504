"""Long certified exact training (issue 14): how many steps the ball run keeps 17 digits.

Builds the README's digits example (scripts/digits_example.py: 64-32-10 ReLU classifier,
cross-entropy, 256 samples) in a temporary directory and runs the exact trajectory in ball
arithmetic (150 bits) with Adam, AdamW and SGD with momentum, batches of 64, up to ``--steps``
steps or until the balls stop vouching for 17 digits. Prints the certified digits of every
parameter every ``--every`` steps, the first step below 17 (where ``fpgrad train`` recomputes in
Arb balls), and the CPU time per step against one torch float64 training step (forward, backward,
torch.optim step) of the same model, one thread each, measured in the same run.
Usage: ``python scripts/bench_train_long.py [--steps 1000] [--every 25]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpgrad.from_torch import load_model_file  # noqa: E402
from fpgrad.network import Network  # noqa: E402
from fpgrad.optim import OptimConfig  # noqa: E402
from fpgrad.train import ExactRun, batch_schedule  # noqa: E402

OPTIMIZERS = {
    "adam": OptimConfig(name="adam", lr=1e-3),
    "adamw": OptimConfig(name="adam", lr=1e-3, weight_decay=0.01, decoupled=True),
    "sgd+momentum": OptimConfig(name="sgd", lr=0.1, momentum=0.9),
}
BATCH = 64


def torch_step_time(net: Network, cfg: OptimConfig, schedule: list[np.ndarray]) -> float:
    """Fastest CPU time of one torch float64 training step (dense/relu/tanh layers)."""
    layers: list[torch.nn.Module] = []
    for ly in net.layers:
        if ly.kind == "dense":
            lin = torch.nn.Linear(*ly.params["weight"].shape[::-1], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(ly.params["weight"]))
                lin.bias.copy_(torch.tensor(ly.params["bias"]))
            layers.append(lin)
        else:
            layers.append({"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[ly.kind]())
    model = torch.nn.Sequential(*layers)
    if cfg.name == "adam":
        cls = torch.optim.AdamW if cfg.decoupled else torch.optim.Adam
        opt: torch.optim.Optimizer = cls(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = torch.tensor(net.x), torch.tensor(net.y, dtype=torch.long)
    best = float("inf")
    for rows in schedule[:50]:
        t0 = time.process_time()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        best = min(best, time.process_time() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        script = ROOT / "scripts" / "digits_example.py"
        subprocess.run([sys.executable, str(script), "--out", tmp], check=True, capture_output=True)
        net = load_model_file(Path(tmp, "digits.toml")).network
    print(
        f"digits example ({net.name}: {net.x.shape[0]} samples), batches of {BATCH}, exact run in "
        f"balls at 150 bits; one thread; CPU times"
    )
    for name in args.optimizers.split(","):
        cfg = OPTIMIZERS[name]
        schedule = batch_schedule(net.x.shape[0], args.steps, BATCH, 0)
        t_torch = torch_step_time(net, cfg, schedule)
        run = ExactRun(net, cfg, 150, balls=True)
        run.record_initial()
        trail, below, spent = [], None, 0.0
        for t, rows in enumerate(schedule, start=1):
            t0 = time.process_time()
            run.step(rows)
            spent += time.process_time() - t0
            if run.failed():
                below = (t, "a value out of range or a ReLU branch undecided")
                break
            d = run.digits_now()
            if t % args.every == 0:
                trail.append(f"{t}: {d:.1f}")
            if d < 17:
                below = (t, f"{d:.1f} digits")
                break
        steps = len(run.history.loss)
        per = spent / max(steps, 1)
        print(f"\n{name} (lr {cfg.lr:g}): certified digits by step: {', '.join(trail)}")
        if below is None:
            print(f"  {steps} steps, >= 17 digits throughout")
        else:
            print(f"  below 17 digits at step {below[0]} ({below[1]}): train recomputes in Arb")
        lost = (run.digits_now() - run._cap()) / max(steps, 1)
        print(
            f"  {per * 1e3:.2f} ms per exact step vs torch float64 {t_torch * 1e3:.3f} ms "
            f"({per / t_torch:.0f}x); about {-lost:.2f} digits lost per step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
