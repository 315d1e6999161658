"""How well iMAML's conjugate-gradient solve does at a trained checkpoint, on real task batches.

    .venv/bin/python bench/imaml_cg_check.py runs/.../5w1s-imaml/checkpoint.pt \\
        --data-dir ../shared/data/omniglot [--batches 3] [--dampings 0 1]

For each of ``--batches`` meta-batches of the checkpoint's training split (split by alphabet, as
bench/algorithms.py trains): adapt with the checkpoint's proximal inner loop, then solve
((1 + δ) I + H/λ) x = ∇L_query(φ) with its ``cg_steps`` for each δ and print, per task, the
relative residual ‖b − A x‖/‖b‖, ‖x‖/‖b‖ and the cosine between x and b. Also prints the smallest
Rayleigh quotient of the support Hessian H found by a short power iteration on (c I − H): weak
evidence (few iterations) of whether A can be indefinite (an eigenvalue of H below −λ(1 + δ)).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POWER_ITERATIONS = 15
POWER_SHIFT = 100.0  # above H's largest eigenvalue, so c I − H's top eigenvector is H's lowest


def fmt(values: torch.Tensor) -> str:
    return " ".join(f"{v:.3f}" for v in values.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()

    from maml_ext.backend import final_weights
    from maml_ext.experiments import load_checkpoint
    from maml_ext.experiments.fewshot.checkpoint import read_checkpoint
    from maml_ext.experiments.fewshot.data import load_split, make_sampler
    from maml_ext.experiments.presets import FewShotPreset

    torch.set_num_threads(1)
    meta = load_checkpoint(args.checkpoint)
    preset = FewShotPreset.from_dict(read_checkpoint(args.checkpoint)["preset"])
    data = load_split(preset, args.data_dir, "train", split_by="alphabet")
    sampler = make_sampler(data, preset, preset.meta_batch, args.seed, "cpu")
    params, ops = meta._ops()
    for index in range(args.batches):
        batch = sampler.sample()
        sx, sy = batch.support_x, batch.support_y
        with torch.no_grad():
            theta = ops.flatten({name: p.detach() for name, p in params.items()})
            phi = final_weights(meta._proximal_descent(ops, theta, sx, sy, [meta.inner_steps]))
            _, b = ops.gradient(phi, batch.query_x, batch.query_y)
            print(f"batch {index} (λ = {meta.lam}, {meta.cg_steps} CG steps), per task:")
            for damping in args.dampings:
                meta.cg_damping = damping
                x = meta._conjugate_gradient(ops, phi, sx, sy, b)
                residual = b - meta._system_product(ops, phi, sx, sy, x)
                norm = b.norm(dim=1)
                cosine = (x * b).sum(1) / (x.norm(dim=1) * norm)
                print(f"  δ = {damping:g}: residual {fmt(residual.norm(dim=1) / norm)}")
                print(f"           |x|/|b| {fmt(x.norm(dim=1) / norm)}; cos(x, b) {fmt(cosine)}")
            v = torch.randn_like(b)
            for _ in range(POWER_ITERATIONS):
                v = v / v.norm(dim=1, keepdim=True)
                v = POWER_SHIFT * v - ops.hvp(phi, sx, sy, v)
            v = v / v.norm(dim=1, keepdim=True)
            rayleigh = (v * ops.hvp(phi, sx, sy, v)).sum(1)
            print(f"  smallest Rayleigh quotient of H found: {fmt(rayleigh)}")


if __name__ == "__main__":
    main()
