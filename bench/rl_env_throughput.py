"""Environment steps per second of the batched MuJoCo environments (issue 12) against gymnasium.

For each environment, the same number of episodes (``--tasks × --rollouts``, MAML's 40 × 20 = 800
by default) is stepped with random actions by
- ``batched``: :mod:`maml_ext.rl.mujoco_envs` (one call per step for all episodes), at one thread
  and at ``--threads``;
- ``gymnasium SyncVectorEnv``: ``gymnasium.vector.SyncVectorEnv`` of the same gymnasium v5
  environments with MAML's reward weights (what the common reimplementations use);
- ``raw mj_step loop``: a Python loop of ``mujoco.mj_step(model, data, frame_skip)`` over one
  ``MjData`` per episode (no observations, no rewards): the simulation's own cost, a floor.
Rounds of ``--steps`` steps alternate between the implementations (so that a change of machine
load hits all of them); the table reports the best round of each. A second table compares one
gymnasium ``env.step`` with the raw ``mj_step`` it wraps, per call.

    python bench/rl_env_throughput.py [--envs halfcheetah-dir ant-dir] [--tasks 40]
        [--rollouts 20] [--steps 20] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from maml_ext.rl import make_env

GYMNASIUM = {
    "halfcheetah": ("HalfCheetah-v5", {"ctrl_cost_weight": 0.05}),
    "ant": (
        "Ant-v5",
        {"ctrl_cost_weight": 0.005, "contact_cost_weight": 5e-4, "healthy_reward": 0.05},
    ),
}


def _gymnasium_id(name: str):
    return GYMNASIUM[name.split("-")[0]]


def batched_round(env, tasks, rollouts, steps, generator):
    env.reset(tasks, rollouts, generator=generator)
    actions = [
        2 * torch.rand(len(tasks), rollouts, env.action_size, generator=generator) - 1
        for _ in range(steps)
    ]
    start = time.perf_counter()
    for action in actions:
        env.step(action)
    return time.perf_counter() - start


def vector_round(vector, count, action_size, steps, rng):
    vector.reset(seed=int(rng.integers(1 << 30)))
    actions = [rng.uniform(-1, 1, (count, action_size)) for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        vector.step(action)
    return time.perf_counter() - start


def raw_round(mujoco, model, datas, frame_skip, steps, rng):
    for data in datas:
        mujoco.mj_resetData(model, data)
        mujoco.mj_forward(model, data)
    controls = [rng.uniform(-1, 1, (len(datas), model.nu)) for _ in range(steps)]
    start = time.perf_counter()
    for control in controls:
        for data, row in zip(datas, control):
            data.ctrl[:] = row
            mujoco.mj_step(model, data, nstep=frame_skip)
    return time.perf_counter() - start


def per_call(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(gymnasium, mujoco, name: str, args):
    """The throughput rows of one environment, and gymnasium's per-call step costs."""
    gym_id, weights = _gymnasium_id(name)
    count = args.tasks * args.rollouts
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    thread_counts = sorted({1, args.threads})
    batched = {n: make_env(name, threads=n) for n in thread_counts}
    tasks = batched[thread_counts[0]].sample_tasks(args.tasks, generator)

    def make_one():
        return gymnasium.make(gym_id, **weights)

    vector = gymnasium.vector.SyncVectorEnv([make_one] * count)
    single = make_one()
    model = single.unwrapped.model
    frame_skip = single.unwrapped.frame_skip
    datas = [mujoco.MjData(model) for _ in range(count)]
    best: dict[str, float] = {}

    def keep(key: str, seconds: float) -> None:
        best[key] = min(best.get(key, float("inf")), seconds)

    for _ in range(args.rounds):
        for n, env in batched.items():
            key = f"batched, {n} thread{'s' if n > 1 else ''} ({env.stepper} stepper)"
            keep(key, batched_round(env, tasks, args.rollouts, args.steps, generator))
        keep("gymnasium SyncVectorEnv", vector_round(vector, count, model.nu, args.steps, rng))
        keep("raw mj_step loop", raw_round(mujoco, model, datas, frame_skip, args.steps, rng))
    vector.close()
    reference = best["gymnasium SyncVectorEnv"]
    rows = [(name, key, count * args.steps / s, reference / s) for key, s in best.items()]

    single.reset(seed=0)
    action = np.zeros(model.nu)
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    wrapped = per_call(lambda: single.step(action), 300)
    bare = per_call(lambda: single.unwrapped.step(action), 300)
    raw = per_call(lambda: mujoco.mj_step(model, data, nstep=frame_skip), 300)
    single.close()
    return rows, (gym_id, wrapped, bare, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["halfcheetah-dir", "ant-dir"])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    import gymnasium
    import mujoco

    count = args.tasks * args.rollouts
    print(
        f"{count} episodes ({args.tasks} tasks x {args.rollouts} rollouts), {args.steps} steps a "
        f"round, best of {args.rounds} rounds; {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start; mujoco "
        f"{mujoco.__version__}, gymnasium {gymnasium.__version__}"
    )
    rows = []
    per_step_rows = []
    for name in args.envs:
        env_rows, per_step = measure(gymnasium, mujoco, name, args)
        rows += env_rows
        per_step_rows.append(per_step)

    print(f"\n{'environment':<16} {'implementation':<38} {'env steps/s':>12} {'vs Sync':>8}")
    for name, key, rate, ratio in rows:
        print(f"{name:<16} {key:<38} {rate:>12,.0f} {ratio:>7.2f}x")
    print(
        f"\n{'gymnasium env':<16} {'env.step (wrapped)':>19} {'unwrapped.step':>15} "
        f"{'mj_step x frame_skip':>21} {'wrapped / raw':>14}"
    )
    for gym_id, wrapped, bare, raw in per_step_rows:
        print(
            f"{gym_id:<16} {wrapped * 1e6:>16.1f} us {bare * 1e6:>12.1f} us "
            f"{raw * 1e6:>18.1f} us {wrapped / raw:>13.2f}x"
        )
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
