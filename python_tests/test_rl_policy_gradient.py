"""The Gaussian policy, the inner step, the meta-gradient, the Fisher-vector product through the
inner step, MetaTRPO/MetaAdam and the rl-navigation2d CLI (issue 12).

The exact quantities are checked in float64 against an independent reference written the way the
common PyTorch reimplementations do it: a Python loop over tasks, ``torch.distributions``, and
``create_graph=True`` double-backward through the inner step."""

import json
import math
import sys

import pytest
import torch
from maml_test_utils import relative_error
from torch.func import functional_call, vmap

import maml_ext
from maml_ext.rl.metarl import (
    MetaAdam,
    MetaTRPO,
    TaskData,
    adapt,
    conjugate_gradient,
    fisher_vector_product,
    inner_hvp,
    meta_gradient,
)
from maml_ext.rl.navigation import Navigation2D
from maml_ext.rl.policy import GaussianPolicy
from maml_ext.rl.sampler import process_rollouts, sample_rollouts

RTOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _random_data(generator, tasks, steps, obs=3, act=2):
    """Task-batched rollouts with random observations, actions, advantages and padding."""

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    lengths = torch.randint(steps // 2, steps + 1, (tasks, 1), generator=generator)
    mask = (torch.arange(steps) < lengths).to(torch.float64)
    return TaskData(
        draw(tasks, steps, obs),
        draw(tasks, steps, act),
        draw(tasks, steps) * mask,
        mask / mask.sum(-1, keepdim=True),
    )


def _policy(seed, activation="relu", obs=3, act=2):
    torch.manual_seed(seed)
    policy = GaussianPolicy(obs, act, hidden=(7, 5), activation=activation, dtype=torch.float64)
    with torch.no_grad():  # not the initial std, not zero biases: a generic point
        for _, p in policy.ordered_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


class _Reference:
    """Per-task autograd through ``functional_call`` and ``torch.distributions.Normal``."""

    def __init__(self, policy):
        self.policy = policy
        self.names = [name for name, _ in policy.ordered_parameters()]

    def dict_of(self, flat):
        out, offset = {}, 0
        for name, p in self.policy.ordered_parameters():
            out[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def distribution(self, flat, obs):
        return functional_call(self.policy, self.dict_of(flat), (obs,))

    def inner_loss(self, flat, data, task):
        log_prob = (
            self.distribution(flat, data.observations[task]).log_prob(data.actions[task]).sum(-1)
        )
        return -(log_prob * data.advantages[task] * data.weights[task]).sum()

    def adapted(self, theta, data, task, lr):
        gradient = torch.autograd.grad(self.inner_loss(theta, data, task), theta, create_graph=True)
        return theta - lr * gradient[0]

    def meta_gradient_and_fvp(self, theta0, inner, outer, lr, vector, first_order=False):
        gradients, products = [], []
        for task in range(outer.tasks):
            theta = theta0.clone().requires_grad_()
            if first_order:
                adapted = (
                    theta0 - lr * torch.autograd.grad(self.inner_loss(theta, inner, task), theta)[0]
                ).detach()
                adapted.requires_grad_()
                wrt = adapted
            else:
                adapted = self.adapted(theta, inner, task, lr)
                wrt = theta
            new = self.distribution(adapted, outer.observations[task])
            old = torch.distributions.Normal(new.loc.detach(), new.scale.detach())
            log_ratio = new.log_prob(outer.actions[task]) - old.log_prob(outer.actions[task])
            surrogate = (
                torch.exp(log_ratio.sum(-1)) * outer.advantages[task] * outer.weights[task]
            ).sum()
            gradients.append(torch.autograd.grad(surrogate, wrt, retain_graph=True)[0])
            kl = (torch.distributions.kl_divergence(old, new).sum(-1) * outer.weights[task]).sum()
            kl_gradient = torch.autograd.grad(kl, wrt, create_graph=True)[0]
            products.append(torch.autograd.grad(kl_gradient @ vector, wrt)[0])
        return torch.stack(gradients), torch.stack(products)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_layout_matches_the_module_and_functional_call_under_vmap(seed, activation):
    policy = _policy(seed, activation)
    layout = policy.layout()
    generator = torch.Generator().manual_seed(seed)
    params = policy.flat_parameters() + 0.1 * torch.randn(
        4, layout.size, generator=generator, dtype=torch.float64
    )
    obs = torch.randn(4, 6, 3, generator=generator, dtype=torch.float64)
    mean, log_std = layout.mean_log_std(params, obs)
    reference = _Reference(policy)
    means = vmap(lambda p, o: reference.distribution(p, o).loc)(params, obs)
    torch.testing.assert_close(mean, means, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(log_std, params[:, -2:], rtol=0, atol=0)
    distribution = policy(obs[0])
    assert isinstance(distribution, torch.distributions.Normal)
    torch.testing.assert_close(distribution.scale[0], policy.log_std.exp())


def test_policy_initialisation_is_the_papers():
    policy = GaussianPolicy(2, 2)
    linears = [m for m in policy.mean if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 2), (100, 100), (2, 100)]
    assert all(not m.bias.any() for m in linears)
    assert torch.equal(policy.log_std.detach(), torch.zeros(2))  # std 1.0
    bound = math.sqrt(6 / 200)  # Xavier-uniform of the 100x100 layer
    assert linears[1].weight.abs().max() <= bound and linears[1].weight.abs().max() > 0.9 * bound
    assert isinstance(policy.mean[1], torch.nn.ReLU)
    assert isinstance(GaussianPolicy(2, 2, activation="tanh").mean[1], torch.nn.Tanh)


def test_inner_step_and_hvp_match_per_task_autograd(seed):
    policy = _policy(seed)
    generator = torch.Generator().manual_seed(seed)
    data = _random_data(generator, tasks=4, steps=11)
    layout, reference = policy.layout(), _Reference(policy)
    theta = policy.flat_parameters()
    vector = torch.randn(layout.size, generator=generator, dtype=torch.float64)
    adapted = adapt(layout, theta, data, 0.1)
    products = inner_hvp(layout, theta, data, vector)
    for task in range(4):
        t = theta.clone().requires_grad_()
        expected = reference.adapted(t, data, task, 0.1)
        assert relative_error(adapted[task], expected.detach()) < RTOL
        gradient = torch.autograd.grad(reference.inner_loss(t, data, task), t, create_graph=True)[0]
        hvp = torch.autograd.grad(gradient @ vector, t)[0]
        assert relative_error(products[task], hvp) < RTOL


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_and_fisher_vector_product_match_double_backward(seed, first_order):
    policy = _policy(seed)
    generator = torch.Generator().manual_seed(seed)
    tasks, lr = 3, 0.1
    inner = _random_data(generator, tasks, steps=13)
    outer = _random_data(generator, tasks, steps=12)
    layout, theta = policy.layout(), policy.flat_parameters()
    vector = torch.randn(layout.size, generator=generator, dtype=torch.float64)
    expected_gradients, expected_products = _Reference(policy).meta_gradient_and_fvp(
        theta, inner, outer, lr, vector, first_order
    )
    gradients = meta_gradient(layout, theta, inner, outer, lr, first_order, reduce=False)
    products = fisher_vector_product(layout, theta, inner, outer, vector, lr, first_order)
    for task in range(tasks):
        assert relative_error(gradients[task], expected_gradients[task]) < RTOL
        assert relative_error(products[task], expected_products[task]) < RTOL
    mean = meta_gradient(layout, theta, inner, outer, lr, first_order)
    assert relative_error(mean, expected_gradients.mean(0)) < RTOL
    # The second-order term matters: it is not the first-order answer.
    if not first_order:
        _, first = _Reference(policy).meta_gradient_and_fvp(theta, inner, outer, lr, vector, True)
        assert relative_error(products[0], first[0]) > 1e-6


def _lvc_hessian_times(reference, theta, data, task, vector):
    """REINFORCE's inner-loss Hessian times ``vector`` by double backward, minus
    sum_n w_n Â_n (score_n · vector) score_n with each sample's score ∇log π_n by autograd."""
    t = theta.clone().requires_grad_()
    gradient = torch.autograd.grad(reference.inner_loss(t, data, task), t, create_graph=True)[0]
    product = torch.autograd.grad(gradient @ vector, t)[0]
    for n in range(data.advantages.shape[1]):
        weight = data.weights[task, n] * data.advantages[task, n]
        if weight == 0:
            continue
        distribution = reference.distribution(t, data.observations[task, n])
        score = torch.autograd.grad(distribution.log_prob(data.actions[task, n]).sum(), t)[0]
        product = product - weight * (score @ vector) * score
    return product


def test_lvc_estimator_adds_the_score_outer_products_to_the_hessian(seed):
    """ProMP's low-variance curvature: the same inner step, and a Hessian that adds
    -sum_n w_n Â_n (∇log π_n)(∇log π_n)ᵀ to REINFORCE's, built here from per-sample score
    vectors; the meta-gradient is then (I - α H_lvc) ∇S(θ') per task."""
    policy = _policy(seed)
    generator = torch.Generator().manual_seed(seed)
    tasks, lr = 3, 0.1
    inner = _random_data(generator, tasks, steps=9)
    outer = _random_data(generator, tasks, steps=8)
    layout, reference = policy.layout(), _Reference(policy)
    theta = policy.flat_parameters()
    vector = torch.randn(layout.size, generator=generator, dtype=torch.float64)
    products = inner_hvp(layout, theta, inner, vector, estimator="lvc")
    gradients = meta_gradient(layout, theta, inner, outer, lr, reduce=False, estimator="lvc")
    # ∇S at each adapted policy: the first-order reference's gradient (J = I).
    surrogate_gradients, _ = reference.meta_gradient_and_fvp(theta, inner, outer, lr, vector, True)
    for task in range(tasks):
        expected = _lvc_hessian_times(reference, theta, inner, task, vector)
        assert relative_error(products[task], expected) < RTOL
        direction = surrogate_gradients[task]
        expected = direction - lr * _lvc_hessian_times(reference, theta, inner, task, direction)
        assert relative_error(gradients[task], expected) < RTOL
    # It is a different Hessian from REINFORCE's.
    plain = inner_hvp(layout, theta, inner, vector)
    assert relative_error(products, plain) > 1e-3
    with pytest.raises(ValueError, match="inner_estimator: expected one of"):
        inner_hvp(layout, theta, inner, vector, estimator="dice")
    with pytest.raises(ValueError, match="inner_estimator"):
        MetaTRPO(policy, inner_estimator="LVC")


def _navigation_batch(policy, learner, seed, tasks=3, rollouts=4, horizon=25):
    env = Navigation2D(horizon=horizon, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    goals = env.sample_tasks(tasks, generator)
    inner = process_rollouts(
        sample_rollouts(env, learner.layout, learner.theta(), goals, rollouts, generator)
    )
    outer = process_rollouts(
        sample_rollouts(env, learner.layout, learner.adapted(inner), goals, rollouts, generator)
    )
    return inner, outer


@pytest.mark.parametrize("iterations", [4, 30])
def test_conjugate_gradient_residual_gives_the_step_curvature(seed, iterations):
    # MetaTRPO scales its step by dᵀAd = d·(b - r) from CG's tracked residual r, not by another
    # product: r must be b - A d, stopped early (4 of 30 dimensions) or run to the dimension.
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=generator, dtype=torch.float64)
    x, residual = conjugate_gradient(
        lambda v: matrix @ v, b, iterations, tolerance=0.0, return_residual=True
    )
    assert float((residual - (b - matrix @ x)).norm() / b.norm()) < 1e-10
    assert math.isclose(float(x @ (b - residual)), float(x @ matrix @ x), rel_tol=1e-10)
    assert float(x @ (b - residual)) > 0
    assert torch.equal(x, conjugate_gradient(lambda v: matrix @ v, b, iterations, tolerance=0.0))


@pytest.mark.parametrize("first_order", [False, True])
def test_one_trpo_step_improves_the_surrogate_within_the_kl_bound(seed, first_order):
    torch.manual_seed(seed)
    policy = GaussianPolicy(2, 2, hidden=(16, 16), dtype=torch.float64)
    learner = MetaTRPO(policy, inner_lr=0.1, first_order=first_order, max_kl=0.01)
    inner, outer = _navigation_batch(policy, learner, seed)
    before = policy.flat_parameters()
    result = learner.step(inner, outer)
    after = policy.flat_parameters()
    assert result.accepted and not torch.equal(before, after)
    # Recompute surrogate and KL independently (per task, torch.distributions) on the fixed batch.
    reference = _Reference(policy)
    data_in, data_out = TaskData.of(inner), TaskData.of(outer)
    surrogates, kls = [], []
    for task in range(3):
        old = reference.distribution(
            reference.adapted(before.clone().requires_grad_(), data_in, task, 0.1).detach(),
            data_out.observations[task],
        )
        new = reference.distribution(
            reference.adapted(after.clone().requires_grad_(), data_in, task, 0.1).detach(),
            data_out.observations[task],
        )
        ratio = torch.exp(
            (new.log_prob(data_out.actions[task]) - old.log_prob(data_out.actions[task])).sum(-1)
        )
        surrogates.append((ratio * data_out.advantages[task] * data_out.weights[task]).sum())
        kls.append(
            (torch.distributions.kl_divergence(old, new).sum(-1) * data_out.weights[task]).sum()
        )
    surrogate, kl = float(torch.stack(surrogates).mean()), float(torch.stack(kls).mean())
    assert kl <= 0.01 and kl > 0
    assert surrogate > 0  # the surrogate before the step is the mean normalised advantage, 0
    assert abs(result.surrogate_before) < 1e-10
    assert math.isclose(surrogate, result.surrogate_after, rel_tol=1e-9)
    assert math.isclose(kl, result.kl, rel_tol=1e-9)


@pytest.mark.parametrize("outer_kind", ["trpo", "adam"])
def test_non_finite_or_mismatched_input_changes_no_parameter(seed, outer_kind):
    torch.manual_seed(seed)
    policy = GaussianPolicy(2, 2, hidden=(8,), dtype=torch.float64)
    learner = MetaTRPO(policy) if outer_kind == "trpo" else MetaAdam(policy)
    inner, outer = _navigation_batch(policy, learner, seed, horizon=10)
    before = {name: p.detach().clone() for name, p in policy.ordered_parameters()}
    broken = TaskData.of(outer)
    broken.advantages = broken.advantages.clone()
    broken.advantages[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="outer rollouts: non-finite advantages in task 1"):
        learner.step(inner, broken)
    fewer = TaskData(*(t[:2] for t in TaskData.of(outer).__dict__.values()))
    with pytest.raises(ValueError, match="inner/outer: expected the same tasks"):
        learner.step(inner, fewer)
    wrong = TaskData.of(inner)
    wrong.observations = wrong.observations[..., :1]
    with pytest.raises(ValueError, match="observations"):
        learner.step(wrong, outer)
    # A meta-gradient that overflows (a finite but huge observation) is refused too.
    huge = TaskData.of(outer)
    huge.observations = huge.observations.clone()
    huge.observations[0, 0] = 1e200
    with pytest.raises(FloatingPointError, match="meta-gradient: not finite"):
        learner.step(inner, huge)
    for name, p in policy.ordered_parameters():
        assert torch.equal(p.detach(), before[name]), name
    if outer_kind == "adam":
        assert not learner.optimizer.state


def _train(tmp_path, name, **options):
    from maml_ext.rl.train import train_rl

    return train_rl(
        "rl-navigation2d", out_dir=str(tmp_path / name), progress=False, verbose=False, **options
    )


def test_cli_navigation_run_adapts(tmp_path):
    from maml_ext.cli import main

    out = tmp_path / "nav"
    status = main(
        [
            "train",
            "rl-navigation2d",
            "--out",
            str(out),
            "--iterations",
            "4",
            "--meta-batch",
            "10",
            "--rollouts",
            "10",
            "--seed",
            "3",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    maml = [row for row in rows if row["phase"] == "maml"]
    assert len(maml) == 4 and len(rows) == 8
    # One policy-gradient step on a task's own rollouts raises that task's return.
    gain = sum(row["post_return"] - row["pre_return"] for row in maml) / len(maml)
    assert gain > 0, maml
    assert (out / "checkpoint.pt").is_file() and (out / "learning_curve.png").is_file()
    assert (out / "log.csv").read_text().startswith("phase,iteration,pre_return")
    run = maml_ext.load_checkpoint(out / "checkpoint.pt")
    assert isinstance(run.policy, GaussianPolicy) and isinstance(run.pretrained, GaussianPolicy)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["maml"]
    assert all(torch.equal(p, saved[name]) for name, p in run.policy.state_dict().items())
    status = main(["eval", str(out / "checkpoint.pt"), "--tasks", "4", "--steps", "1"])
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"] == [0, 1] and set(report["returns"]) == {
        "maml",
        "pretrained",
        "random",
        "oracle",
    }
    assert all(len(v) == 2 for v in report["ci95"].values())
    assert report["returns"]["oracle"][0] > max(report["returns"]["random"])
    assert (out / "trajectories.png").is_file()
    # The preset's test batch (40 rollouts: the authors' 4,000 steps), or --rollouts.
    assert report["rollouts"] == 40 and report["inner_lrs"] == [0.1, 0.05]
    other = tmp_path / "eval3.json"
    argv = ["eval", str(out / "checkpoint.pt"), "--tasks", "2", "--steps", "0", "--rollouts", "3"]
    assert main([*argv, "--out", str(other)]) == 0
    assert json.loads(other.read_text())["rollouts"] == 3


def test_eval_rollouts_is_only_for_meta_rl(tmp_path, capsys):
    from maml_ext.cli import main

    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "fewshot.pt"), "--rollouts", "3"])
    assert "--rollouts: only meta-RL checkpoints" in capsys.readouterr().err


def test_checkpoint_from_before_the_test_batch_and_estimator_fields(tmp_path):
    # Checkpoints written before session 12 have no eval_rollouts / inner_estimator in their
    # preset: they take today's test protocol and the estimator they were trained with.
    from maml_ext.rl.train import load_rl_checkpoint

    _train(tmp_path, "run", iterations=1, meta_batch=2, rollouts=2, seed=1)
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    del saved["preset"]["eval_rollouts"], saved["preset"]["inner_estimator"]
    saved["config"]["inner_estimator"] = "reinforce"
    torch.save(saved, path)
    run = load_rl_checkpoint(str(path))
    assert run.preset.eval_rollouts == 40 and run.preset.inner_estimator == "reinforce"
    from maml_ext.rl.evaluate import evaluate_rl_checkpoint

    with pytest.raises(ValueError, match="rollouts >= 1, got 40, 3, 0"):
        evaluate_rl_checkpoint(str(path), rollouts=0)
    assert not (tmp_path / "run" / "eval.json").exists()


@pytest.mark.parametrize("outer", ["trpo", "adam"])
def test_resume_continues_bit_for_bit(tmp_path, outer):
    options = dict(meta_batch=3, rollouts=3, seed=5, outer=outer, checkpoint_every=1)
    _train(tmp_path, "whole", iterations=4, **options)
    _train(tmp_path, "split", iterations=2, **options)
    _train(tmp_path, "split", iterations=4, resume=True, **options)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for key in ("maml", "pretrained"):
        for name in whole[key]:
            assert torch.equal(whole[key][name], split[key][name]), (key, name)
    returns = [
        [(r["phase"], r["pre_return"], r["post_return"]) for r in c["history"]]
        for c in (whole, split)
    ]
    assert sorted(returns[0]) == sorted(returns[1])


def test_resume_refuses_a_changed_setting(tmp_path):
    from maml_ext.experiments.presets import ConfigurationError

    _train(tmp_path, "run", iterations=1, meta_batch=2, rollouts=2, seed=1)
    with pytest.raises(ConfigurationError, match="meta_batch=2"):
        _train(tmp_path, "run", iterations=2, meta_batch=3, rollouts=2, seed=1, resume=True)
    # The navigation preset's estimator is LVC (session 12); the paper's may not replace it.
    with pytest.raises(ConfigurationError, match="inner_estimator='lvc'"):
        _train(
            tmp_path,
            "run",
            iterations=2,
            meta_batch=2,
            rollouts=2,
            seed=1,
            resume=True,
            inner_estimator="reinforce",
        )
    with pytest.raises(ConfigurationError, match="--inner-estimator: expected one of"):
        _train(tmp_path, "other", iterations=1, meta_batch=2, rollouts=2, inner_estimator="x")


def test_checkpoint_keeps_the_environment_it_was_trained_in(tmp_path, monkeypatch):
    # The navigation preset's action scale changed (session 11): a checkpoint is evaluated in the
    # environment it was trained in, and a resume may not change it.
    import dataclasses

    from maml_ext.experiments.presets import ConfigurationError
    from maml_ext.rl import train
    from maml_ext.rl.train import load_rl_checkpoint, make_preset_env

    name = "rl-navigation2d"
    assert dict(train.RL_PRESETS[name].env_options) == {"action_scale": 0.1}
    _train(tmp_path, "run", iterations=1, meta_batch=2, rollouts=2, seed=1)
    scaled = load_rl_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert make_preset_env(scaled.preset).action_scale == 0.1
    monkeypatch.setitem(
        train.RL_PRESETS, name, dataclasses.replace(train.RL_PRESETS[name], env_options=())
    )
    with pytest.raises(ConfigurationError, match=r"env_options=\[\['action_scale', 0.1\]\]"):
        _train(tmp_path, "run", iterations=2, meta_batch=2, rollouts=2, seed=1, resume=True)
    _train(tmp_path, "unscaled", iterations=1, meta_batch=2, rollouts=2, seed=1)
    unscaled = load_rl_checkpoint(str(tmp_path / "unscaled" / "checkpoint.pt"))
    assert make_preset_env(unscaled.preset).action_scale == 1.0
    assert make_preset_env(scaled.preset).action_scale == 0.1


def test_mujoco_preset_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    """Without gymnasium and mujoco (hidden here), a locomotion preset says which extra to
    install before it trains or writes anything."""
    from maml_ext import MissingExtraError
    from maml_ext.rl.train import train_rl

    for module in ("mujoco", "gymnasium"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"'rl' extra.*maml_ext\[rl\]"):
        train_rl("rl-halfcheetah-vel", out_dir=str(tmp_path / "run"), iterations=1, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _on(data: TaskData, device) -> TaskData:
    return TaskData(*(getattr(data, f).to(device) for f in TaskData.__dataclass_fields__))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_fused_engine_products_equal_the_torch_engine(seed, activation, device):
    # The policy as a layer program (AppendLogStd) with the engine's gaussian_nll: the inner step,
    # its Hessian-vector products, the Fisher product at the adapted policy and the policy
    # gradient, every task at once, against the torch engine (itself checked against per-task
    # double-backward above), float64; on the GPU, the CUDA kernels against torch on the GPU.
    from maml_ext.rl import fused
    from maml_ext.rl.metarl import FisherAt, FusedInnerCurvature, InnerCurvature, policy_gradient

    generator = torch.Generator().manual_seed(seed)
    policy = _policy(seed, activation).to(device)
    layout, theta = policy.layout(), policy.flat_parameters()
    assert theta.device.type == device
    inner = _on(_random_data(generator, 4, 9), device)
    outer = _on(_random_data(generator, 4, 11), device)
    vectors = torch.randn(4, layout.size, dtype=torch.float64, generator=generator).to(device)
    torch_inner = InnerCurvature(layout, theta, inner, 0.1)
    fused_inner = FusedInnerCurvature(layout, theta, inner, 0.1)
    assert relative_error(fused_inner.adapted, torch_inner.adapted) <= RTOL
    assert relative_error(fused_inner.hvp(vectors), torch_inner.hvp(vectors)) <= RTOL
    adapted = torch_inner.adapted
    torch_fisher, fused_fisher = (
        FisherAt(layout, adapted, outer),
        fused.FusedFisherAt(layout, adapted, outer),
    )
    assert relative_error(fused_fisher.product(vectors), torch_fisher.product(vectors)) <= RTOL
    assert (
        relative_error(
            fused.fused_policy_gradient(layout, adapted, outer),
            policy_gradient(layout, adapted, outer),
        )
        <= RTOL
    )


@pytest.mark.parametrize("first_order", [False, True])
def test_fused_engine_takes_the_same_trpo_step(seed, first_order):
    torch.manual_seed(seed)
    policies = [GaussianPolicy(2, 2, hidden=(16, 16), dtype=torch.float64) for _ in range(2)]
    policies[1].load_state_dict(policies[0].state_dict())
    # Three CG iterations, none skipped: run to convergence, CG's last iterations work on a
    # residual at rounding level, and they, or an early stop that one engine reaches an iteration
    # before the other, move the step by ~1e-9 (measured) whatever the products' agreement.
    learners = [
        MetaTRPO(
            policy,
            inner_lr=0.1,
            first_order=first_order,
            cg_iterations=3,
            cg_tolerance=0.0,
            engine=engine,
        )
        for policy, engine in zip(policies, ("torch", "fused"))
    ]
    inner, outer = _navigation_batch(policies[0], learners[0], seed)
    before = policies[0].flat_parameters()
    results = [learner.step(inner, outer) for learner in learners]
    assert results[0].accepted and results[1].line_search_step == results[0].line_search_step
    steps = [policy.flat_parameters() - before for policy in policies]
    # the step, not the parameters: its size (max-KL-scaled) is what the engines must agree on
    assert relative_error(steps[1], steps[0]) <= RTOL
    assert math.isclose(results[1].surrogate_after, results[0].surrogate_after, rel_tol=1e-9)


def test_fused_engine_refuses_the_lvc_estimator():
    policy = GaussianPolicy(2, 2, hidden=(4,), dtype=torch.float64)
    with pytest.raises(ValueError, match="inner_estimator='lvc' needs engine='torch'"):
        MetaTRPO(policy, inner_estimator="lvc", engine="fused")
    with pytest.raises(ValueError, match="engine: expected one of"):
        MetaTRPO(policy, engine="cuda")
