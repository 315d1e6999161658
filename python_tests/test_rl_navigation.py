"""2D navigation, the linear feature baseline and the batched sampler (issue 12)."""

import math

import numpy as np
import pytest
import torch

from maml_ext.rl import make_env
from maml_ext.rl.baseline import baseline_features, fit_linear_baseline
from maml_ext.rl.navigation import Navigation2D
from maml_ext.rl.policy import GaussianPolicy
from maml_ext.rl.sampler import Rollouts, process_rollouts, sample_rollouts

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_registry_makes_navigation_and_unknown_names_list_the_known():
    env = make_env("navigation2d", horizon=7)
    assert isinstance(env, Navigation2D) and env.horizon == 7
    with pytest.raises(ValueError, match="known: navigation2d"):
        make_env("navigation3d")


def test_goals_are_uniform_in_the_square(seed):
    env = Navigation2D(dtype=torch.float64)
    goals = env.sample_tasks(4000, torch.Generator().manual_seed(seed))
    assert goals.shape == (4000, 2) and goals.dtype == torch.float64
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert abs(float(goals.mean())) < 0.02 and abs(float(goals.var()) - 1 / 12) < 0.01


def test_dynamics_reward_and_termination_by_hand():
    env = Navigation2D(dtype=torch.float64)
    goals = torch.tensor([[0.3, -0.2], [0.05, 0.0]], dtype=torch.float64)
    obs = env.reset(goals, rollouts=2)
    assert obs.shape == (2, 2, 2) and not obs.any()
    # Task 0: the first rollout's action is clipped to (0.1, -0.1); the second moves (0.05, 0.02).
    # Task 1: the first rollout lands 0.005 from the goal in x (done); the second overshoots.
    actions = torch.tensor(
        [[[0.5, -7.0], [0.05, 0.02]], [[0.045, 0.009], [0.2, 0.0]]], dtype=torch.float64
    )
    obs, rewards, done = env.step(actions)
    expected = torch.tensor(
        [[[0.1, -0.1], [0.05, 0.02]], [[0.045, 0.009], [0.1, 0.0]]], dtype=torch.float64
    )
    torch.testing.assert_close(obs, expected, rtol=0, atol=1e-15)
    hand = [
        [-math.hypot(0.2, 0.1), -math.hypot(0.25, 0.22)],
        [-math.hypot(0.005, 0.009), -0.05],
    ]
    torch.testing.assert_close(rewards, torch.tensor(hand, dtype=torch.float64), rtol=1e-14, atol=0)
    assert done.tolist() == [[False, False], [True, False]]
    # done stays set even when the point moves away again.
    obs, rewards, done = env.step(torch.full_like(actions, 0.1))
    assert done.tolist() == [[False, False], [True, False]]
    torch.testing.assert_close(obs[1, 0], torch.tensor([0.145, 0.109], dtype=torch.float64))


def test_action_scale_maps_policy_units_onto_the_bound_before_the_clip():
    # The authors' normalize wrapper: a policy action in [-1, 1] moves by up to the bound (0.1).
    env = Navigation2D(dtype=torch.float64, action_scale=0.1)
    env.reset(torch.tensor([[0.3, -0.2]], dtype=torch.float64), rollouts=2)
    obs, rewards, _ = env.step(torch.tensor([[[0.5, -7.0], [1.0, 0.2]]], dtype=torch.float64))
    expected = torch.tensor([[[0.05, -0.1], [0.1, 0.02]]], dtype=torch.float64)
    torch.testing.assert_close(obs, expected, rtol=0, atol=1e-15)
    hand = [[-math.hypot(0.25, 0.1), -math.hypot(0.2, 0.22)]]
    torch.testing.assert_close(rewards, torch.tensor(hand, dtype=torch.float64), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="action_scale: expected a positive factor"):
        Navigation2D(action_scale=0.0)


def test_oracle_reaches_the_goal_whatever_the_action_scale():
    from maml_ext.rl.evaluate import oracle_returns

    goals = torch.tensor([[0.3, -0.2], [-0.45, 0.05]], dtype=torch.float64)
    # Straight at the goal, 0.1 per coordinate per step: the distances after each step, by hand.
    expected = []
    for gx, gy in goals.tolist():
        x = y = total = 0.0
        while not (abs(x - gx) < 0.01 and abs(y - gy) < 0.01):
            x += max(-0.1, min(0.1, gx - x))
            y += max(-0.1, min(0.1, gy - y))
            total -= math.hypot(x - gx, y - gy)
        expected.append(total)
    for scale in (1.0, 0.1):
        env = Navigation2D(dtype=torch.float64, action_scale=scale)
        returns = oracle_returns(env, goals, rollouts=2)
        torch.testing.assert_close(returns, torch.tensor(expected, dtype=torch.float64))


def test_termination_needs_both_coordinates_within_tolerance():
    env = Navigation2D(dtype=torch.float64)
    env.reset(torch.tensor([[0.1, 0.1]], dtype=torch.float64), rollouts=3)
    moves = torch.tensor([[[0.1, 0.095], [0.1, 0.08], [0.0, 0.1]]], dtype=torch.float64)
    _, _, done = env.step(moves)
    assert done.tolist() == [[True, False, False]]


def test_environment_rejects_bad_shapes():
    env = Navigation2D()
    with pytest.raises(ValueError, match=r"tasks: expected goals of shape \[T, 2\]"):
        env.reset(torch.zeros(3), rollouts=2)
    env.reset(torch.zeros(3, 2), rollouts=2)
    with pytest.raises(ValueError, match=r"actions: expected shape \[3, 2, 2\]"):
        env.step(torch.zeros(3, 2, 3))


def test_baseline_matches_per_task_closed_form_least_squares(seed):
    generator = torch.Generator().manual_seed(seed)
    tasks, rollouts, horizon = 3, 4, 9
    obs = torch.randn(tasks, rollouts, horizon, 2, generator=generator, dtype=torch.float64) * 4
    returns = torch.randn(tasks, rollouts, horizon, generator=generator, dtype=torch.float64)
    lengths = torch.randint(3, horizon + 1, (tasks, rollouts), generator=generator)
    mask = torch.arange(horizon) < lengths.unsqueeze(-1)
    values = fit_linear_baseline(obs, returns, mask)
    for task in range(tasks):
        rows = []
        for rollout in range(rollouts):
            for step in range(int(lengths[task, rollout])):
                o = np.clip(obs[task, rollout, step].numpy(), -10, 10)
                t = step / 100.0
                rows.append(np.concatenate([o, o * o, [t, t * t, t**3, 1.0]]))
        x = np.array(rows)
        y = returns[task][mask[task]].numpy()
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
        np.testing.assert_allclose(values[task][mask[task]].numpy(), x @ w, rtol=1e-10, atol=1e-12)
        assert not values[task][~mask[task]].any()
    assert baseline_features(obs).shape == (tasks, rollouts, horizon, 8)


def test_baseline_raises_the_ridge_when_the_fit_fails():
    # All-zero features (every step padding) make X^T X zero: 1e-5 * I still factors, so the fit
    # succeeds with zero weights; a NaN return makes every try fail and names the task.
    obs = torch.zeros(2, 1, 3, 2, dtype=torch.float64)
    returns = torch.zeros(2, 1, 3, dtype=torch.float64)
    returns[1, 0, 0] = float("nan")
    mask = torch.ones(2, 1, 3, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        fit_linear_baseline(obs, returns, mask)


def _reference_advantages(batch, discount, lam):
    """Per task, per episode Python loops: returns, baseline by numpy lstsq, GAE, normalisation."""
    tasks, rollouts, horizon = batch.rewards.shape
    values = fit_linear_baseline(batch.observations, batch.returns, batch.mask).numpy()
    out = np.zeros((tasks, rollouts, horizon))
    returns = np.zeros((tasks, rollouts, horizon))
    for t in range(tasks):
        for k in range(rollouts):
            length = int(batch.mask[t, k].sum())
            r = batch.rewards[t, k, :length].numpy()
            v = values[t, k, :length]
            running, advantage = 0.0, 0.0
            for step in reversed(range(length)):
                running = r[step] + discount * running
                returns[t, k, step] = running
                next_v = v[step + 1] if step + 1 < length else 0.0
                advantage = r[step] + discount * next_v - v[step] + discount * lam * advantage
                out[t, k, step] = advantage
        valid = batch.mask[t].numpy()
        mean, std = out[t][valid].mean(), out[t][valid].std()
        out[t][valid] = (out[t][valid] - mean) / (std + 1e-8)
    return returns, out


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_advantages_match_a_per_episode_loop(seed, lam):
    generator = torch.Generator().manual_seed(seed)
    tasks, rollouts, horizon = 3, 5, 30
    lengths = torch.randint(1, horizon + 1, (tasks, rollouts), generator=generator)
    batch = Rollouts(
        tasks=torch.zeros(tasks, 2, dtype=torch.float64),
        observations=torch.randn(
            tasks, rollouts, horizon, 2, generator=generator, dtype=torch.float64
        ),
        actions=torch.randn(tasks, rollouts, horizon, 2, generator=generator, dtype=torch.float64),
        rewards=torch.randn(tasks, rollouts, horizon, generator=generator, dtype=torch.float64),
        mask=torch.arange(horizon) < lengths.unsqueeze(-1),
    )
    processed = process_rollouts(batch, discount=0.99, gae_lambda=lam)
    returns, advantages = _reference_advantages(processed, 0.99, lam)
    valid = batch.mask.numpy()
    np.testing.assert_allclose(
        processed.returns.numpy()[valid], returns[valid], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(processed.advantages.numpy(), advantages, rtol=1e-8, atol=1e-9)
    assert not processed.advantages[~batch.mask].any()


def test_sampler_shapes_and_prefix_masks(seed):
    generator = torch.Generator().manual_seed(seed)
    env = Navigation2D(horizon=30, dtype=torch.float64)
    policy = GaussianPolicy(2, 2, hidden=(16, 16), init_std=0.3, dtype=torch.float64)
    tasks = env.sample_tasks(3, generator)
    params = policy.flat_parameters().expand(3, -1)
    batch = sample_rollouts(env, policy.layout(), params, tasks, 5, generator)
    assert batch.observations.shape == (3, 5, 30, 2) and batch.actions.shape == (3, 5, 30, 2)
    assert batch.mask.shape == (3, 5, 30) and batch.mask[..., 0].all()
    assert (batch.mask[..., 1:] <= batch.mask[..., :-1]).all()
    # Rewards are those of the positions the next observations show, on the steps that happened
    # (both steps valid); padding after an episode's end is zero in every field.
    offsets = batch.observations[..., 1:, :] - tasks[:, None, None]
    distance = torch.linalg.vector_norm(offsets, dim=-1)
    both = batch.mask[..., 1:]
    torch.testing.assert_close(batch.rewards[..., :-1][both], -distance[both])
    padding = ~batch.mask
    assert (batch.rewards[padding] == 0).all() and (batch.observations[padding] == 0).all()


def test_episodes_end_early_and_stay_masked(seed):
    env = Navigation2D(horizon=40, dtype=torch.float64)
    goals = torch.tensor([[0.2, -0.15]], dtype=torch.float64)
    policy = GaussianPolicy(2, 2, hidden=(4,), dtype=torch.float64)
    layout = policy.layout()
    params = torch.zeros(layout.size, dtype=torch.float64)
    # mean = the last layer's bias; std = exp(-30): deterministic in effect.
    params[-4:-2] = torch.tensor([0.1, -0.06], dtype=torch.float64)
    params[-2:] = -30.0
    batch = sample_rollouts(env, layout, params, goals, 2, torch.Generator().manual_seed(seed))
    assert batch.mask.all()  # (0.1, -0.06) steps never come within 0.01 of the goal
    params[-4:-2] = torch.tensor([0.1, -0.075], dtype=torch.float64)
    batch = sample_rollouts(env, layout, params, goals, 2, torch.Generator().manual_seed(seed))
    assert batch.mask.sum(-1).tolist() == [[2, 2]]  # there after two steps
    expected = torch.full((1, 2), -math.hypot(0.1, 0.075), dtype=torch.float64)
    torch.testing.assert_close(batch.episode_returns, expected, rtol=1e-12, atol=1e-12)


class _NaNAfter(Navigation2D):
    """Navigation whose observation of task 1, rollout 2 turns NaN at step 4 (an unstable
    simulator)."""

    def reset(self, tasks, rollouts):
        self._count = 0
        return super().reset(tasks, rollouts)

    def step(self, actions):
        obs, rewards, done = super().step(actions)
        self._count += 1
        if self._count == 4:
            obs = obs.clone()
            obs[1, 2, 0] = float("nan")
        return obs, rewards, done


def test_nan_observation_names_task_rollout_and_step(seed):
    env = _NaNAfter(horizon=10)
    policy = GaussianPolicy(2, 2, hidden=(8,))
    tasks = env.sample_tasks(3, torch.Generator().manual_seed(seed))
    with pytest.raises(FloatingPointError, match="observation in task 1, rollout 2, step 4"):
        sample_rollouts(env, policy.layout(), policy.flat_parameters(), tasks, 3)


def test_nan_reward_is_reported_before_advantages(seed):
    batch = Rollouts(
        tasks=torch.zeros(2, 2),
        observations=torch.zeros(2, 1, 4, 2),
        actions=torch.zeros(2, 1, 4, 2),
        rewards=torch.zeros(2, 1, 4),
        mask=torch.ones(2, 1, 4, dtype=torch.bool),
    )
    batch.rewards[0, 0, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="reward in task 0, rollout 0, step 2"):
        process_rollouts(batch)
    batch.mask[0, 0, 2:] = False  # padding is never checked (nor used)
    assert torch.isfinite(process_rollouts(batch).advantages).all()


def test_sampler_rejects_parameters_of_the_wrong_shape():
    env = Navigation2D(horizon=5)
    policy = GaussianPolicy(2, 2, hidden=(8,))
    with pytest.raises(ValueError, match=r"params: expected \[T=3"):
        sample_rollouts(
            env, policy.layout(), torch.zeros(2, policy.layout().size), torch.zeros(3, 2), 2
        )
