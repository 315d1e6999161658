"""Time per meta-iteration of MAML-TRPO on 2D navigation, split into sampling, inner adaptation
and the TRPO step (meta-gradient + 10 CG iterations + line search), for maml_ext.rl's task-batched
implementation against an autograd reference written the way the common PyTorch
reimplementations do it: a Python loop over tasks, ``torch.distributions`` through
``functional_call``, and ``create_graph=True`` double-backward for every Fisher-vector product.

The batched implementation runs on both of its engines: ``torch`` (torch.func, kept graphs) and
``fused`` (the layer-program engine: ``MetaTRPO(engine="fused")``, maml_ext/rl/fused.py); sampling
is the same for both. All TRPO steps start from the same parameters on the same rollouts; the table
also gives the relative difference of the parameters they end at. One run of each (RL steps are
long).

    PYTHONPATH=. python bench/rl_step.py [--meta-batch 20 --rollouts 20 --horizon 100]
        [--device cuda]     # (bench/gpu_check.sh runs it on the GPU)
"""

import argparse
import copy
import os
import time

import torch
from torch.func import functional_call

from maml_ext.rl.fused import fused_adapt
from maml_ext.rl.metarl import MetaTRPO, TaskData, adapt, conjugate_gradient
from maml_ext.rl.navigation import Navigation2D
from maml_ext.rl.policy import GaussianPolicy
from maml_ext.rl.sampler import Rollouts, process_rollouts, sample_rollouts


def _params(policy, flat):
    out, offset = {}, 0
    for name, p in policy.ordered_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def _distribution(policy, flat, obs):
    return functional_call(policy, _params(policy, flat), (obs,))


@torch.no_grad()
def reference_sample(env, policy, params_per_task, tasks, rollouts, generator):
    """One task at a time (the reimplementations step a vector env of K episodes per task)."""
    parts = []
    for task in range(tasks.shape[0]):
        obs = env.reset(tasks[task : task + 1], rollouts)[0]
        record = {"observations": [], "actions": [], "rewards": [], "mask": []}
        alive = torch.ones(rollouts, dtype=torch.bool)
        for _ in range(env.horizon):
            action = _distribution(policy, params_per_task[task], obs).sample()
            next_obs, reward, done = env.step(action.unsqueeze(0))
            for key, value in zip(record, (obs, action, reward[0], alive)):
                record[key].append(value)
            alive = alive & ~done[0]
            obs = next_obs[0]
        parts.append({key: torch.stack(values, 1) for key, values in record.items()})
    stacked = {key: torch.stack([part[key] for part in parts]) for key in parts[0]}
    return process_rollouts(Rollouts(tasks=tasks, **stacked))


def _inner_loss(policy, flat, data, task):
    log_prob = _distribution(policy, flat, data.observations[task]).log_prob(data.actions[task])
    return -(log_prob.sum(-1) * data.advantages[task] * data.weights[task]).sum()


def _adapted(policy, theta, data, task, lr, create_graph):
    gradient = torch.autograd.grad(
        _inner_loss(policy, theta, data, task), theta, create_graph=create_graph
    )[0]
    return theta - lr * gradient


def reference_adapt(policy, theta, inner, lr):
    rows = []
    for task in range(inner.tasks):
        t = theta.clone().requires_grad_()
        rows.append(_adapted(policy, t, inner, task, lr, False).detach())
    return torch.stack(rows)


def reference_trpo_step(policy, theta, inner, outer, lr, max_kl=0.01):
    """The reimplementations' TRPO step: per-task loops, double backward for every FVP."""
    tasks = inner.tasks
    old = []
    for task in range(tasks):
        t = theta.clone().requires_grad_()
        adapted = _adapted(policy, t, inner, task, lr, False).detach()
        d = _distribution(policy, adapted, outer.observations[task])
        old.append(torch.distributions.Normal(d.loc.detach(), d.scale.detach()))

    def surrogate_and_kl(t, task, create_graph):
        adapted = _adapted(policy, t, inner, task, lr, create_graph)
        new = _distribution(policy, adapted, outer.observations[task])
        ratio = torch.exp(
            (new.log_prob(outer.actions[task]) - old[task].log_prob(outer.actions[task])).sum(-1)
        )
        surrogate = (ratio * outer.advantages[task] * outer.weights[task]).sum()
        kl = (torch.distributions.kl_divergence(old[task], new).sum(-1) * outer.weights[task]).sum()
        return surrogate, kl

    gradient = torch.zeros_like(theta)
    for task in range(tasks):
        t = theta.clone().requires_grad_()
        surrogate, _ = surrogate_and_kl(t, task, True)
        gradient += torch.autograd.grad(surrogate, t)[0] / tasks

    def fvp(v):
        total = torch.zeros_like(v)
        for task in range(tasks):
            t = theta.clone().requires_grad_()
            _, kl = surrogate_and_kl(t, task, True)
            kl_gradient = torch.autograd.grad(kl, t, create_graph=True)[0]
            total += torch.autograd.grad(kl_gradient @ v, t)[0] / tasks
        return total + 1e-5 * v

    direction = conjugate_gradient(fvp, gradient, 10)
    full_step = (2 * max_kl / float(direction @ fvp(direction))) ** 0.5 * direction

    def evaluate(t):
        values = [
            surrogate_and_kl(t.clone().requires_grad_(), task, False) for task in range(tasks)
        ]
        return (
            sum(float(s.detach()) for s, _ in values) / tasks,
            sum(float(k.detach()) for _, k in values) / tasks,
        )

    before, _ = evaluate(theta)
    for index in range(15):
        candidate = theta + 0.8**index * full_step
        surrogate, kl = evaluate(candidate)
        if surrogate > before and kl <= max_kl:
            return candidate.detach()
    return theta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-batch", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    env = Navigation2D(horizon=args.horizon, dtype=dtype, device=device)
    policy = GaussianPolicy(2, 2, dtype=dtype, device=device)
    learner = MetaTRPO(policy)
    layout, theta = learner.layout, learner.theta()
    tasks = env.sample_tasks(args.meta_batch, torch.Generator(device).manual_seed(args.seed))
    times = {}
    # CUDA runs asynchronously: a part's time ends when its kernels have.
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def clock(key, function):
        synchronize()
        start = time.perf_counter()
        value = function()
        synchronize()
        times[key] = time.perf_counter() - start
        return value

    # The batched iteration runs twice and the second is timed: torch.func's first call pays a
    # one-off set-up (seconds) that a training run pays once.
    def batched_iteration():
        generator = torch.Generator(device).manual_seed(args.seed + 1)

        def sample(params):
            return process_rollouts(
                sample_rollouts(env, layout, params, tasks, args.rollouts, generator)
            )

        inner = clock("batched sampling (inner)", lambda: sample(theta))
        inner_data = TaskData.of(inner)
        adapted = clock("batched inner adaptation", lambda: adapt(layout, theta, inner_data, 0.1))
        outer = clock("batched sampling (outer)", lambda: sample(adapted.detach()))
        batched_policy = copy.deepcopy(policy)
        batched = MetaTRPO(batched_policy)
        clock("batched TRPO step", lambda: batched.step(inner, outer))
        clock("fused inner adaptation", lambda: fused_adapt(layout, theta, inner_data, 0.1))
        fused_policy = copy.deepcopy(policy)
        fused = MetaTRPO(fused_policy, engine="fused")
        clock("fused TRPO step", lambda: fused.step(inner, outer))
        return inner_data, TaskData.of(outer), batched_policy, fused_policy

    for _ in range(2):
        inner_data, outer_data, batched_policy, fused_policy = batched_iteration()

    torch.manual_seed(args.seed + 2)
    clock(
        "reference sampling (inner)",
        lambda: reference_sample(
            env, policy, theta.expand(args.meta_batch, -1), tasks, args.rollouts, None
        ),
    )
    reference_adapted = clock(
        "reference inner adaptation", lambda: reference_adapt(policy, theta, inner_data, 0.1)
    )
    clock(
        "reference sampling (outer)",
        lambda: reference_sample(env, policy, reference_adapted, tasks, args.rollouts, None),
    )
    reference_theta = clock(
        "reference TRPO step",
        lambda: reference_trpo_step(policy, theta, inner_data, outer_data, 0.1),
    )

    def difference(other):
        return float(
            (other.flat_parameters() - reference_theta).norm() / (reference_theta - theta).norm()
        )

    print(
        f"MAML-TRPO, 2D navigation: meta-batch {args.meta_batch}, {args.rollouts} rollouts, "
        f"horizon {args.horizon}, {args.dtype}, "
        + (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} thread(s)"
        )
        + f", load average {os.getloadavg()[0]:.1f}"
    )
    # The fused engine samples as the torch one does (the same batched sampler).
    times["fused sampling (inner)"] = times["batched sampling (inner)"]
    times["fused sampling (outer)"] = times["batched sampling (outer)"]
    print(
        f"{'part':<28}{'torch (s)':>11}{'fused (s)':>11}{'reference (s)':>15}"
        f"{'torch speed-up':>16}{'fused speed-up':>16}"
    )
    parts = (
        ("sampling (inner + outer)", ("sampling (inner)", "sampling (outer)")),
        ("inner adaptation", ("inner adaptation",)),
        ("TRPO step", ("TRPO step",)),
        (
            "meta-iteration",
            ("sampling (inner)", "sampling (outer)", "inner adaptation", "TRPO step"),
        ),
    )
    for part, keys in parts:
        torch_s, fused_s, slow = (
            sum(times[f"{engine} {key}"] for key in keys)
            for engine in ("batched", "fused", "reference")
        )
        print(
            f"{part:<28}{torch_s:>11.3f}{fused_s:>11.3f}{slow:>15.3f}"
            f"{slow / torch_s:>15.1f}x{slow / fused_s:>15.1f}x"
        )
    print(
        "TRPO steps' parameter change, relative difference against the reference: torch "
        f"{difference(batched_policy):.1e}, fused {difference(fused_policy):.1e}"
    )


if __name__ == "__main__":
    main()
