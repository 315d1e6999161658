"""Per-task primitives at per-task weights, on either backend, for the algorithms whose inner loop
is not MAML's plain SGD (iMAML's proximal steps, Reptile's Adam) or whose meta-gradient is not
MAML's (iMAML's conjugate gradients).

Weights are flat: θ as [P], per-task weights φ as [T, P], in one layout fixed per backend (the
fused program's slot layout, or ``named_parameters()`` order for the reference backend), so the
algorithms do their vector arithmetic (proximal terms, Adam moments, CG) on plain tensors for all
tasks at once. Every call covers all tasks: one op on the fused backend, a per-task autograd loop
on the reference backend.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from . import fused
from .backend import Backend, FusedBackend, Params


class TaskOps:
    """Flat per-task operations of ``backend`` for a model with parameters ``params`` (shapes
    and names only are read)."""

    def __init__(self, backend: Backend, params: Params):
        self.backend = backend
        self.program = backend.program if isinstance(backend, FusedBackend) else None
        if self.program is None:
            self.model, self.loss = backend.model, backend.loss
        self.shapes = {name: p.shape for name, p in params.items()}
        self.sizes = [p.numel() for p in params.values()]
        self._rate_tables: dict[float, torch.Tensor] = {}

    # ---- layout ---------------------------------------------------------------------------

    def flatten(self, params: Params, task_dims: int = 0) -> torch.Tensor:
        """{name: [*lead, *shape]} -> [*lead, P] (lead: ``task_dims`` leading task dims)."""
        if self.program is not None:
            return self.program.flatten(params, task_dims=task_dims)
        return torch.cat(
            [params[name].reshape(*params[name].shape[:task_dims], -1) for name in self.shapes],
            dim=-1,
        )

    def unflatten(self, flat: torch.Tensor) -> Params:
        """[*lead, P] -> {name: [*lead, *shape]}, in ``named_parameters()`` order."""
        if self.program is not None:
            pieces = self.program.unflatten(flat)
            return {name: pieces[name] for name in self.shapes}
        lead = flat.shape[:-1]
        return {
            name: piece.reshape(*lead, *shape)
            for (name, shape), piece in zip(self.shapes.items(), flat.split(self.sizes, dim=-1))
        }

    # ---- per-task computations ----------------------------------------------------------------

    def sgd_step(self, phi: torch.Tensor, rate: float, x, y) -> torch.Tensor:
        """φ_t − rate · ∇L_t(φ_t) for every task t: [T, P] (φ: [T, P], or [P] shared)."""
        if self.program is not None:
            return fused.adapt(
                self.program,
                phi,
                self._rate_table(rate, phi),
                x,
                y,
                loss_code=self.backend.loss_code,
            )
        _, grads = self.gradient(phi, x, y)
        return phi - rate * grads

    def gradient(self, phi: torch.Tensor, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-task loss [T], per-task gradient [T, P]) of each task's loss on (x[t], y[t]) at
        its weights φ_t (φ: [T, P], or [P] shared)."""
        tasks = x.shape[0]
        if self.program is not None:
            # The fused engine's gradient pass with a zero tangent: the HVP it also returns is 0.
            zeros = phi.new_zeros((tasks, phi.shape[-1]))
            loss, grads, _ = fused.loss_hvp(
                self.program, phi, x, y, zeros, loss_code=self.backend.loss_code
            )
            return loss, grads
        losses, grads = [], []
        for t in range(tasks):
            weights = self.unflatten(phi[t] if phi.dim() == 2 else phi)
            weights = {name: w.detach().requires_grad_() for name, w in weights.items()}
            with torch.enable_grad():
                loss = self.loss.fn(functional_call(self.model, weights, (x[t],)), y[t])
                task_grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            task_grads = [
                torch.zeros_like(w) if g is None else g
                for w, g in zip(weights.values(), task_grads)
            ]
            losses.append(loss.detach())
            grads.append(torch.cat([g.reshape(-1) for g in task_grads]))
        return torch.stack(losses), torch.stack(grads)

    def hvp(self, phi: torch.Tensor, x, y, v: torch.Tensor) -> torch.Tensor:
        """H_t v_t for every task, H_t the Hessian of task t's loss at φ_t: [T, P]."""
        if self.program is not None:
            return fused.loss_hvp(self.program, phi, x, y, v, loss_code=self.backend.loss_code)[2]
        phi = phi.expand(x.shape[0], -1) if phi.dim() == 1 else phi
        return self.flatten(self.backend.hvp(self.unflatten(phi), x, y, self.unflatten(v)), 1)

    def forward(self, phi: torch.Tensor, x) -> torch.Tensor:
        """Per-task outputs [T, N, ...] at per-task weights φ [T, P]."""
        phi = phi.expand(x.shape[0], -1) if phi.dim() == 1 else phi
        if self.program is not None:
            with torch.no_grad():
                return fused.forward(self.program, phi, x)
        return self.backend.predict(self.unflatten(phi), x)

    def _rate_table(self, rate: float, like: torch.Tensor) -> torch.Tensor:
        """The fused adapt op's per-element rates [1, P] for one step of ``rate``."""
        table = self._rate_tables.get(rate)
        if table is None or table.device != like.device or table.dtype != like.dtype:
            table = torch.full((1, like.shape[-1]), rate, device=like.device, dtype=like.dtype)
            self._rate_tables[rate] = table
        return table
