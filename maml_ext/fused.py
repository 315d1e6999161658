"""The fused backend's Python side: thin calls of the maml_ext._C ops and their fake (meta) kernels.

One call to ``torch.ops.maml_ext.meta_step`` runs the whole meta-step for all tasks in C++/CUDA.
The op is differentiable (its Autograd kernel, csrc/meta_step_autograd.cpp, hands back the
meta-gradient it computed), so learned inner rates (built from their parameters by differentiable
ops) get their gradients through ordinary autograd.
"""

from __future__ import annotations

import torch

from ._extension import compiled_ops_available
from .program import LayerProgram, loss_code as code_of_loss, output_shape


def _register_fake_kernels() -> None:
    """Shape functions for torch.compile / FakeTensor tracing and torch.library.opcheck."""

    def options_results(theta, inner_lr, tasks, loss, inner_lr_grad, shift):
        accuracy = theta.new_empty((tasks,) if loss == code_of_loss("cross_entropy") else (0,))
        return (
            theta.new_empty((tasks,)),
            accuracy,
            theta.new_empty((tasks,)),
            theta.new_empty(theta.shape),
            theta.new_empty(inner_lr.shape if inner_lr_grad else (0,)),
            theta.new_empty(inner_lr.shape if shift else (0,)),
            theta.new_empty(()),
        )

    @torch.library.register_fake("maml_ext::meta_step")
    def _(
        theta,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program,
        program_floats,
        loss,
        first_order,
        inner_lr_grad,
    ):
        # meta_step_options' outputs without its inner-shift gradient (the sixth).
        results = options_results(theta, inner_lr, support_x.shape[0], loss, inner_lr_grad, False)
        return results[:5] + results[6:]

    @torch.library.register_fake("maml_ext::meta_step_options")
    def _meta_step_options(
        theta,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program,
        program_floats,
        loss,
        first_order,
        inner_lr_grad,
        query_weights=None,
        inner_shift=None,
    ):
        tasks = support_x.shape[0]
        return options_results(theta, inner_lr, tasks, loss, inner_lr_grad, inner_shift is not None)

    @torch.library.register_fake("maml_ext::frozen_body_meta_step")
    def _frozen_body_meta_step(
        theta,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        body_program,
        body_floats,
        head_program,
        head_floats,
        loss,
        first_order,
        inner_lr_grad,
    ):
        return options_results(theta, inner_lr, support_x.shape[0], loss, inner_lr_grad, False)

    @torch.library.register_fake("maml_ext::meta_gradient")
    def _(
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program,
        program_floats,
        loss,
        first_order,
    ):
        # The gradients are views of one flat buffer, as the real kernel returns them.
        first, sizes = params[0], [p.numel() for p in params]
        flat = first.new_empty((sum(sizes),))
        grads = [piece.view(p.shape) for piece, p in zip(flat.split(sizes), params)]
        accuracy = first.new_empty(() if loss == code_of_loss("cross_entropy") else (0,))
        return (
            grads,
            first.new_empty(()),
            accuracy,
            first.new_empty(()),
            first.new_empty((), dtype=torch.bool),
        )

    @torch.library.register_fake("maml_ext::adapt")
    def _(theta, inner_lr, support_x, support_y, program, program_floats, loss):
        return theta.new_empty((support_x.shape[0], theta.shape[-1]))

    @torch.library.register_fake("maml_ext::program_forward")
    def _(theta, x, program, program_floats):
        return x.new_empty((x.shape[0], x.shape[1], *output_shape(program, x.shape[2:])))

    @torch.library.register_fake("maml_ext::loss_hvp")
    def _(theta, x, y, v, program, program_floats, loss):
        tasks, params = x.shape[0], theta.shape[-1]
        return (
            theta.new_empty((tasks,)),
            theta.new_empty((tasks, params)),
            theta.new_empty((tasks, params)),
        )

    @torch.library.register_fake("maml_ext::task_loss")
    def _(z, z_tangent, y, loss):
        tasks = z.shape[0]
        accuracy = z.new_empty((tasks,) if loss == code_of_loss("cross_entropy") else (0,))
        tangent = z.new_empty(z.shape if z_tangent is not None else (0,))
        return z.new_empty((tasks,)), accuracy, torch.empty_like(z), tangent

    @torch.library.register_fake("maml_ext::softmax_cross_entropy")
    def _(logits, target, logits_tangent):
        rows = logits.shape[0]
        tangent = logits.new_empty(logits.shape if logits_tangent is not None else (0,))
        return (
            logits.new_empty((rows,)),
            logits.new_empty((rows,)),
            torch.empty_like(logits),
            tangent,
        )


if compiled_ops_available():
    _register_fake_kernels()


def meta_step(
    program: LayerProgram,
    theta,
    inner_lr,
    support_x,
    support_y,
    query_x,
    query_y,
    *,
    loss_code: int,
    first_order: bool,
    inner_lr_grad: bool = False,
):
    """The op's per-task results and gradients: (per-task query loss, per-task query accuracy or
    [0], per-task support loss, meta-gradient [P], inner-rate gradient [K, P] or [0])."""
    return torch.ops.maml_ext.meta_step(
        theta,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program.ints_list,
        program.floats_list,
        loss_code,
        first_order,
        inner_lr_grad,
    )[:5]


def meta_gradient(
    program: LayerProgram,
    params: list[torch.Tensor],
    inner_lr,
    support_x,
    support_y,
    query_x,
    query_y,
    *,
    loss_code: int,
    first_order: bool,
):
    """MetaOptimizer's fixed-rate meta-step in one op, for ``params`` in the program's slot order:
    (their meta-gradients (views of one buffer), mean query loss, mean query accuracy or None,
    mean support loss, finite: a 0-d bool tensor, true iff the query loss and every gradient
    element are finite); no autograd, no host synchronisation."""
    grads, loss, accuracy, support_loss, finite = torch.ops.maml_ext.meta_gradient.default(
        params,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program.ints_list,
        program.floats_list,
        loss_code,
        first_order,
    )
    return grads, loss, (accuracy if accuracy.numel() else None), support_loss, finite


def meta_loss(
    program: LayerProgram,
    theta: torch.Tensor,
    inner_lr: torch.Tensor,
    support_x,
    support_y,
    query_x,
    query_y,
    *,
    loss_code: int,
    first_order: bool,
):
    """(mean query loss (differentiable in theta and inner_lr), per-task query loss, per-task
    query accuracy or None, per-task support loss before adaptation)."""
    query_loss, query_accuracy, support_loss, _, _, loss = torch.ops.maml_ext.meta_step(
        theta,
        inner_lr,
        support_x,
        support_y,
        query_x,
        query_y,
        program.ints_list,
        program.floats_list,
        loss_code,
        first_order,
        False,
    )
    return loss, query_loss, (query_accuracy if query_accuracy.numel() else None), support_loss


def adapt(program: LayerProgram, theta, inner_lr, support_x, support_y, *, loss_code: int):
    return torch.ops.maml_ext.adapt(
        theta, inner_lr, support_x, support_y, program.ints_list, program.floats_list, loss_code
    )


def forward(program: LayerProgram, theta, x):
    return torch.ops.maml_ext.program_forward(theta, x, program.ints_list, program.floats_list)


def loss_hvp(program: LayerProgram, theta, x, y, v, *, loss_code: int):
    return torch.ops.maml_ext.loss_hvp(
        theta, x, y, v, program.ints_list, program.floats_list, loss_code
    )
