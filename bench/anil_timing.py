"""ANIL's fused meta-step with and without the frozen body's features reused (issue 14).

Times, on one task batch of an Omniglot-sized conv net (4 blocks of 64 channels, 28x28, 5-way
1-shot, 15 query samples per class):
- maml: the plain meta-step (every parameter adapted), torch.ops.maml_ext.meta_step;
- anil_masked: ANIL as MAML's sweep with zero inner rates on the body (the same op);
- anil_frozen_body: torch.ops.maml_ext.frozen_body_meta_step (the body's features once per set).
Reports the minimum over repeats (seconds per meta-step) and checks that both ANIL paths agree.

    python bench/anil_timing.py [--tasks 8] [--steps 5] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import maml_ext
from maml_ext.backend import frozen_body_split
from maml_ext.program import compile_program, loss_code


def omniglot_net(ways: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--first-order", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ways, model = 5, omniglot_net(5).to(dtype)
    program = compile_program(model)
    head = frozenset(name for name, _ in model.named_parameters() if name.startswith("17."))
    split = frozen_body_split(program, head)
    assert split is not None
    theta = program.flatten(dict(model.named_parameters())).detach()
    sx = torch.randn(args.tasks, ways, 1, 28, 28, dtype=dtype)
    qx = torch.randn(args.tasks, ways * 15, 1, 28, 28, dtype=dtype)
    sy = torch.arange(ways).repeat(args.tasks, 1)
    qy = torch.arange(ways).repeat_interleave(15).repeat(args.tasks, 1)
    code = loss_code("cross_entropy")
    rates = torch.full((args.steps, theta.numel()), 0.4, dtype=dtype)
    masked = rates.clone()
    masked[:, : split.body_params] = 0
    head_rates = masked[:, split.body_params :].contiguous()

    def plain(table):
        return torch.ops.maml_ext.meta_step(
            theta,
            table,
            sx,
            sy,
            qx,
            qy,
            program.ints_list,
            program.floats_list,
            code,
            args.first_order,
            False,
        )

    def frozen():
        return torch.ops.maml_ext.frozen_body_meta_step(
            theta,
            head_rates,
            sx,
            sy,
            qx,
            qy,
            split.body_ints,
            split.body_floats,
            split.head_ints,
            split.head_floats,
            code,
            args.first_order,
            False,
        )

    a, b = plain(masked)[3], frozen()[3]
    error = float((a - b).norm() / a.norm())
    results = {
        "maml": best_of(args.repeats, lambda: plain(rates)),
        "anil_masked": best_of(args.repeats, lambda: plain(masked)),
        "anil_frozen_body": best_of(args.repeats, frozen),
    }
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, "
        f"T={args.tasks}, K={args.steps}, first_order={args.first_order}, "
        f"maml_ext {maml_ext.__file__}"
    )
    for name, seconds in results.items():
        print(f"{name:18s} {seconds * 1e3:9.1f} ms/meta-step")
    print(
        f"speed-up of the frozen body over masked ANIL: "
        f"{results['anil_masked'] / results['anil_frozen_body']:.1f}x; "
        f"relative difference of their meta-gradients: {error:.1e}"
    )


if __name__ == "__main__":
    main()
