"""MAML's MuJoCo locomotion tasks (section 5.3) as batched environments: ``halfcheetah-vel``,
``halfcheetah-dir``, ``ant-vel``, ``ant-dir``.

Each environment runs ``tasks × rollouts`` episodes of gymnasium's ``HalfCheetah-v5`` or
``Ant-v5`` model at once (the :class:`maml_ext.rl.envs.BatchedEnv` protocol): one ``MjModel``,
one simulation state per episode, all advanced by one call per step. The physics is gymnasium
v5's exactly: the same XML (read from the installed gymnasium package), the same ``frame_skip``
(5), the same reset noise (``qpos0 + U(-0.1, 0.1)``, ``0.1 · N(0, 1)`` velocities), the same
observations, and per episode the same sequence of ``mj_step`` calls, so that a trajectory equals
gymnasium's bit for bit (the tests check it). Only the reward weights are MAML's.

Stepping: where mujoco has :mod:`mujoco.batch` (4.x), the simulations live in a
``mujoco.batch.Batch`` that steps them on a C++ thread pool and copies the fields out in one
array each, so no Python runs per episode. Ant's observation contains the contact forces
``cfrc_ext``, which gymnasium computes with ``mj_rnePostConstraint`` after each step and which
the batch does not keep; the ant therefore runs a loop over one ``MjData`` per episode, in
``threads`` chunks (``mj_step`` releases the GIL), whose Python cost is small next to the ant's
RK4 step. Both steppers are bit-identical to gymnasium at any thread count.

Episodes that end early (the ant's unhealthy termination) are masked through ``done`` and never
reset: they are no longer simulated, their observations stay at the last state and their rewards
are 0. A simulation that MuJoCo flags as unstable (non-finite or huge positions, velocities or
accelerations, after which MuJoCo would silently reset it) stops too and reports NaN
observations and rewards from that step on, for the sampler to report with the task and step.

The original experiments used rllab's models (the cheetah's time step 0.01; gymnasium's v5
models step 0.05 per action), so returns compare with the paper's in shape, not in absolute value.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from maml_ext._optional import require

__all__ = ["AntDirection", "AntVelocity", "HalfCheetahDirection", "HalfCheetahVelocity"]

# MuJoCo's warnings after which mj_step resets the simulation (mjtWarning's values).
_UNSTABLE_WARNINGS = ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC")


def _mujoco():
    return require("mujoco", "the MuJoCo locomotion environments (halfcheetah-*, ant-*)")


def _gymnasium_asset(file_name: str) -> str:
    """The path of one of gymnasium's MuJoCo model files, found without importing gymnasium's
    MuJoCo environments (which would import their renderer)."""
    require("gymnasium", "the MuJoCo locomotion environments (their HalfCheetah-v5/Ant-v5 models)")
    spec = importlib.util.find_spec("gymnasium")
    root = os.path.dirname(spec.origin)
    path = os.path.join(root, "envs", "mujoco", "assets", file_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"gymnasium's model {file_name!r} is not at {path}")
    return path


def _compile_quietly(mujoco, path: str):
    """``MjModel.from_xml_path(path)`` without MuJoCo's compiler warnings: gymnasium's
    ``half_cheetah.xml`` uses the deprecated ``settotalmass``, and each warning would be printed
    and appended to ``MUJOCO_LOG.TXT`` in the working directory at every construction."""
    config = getattr(mujoco, "MjLogConfig", None)
    if config is None:  # a mujoco without a log configuration
        return mujoco.MjModel.from_xml_path(path)
    previous = config.get()
    quiet = config.get()
    quiet.logto_console = False
    quiet.logto_file = False
    quiet.set()
    try:
        return mujoco.MjModel.from_xml_path(path)
    finally:
        previous.set()


class _BatchStepper:
    """All simulations in one ``mujoco.batch.Batch``; the bound fields are live ``[N, ...]``
    arrays."""

    def __init__(self, mujoco, model, count: int, frame_skip: int, threads: int, fields):
        from mujoco import batch as mujoco_batch

        self._batch = mujoco_batch.Batch(model, count, nthread=threads)
        self._frame_skip = frame_skip
        self._stage_none = mujoco.mjtStage.mjSTAGE_NONE.value
        self.qpos = self._batch.bind("qpos")
        self.qvel = self._batch.bind("qvel")
        self._ctrl = self._batch.bind("ctrl")
        # Derived fields are refreshed by every call, one array per field.
        self.derived = {name: self._batch.bind(name) for name in fields}
        self._unstable = [int(getattr(mujoco.mjtWarning, name)) for name in _UNSTABLE_WARNINGS]
        self._warnings_at_reset = np.zeros(count, dtype=np.int64)

    def reset(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        # mj_resetData, the state written, then mj_forward: gymnasium's reset.
        self._batch.reset(stage=self._stage_none)
        self.qpos[:] = qpos
        self.qvel[:] = qvel
        self._batch.forward()
        self._warnings_at_reset = self._warning_counts()

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        # gymnasium's set_state: the state written, then mj_forward.
        self.qpos[:] = qpos
        self.qvel[:] = qvel
        self._batch.forward()

    def step(self, ctrl: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Steps the simulations ``ids`` with their rows of ``ctrl``; returns the ids among them
        that MuJoCo flagged unstable during the step."""
        self._ctrl[ids] = ctrl[ids]
        self._batch.step(ids=ids.astype(np.int32), nstep=self._frame_skip)
        counts = self._warning_counts()
        return ids[counts[ids] > self._warnings_at_reset[ids]]

    def _warning_counts(self) -> np.ndarray:
        # warning[sim, kind] = (lastinfo, number), as mjWarningStat.
        return self._batch.warning[:, self._unstable, 1].sum(axis=1).astype(np.int64)


class _LoopStepper:
    """One ``MjData`` per simulation, stepped in a loop split into ``threads`` chunks; each step
    ends with ``mj_rnePostConstraint`` (the contact forces ``cfrc_ext``), as gymnasium's does."""

    def __init__(self, mujoco, model, count: int, frame_skip: int, threads: int, fields):
        self._mujoco = mujoco
        self._model = model
        self._frame_skip = frame_skip
        self._datas = [mujoco.MjData(model) for _ in range(count)]
        self.qpos = np.zeros((count, model.nq))
        self.qvel = np.zeros((count, model.nv))
        self.derived = {
            name: np.zeros((count, *getattr(self._datas[0], name).shape)) for name in fields
        }
        self._unstable = [int(getattr(mujoco.mjtWarning, name)) for name in _UNSTABLE_WARNINGS]
        self._threads = max(1, min(int(threads), count))
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None

    def _copy_out(self, index: int, data) -> None:
        self.qpos[index] = data.qpos
        self.qvel[index] = data.qvel
        for name, array in self.derived.items():
            array[index] = getattr(data, name)

    def reset(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        mujoco, model = self._mujoco, self._model
        for index, data in enumerate(self._datas):
            mujoco.mj_resetData(model, data)
            data.qpos[:] = qpos[index]
            data.qvel[:] = qvel[index]
            mujoco.mj_forward(model, data)
            self._copy_out(index, data)

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        for index, data in enumerate(self._datas):
            data.qpos[:] = qpos[index]
            data.qvel[:] = qvel[index]
            self._mujoco.mj_forward(self._model, data)
            self._copy_out(index, data)

    def _step_chunk(self, ctrl: np.ndarray, ids: np.ndarray) -> list[int]:
        mujoco, model, frame_skip = self._mujoco, self._model, self._frame_skip
        unstable = []
        for index in ids:
            data = self._datas[index]
            data.ctrl[:] = ctrl[index]
            mujoco.mj_step(model, data, nstep=frame_skip)
            mujoco.mj_rnePostConstraint(model, data)
            # reset() zeroed the counters: any count means MuJoCo reset this simulation.
            if any(data.warning[kind].number for kind in self._unstable):
                unstable.append(int(index))
            self._copy_out(index, data)
        return unstable

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def step(self, ctrl: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if self._pool is None or len(ids) < 2 * self._threads:
            unstable = self._step_chunk(ctrl, ids)
        else:
            chunks = np.array_split(ids, self._threads)
            parts = self._pool.map(self._step_chunk, [ctrl] * len(chunks), chunks)
            unstable = [index for part in parts for index in part]
        return np.asarray(unstable, dtype=np.int64)


class _Locomotion:
    """The batched stepping, resets, masking and tensor conversion shared by the four tasks.

    Subclasses set the model (``_xml``), the observation (``_observations``), the task draw
    (``sample_tasks``) and the reward (``_rewards``).
    """

    name: str
    task_size = 1
    _xml: str
    _frame_skip = 5
    _reset_noise_scale = 0.1
    # MjData fields besides qpos/qvel that the observation or reward reads after each step, and
    # whether they need mj_rnePostConstraint (which only the loop stepper runs).
    _derived_fields: tuple[str, ...] = ()
    _needs_contact_forces = False

    def __init__(
        self,
        horizon: int = 200,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        stepper: str = "auto",
    ):
        if int(horizon) < 1:
            raise ValueError(f"horizon: expected a positive number of steps, got {horizon}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads: expected a positive number of threads, got {threads}")
        if stepper not in ("auto", "batch", "loop"):
            raise ValueError(f"stepper: expected 'auto', 'batch' or 'loop', got {stepper!r}")
        mujoco = _mujoco()
        has_batch = importlib.util.find_spec("mujoco.batch") is not None
        if stepper == "batch" and (self._needs_contact_forces or not has_batch):
            why = "needs cfrc_ext" if self._needs_contact_forces else "has no mujoco.batch"
            raise ValueError(f"stepper: 'batch' is not available here ({self.name} {why})")
        if stepper == "auto":
            stepper = "batch" if has_batch and not self._needs_contact_forces else "loop"
        self.horizon = int(horizon)
        self.dtype = dtype
        self.device = torch.device(device)
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.stepper = stepper
        self._mujoco = mujoco
        self.model = _compile_quietly(mujoco, _gymnasium_asset(self._xml))
        # gymnasium's init_qpos/init_qvel: a fresh MjData's state.
        self._init_qpos = self.model.qpos0.copy()
        self._init_qvel = np.zeros(self.model.nv)
        self.dt = self.model.opt.timestep * self._frame_skip
        self._ctrl_low = self.model.actuator_ctrlrange[:, 0].copy()
        self._ctrl_high = self.model.actuator_ctrlrange[:, 1].copy()
        self.action_size = self.model.nu
        self.observation_size = self._observation_size()
        self._sim = None  # the stepper, made for the batch size of the first reset
        self._shape: tuple[int, int] | None = None

    # -- the protocol ------------------------------------------------------------------------

    def reset(
        self, tasks: torch.Tensor, rollouts: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Starts ``rollouts`` episodes of each task from gymnasium v5's noisy initial state;
        observations ``[T, K, observation_size]``. The noise is drawn from ``generator`` (CPU,
        default: torch's global generator)."""
        if tasks.dim() != 2 or tasks.shape[1] != self.task_size:
            raise ValueError(
                f"tasks: expected shape [T, {self.task_size}], got {list(tasks.shape)}"
            )
        if not torch.isfinite(tasks).all():
            raise ValueError("tasks: task parameters must be finite")
        if int(rollouts) < 1:
            raise ValueError(f"rollouts: expected a positive number, got {rollouts}")
        count, rollouts = tasks.shape[0], int(rollouts)
        total = count * rollouts
        if self._sim is None or self._shape[0] * self._shape[1] != total:
            self.close()
            make = _BatchStepper if self.stepper == "batch" else _LoopStepper
            self._sim = make(
                self._mujoco,
                self.model,
                total,
                self._frame_skip,
                self.threads,
                self._derived_fields,
            )
        self._shape = (count, rollouts)
        task_values = tasks.detach().to("cpu", torch.float64).numpy()
        self._tasks = np.repeat(task_values, rollouts, axis=0)  # [N, task_size]

        model, scale = self.model, self._reset_noise_scale
        uniform = torch.rand(total, model.nq, generator=generator, dtype=torch.float64)
        normal = torch.randn(total, model.nv, generator=generator, dtype=torch.float64)
        qpos = self._init_qpos + (-scale + 2.0 * scale * uniform.numpy())
        qvel = self._init_qvel + scale * normal.numpy()
        self._sim.reset(qpos, qvel)

        self._position = self._main_position().copy()
        self._done = np.zeros(total, dtype=bool)
        self._failed = np.zeros(total, dtype=bool)
        self._steps = 0
        return self._to_tensor(self._observations())

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advances every running episode by one action (``frame_skip`` physics steps);
        ``(observations [T, K, obs], rewards [T, K], done [T, K])``. Actions are clipped to the
        actuators' range [-1, 1] first, as the authors' rllab wrapper did, and the control cost is
        on the clipped action."""
        if self._sim is None or self._shape is None:
            raise RuntimeError("step: call reset(tasks, rollouts) first")
        expected = (*self._shape, self.action_size)
        if tuple(actions.shape) != expected:
            raise ValueError(
                f"actions: expected shape {list(expected)} [T, K, action_size], "
                f"got {list(actions.shape)}"
            )
        ctrl = actions.detach().to("cpu", torch.float64).reshape(-1, self.action_size).numpy()
        if not np.isfinite(ctrl).all():
            raise ValueError("actions: every action must be finite (got NaN or infinity)")
        ctrl = np.clip(ctrl, self._ctrl_low, self._ctrl_high)

        running = ~(self._done | self._failed)
        ids = np.flatnonzero(running)
        unstable = self._sim.step(ctrl, ids) if len(ids) else np.zeros(0, dtype=np.int64)
        self._steps += 1

        position = self._main_position()
        velocity = (position - self._position) / self.dt  # [N, 2] or [N, 1]
        self._position = position.copy()
        rewards = self._rewards(velocity[:, 0], ctrl)
        rewards[~running] = 0.0
        self._done |= running & self._terminated()
        self._failed[unstable] = True
        observations = self._observations()
        observations[self._failed] = np.nan
        rewards[self._failed] = np.nan
        done = torch.from_numpy(self._done.reshape(self._shape).copy()).to(self.device)
        return (
            self._to_tensor(observations),
            self._to_tensor(rewards),
            done,
        )

    def close(self) -> None:
        """Releases the simulations and the stepping threads (a later reset makes new ones)."""
        close = getattr(self._sim, "close", None)
        if close is not None:
            close()
        self._sim = None
        self._shape = None

    # -- inspection ----------------------------------------------------------------------------

    def physics_state(self) -> dict[str, torch.Tensor]:
        """The simulations' positions and velocities, float64 ``[T, K, nq]`` / ``[T, K, nv]``
        (to replay an episode elsewhere, e.g. in gymnasium through ``set_state``)."""
        if self._sim is None or self._shape is None:
            raise RuntimeError("physics_state: call reset(tasks, rollouts) first")
        return {
            "qpos": torch.from_numpy(self._sim.qpos.reshape(*self._shape, -1).copy()),
            "qvel": torch.from_numpy(self._sim.qvel.reshape(*self._shape, -1).copy()),
        }

    def set_physics_state(self, qpos: torch.Tensor, qvel: torch.Tensor) -> None:
        """Replaces every simulation's positions ``[T, K, nq]`` and velocities ``[T, K, nv]``
        and recomputes what depends on them (gymnasium's ``set_state``); ``done`` is kept."""
        if self._sim is None or self._shape is None:
            raise RuntimeError("set_physics_state: call reset(tasks, rollouts) first")
        for argument, value, size in (("qpos", qpos, self.model.nq), ("qvel", qvel, self.model.nv)):
            if tuple(value.shape) != (*self._shape, size):
                raise ValueError(
                    f"{argument}: expected shape {[*self._shape, size]}, got {list(value.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"{argument}: must be finite")
        total = self._shape[0] * self._shape[1]
        self._sim.set_state(
            qpos.detach().to("cpu", torch.float64).reshape(total, -1).numpy(),
            qvel.detach().to("cpu", torch.float64).reshape(total, -1).numpy(),
        )
        self._position = self._main_position().copy()

    # -- helpers -------------------------------------------------------------------------------

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        shaped = array.reshape(*self._shape, *array.shape[1:])
        return torch.from_numpy(np.ascontiguousarray(shaped)).to(self.device, self.dtype)

    def _control_cost(self, ctrl: np.ndarray) -> np.ndarray:
        return self._ctrl_cost_weight * np.square(ctrl).sum(axis=1)

    def _terminated(self) -> np.ndarray:
        return np.zeros(self._shape[0] * self._shape[1], dtype=bool)

    def _uniform_tasks(self, count: int, generator, low: float, high: float) -> torch.Tensor:
        if int(count) < 1:
            raise ValueError(f"count: expected a positive number of tasks, got {count}")
        draw = torch.rand(int(count), 1, generator=generator, dtype=torch.float64)
        return (low + (high - low) * draw).to(self.device, self.dtype)

    def _sign_tasks(self, count: int, generator) -> torch.Tensor:
        if int(count) < 1:
            raise ValueError(f"count: expected a positive number of tasks, got {count}")
        heads = torch.rand(int(count), 1, generator=generator, dtype=torch.float64) < 0.5
        return (2.0 * heads.to(torch.float64) - 1.0).to(self.device, self.dtype)


class _HalfCheetah(_Locomotion):
    """gymnasium's ``HalfCheetah-v5``: observation ``[qpos[1:], qvel]`` (17), action 6, forward
    velocity ``Δqpos[0] / dt`` with ``dt = 0.05``. Control cost ``0.05 ‖a‖²`` (MAML's weight;
    v5's default is 0.1). Episodes never end early."""

    _xml = "half_cheetah.xml"
    _ctrl_cost_weight = 0.05

    def _observation_size(self) -> int:
        return self.model.nq - 1 + self.model.nv

    def _main_position(self) -> np.ndarray:
        return self._sim.qpos[:, :1]

    def _observations(self) -> np.ndarray:
        return np.concatenate([self._sim.qpos[:, 1:], self._sim.qvel], axis=1)


class HalfCheetahVelocity(_HalfCheetah):
    """``halfcheetah-vel``: run at a goal velocity drawn from U[0, 2]; reward
    ``-|v - v_goal| - 0.05 ‖a‖²`` (MAML section 5.3, the authors' ``half_cheetah_env_rand``).
    Tasks ``[T, 1]``: the goal velocity. See the module docstring for the batching and for how
    returns compare with the paper's (rllab's model)."""

    name = "halfcheetah-vel"
    velocity_range = (0.0, 2.0)

    def sample_tasks(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` goal velocities, uniform in [0, 2]: ``[count, 1]``."""
        return self._uniform_tasks(count, generator, *self.velocity_range)

    def _rewards(self, velocity: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
        return -np.abs(velocity - self._tasks[:, 0]) - self._control_cost(ctrl)


class HalfCheetahDirection(_HalfCheetah):
    """``halfcheetah-dir``: run forward (+1) or backward (-1), each with probability ½; reward
    ``dir · v - 0.05 ‖a‖²``, which is gymnasium's ``HalfCheetah-v5`` reward with
    ``forward_reward_weight=dir, ctrl_cost_weight=0.05``. Tasks ``[T, 1]``: the direction."""

    name = "halfcheetah-dir"

    def sample_tasks(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` directions, +1 or -1 with probability ½ each: ``[count, 1]``."""
        return self._sign_tasks(count, generator)

    def _rewards(self, velocity: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
        return self._tasks[:, 0] * velocity - self._control_cost(ctrl)


class _Ant(_Locomotion):
    """gymnasium's ``Ant-v5``: observation ``[qpos[2:], qvel, clip(cfrc_ext[1:], -1, 1)]`` (105),
    action 8, forward velocity from the torso's x position over ``dt = 0.05``; an episode ends
    (``done``) when the state is non-finite or the torso's height leaves [0.2, 1.0].

    Reward weights: the paper gives only the velocity term; the costs are those of the authors'
    code (rllab's ``AntEnv``, used by ``ant_env_rand``/``ant_env_rand_direc``): control
    ``0.005 ‖a‖²`` (rllab's ``0.5e-2 ‖a / 150‖²`` on torques up to 150, i.e. on the normalised
    action), contact ``5e-4 ‖clip(cfrc_ext, -1, 1)‖²`` and a survival bonus of 0.05 per step.
    These are gymnasium's constructor arguments ``ctrl_cost_weight=0.005,
    contact_cost_weight=5e-4, healthy_reward=0.05`` (v5's defaults: 0.5, 5e-4, 1.0). As in
    gymnasium, the bonus is 0 on the step that ends the episode (rllab paid it there too).
    """

    _xml = "ant.xml"
    _ctrl_cost_weight = 0.005
    _contact_cost_weight = 5e-4
    _healthy_reward = 0.05
    _healthy_z_range = (0.2, 1.0)
    _main_body = 1  # the torso
    _derived_fields = ("xpos", "cfrc_ext")
    _needs_contact_forces = True

    def _observation_size(self) -> int:
        return self.model.nq - 2 + self.model.nv + (self.model.nbody - 1) * 6

    def _main_position(self) -> np.ndarray:
        return self._sim.derived["xpos"][:, self._main_body, :2]

    def _contact_forces(self) -> np.ndarray:
        return np.clip(self._sim.derived["cfrc_ext"], -1.0, 1.0)

    def _observations(self) -> np.ndarray:
        forces = self._contact_forces()[:, 1:].reshape(len(self._sim.qpos), -1)
        return np.concatenate([self._sim.qpos[:, 2:], self._sim.qvel, forces], axis=1)

    def _healthy(self) -> np.ndarray:
        qpos, qvel = self._sim.qpos, self._sim.qvel
        finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
        low, high = self._healthy_z_range
        return finite & (qpos[:, 2] >= low) & (qpos[:, 2] <= high)

    def _terminated(self) -> np.ndarray:
        return ~self._healthy()

    def _costs_and_bonus(self, ctrl: np.ndarray) -> np.ndarray:
        contact = self._contact_cost_weight * np.square(self._contact_forces()).sum(axis=(1, 2))
        bonus = self._healthy_reward * self._healthy()
        return bonus - self._control_cost(ctrl) - contact


class AntVelocity(_Ant):
    """``ant-vel``: run forward at a goal velocity drawn from U[0, 3]; reward
    ``-|v - v_goal| - 0.005 ‖a‖² - 5e-4 ‖clip(cfrc_ext)‖² + 0.05`` (see :class:`_Ant` for the
    weights). Tasks ``[T, 1]``: the goal velocity."""

    name = "ant-vel"
    velocity_range = (0.0, 3.0)

    def sample_tasks(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` goal velocities, uniform in [0, 3]: ``[count, 1]``."""
        return self._uniform_tasks(count, generator, *self.velocity_range)

    def _rewards(self, velocity: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
        return -np.abs(velocity - self._tasks[:, 0]) + self._costs_and_bonus(ctrl)


class AntDirection(_Ant):
    """``ant-dir``: run forward (+1) or backward (-1) along x, each with probability ½; reward
    ``dir · v - 0.005 ‖a‖² - 5e-4 ‖clip(cfrc_ext)‖² + 0.05``: gymnasium's ``Ant-v5`` reward with
    ``forward_reward_weight=dir`` and the weights of :class:`_Ant`. Tasks ``[T, 1]``."""

    name = "ant-dir"

    def sample_tasks(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` directions, +1 or -1 with probability ½ each: ``[count, 1]``."""
        return self._sign_tasks(count, generator)

    def _rewards(self, velocity: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
        return self._tasks[:, 0] * velocity + self._costs_and_bonus(ctrl)
