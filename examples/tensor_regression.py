"""Few-shot regression from tensors you already have: maml_ext.tasks.TensorTasks.

The data: 400 "devices", each with its own response curve y = a x^2 + b x + c (a, b, c drawn per
device) measured at 40 random points with noise, as one table: x [16000, 1], y [16000] and a
device id per row. Nothing else is needed: TensorTasks draws meta-batches of devices, each split
into 5 support and 15 query measurements. MAML meta-trains an MLP on 300 devices; on the 100 held
out, a few SGD steps on 5 measurements fit a new device's curve.

    python examples/tensor_regression.py [--iterations 3000] [--out tensor_regression.png]

Prints the query MSE on the held-out devices after 0, 1, 5 and 10 inner steps (MAML's
initialisation against the same network freshly initialised), and draws three held-out devices.
"""

import argparse

import torch
from torch import nn

import maml_ext
from maml_ext._optional import require
from maml_ext.tasks import TensorTasks

DEVICES, PER_DEVICE, TRAIN_DEVICES = 400, 40, 300
SHOTS, QUERIES = 5, 15


def make_table(generator):
    """One row per measurement: x [S, 1], y [S], device id [S]."""
    a, b, c = (torch.rand(3, DEVICES, generator=generator) * 2 - 1).unbind()
    device = torch.arange(DEVICES).repeat_interleave(PER_DEVICE)
    x = torch.rand(DEVICES * PER_DEVICE, 1, generator=generator) * 4 - 2
    noise = 0.05 * torch.randn(DEVICES * PER_DEVICE, generator=generator)
    y = a[device] * x[:, 0] ** 2 + b[device] * x[:, 0] + c[device] + noise
    return x, y, device, (a, b, c)


def mlp():
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def query_mse(meta, batch, steps):
    with torch.no_grad():
        if steps == 0:
            predicted = meta.model(batch.query_x)
        else:
            predicted = meta.predict(
                meta.adapt(batch.support_x, batch.support_y, steps=steps), batch.query_x
            )
    return float(((predicted - batch.query_y) ** 2).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--out", default="tensor_regression.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y, device, (a, b, c) = make_table(torch.Generator().manual_seed(0))
    train_rows = device < TRAIN_DEVICES
    train = TensorTasks(
        x[train_rows],
        y[train_rows],
        task=device[train_rows],
        shots=SHOTS,
        queries=QUERIES,
        meta_batch=25,
        seed=1,
    )
    held_out = ~train_rows
    test = TensorTasks(
        x[held_out],
        y[held_out],
        task=device[held_out],
        shots=SHOTS,
        queries=QUERIES,
        meta_batch=100,
        seed=2,
    ).sample()

    model = mlp()
    meta = maml_ext.MetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        inner_lr=0.05,
        inner_steps=1,
        loss="mse",
    )
    for iteration in range(1, args.iterations + 1):
        batch = train.sample()
        result = meta.step(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if iteration % 1000 == 0:
            print(f"iteration {iteration}: query MSE after 1 step {float(result.query_loss):.4f}")

    fresh = maml_ext.MetaOptimizer(mlp(), None, inner_lr=0.05, loss="mse")
    print(
        f"query MSE on the {DEVICES - TRAIN_DEVICES} held-out "
        f"devices, {SHOTS} support points each, after k steps of 0.05:"
    )
    print("k   MAML     fresh init")
    for steps in (0, 1, 5, 10):
        maml, baseline = query_mse(meta, test, steps), query_mse(fresh, test, steps)
        print(f"{steps:<3} {maml:.4f}   {baseline:.4f}")

    plt = require("matplotlib.pyplot", "the example's figure")
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    grid = torch.linspace(-2, 2, 100)[:, None]
    for axis, t in zip(axes, range(3)):
        d = int(test.classes[t, 0])
        axis.plot(grid, a[d] * grid**2 + b[d] * grid + c[d], "k", label="true curve")
        axis.plot(
            test.support_x[t, :, 0],
            test.support_y[t, :, 0],
            "o",
            color="C3",
            label=f"{SHOTS} support points",
        )
        sx, sy = test.support_x[t : t + 1], test.support_y[t : t + 1]
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            with torch.no_grad():
                if steps == 0:
                    curve = meta.model(grid)
                else:
                    curve = meta.predict(meta.adapt(sx, sy, steps=steps), grid[None])[0]
            axis.plot(grid, curve, style, color="C0", label=f"MAML, {steps} steps")
        axis.set_title(f"held-out device {d}")
        axis.set_xlabel("x")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
