"""The op layer: which ops the two libraries register and for which dispatch keys, the program
record format shared by C++ and Python, and meta_step as a differentiable op (its Autograd kernel
against finite differences, opcheck with inputs that require grad)."""

import json

import pytest
import torch
from maml_test_utils import conv_net, random_batch, relative_error
from torch import nn

import maml_ext
from maml_ext import fused
from maml_ext.program import (
    LAYER_RECORDS,
    LOSS_CODES,
    check_program_format,
    compile_program,
    loss_code,
    program_format,
)

pytestmark = pytest.mark.skipif(
    not maml_ext.extension_info()["compiled_ops_loaded"], reason="maml_ext._C is not built"
)

PUBLIC_OPS = {
    "adapt",
    "compiled_with_cuda",
    "frozen_body_meta_step",
    "loss_hvp",
    "meta_gradient",
    "meta_step",
    "meta_step_options",
    "program_format",
    "program_forward",
    "softmax_cross_entropy",
    "task_batch_norm",
    "task_batch_norm_backward",
    "task_batch_norm_relu_max_pool",
    "task_batch_norm_relu_max_pool_backward",
    "task_conv2d",
    "task_conv2d_backward",
    "task_conv2d_with_statistics",
    "task_loss",
}
TEST_HOOKS = {
    "_force_baseline_cpu_kernels",
    "_mlp_meta_step",
    "_task_conv2d_backward_emulated",
    "_task_conv2d_emulated",
    "_task_conv2d_launch_config",
    "_task_conv2d_tile_coverage",
    "_task_conv2d_with_statistics_emulated",
    "task_batch_norm_reduction_plan",
}


def registered_ops(namespace: str) -> set[str]:
    prefix = namespace + "::"
    return {
        name[len(prefix) :].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(prefix)
    }


def test_public_namespace_lists_exactly_the_public_ops():
    assert registered_ops("maml_ext") == PUBLIC_OPS
    assert registered_ops("maml_ext_testing") == TEST_HOOKS


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"maml_ext::{op}", key)


@pytest.mark.parametrize(
    "op",
    [
        "meta_step",
        "adapt",
        "program_forward",
        "loss_hvp",
        "meta_gradient",
        "meta_step_options",
        "frozen_body_meta_step",
    ],
)
def test_device_agnostic_ops_are_registered_once(op):
    assert has_kernel(op, "CompositeExplicitAutograd")
    assert has_kernel(op, "Autograd")
    # Only meta_step has a CPU kernel of its own (the small-MLP path); none has a CUDA one.
    assert has_kernel(op, "CPU") == (op == "meta_step")
    assert not has_kernel(op, "CUDA")


def test_program_format_matches_the_compiled_table():
    compiled = json.loads(torch.ops.maml_ext.program_format())
    assert compiled == program_format()
    assert [entry["name"] for entry in compiled["losses"]] == list(LOSS_CODES)
    assert [entry["code"] for entry in compiled["layers"]] == [r.code for r in LAYER_RECORDS]


def test_a_mismatched_table_is_named():
    compiled = json.loads(torch.ops.maml_ext.program_format())
    compiled["layers"][0]["int_fields"] = list(reversed(compiled["layers"][0]["int_fields"]))
    with pytest.raises(ImportError, match="layers 'linear'"):
        check_program_format(compiled)


def test_loss_names_and_codes():
    assert loss_code("cross_entropy") != loss_code("mse")
    with pytest.raises(ValueError, match="loss: expected one of"):
        loss_code("hinge")
    program = compile_program(nn.Sequential(nn.Linear(2, 3)).double())
    theta = torch.zeros(program.num_params, dtype=torch.float64)
    x = torch.zeros(1, 2, 2, dtype=torch.float64)
    y = torch.zeros(1, 2, 3, dtype=torch.float64)
    bad = max(LOSS_CODES.values()) + 1
    with pytest.raises(ValueError, match=r"argument 'loss'.*1 \(cross_entropy\) 2 \(mse\)"):
        torch.ops.maml_ext.loss_hvp(
            theta, x, y, theta.expand(1, -1), program.ints_list, program.floats_list, bad
        )


@pytest.mark.parametrize(
    "edit, argument, message",
    [
        (lambda ints, floats: (ints[:-2], floats), "program", "ends before field"),
        (
            lambda ints, floats: (ints[:3] + [2] + ints[4:], floats),
            "program",
            "flag: expected 0 or 1",
        ),
        (lambda ints, floats: ([99] + ints, floats), "program", "unknown layer kind 99"),
        (lambda ints, floats: (ints, floats + [0.5]), "program_floats", "read 1 values, got 2"),
        (lambda ints, floats: (ints, []), "program_floats", "value for 'eps'"),
    ],
)
def test_malformed_programs_are_named(edit, argument, message):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    program = compile_program(model)
    ints, floats = edit(program.ints_list, program.floats_list)
    theta = torch.zeros(program.num_params, dtype=torch.float64)
    x = torch.zeros(1, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"argument '{argument}'.*{message}"):
        torch.ops.maml_ext.program_forward(theta, x, ints, floats)


def mlp_case(generator, dtype=torch.float64):
    model = nn.Sequential(
        nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    ).to(dtype)
    return model, random_batch(generator, 3, 4, 3, (2,), "mse", 2, dtype), "mse"


def relu_mlp_case(generator, dtype=torch.float64):
    # Linear/ReLU only: the CPU takes the small-MLP path.
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    return model, random_batch(generator, 3, 4, 3, (2,), "cross_entropy", 3, dtype), "cross_entropy"


def conv_case(generator, dtype=torch.float64):
    model = conv_net(ways=3, channels=3, blocks=1, image=4).to(dtype)
    return (
        model,
        random_batch(generator, 2, 3, 2, (1, 4, 4), "cross_entropy", 3, dtype),
        "cross_entropy",
    )


CASES = [mlp_case, relu_mlp_case, conv_case]
CASE_IDS = ["tanh_mlp", "relu_mlp", "conv"]


def op_inputs(make_case, seed, *, steps=2, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = make_case(generator, dtype)
    program = compile_program(model)
    with torch.no_grad():
        theta = program.flatten(dict(model.named_parameters())).clone()
        theta += 0.1 * torch.randn(theta.shape, dtype=dtype, generator=generator)
    rates = 0.05 + 0.05 * torch.rand(steps, theta.numel(), dtype=dtype, generator=generator)
    return program, theta, rates, batch, loss


@pytest.mark.parametrize("make_case", CASES, ids=CASE_IDS)
def test_meta_step_gradients_by_finite_differences(make_case, seed):
    seed = seed
    program, theta, rates, batch, loss = op_inputs(make_case, seed)
    theta.requires_grad_()
    rates.requires_grad_()

    def mean_query_loss(theta, rates):
        return torch.ops.maml_ext.meta_step(
            theta,
            rates,
            *batch,
            program.ints_list,
            program.floats_list,
            loss_code(loss),
            False,
            False,
        )[5]

    assert torch.autograd.gradcheck(
        mean_query_loss, (theta, rates), eps=1e-6, atol=1e-7, rtol=1e-5
    ), seed


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("make_case", CASES, ids=CASE_IDS)
def test_meta_step_backward_scales_its_gradients(make_case, first_order, seed):
    seed = seed
    program, theta, rates, batch, loss = op_inputs(make_case, seed)
    args = (program.ints_list, program.floats_list, loss_code(loss), first_order)
    bare = torch.ops.maml_ext.meta_step(theta, rates, *batch, *args, True)
    theta.requires_grad_()
    rates.requires_grad_()
    # inner_lr_grad=False: the op still computes the rate gradient backward needs, and returns [0].
    outputs = torch.ops.maml_ext.meta_step(theta, rates, *batch, *args, False)
    assert outputs[4].shape == (0,), seed
    assert [o.requires_grad for o in outputs] == [False] * 5 + [True], seed
    for plain, recorded in zip(bare[:4], outputs[:4]):
        assert torch.equal(plain, recorded), seed
    (3.0 * outputs[5]).backward()
    assert torch.equal(theta.grad, 3.0 * bare[3]), seed
    assert torch.equal(rates.grad, 3.0 * bare[4]), seed


def test_fused_meta_loss_differentiates_through_the_op(seed):
    seed = seed
    program, theta, rates, batch, loss = op_inputs(mlp_case, seed)
    expected = torch.ops.maml_ext.meta_step(
        theta, rates, *batch, program.ints_list, program.floats_list, loss_code(loss), False, True
    )
    theta.requires_grad_()
    rates.requires_grad_()
    mean, query_loss, accuracy, support_loss = fused.meta_loss(
        program, theta, rates, *batch, loss_code=loss_code(loss), first_order=False
    )
    assert accuracy is None and relative_error(mean.detach(), query_loss.mean()) <= 1e-15, seed
    theta_grad, rate_grad = torch.autograd.grad(mean, (theta, rates))
    assert torch.equal(theta_grad, expected[3]) and torch.equal(rate_grad, expected[4]), seed


def test_meta_step_is_not_differentiable_in_the_data(seed):
    program, theta, rates, batch, loss = op_inputs(mlp_case, seed)
    support_x = batch[0].clone().requires_grad_()
    out = torch.ops.maml_ext.meta_step(
        theta,
        rates,
        support_x,
        *batch[1:],
        program.ints_list,
        program.floats_list,
        loss_code(loss),
        False,
        False,
    )
    with pytest.raises(ValueError, match="argument 'support_x'.*theta and inner_lr only"):
        out[5].backward()


@pytest.mark.parametrize("make_case", CASES, ids=CASE_IDS)
def test_opcheck_meta_step_with_inputs_that_require_grad(make_case, seed):
    program, theta, rates, batch, loss = op_inputs(make_case, seed)
    for inner_lr_grad in (False, True):
        args = (
            theta.clone().requires_grad_(),
            rates.clone().requires_grad_(),
            *batch,
            program.ints_list,
            program.floats_list,
            loss_code(loss),
            False,
            inner_lr_grad,
        )
        torch.library.opcheck(torch.ops.maml_ext.meta_step.default, args)


@pytest.mark.parametrize("make_case", CASES, ids=CASE_IDS)
def test_opcheck_meta_gradient_with_parameters_that_require_grad(make_case, seed):
    generator = torch.Generator().manual_seed(seed)
    model, batch, loss = make_case(generator)
    program = compile_program(model)
    params = [dict(model.named_parameters())[name] for name in program.slot_names]
    rates = torch.full((2, program.num_params), 0.05, dtype=torch.float64)
    args = (params, rates, *batch, program.ints_list, program.floats_list, loss_code(loss), False)
    torch.library.opcheck(
        torch.ops.maml_ext.meta_gradient.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("op", ["adapt", "loss_hvp", "program_forward"])
def test_non_differentiable_ops_say_so(op, seed):
    program, theta, rates, batch, loss = op_inputs(conv_case, seed)
    sx, sy, qx, _ = batch
    per_task = theta.expand(sx.shape[0], -1).clone().requires_grad_()
    code = loss_code(loss)
    call = {
        "adapt": lambda: torch.ops.maml_ext.adapt(
            per_task, rates, sx, sy, program.ints_list, program.floats_list, code
        ),
        "loss_hvp": lambda: torch.ops.maml_ext.loss_hvp(
            per_task,
            sx,
            sy,
            torch.ones_like(per_task),
            program.ints_list,
            program.floats_list,
            code,
        )[0],
        "program_forward": lambda: torch.ops.maml_ext.program_forward(
            per_task, qx, program.ints_list, program.floats_list
        ),
    }[op]
    torch.library.opcheck(
        getattr(torch.ops.maml_ext, op).default,
        {
            "adapt": (per_task, rates, sx, sy, program.ints_list, program.floats_list, code),
            "loss_hvp": (
                per_task,
                sx,
                sy,
                torch.ones_like(per_task),
                program.ints_list,
                program.floats_list,
                code,
            ),
            "program_forward": (per_task, qx, program.ints_list, program.floats_list),
        }[op],
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    with pytest.raises(RuntimeError, match="not implemented"):
        call().sum().backward()
