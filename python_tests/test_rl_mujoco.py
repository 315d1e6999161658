"""The batched MuJoCo locomotion environments (maml_ext.rl.mujoco_envs) against gymnasium itself.

Every episode of a batch starts from the state the batch drew, is replayed in its own
``gymnasium.make("HalfCheetah-v5" / "Ant-v5")`` from the same state with the same actions, and
must give the same observations and termination, and the reward MAML's formula gives from
gymnasium's own velocity and cost terms. The MuJoCo tests need the ``rl`` extra: outside CI they
are skipped without it, in CI (``CI`` set) its absence fails them.
"""

import importlib
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from maml_ext import MissingExtraError
from maml_ext.rl import ENVIRONMENTS, make_env

MUJOCO_ENVIRONMENTS = ("halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir")
GYMNASIUM_ID = {"halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}
# MAML's weights as gymnasium's constructor arguments (the forward weight is the task's, below).
GYMNASIUM_WEIGHTS = {
    "halfcheetah": {"ctrl_cost_weight": 0.05},
    "ant": {"ctrl_cost_weight": 0.005, "contact_cost_weight": 5e-4, "healthy_reward": 0.05},
}


@pytest.fixture(autouse=True)
def _in_a_scratch_directory(tmp_path, monkeypatch):
    # MuJoCo appends its warnings (gymnasium's cheetah model compiles with one; the unstable
    # simulation below raises some) to MUJOCO_LOG.TXT in the working directory.
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def rl_extra():
    """gymnasium, or a skip (a failure in CI) naming the missing extra."""
    missing = []
    for name in ("gymnasium", "mujoco"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        message = (
            f"the 'rl' extra is not installed (missing: {', '.join(missing)}); "
            'pip install ".[rl]"'
        )
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it with the test extra, so this is a set-up bug")
        pytest.skip(message)
    import gymnasium

    return gymnasium


def _body(name: str) -> str:
    return name.split("-")[0]


def _gymnasium_episodes(gymnasium, name, tasks, state):
    """One unwrapped gymnasium environment per episode, set to that episode's initial state."""
    episodes = []
    T, K = state["qpos"].shape[:2]
    for t in range(T):
        task = float(tasks[t, 0])
        weights = dict(GYMNASIUM_WEIGHTS[_body(name)])
        if name.endswith("-dir"):
            weights["forward_reward_weight"] = task
        for k in range(K):
            env = gymnasium.make(GYMNASIUM_ID[_body(name)], **weights).unwrapped
            env.reset(seed=1000 * t + k)
            env.set_state(state["qpos"][t, k].numpy(), state["qvel"][t, k].numpy())
            episodes.append((t, k, task, env))
    return episodes


def _maml_reward(name, task, reward, info):
    """MAML's reward from gymnasium's terms: the direction tasks are gymnasium's own reward (the
    direction is its forward weight); the velocity tasks replace the forward term."""
    if name.endswith("-dir"):
        return reward
    costs = info["reward_ctrl"] + info.get("reward_contact", 0.0) + info.get("reward_survive", 0.0)
    return -abs(info["x_velocity"] - task) + costs


def _run_against_gymnasium(gymnasium, env, name, tasks, rollouts, steps, generator):
    observations = env.reset(tasks, rollouts, generator=generator)
    episodes = _gymnasium_episodes(gymnasium, name, tasks, env.physics_state())
    for t, k, _, reference in episodes:
        torch.testing.assert_close(
            observations[t, k], torch.from_numpy(reference._get_obs()), rtol=1e-12, atol=1e-12
        )
    ended = torch.zeros(tasks.shape[0], rollouts, dtype=torch.bool)
    frozen = observations.clone()
    for _ in range(steps):
        # Some actions beyond the actuators' range [-1, 1]: both sides get them clipped.
        shape = (*observations.shape[:2], env.action_size)
        actions = 2.6 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.3
        observations, rewards, done = env.step(actions)
        for t, k, task, reference in episodes:
            if ended[t, k]:
                # Masked: not simulated any more, frozen observation, no reward, done kept.
                assert done[t, k] and rewards[t, k] == 0
                assert torch.equal(observations[t, k], frozen[t, k])
                continue
            clipped = actions[t, k].clamp(-1.0, 1.0).numpy()
            observation, reward, terminated, _, info = reference.step(clipped)
            torch.testing.assert_close(
                observations[t, k], torch.from_numpy(observation), rtol=1e-12, atol=1e-12
            )
            expected = _maml_reward(name, task, reward, info)
            assert rewards[t, k].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
            assert bool(done[t, k]) == terminated
        ended = done.clone()
        frozen = observations.clone()
    return ended


@pytest.mark.parametrize(
    "name, stepper",
    [
        ("halfcheetah-vel", "batch"),
        ("halfcheetah-vel", "loop"),
        ("halfcheetah-dir", "batch"),
        ("ant-vel", "loop"),
        ("ant-dir", "loop"),
    ],
)
def test_trajectories_match_gymnasium(rl_extra, name, stepper):
    if stepper == "batch" and importlib.util.find_spec("mujoco.batch") is None:
        pytest.skip("this mujoco has no mujoco.batch (4.x); the loop stepper is tested instead")
    generator = torch.Generator().manual_seed(12)
    env = make_env(name, horizon=40, dtype=torch.float64, stepper=stepper, threads=2)
    assert env.stepper == stepper
    tasks = env.sample_tasks(3, generator)
    if name.endswith("-dir"):
        tasks = torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)  # both directions
    ended = _run_against_gymnasium(rl_extra, env, name, tasks, 2, 40, generator)
    if name.startswith("ant"):
        # With these actions some ants leave the healthy height range: termination is exercised.
        assert ended.any()
    else:
        assert not ended.any()


def test_ant_termination_is_masked_not_reset(rl_extra):
    env = make_env("ant-dir", horizon=20, dtype=torch.float64)
    tasks = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    env.reset(tasks, 3, generator=generator)
    state = env.physics_state()
    # Episode (1, 2) starts just below the healthy ceiling (torso height 1.0), rising fast: it
    # ends at its first step.
    state["qpos"][1, 2, 2] = 0.99
    state["qvel"][1, 2, 2] = 5.0
    env.set_physics_state(state["qpos"], state["qvel"])
    episodes = _gymnasium_episodes(rl_extra, "ant-dir", tasks, env.physics_state())
    zeros = torch.zeros(2, 3, env.action_size, dtype=torch.float64)
    observations, rewards, done = env.step(zeros)
    assert done.tolist() == [[False, False, False], [False, False, True]]
    for t, k, _, reference in episodes:
        observation, reward, terminated, _, _ = reference.step(np.zeros(env.action_size))
        assert terminated == bool(done[t, k])
        torch.testing.assert_close(observations[t, k], torch.from_numpy(observation))
        assert rewards[t, k].item() == pytest.approx(reward, rel=1e-10, abs=1e-12)
    ended_at = observations[1, 2].clone()
    ended_state = env.physics_state()["qpos"][1, 2].clone()
    for _ in range(3):
        observations, rewards, done = env.step(zeros)
    assert done[1, 2] and done.sum() == 1
    assert rewards[1, 2] == 0 and torch.equal(observations[1, 2], ended_at)
    assert torch.equal(env.physics_state()["qpos"][1, 2], ended_state)  # not reset, not stepped
    assert (rewards[~done] != 0).all()


@pytest.mark.parametrize("name, stepper", [("halfcheetah-dir", "batch"), ("ant-vel", "loop")])
def test_thread_count_does_not_change_trajectories(rl_extra, name, stepper):
    if stepper == "batch" and importlib.util.find_spec("mujoco.batch") is None:
        pytest.skip("this mujoco has no mujoco.batch")
    runs = []
    for threads in (1, 3):
        env = make_env(name, dtype=torch.float64, stepper=stepper, threads=threads)
        generator = torch.Generator().manual_seed(5)
        observations = [env.reset(env.sample_tasks(4, generator), 5, generator=generator)]
        for _ in range(5):
            actions = torch.randn(4, 5, env.action_size, generator=generator, dtype=torch.float64)
            observations.append(env.step(actions)[0])
        runs.append(torch.stack(observations))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("stepper", ["batch", "loop"])
def test_an_unstable_simulation_reports_nan_and_stops(rl_extra, stepper):
    if stepper == "batch" and importlib.util.find_spec("mujoco.batch") is None:
        pytest.skip("this mujoco has no mujoco.batch")
    env = make_env("halfcheetah-vel", dtype=torch.float64, stepper=stepper, threads=1)
    tasks = torch.tensor([[0.5], [1.5]], dtype=torch.float64)
    env.reset(tasks, 2, generator=torch.Generator().manual_seed(0))
    state = env.physics_state()
    state["qvel"][0, 1, 3] = 1e11  # past MuJoCo's bound on velocities: it would reset the sim
    env.set_physics_state(state["qpos"], state["qvel"])
    actions = torch.zeros(2, 2, env.action_size, dtype=torch.float64)
    for _ in range(2):
        observations, rewards, done = env.step(actions)
        assert torch.isnan(observations[0, 1]).all() and torch.isnan(rewards[0, 1])
        unaffected = torch.ones(2, 2, dtype=torch.bool)
        unaffected[0, 1] = False
        assert torch.isfinite(observations[unaffected]).all()
        assert torch.isfinite(rewards[unaffected]).all() and not done.any()


@pytest.mark.parametrize("name", MUJOCO_ENVIRONMENTS)
def test_task_sampling_shapes_and_dtypes(rl_extra, name):
    env = make_env(name)
    assert env.name == name and env.horizon == 200
    size = {"halfcheetah": (17, 6), "ant": (105, 8)}[_body(name)]
    assert (env.observation_size, env.action_size, env.task_size) == (*size, 1)
    tasks = env.sample_tasks(4000, torch.Generator().manual_seed(1))
    again = env.sample_tasks(4000, torch.Generator().manual_seed(1))
    assert torch.equal(tasks, again) and tasks.shape == (4000, 1) and tasks.dtype == torch.float32
    if name.endswith("-dir"):
        assert set(tasks.flatten().tolist()) == {-1.0, 1.0}
        # P(+1) = 1/2: the standard error of the fraction is 0.008 at 4000 draws.
        assert abs((tasks > 0).double().mean().item() - 0.5) < 0.04
    else:
        high = 2.0 if name.startswith("halfcheetah") else 3.0
        assert tasks.min() >= 0 and tasks.max() <= high
        assert tasks.min() < 0.01 * high and tasks.max() > 0.99 * high
        assert abs(tasks.double().mean().item() - high / 2) < 0.05 * high
    observations = env.reset(tasks[:3], 2)
    assert observations.shape == (3, 2, env.observation_size)
    assert observations.dtype == torch.float32
    observations, rewards, done = env.step(torch.zeros(3, 2, env.action_size))
    assert observations.shape == (3, 2, env.observation_size) and rewards.shape == (3, 2)
    assert rewards.dtype == torch.float32 and done.dtype == torch.bool and done.shape == (3, 2)


@pytest.mark.parametrize("name", ["halfcheetah-vel", "ant-dir"])
def test_reset_noise_is_gymnasium_v5s(rl_extra, name):
    # v5: qpos = init_qpos + U(-0.1, 0.1) on every coordinate, qvel = 0.1 N(0, 1).
    env = make_env(name, dtype=torch.float64, threads=1)
    reference = rl_extra.make(GYMNASIUM_ID[_body(name)]).unwrapped
    env.reset(torch.ones(50, 1), 20, generator=torch.Generator().manual_seed(4))
    state = env.physics_state()
    offsets = (state["qpos"] - torch.from_numpy(reference.init_qpos)).reshape(1000, -1)
    velocities = (state["qvel"] - torch.from_numpy(reference.init_qvel)).reshape(1000, -1)
    assert offsets.abs().max() <= 0.1 and offsets.abs().max() > 0.099
    assert offsets.mean().abs() < 0.005  # standard error 0.058 / sqrt(1000 nq)
    assert abs(velocities.std().item() - 0.1) < 0.005 and velocities.mean().abs() < 0.005


def test_bad_input_is_refused_and_changes_nothing(rl_extra):
    env = make_env("halfcheetah-dir", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(1, 1, 6))
    with pytest.raises(ValueError, match="tasks"):
        env.reset(torch.ones(2, 2), 3)
    with pytest.raises(ValueError, match="rollouts"):
        env.reset(torch.ones(2, 1), 0)
    with pytest.raises(ValueError, match="horizon"):
        make_env("ant-vel", horizon=0)
    with pytest.raises(ValueError, match="stepper"):
        make_env("ant-vel", stepper="batch")  # the ant's observation needs the loop
    env.reset(torch.ones(2, 1), 3, generator=torch.Generator().manual_seed(0))
    before = env.physics_state()
    with pytest.raises(ValueError, match=r"actions: expected shape \[2, 3, 6\]"):
        env.step(torch.zeros(2, 3, 5))
    nan_actions = torch.zeros(2, 3, 6)
    nan_actions[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="actions: .*finite"):
        env.step(nan_actions)
    after = env.physics_state()
    assert all(torch.equal(before[key], after[key]) for key in before)
    env.close()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, 3, 6))


def test_unknown_environment_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown environment 'humanoid-vel'") as error:
        make_env("humanoid-vel")
    for name in ("navigation2d", *MUJOCO_ENVIRONMENTS):
        assert name in str(error.value) and name in ENVIRONMENTS


@pytest.mark.parametrize("blocked", ["mujoco", "gymnasium"])
def test_missing_extra_names_it(monkeypatch, blocked):
    # A None entry in sys.modules makes `import blocked` raise ModuleNotFoundError, as if it were
    # not installed.
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(MissingExtraError) as error:
        make_env("halfcheetah-vel")
    message = str(error.value)
    assert blocked in message and "'rl' extra" in message
    assert 'pip install "maml_ext[rl]"' in message


def test_require_knows_each_modules_extra(monkeypatch):
    from maml_ext._optional import require

    # Both entries: an earlier test may have imported pyplot, which import_module would return.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match=r"matplotlib, part of .*'experiments' extra"):
        require("matplotlib.pyplot", "plots")
    with pytest.raises(ValueError, match="module: 'scipy' is not part of an optional extra"):
        require("scipy", "anything")
    assert require("tqdm", "bars").__name__ == "tqdm"


@pytest.mark.parametrize("preset", ["rl-halfcheetah-dir", "rl-ant-vel"])
def test_cli_trains_and_evaluates_a_locomotion_preset(rl_extra, preset, tmp_path):
    """The CLI end to end on a MuJoCo preset (one small iteration): the policy fits the
    environment's observation and action sizes, the log's returns are finite, and eval reports
    the paper's protocol for MAML, pretrained and random (no oracle outside navigation)."""
    import json

    from maml_ext.checkpoint import load_checkpoint
    from maml_ext.cli import main

    out = tmp_path / "run"
    common = ["--meta-batch", "2", "--rollouts", "2", "--seed", "5"]
    assert main(["train", preset, "--out", str(out), "--iterations", "1", *common]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {row["phase"] for row in rows} == {"maml", "pretrained"}
    assert all(
        np.isfinite(value)
        for row in rows
        for value in row.values()
        if value is not None and isinstance(value, float)
    )
    env = make_env(preset.removeprefix("rl-"))
    policy = load_checkpoint(out / "checkpoint.pt").policy
    distribution = policy(torch.zeros(3, env.observation_size, dtype=policy.log_std.dtype))
    assert distribution.mean.shape == (3, env.action_size)
    env.close()
    assert main(["eval", str(out / "checkpoint.pt"), "--tasks", "2", "--steps", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"] == [0, 1]
    assert set(report["returns"]) == {"maml", "pretrained", "random"}
    assert all(np.isfinite(report["returns"][name]).all() for name in report["returns"])
