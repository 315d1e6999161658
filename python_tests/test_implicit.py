"""iMAML (maml_ext.ImplicitMetaOptimizer) against an independent float64 implementation: the
proximal inner loop as a plain per-task autograd loop, the meta-gradient as a direct solve with
the explicit Hessian (torch.autograd.functional.hessian), and a textbook per-task CG on that
Hessian for the lockstep iterations."""

import copy

import pytest
import torch
from maml_test_utils import conv_net, random_batch, relative_error
from torch import nn
from torch.func import functional_call

import maml_ext

BACKENDS = ["fused", "reference"]


def small_model(outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def loss_fn(name):
    return nn.functional.cross_entropy if name == "cross_entropy" else nn.functional.mse_loss


class Flat:
    """The model's loss as a function of one flat parameter vector (named_parameters order)."""

    def __init__(self, model):
        self.model = model
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        self.sizes = [p.numel() for p in model.parameters()]

    def theta(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, flat):
        pieces = flat.split(self.sizes)
        return {n: piece.reshape(s) for (n, s), piece in zip(self.shapes.items(), pieces)}

    def loss(self, flat, x, y, loss):
        return loss_fn(loss)(functional_call(self.model, self.unflatten(flat), (x,)), y)

    def grad(self, flat, x, y, loss):
        flat = flat.detach().requires_grad_()
        return torch.autograd.grad(self.loss(flat, x, y, loss), flat)[0]


def proximal_descent(flat: Flat, theta, x, y, *, lr, lam, steps, loss):
    """A plain autograd loop: φ ← φ − lr (∇L(φ) + λ (φ − θ)) from φ = θ, one task."""
    phi = theta.clone()
    for _ in range(steps):
        phi = phi - lr * (flat.grad(phi, x, y, loss) + lam * (phi - theta))
    return phi


def textbook_cg(matrix, b, steps):
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(steps):
        ap = matrix @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    return x


def expected(model, batch, *, lr, lam, steps, damping, loss, cg_steps=None):
    """(per-task adapted weights [T, P], meta-gradient [P]): the direct solve, or ``cg_steps``
    iterations of textbook CG on the explicit matrix when given."""
    flat = Flat(model)
    theta = flat.theta()
    sx, sy, qx, qy = batch
    adapted, solutions = [], []
    for t in range(sx.shape[0]):
        phi = proximal_descent(flat, theta, sx[t], sy[t], lr=lr, lam=lam, steps=steps, loss=loss)
        hessian = torch.autograd.functional.hessian(
            lambda w, x=sx[t], y=sy[t]: flat.loss(w, x, y, loss), phi
        )
        matrix = (1 + damping) * torch.eye(len(phi), dtype=phi.dtype) + hessian / lam
        rhs = flat.grad(phi, qx[t], qy[t], loss)
        if cg_steps is None:
            solutions.append(torch.linalg.solve(matrix, rhs))
        else:
            solutions.append(textbook_cg(matrix, rhs, cg_steps))
        adapted.append(phi)
    return torch.stack(adapted), torch.stack(solutions).mean(0)


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def make_case(seed, loss, device, network="mlp"):
    torch.manual_seed(seed)
    if network == "mlp":
        outputs, shape = 4, (3,)
        model = small_model(outputs)
    else:  # conv, batch norm, ReLU, max-pool, linear: 51 parameters
        outputs, shape = 3, (1, 4, 4)
        model = conv_net(ways=outputs, channels=2, blocks=1, image=4)
    generator = torch.Generator().manual_seed(seed)
    batch = random_batch(generator, 3, 6, 5, shape, loss, outputs, torch.float64)
    return model, batch, [t.to(device) for t in batch]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("network", "loss"), [("mlp", "cross_entropy"), ("mlp", "mse"), ("conv", "cross_entropy")]
)
def test_implicit_gradient_matches_a_direct_solve_with_the_explicit_hessian(
    backend, network, loss, seed, device
):
    model, batch, on_device = make_case(seed, loss, device, network)
    lr, lam, steps, damping = 0.3, 2.0, 6, 0.1
    want_phi, want_grad = expected(
        model, batch, lr=lr, lam=lam, steps=steps, damping=damping, loss=loss
    )
    dimension = sum(p.numel() for p in model.parameters())
    opt = maml_ext.ImplicitMetaOptimizer(
        copy.deepcopy(model).to(device),
        None,
        inner_lr=lr,
        inner_steps=steps,
        lam=lam,
        cg_steps=dimension,  # CG is exact after P iterations; it converges long before
        cg_damping=damping,
        loss=loss,
        backend=backend,
    )
    adapted = opt.adapt(on_device[0], on_device[1])
    got_phi = torch.cat([adapted[n].reshape(3, -1) for n, _ in model.named_parameters()], 1)
    assert relative_error(got_phi.cpu(), want_phi) < 1e-10
    result = opt.meta_gradient(*on_device)
    assert result.backend == backend
    assert relative_error(flat_grads(opt.model).cpu(), want_grad) < 1e-8
    # The reported losses are the query loss after adaptation and the support loss at θ.
    flat = Flat(model)
    query = torch.stack(
        [flat.loss(want_phi[t], batch[2][t], batch[3][t], loss) for t in range(3)]
    ).mean()
    support = torch.stack(
        [flat.loss(flat.theta(), batch[0][t], batch[1][t], loss) for t in range(3)]
    ).mean()
    assert abs(result.query_loss.item() - query.item()) < 1e-10 * abs(query.item())
    assert abs(result.support_loss.item() - support.item()) < 1e-10 * abs(support.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_few_cg_iterations_match_per_task_cg_in_lockstep(backend, seed, device):
    """With 3 iterations CG has not converged, so this checks each task's own step sizes."""
    model, batch, on_device = make_case(seed, "cross_entropy", device)
    lr, lam, steps = 0.4, 0.5, 3
    _, want = expected(
        model, batch, lr=lr, lam=lam, steps=steps, damping=0.0, loss="cross_entropy", cg_steps=3
    )
    _, solved = expected(
        model, batch, lr=lr, lam=lam, steps=steps, damping=0.0, loss="cross_entropy"
    )
    opt = maml_ext.ImplicitMetaOptimizer(
        copy.deepcopy(model).to(device),
        None,
        inner_lr=lr,
        inner_steps=steps,
        lam=lam,
        cg_steps=3,
        backend=backend,
    )
    opt.meta_gradient(*on_device)
    got = flat_grads(opt.model).cpu()
    assert relative_error(got, want) < 1e-10
    assert relative_error(want, solved) > 1e-8  # the truncated solve is a different answer


def test_step_applies_the_implicit_gradient_with_the_outer_optimiser(seed):
    model, batch, _ = make_case(seed, "cross_entropy", "cpu")
    _, grad = expected(model, batch, lr=0.2, lam=1.0, steps=4, damping=0.0, loss="cross_entropy")
    before = Flat(model).theta()
    copy_ = copy.deepcopy(model)
    opt = maml_ext.ImplicitMetaOptimizer(
        copy_,
        torch.optim.SGD(copy_.parameters(), lr=0.5),
        inner_lr=0.2,
        inner_steps=4,
        lam=1.0,
        cg_steps=60,
    )
    opt.step(*batch)
    assert relative_error(Flat(copy_).theta(), before - 0.5 * grad) < 1e-8


def test_reference_and_fused_predict_alike(seed):
    model, batch, _ = make_case(seed, "cross_entropy", "cpu")
    outputs = []
    for backend in BACKENDS:
        opt = maml_ext.ImplicitMetaOptimizer(
            copy.deepcopy(model), None, inner_lr=0.3, inner_steps=3, lam=1.0, backend=backend
        )
        outputs.append(opt.predict(opt.adapt(batch[0], batch[1], steps=2), batch[2]))
    assert relative_error(outputs[0], outputs[1]) < 1e-10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(lam=0.0), "lam: expected a positive"),
        (dict(lam=float("inf")), "lam: expected a positive"),
        (dict(cg_steps=0), "cg_steps: expected an integer"),
        (dict(cg_damping=-1.0), "cg_damping: expected a non-negative"),
        (dict(inner_steps=0), "inner_steps: expected an integer"),
        (dict(inner_lr=-0.1), "inner_lr: expected a positive"),
    ],
)
def test_bad_settings_raise_naming_the_argument(options, message):
    settings = dict(inner_lr=0.1, inner_steps=2, lam=1.0) | options
    with pytest.raises(ValueError, match=message):
        maml_ext.ImplicitMetaOptimizer(small_model(4), None, **settings)


def test_bad_input_and_non_finite_steps_change_nothing(seed):
    model, batch, _ = make_case(seed, "cross_entropy", "cpu")
    outer = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = maml_ext.ImplicitMetaOptimizer(model, outer, inner_lr=0.2, inner_steps=2, lam=1.0)
    opt.step(*batch)  # Adam has state now
    weights = Flat(model).theta()
    adam_state = copy.deepcopy(outer.state_dict())
    sx, sy, qx, qy = batch
    with pytest.raises(ValueError, match="query_x: expected 3 tasks"):
        opt.step(sx, sy, qx[:2], qy[:2])
    with pytest.raises(ValueError, match="support_y: class indices must lie in"):
        opt.step(sx, sy + 10, qx, qy)
    with pytest.raises(ValueError, match="query_x: expected dtype"):
        opt.step(sx, sy, qx.float(), qy)
    bad = qx.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nothing was applied"):
        opt.step(sx, sy, bad, qy)
    assert torch.equal(Flat(model).theta(), weights)
    state = outer.state_dict()
    assert all(
        torch.equal(state["state"][k]["exp_avg"], adam_state["state"][k]["exp_avg"])
        for k in state["state"]
    )
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_state_dict_round_trip_records_the_algorithm(seed):
    model, batch, _ = make_case(seed, "cross_entropy", "cpu")
    opt = maml_ext.ImplicitMetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), 1e-2),
        inner_lr=0.2,
        inner_steps=2,
        lam=3.0,
        cg_steps=4,
    )
    opt.step(*batch)
    state = opt.state_dict()
    assert state["config"]["algorithm"] == "imaml"
    assert (state["config"]["lam"], state["config"]["cg_steps"]) == (3.0, 4)
    fresh_model = small_model(4)
    fresh = maml_ext.ImplicitMetaOptimizer(
        fresh_model,
        torch.optim.Adam(fresh_model.parameters(), 1e-2),
        inner_lr=0.2,
        inner_steps=2,
        lam=3.0,
        cg_steps=4,
    )
    fresh.load_state_dict(state)
    assert torch.equal(Flat(fresh_model).theta(), Flat(model).theta())
