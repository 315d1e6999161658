"""MetaOptimizer: the MAML meta-update for an ordinary nn.Module and outer optimiser.

It validates inputs, picks a backend object per (device, dtype) and delegates the computation to
it; the backends and what they provide are in maml_ext/backend.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import cuda_graph as graphs, distributed as dist_meta, reference, task_chunks
from .backend import Backend, choose_backend, final_weights
from .inner_lr import InnerLearningRates
from .losses import LossFn, resolve_loss
from .validation import (
    check_inputs,
    check_step_counts,
    check_steps,
    check_targets,
    check_tensor,
)
from .variants import PerStepBatchNorm, Variant, msl_weights, resolve_adapted


@dataclasses.dataclass
class MetaStepResult:
    """Detached 0-dim tensors (no host synchronisation needed to return them)."""

    query_loss: torch.Tensor  # mean query loss over tasks after adaptation
    query_accuracy: torch.Tensor | None  # mean query accuracy (classification), else None
    support_loss: torch.Tensor  # mean support loss before adaptation
    backend: str  # "fused" or "reference"


class MetaOptimizer:
    """Model-Agnostic Meta-Learning (Finn et al., 2017) for ``model``.

    Args:
        model: the network; its parameters are the meta-learned initialisation θ.
        outer_optimizer: a torch optimiser over ``model.parameters()`` (learned inner rates are
            added to it as a new parameter group), or None to use only ``meta_gradient``.
        inner_lr: α, the inner SGD step size (the initial value when learned).
        inner_steps: K >= 1 inner steps per task.
        first_order: drop the Hessian term (FOMAML).
        loss: "cross_entropy", "mse", "gaussian_nll" (:func:`maml_ext.losses.gaussian_nll`), or a
            callable ``(outputs [N, ...], targets) -> scalar``.
        learn_inner_lr: None (fixed), "scalar", "per_parameter" (Meta-SGD), or "per_step"
            (a rate per parameter tensor and step, as MAML++).
        backend: "fused" (compiled, task-batched), "reference" (plain PyTorch, any model) or
            "auto" (fused where supported, else reference with one warning saying why).
        cuda_graph: capture the fused meta-step on CUDA in a CUDA graph per input shape and
            replay it (maml_ext/cuda_graph.py: when it pays, memory); needs the fused backend.
            True keeps up to ``cuda_graph.MAX_GRAPHS`` graphs; a ``cuda_graph.MetaStepGraphs``
            given here sets another bound (``max_graphs``) and is where the graphs are kept.
        adapt: ANIL and friends: which parameters take inner steps. "all" (MAML), "head" (the
            last nn.Linear's parameters: ANIL), or a list of parameter names or prefixes (a
            prefix such as "features.3" names every parameter under it). Every parameter is
            still meta-learned; the others keep θ through the inner loop (inner rate 0, and no
            learned rate of their own). On the fused backend a head of the last layers from a
            Linear on runs with the frozen body's features computed once per step.
        multi_step_loss: MAML++'s multi-step loss: the meta-objective is Σ_k w_k · (mean query
            loss after inner step k) with the authors' annealing: w starts at 1/K; the non-final
            weights decay linearly over ``msl_iterations`` outer steps to 0.03/K while the final
            one grows so that they sum to 1; from ``msl_iterations`` on only the final loss
            counts. ``MetaStepResult.query_loss`` stays the final step's loss.
        msl_iterations: the outer steps over which the multi-step loss is annealed (required with
            ``multi_step_loss``).
        per_step_batch_norm: MAML++'s per-step batch-norm weights and biases: inner step k's
            passes (and the query pass after step k) use step k's. The model's own batch-norm
            parameters are step 0's; ``self.per_step_batch_norm`` holds steps 1 … K-1 (tensors
            [K - 1, C], initialised from the model's), added to the outer optimiser as a parameter
            group and saved in ``state_dict``. As in the authors' code they take no inner steps
            (``adapt="all"`` leaves them out; naming them in ``adapt`` is an error). ``adapt`` with
            more steps than K reuses the last step's, and its batch-norm entries are the ones of
            the last step taken, which ``predict`` uses.
        first_order_until: derivative-order annealing (MAML++): first order for the first N outer
            steps (``step()`` calls), then as ``first_order`` says.

        distributed: False, True (the default torch.distributed process group) or a
            ProcessGroup: each rank passes its own shard of tasks (shards may differ in size);
            ``step``/``meta_gradient`` return and apply the gradient of the mean query loss over
            all ranks' tasks, and global means, from one all-reduce of one flat buffer per step
            (maml_ext/distributed.py). Parameters and learned rates are broadcast from rank 0
            here. With ``cuda_graph`` the all-reduce runs after the replayed graph, outside it.
            A rank that raises must not go on alone: the group's next collective would not match.
        consistency_check_every: with ``distributed``, every N steps compare a checksum of the
            parameters across ranks and raise ``distributed.RankDivergedError`` naming the ranks
            that differ from rank 0 (None: never).
        max_tasks_per_call: None (all tasks in one call), an integer (the meta-batch runs in
            chunks of at most this many tasks whose meta-gradients are combined, weighted by
            their task counts: the unchunked result up to round-off, the peak memory of one
            chunk), or "auto": the chunk from ``memory_budget`` or free CUDA memory
            (maml_ext/task_chunks.py says how the bytes per task are estimated).
        memory_budget: bytes one meta-step may use, for ``max_tasks_per_call="auto"`` (required
            on the CPU; on CUDA the default is a share of free device memory).

    ``iteration`` counts the outer steps taken (``step()``); it drives ``msl_iterations`` and
    ``first_order_until`` and is saved in ``state_dict``.

    Tensors are task-batched: inputs ``[T, N, *features]``; targets ``[T, N]`` class indices or
    ``[T, N, *outputs]`` for regression. Batch norm must use batch statistics
    (``track_running_stats=False``): each task is normalised with its own statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        outer_optimizer: torch.optim.Optimizer | None,
        *,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "cross_entropy",
        learn_inner_lr: str | None = None,
        backend: str = "auto",
        cuda_graph: bool = False,
        adapt: str | list[str] = "all",
        multi_step_loss: bool = False,
        msl_iterations: int | None = None,
        per_step_batch_norm: bool = False,
        first_order_until: int = 0,
        distributed=False,
        consistency_check_every: int | None = None,
        max_tasks_per_call: int | str | None = None,
        memory_budget: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        group = dist_meta.resolve_group(distributed)
        if consistency_check_every is not None and group is None:
            raise ValueError("consistency_check_every: only used with distributed=True")
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.first_order = bool(first_order)
        self._check_variant_args(
            multi_step_loss, msl_iterations, per_step_batch_norm, first_order_until, cuda_graph
        )
        self.multi_step_loss = multi_step_loss
        self.msl_iterations = msl_iterations
        self.first_order_until = first_order_until
        self.iteration = 0
        self.loss = resolve_loss(loss)
        reference.check_batch_norm(model)
        # Where each parameter lives (its module's _parameters dict and key), so that reading the
        # current parameters each step is a few dict lookups instead of a module-tree walk (which
        # costs tens of µs: a third of a sinusoid meta-step's Python). A parameter replaced in its
        # module (`model.to(...)`, `setattr`) is read afresh; modules added later are not seen, as
        # the compiled program would not know them either.
        self._sites = [(name, *self._site(model, name)) for name, _ in model.named_parameters()]
        params = self._params(model)
        if not params:
            raise ValueError("model: has no trainable parameters to meta-learn")
        first = next(iter(params.values()))
        self.model = model
        self.outer_optimizer = outer_optimizer
        adapted = resolve_adapted(model, adapt, list(params))
        self.per_step_batch_norm = (
            PerStepBatchNorm(model, self.inner_steps, list(params)) if per_step_batch_norm else None
        )
        if self.per_step_batch_norm is not None:
            adapted = self._without_batch_norm(adapt, adapted, list(params))
        self.adapt_names = adapted  # None: all
        # Whether a MAML++ option may change a step (the default path skips building a Variant).
        self._variants_on = multi_step_loss or self.per_step_batch_norm is not None
        self.inner_lr = InnerLearningRates(
            {n: p.shape for n, p in params.items()},
            self.inner_steps,
            inner_lr,
            learn_inner_lr,
            device=first.device,
            dtype=first.dtype,
            adapted=adapted,
        )
        self.requested_backend = backend
        self._output_shapes: dict[tuple, tuple[int, ...]] = {}
        # One backend object per (device, dtype), picked on first use; the first one now, which
        # validates `backend` and warns once where 'auto' falls back.
        chosen = choose_backend(backend, model, self.loss, first.device, first.dtype, warn=True)
        self._cuda_graphs = graphs.check_option(
            cuda_graph, backend=backend, chosen=chosen, device=first.device
        )
        self._backends: dict[tuple, Backend] = {
            (first.device, first.dtype): graphs.graphed(chosen, self._cuda_graphs)
        }
        self.max_tasks_per_call, self.memory_budget = task_chunks.check_options(
            max_tasks_per_call, memory_budget, first.device
        )
        self._activations: dict[tuple, int] = {}  # per-sample activation elements per features
        self._reducer = None
        if group is not None:
            self._reducer = dist_meta.MetaGradientReducer(
                group, consistency_check_every=consistency_check_every
            )
            self._reducer.broadcast(
                [*model.parameters(), *self.inner_lr.parameters(), *self._per_step_parameters()]
            )
        # Last, once every argument is checked: a bad one leaves the outer optimiser as it was.
        if outer_optimizer is not None and learn_inner_lr is not None:
            outer_optimizer.add_param_group({"params": list(self.inner_lr.parameters())})
        if outer_optimizer is not None and self.per_step_batch_norm is not None:
            outer_optimizer.add_param_group({"params": list(self.per_step_batch_norm.parameters())})

    # ---- public API -------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend used for the model's current device and dtype."""
        first = next(iter(self._params(self.model).values()))
        return self._backend_for(first.device, first.dtype).name

    @property
    def cuda_graphs(self) -> graphs.MetaStepGraphs | None:
        """The captured CUDA graphs of the meta-step (how many are kept, how many captures were
        made) with ``cuda_graph``; None without."""
        return self._cuda_graphs

    @property
    def reducer(self) -> dist_meta.MetaGradientReducer | None:
        """With ``distributed``, what combines the ranks' meta-gradients (its
        ``last_communication_s`` is the wall time of the last all-reduce); else None."""
        return self._reducer

    def tasks_per_call(self, support_x: torch.Tensor, query_x: torch.Tensor) -> int:
        """How many tasks of this meta-batch one backend call processes (``max_tasks_per_call``;
        for "auto" the budget divided by the estimated bytes per task, task_chunks.py)."""
        tasks = support_x.shape[0]
        chunk = self.max_tasks_per_call
        if chunk is None:
            return tasks
        if chunk != "auto":
            return min(chunk, tasks)
        params = self._params(self.model)
        first = next(iter(params.values()))
        features = tuple(support_x.shape[2:])
        if features not in self._activations:
            self._activations[features] = task_chunks.activation_elements(
                self.model, features, first
            )
        per_task = task_chunks.estimate_task_bytes(
            parameters=sum(p.numel() for p in params.values()),
            activations=self._activations[features],
            inner_steps=self.inner_steps,
            support_samples=support_x.shape[1],
            query_samples=query_x.shape[1],
            first_order=self.first_order,
            itemsize=first.element_size(),
        )
        budget = task_chunks.budget_bytes(self.memory_budget, first.device)
        return max(1, min(tasks, budget // per_task))

    def step(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """One meta-update: the meta-gradient of the mean query loss, then the outer step.
        Raises (changing nothing) on bad input or a non-finite loss or gradient."""
        if self.outer_optimizer is None:
            raise RuntimeError("step() needs an outer optimiser; use meta_gradient() without one")
        result, tensors, grads = self._meta_gradient(support_x, support_y, query_x, query_y)
        self.outer_optimizer.zero_grad(set_to_none=True)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad
        self.outer_optimizer.step()
        self.iteration += 1
        return result

    def meta_gradient(self, support_x, support_y, query_x, query_y) -> MetaStepResult:
        """Accumulates the meta-gradient into ``.grad`` of the model's parameters (and of learned
        rates) as ``backward()`` would, without stepping: for custom loops and torch.distributed."""
        result, tensors, grads = self._meta_gradient(support_x, support_y, query_x, query_y)
        for tensor, grad in zip(tensors, grads):
            tensor.grad = grad if tensor.grad is None else tensor.grad + grad
        return result

    def adapt(self, support_x, support_y, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task adapted weights {name: [T, *shape]} after ``steps`` (default: inner_steps)
        SGD steps on each task's support set. No graph is kept."""
        steps = self.inner_steps if steps is None else check_steps("steps", steps)
        params = self._params(self.model)
        self._check_support(support_x, support_y, next(iter(params.values())))
        return final_weights(self._adapt_trajectory(params, support_x, support_y, [steps]))

    def adapt_steps(
        self, support_x, support_y, steps: Iterable[int]
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(k, adapt(support_x, support_y, steps=k))`` for each k in ``steps`` (distinct
        integers >= 0, yielded in increasing order; k = 0: θ for every task), from one inner loop:
        the cost of the largest k alone, where calling ``adapt`` per k costs the sum of all k
        (the test protocol's curve over 0..K steps). Each item is computed when it is asked for;
        the inputs and ``steps`` are checked at the call."""
        counts = check_step_counts("steps", steps)
        params = self._params(self.model)
        self._check_support(support_x, support_y, next(iter(params.values())))
        positive = [k for k in counts if k > 0]

        def trajectory():
            if counts[0] == 0:
                tasks = support_x.shape[0]
                yield (
                    0,
                    {
                        name: p.detach().unsqueeze(0).expand(tasks, *p.shape).contiguous()
                        for name, p in params.items()
                    },
                )
            if positive:
                yield from self._adapt_trajectory(params, support_x, support_y, positive)

        return trajectory()

    def predict(self, adapted: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-task outputs [T, N, ...] of the model at the adapted weights from ``adapt``."""
        params = self._params(self.model)
        if not isinstance(adapted, dict) or set(adapted) != set(params):
            got = sorted(adapted) if isinstance(adapted, dict) else type(adapted).__name__
            raise ValueError(
                f"adapted: expected the dict returned by adapt() with keys {sorted(params)}, "
                f"got {got}"
            )
        first = next(iter(params.values()))
        tasks = next(iter(adapted.values())).shape[0]
        for name, value in adapted.items():
            check_tensor(f"adapted['{name}']", value, dtype=first.dtype, device=first.device)
            if tuple(value.shape) != (tasks, *params[name].shape):
                raise ValueError(
                    f"adapted['{name}']: expected shape "
                    f"[{tasks}, {', '.join(map(str, params[name].shape))}], got "
                    f"[{', '.join(map(str, value.shape))}]"
                )
        check_inputs("x", x, tasks=tasks, dtype=first.dtype, device=first.device)
        return self._backend_for(first.device, first.dtype).predict(adapted, x)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "inner_lr": self.inner_lr.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict() if self.outer_optimizer else None,
            "config": self._config(),
            "iteration": self.iteration,
            "per_step_batch_norm": (
                None if self.per_step_batch_norm is None else self.per_step_batch_norm.state_dict()
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores model, learned rates and outer optimiser; checks everything first, so a
        mismatching state raises and leaves this optimiser as it was."""
        if not isinstance(state, dict) or not {"model", "inner_lr", "config"} <= set(state):
            raise ValueError("state: expected a dict from MetaOptimizer.state_dict()")
        mine = self._config()
        defaults = {"adapt": "all", "per_step_batch_norm": False}  # states saved before them
        for key in ("learn_inner_lr", "inner_steps", "per_step_batch_norm", "adapt"):
            saved_value = state["config"].get(key, defaults.get(key))
            if saved_value != mine[key]:
                raise ValueError(
                    f"state: saved with {key}={saved_value!r}, this "
                    f"MetaOptimizer has {key}={mine[key]!r}"
                )
        iteration = state.get("iteration", 0)
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"state['iteration']: expected a non-negative int, got {iteration!r}")
        checked = [
            ("model", self.model, state["model"]),
            ("inner_lr", self.inner_lr, state["inner_lr"]),
        ]
        if self.per_step_batch_norm is not None:
            checked.append(
                (
                    "per_step_batch_norm",
                    self.per_step_batch_norm,
                    state.get("per_step_batch_norm") or {},
                )
            )
        for label, module, saved in checked:
            current = module.state_dict()
            if set(saved) != set(current):
                raise ValueError(
                    f"state['{label}']: keys differ: missing "
                    f"{sorted(set(current) - set(saved))}, unexpected "
                    f"{sorted(set(saved) - set(current))}"
                )
            for key, value in saved.items():
                if tuple(value.shape) != tuple(current[key].shape):
                    raise ValueError(
                        f"state['{label}']['{key}']: expected shape "
                        f"{tuple(current[key].shape)}, got {tuple(value.shape)}"
                    )
        if self.outer_optimizer is not None and state.get("outer_optimizer") is not None:
            saved_groups = state["outer_optimizer"]["param_groups"]
            groups = self.outer_optimizer.param_groups
            if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
                raise ValueError(
                    "state['outer_optimizer']: its parameter groups do not match this "
                    "outer optimiser's"
                )
        self.model.load_state_dict(state["model"])
        self.inner_lr.load_state_dict(state["inner_lr"])
        if self.per_step_batch_norm is not None:
            self.per_step_batch_norm.load_state_dict(state["per_step_batch_norm"])
        self.iteration = iteration
        if self.outer_optimizer is not None and state.get("outer_optimizer") is not None:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _check_variant_args(
        multi_step_loss, msl_iterations, per_step_batch_norm, first_order_until, cuda_graph
    ) -> None:
        for name, value in (
            ("multi_step_loss", multi_step_loss),
            ("per_step_batch_norm", per_step_batch_norm),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
        if msl_iterations is not None or multi_step_loss:
            if (
                isinstance(msl_iterations, bool)
                or not isinstance(msl_iterations, int)
                or msl_iterations < 1
            ):
                raise ValueError(
                    "msl_iterations: expected a positive int (the outer steps over which the "
                    f"multi-step loss is annealed), got {msl_iterations!r}"
                )
        if (
            isinstance(first_order_until, bool)
            or not isinstance(first_order_until, int)
            or first_order_until < 0
        ):
            raise ValueError(
                f"first_order_until: expected a non-negative int, got {first_order_until!r}"
            )
        if cuda_graph and (multi_step_loss or per_step_batch_norm):
            raise ValueError(
                "cuda_graph: not supported with multi_step_loss or per_step_batch_norm "
                "(their meta-step changes with the iteration); leave cuda_graph off"
            )

    def _without_batch_norm(self, adapt, adapted, names) -> frozenset[str]:
        """ANIL's adapted set less the per-step batch-norm parameters, which take no inner steps;
        naming them in ``adapt`` is an error."""
        batch_norm = set(self.per_step_batch_norm.names)
        if not isinstance(adapt, str):
            named = sorted(batch_norm & set(adapted if adapted is not None else names))
            if named:
                raise ValueError(
                    f"adapt: {named} are per-step batch-norm parameters, which take no inner "
                    "steps with per_step_batch_norm=True"
                )
        chosen = frozenset((adapted if adapted is not None else set(names)) - batch_norm)
        if not chosen:
            raise ValueError("adapt: with per_step_batch_norm, no parameter is left to adapt")
        return chosen

    def _adapt_trajectory(self, params, support_x, support_y, counts: list[int]):
        """``(k, per-task weights)`` after each of ``counts`` (increasing, >= 1) inner steps: the
        inner loop of ``adapt`` and ``adapt_steps`` (checked inputs). iMAML and Reptile override
        it with their own inner loops."""
        first = next(iter(params.values()))
        variant = self._variant(for_adapt=True)
        return self._backend_for(first.device, first.dtype).adapt_steps(
            params,
            self.inner_lr,
            support_x,
            support_y,
            steps=counts,
            **({} if variant is None else {"variant": variant}),
        )

    def _variant(self, *, for_adapt: bool = False) -> Variant | None:
        """This step's MAML++ options for the backend, None when none is on (the default path)."""
        weights = None
        if (
            not for_adapt
            and self.multi_step_loss
            and self.inner_steps > 1
            and self.iteration < self.msl_iterations
        ):
            weights = tuple(msl_weights(self.inner_steps, self.iteration, self.msl_iterations))
        if weights is None and self.per_step_batch_norm is None:
            return None
        return Variant(query_weights=weights, batch_norm=self.per_step_batch_norm)

    @staticmethod
    def _site(model: nn.Module, name: str) -> tuple[dict, str]:
        module_path, _, key = name.rpartition(".")
        return model.get_submodule(module_path)._parameters, key

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters {name: tensor}, in named_parameters() order."""
        params = {}
        for name, owner, key in self._sites:
            p = owner[key]
            if p is not None and p.requires_grad:
                params[name] = p
        return params

    def _config(self) -> dict:
        return {
            "inner_steps": self.inner_steps,
            "first_order": self.first_order,
            "learn_inner_lr": self.inner_lr.learn,
            "inner_lr": self.inner_lr.init,
            "loss": self.loss.name,
            "adapt": "all" if self.adapt_names is None else sorted(self.adapt_names),
            "multi_step_loss": self.multi_step_loss,
            "msl_iterations": self.msl_iterations,
            "per_step_batch_norm": self.per_step_batch_norm is not None,
            "first_order_until": self.first_order_until,
        }

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> Backend:
        backend = self._backends.get((device, dtype))
        if backend is None:
            backend = self._backends[(device, dtype)] = graphs.graphed(
                choose_backend(
                    self.requested_backend, self.model, self.loss, device, dtype, warn=True
                ),
                self._cuda_graphs,
            )
        return backend

    def _output_shape(
        self, name: str, features: tuple[int, ...], like: torch.Tensor
    ) -> tuple[int, ...]:
        """The model's per-sample output shape for inputs of per-sample shape ``features``."""
        if features not in self._output_shapes:
            probe = torch.zeros((2, *features), dtype=like.dtype, device=like.device)
            try:
                with torch.no_grad():
                    self._output_shapes[features] = tuple(self.model(probe).shape[1:])
            except RuntimeError as error:
                shape = ", ".join(map(str, features))
                raise ValueError(
                    f"{name}: the model does not accept per-sample inputs of shape "
                    f"[{shape}] ({error})"
                ) from None
        return self._output_shapes[features]

    def _check_support(self, support_x, support_y, first, *, class_range=True) -> None:
        check_inputs("support_x", support_x, tasks=None, dtype=first.dtype, device=first.device)
        self._check_targets("support_y", support_y, support_x, first, class_range=class_range)

    def _check_batch(self, support_x, support_y, query_x, query_y, first, *, class_range=True):
        """Every check of a meta-step's inputs, before anything is computed."""
        self._check_support(support_x, support_y, first, class_range=class_range)
        check_inputs(
            "query_x",
            query_x,
            tasks=support_x.shape[0],
            dtype=first.dtype,
            device=first.device,
            features=tuple(support_x.shape[2:]),
        )
        self._check_targets("query_y", query_y, query_x, first, class_range=class_range)

    def _check_targets(self, name, y, x, first, *, class_range=True) -> None:
        """Shapes and dtypes; with class_range, also that class indices lie in [0, classes), which
        reads y's values (a host synchronisation on a GPU)."""
        x_name = "support_x" if name == "support_y" else "query_x"
        output_shape = self._output_shape(x_name, tuple(x.shape[2:]), first)
        classification = self.loss.is_classification
        check_targets(
            name,
            y,
            x,
            classification=classification,
            num_classes=output_shape[-1] if classification and class_range else None,
            output_shape=None if classification or not self.loss.builtin else output_shape,
            dtype=first.dtype,
            device=first.device,
        )

    def _meta_gradient(self, support_x, support_y, query_x, query_y):
        params = self._params(self.model)
        first = next(iter(params.values()))
        backend = self._backend_for(first.device, first.dtype)
        # A backend that defers the class range reports an index out of range as a non-finite
        # step; the indices are read only then, to name the culprit.
        deferred = backend.defers_class_range
        self._check_batch(support_x, support_y, query_x, query_y, first, class_range=not deferred)
        variant = self._variant() if self._variants_on else None
        options = {
            "steps": self.inner_steps,
            "first_order": self.first_order or self.iteration < self.first_order_until,
            **({} if variant is None else {"variant": variant}),
        }
        tasks = support_x.shape[0]
        chunk = self.tasks_per_call(support_x, query_x)
        if chunk >= tasks and self._reducer is None:
            step = backend.meta_gradient(
                params, self.inner_lr, support_x, support_y, query_x, query_y, **options
            )
        else:
            step = self._combined_meta_gradient(
                backend, params, chunk, support_x, support_y, query_x, query_y, options
            )
        if not bool(step.finite):
            if deferred:  # an index out of range reads as NaN: name it if that is the cause
                self._check_targets("support_y", support_y, support_x, first)
                self._check_targets("query_y", query_y, query_x, first)
            bad = [
                name for name, g in zip(step.names, step.grads) if not bool(torch.isfinite(g).all())
            ]
            ranks = ""
            if self._reducer is not None:
                ranks = f" on rank(s) {self._reducer.non_finite_ranks()}"
            raise FloatingPointError(
                f"maml_ext: non-finite meta-step{ranks} (query loss "
                f"{step.query_loss.item():.4g}; non-finite gradient of {bad or 'none'}); "
                "nothing was applied"
            )
        if self._reducer is not None:
            self._reducer.check_consistency([*self.model.parameters(), *self.inner_lr.parameters()])
        result = MetaStepResult(
            query_loss=step.query_loss,
            query_accuracy=step.query_accuracy,
            support_loss=step.support_loss,
            backend=backend.name,
        )
        return result, step.tensors, step.grads

    def _per_step_parameters(self) -> list[torch.Tensor]:
        """MAML++'s per-step batch-norm parameters (none without ``per_step_batch_norm``)."""
        if self.per_step_batch_norm is None:
            return []
        return list(self.per_step_batch_norm.parameters())

    def _combined_meta_gradient(
        self, backend, params, chunk, support_x, support_y, query_x, query_y, options
    ):
        """The meta-gradient of the whole meta-batch from chunks of at most ``chunk`` tasks,
        combined by their task counts, then over ranks with ``distributed`` (one all-reduce)."""
        reducer = self._reducer
        rank, world = (reducer.rank, reducer.world_size) if reducer else (0, 1)
        packed = part = None
        for start in range(0, support_x.shape[0], chunk):
            rows = slice(start, start + chunk)
            part = backend.meta_gradient(
                params,
                self.inner_lr,
                support_x[rows],
                support_y[rows],
                query_x[rows],
                query_y[rows],
                **options,
            )
            count = support_x[rows].shape[0]
            packed = dist_meta.pack_meta_gradient(
                part, count, rank=rank, world_size=world, out=packed
            )
        if reducer is not None:
            return reducer.finish(packed, part)
        return dist_meta.unpack_meta_gradient(packed, part, world)[0]
