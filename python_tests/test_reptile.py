"""Reptile (maml_ext.Reptile) against a plain per-task loop written here: a copy of the model per
task, torch.optim.SGD or torch.optim.Adam on its support set, then θ + ε · mean(φ_t − θ)."""

import copy

import pytest
import torch
from maml_test_utils import random_batch, relative_error
from torch import nn

import maml_ext

BACKENDS = ["fused", "reference"]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def per_task_loop(model, sx, sy, *, optimizer, lr, steps, loss, betas=(0.0, 0.999), eps=1e-8):
    """φ_t [T, P]: each task's copy of the model trained by a torch optimiser, full batch."""
    adapted = []
    for t in range(sx.shape[0]):
        task_model = copy.deepcopy(model)
        if optimizer == "sgd":
            inner = torch.optim.SGD(task_model.parameters(), lr=lr)
        else:
            inner = torch.optim.Adam(task_model.parameters(), lr=lr, betas=betas, eps=eps)
        for _ in range(steps):
            inner.zero_grad()
            loss(task_model(sx[t]), sy[t]).backward()
            inner.step()
        adapted.append(flat(task_model))
    return torch.stack(adapted)


def case(seed, network, loss_name):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if network == "mlp":
        model, shape, outputs = mlp(), (3,), 4
    else:
        # No conv bias before batch norm: its gradient is exactly 0 in exact arithmetic, so each
        # implementation's rounding noise there is all Adam sees, and Adam scales it up by 1/eps.
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, bias=False),
            nn.BatchNorm2d(3, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 3),
        ).double()
        shape, outputs = (1, 4, 4), 3
    batch = random_batch(generator, 3, 5, 4, shape, loss_name, outputs, torch.float64)
    loss = nn.functional.cross_entropy if loss_name == "cross_entropy" else nn.functional.mse_loss
    return model, batch, loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("network", "loss_name"), [("mlp", "cross_entropy"), ("mlp", "mse"), ("conv", "cross_entropy")]
)
def test_step_matches_a_per_task_torch_optimiser_loop(
    backend, optimizer, network, loss_name, seed, device
):
    model, batch, loss = case(seed, network, loss_name)
    lr = 0.1 if optimizer == "sgd" else 0.01
    steps, epsilon = 4, 0.7
    theta = flat(model)
    phi = per_task_loop(
        model, batch[0], batch[1], optimizer=optimizer, lr=lr, steps=steps, loss=loss
    )
    want = theta + epsilon * (phi.mean(0) - theta)

    reptile = maml_ext.Reptile(
        copy.deepcopy(model).to(device),
        inner_lr=lr,
        inner_steps=steps,
        outer_lr=epsilon,
        inner_optimizer=optimizer,
        loss=loss_name,
        backend=backend,
    )
    on_device = [t.to(device) for t in batch]
    adapted = reptile.adapt(on_device[0], on_device[1])
    got_phi = torch.cat([adapted[n].reshape(3, -1) for n, _ in model.named_parameters()], 1)
    assert relative_error(got_phi.cpu(), phi) < 1e-10
    result = reptile.step(*on_device)
    assert result.backend == backend
    assert relative_error(flat(reptile.model).cpu(), want) < 1e-10
    query_losses = []
    for t in range(3):
        task_model = copy.deepcopy(model)
        nn.utils.vector_to_parameters(phi[t], task_model.parameters())
        query_losses.append(loss(task_model(batch[2][t]), batch[3][t]).detach())
    want_query = torch.stack(query_losses).mean()
    assert abs(result.query_loss.item() - want_query.item()) < 1e-10 * want_query.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_annealing_and_meta_gradient(backend, seed):
    model, batch, loss = case(seed, "mlp", "cross_entropy")
    reptile = maml_ext.Reptile(
        model,
        inner_lr=0.1,
        inner_steps=2,
        outer_lr=1.0,
        anneal=4,
        final_outer_lr=0.2,
        backend=backend,
    )
    for expected_epsilon in (1.0, 0.8, 0.6, 0.4, 0.2, 0.2):
        assert reptile.current_outer_lr == pytest.approx(expected_epsilon, rel=1e-12)
        theta = flat(model)
        phi = per_task_loop(model, batch[0], batch[1], optimizer="sgd", lr=0.1, steps=2, loss=loss)
        reptile.step(*batch)
        want = theta + expected_epsilon * (phi.mean(0) - theta)
        assert relative_error(flat(model), want) < 1e-10
    # meta_gradient: the direction θ − mean φ in .grad, θ unchanged.
    theta = flat(model)
    phi = per_task_loop(model, batch[0], batch[1], optimizer="sgd", lr=0.1, steps=2, loss=loss)
    reptile.meta_gradient(*batch)
    assert torch.equal(flat(model), theta)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(grads, theta - phi.mean(0)) < 1e-10


def test_state_dict_keeps_the_annealing_position(seed):
    model, batch, _ = case(seed, "mlp", "cross_entropy")
    reptile = maml_ext.Reptile(
        model, inner_lr=0.1, inner_steps=1, outer_lr=1.0, anneal=10, inner_optimizer="adam"
    )
    for _ in range(3):
        reptile.step(*batch)
    state = reptile.state_dict()
    assert state["config"]["algorithm"] == "reptile"
    assert state["config"]["inner_optimizer"] == "adam"
    fresh = maml_ext.Reptile(
        mlp(), inner_lr=0.1, inner_steps=1, outer_lr=1.0, anneal=10, inner_optimizer="adam"
    )
    fresh.load_state_dict(state)
    assert fresh.meta_steps == 3
    assert fresh.current_outer_lr == pytest.approx(0.7)
    assert torch.equal(flat(fresh.model), flat(model))
    broken = dict(state)
    broken.pop("reptile")
    before = flat(fresh.model)
    with pytest.raises(ValueError, match="Reptile.state_dict"):
        fresh.load_state_dict(broken)
    assert torch.equal(flat(fresh.model), before) and fresh.meta_steps == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(outer_lr=0.0), "outer_lr: expected a positive"),
        (dict(inner_optimizer="rmsprop"), "inner_optimizer: expected one of"),
        (dict(anneal=0), "anneal: expected an integer"),
        (dict(anneal=2.5), "anneal: expected an integer"),
        (dict(final_outer_lr=-1.0), "final_outer_lr: expected a non-negative"),
        (dict(inner_betas=(0.9,)), "inner_betas: expected two numbers"),
        (dict(inner_betas=(0.9, 1.0)), "inner_betas: expected two numbers"),
        (dict(inner_eps=0.0), "inner_eps: expected a positive"),
        (dict(inner_steps=0), "inner_steps: expected an integer"),
    ],
)
def test_bad_settings_raise_naming_the_argument(options, message):
    settings = dict(inner_lr=0.1, inner_steps=2, outer_lr=1.0) | options
    with pytest.raises(ValueError, match=message):
        maml_ext.Reptile(mlp(), **settings)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bad_input_and_non_finite_steps_change_nothing(optimizer, seed):
    model, batch, _ = case(seed, "mlp", "cross_entropy")
    reptile = maml_ext.Reptile(
        model, inner_lr=0.1, inner_steps=2, outer_lr=1.0, anneal=5, inner_optimizer=optimizer
    )
    theta = flat(model)
    sx, sy, qx, qy = batch
    with pytest.raises(ValueError, match="query_y: expected shape"):
        reptile.step(sx, sy, qx, qy[:, :2])
    with pytest.raises(ValueError, match="support_x: expected dtype"):
        reptile.step(sx.float(), sy, qx, qy)
    bad = sx.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="nothing was applied"):
        reptile.step(bad, sy, qx, qy)
    assert torch.equal(flat(model), theta)
    assert reptile.meta_steps == 0
    assert all(p.grad is None for p in model.parameters())
