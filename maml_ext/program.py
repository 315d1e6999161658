"""Compiles an ``nn.Module`` into the layer program that the fused backend (maml_ext._C) runs.

The program is an int list (one record per layer: its kind's code, then its int fields) plus a
float list (the records' float fields, e.g. batch norm eps), and the parameters laid out as one
flat vector θ [P] in the model's own parameter order: per-task weights are then one [T, P] tensor
and the whole inner update one fused multiply-add. The record format is defined in
csrc/program_records.h; LAYER_RECORDS below mirrors it and is checked against the compiled
extension's table at import.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._extension import compiled_ops_available
from .models import AppendLogStd


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """One layer kind's record: ``code``, then ``int_fields`` in order; ``float_fields`` go to the
    float list; ``parameters`` are the layer's parameter tensors, slices of θ, in slot order."""

    name: str
    code: int
    int_fields: tuple[str, ...] = ()
    float_fields: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()


# Mirrors MAML_EXT_LAYER_RECORDS in csrc/program_records.h (checked at import).
LAYER_RECORDS = (
    RecordFormat(
        "linear",
        1,
        ("in_features", "out_features", "has_bias", "weight_offset", "bias_offset"),
        parameters=("weight", "bias"),
    ),
    RecordFormat(
        "conv2d",
        2,
        (
            "in_channels",
            "out_channels",
            "kernel_h",
            "kernel_w",
            "stride_h",
            "stride_w",
            "padding_h",
            "padding_w",
            "has_bias",
            "weight_offset",
            "bias_offset",
        ),
        parameters=("weight", "bias"),
    ),
    RecordFormat(
        "batch_norm",
        3,
        ("channels", "spatial", "affine", "weight_offset", "bias_offset"),
        ("eps",),
        parameters=("weight", "bias"),
    ),
    RecordFormat("relu", 4),
    RecordFormat(
        "max_pool2d",
        5,
        ("kernel_h", "kernel_w", "stride_h", "stride_w", "padding_h", "padding_w", "ceil_mode"),
    ),
    RecordFormat("flatten", 6),
    RecordFormat("tanh", 7),
    RecordFormat("leaky_relu", 8, (), ("negative_slope",)),
    # A residual block: residual_begin, main's records, residual_shortcut, the shortcut's records,
    # residual_end (see csrc/program_records.h).
    RecordFormat("residual_begin", 9),
    RecordFormat("residual_shortcut", 10),
    RecordFormat("residual_end", 11),
    RecordFormat("append_log_std", 12, ("features", "log_std_offset"), parameters=("log_std",)),
)
RECORDS_BY_NAME = {record.name: record for record in LAYER_RECORDS}
RECORDS_BY_CODE = {record.code: record for record in LAYER_RECORDS}

# Mirrors MAML_EXT_LOSS_KINDS in csrc/program_records.h (checked at import): the ops' `loss` codes.
LOSS_CODES = {"cross_entropy": 1, "mse": 2, "gaussian_nll": 3}


def loss_code(name: str) -> int:
    """The ops' ``loss`` argument for the built-in loss ``name`` (a key of LOSS_CODES)."""
    try:
        return LOSS_CODES[name]
    except KeyError:
        raise ValueError(f"loss: expected one of {sorted(LOSS_CODES)}, got {name!r}") from None


def program_format() -> dict:
    """The record format as maml_ext::program_format() returns it from C++ (a dict of JSON)."""
    return {
        "layers": [
            {
                "name": r.name,
                "code": r.code,
                "int_fields": list(r.int_fields),
                "float_fields": list(r.float_fields),
                "parameters": list(r.parameters),
            }
            for r in LAYER_RECORDS
        ],
        "losses": [{"name": name, "code": code} for name, code in LOSS_CODES.items()],
    }


def check_program_format(compiled: dict) -> None:
    """Raises if this module's record table differs from the compiled extension's."""
    ours = program_format()
    if compiled == ours:
        return
    differences = []
    for key in ("layers", "losses"):
        theirs_by_name = {entry["name"]: entry for entry in compiled.get(key, [])}
        ours_by_name = {entry["name"]: entry for entry in ours[key]}
        for name in sorted(set(theirs_by_name) | set(ours_by_name)):
            if theirs_by_name.get(name) != ours_by_name.get(name):
                differences.append(
                    f"{key} '{name}': C++ {theirs_by_name.get(name)}, "
                    f"Python {ours_by_name.get(name)}"
                )
        if [e["name"] for e in compiled.get(key, [])] != [e["name"] for e in ours[key]]:
            differences.append(f"{key}: order differs")
    raise ImportError(
        "maml_ext: the program format of maml_ext/program.py does not match the compiled "
        "extension's (csrc/program_records.h); rebuild the extension or update LAYER_RECORDS / "
        "LOSS_CODES: " + "; ".join(differences)
    )


def _compiled_program_format() -> dict:
    try:
        return json.loads(torch.ops.maml_ext.program_format())
    except (AttributeError, RuntimeError) as error:  # a build from before the op existed
        raise ImportError(
            "maml_ext: the compiled extension maml_ext._C has no program_format op; "
            "it is older than maml_ext/program.py: rebuild it"
        ) from error


if compiled_ops_available():
    check_program_format(_compiled_program_format())

SUPPORTED_LAYERS = (
    "Linear, Conv2d (groups=1, dilation=1, zero padding), BatchNorm1d/2d (batch statistics), "
    "ReLU, LeakyReLU, Tanh, MaxPool2d (dilation=1), Flatten (start_dim=1), Identity, "
    "maml_ext.models.AppendLogStd, nested "
    "Sequential, and modules of your own whose forward chains these and adds branches "
    "(residual blocks, e.g. act(main(x) + shortcut(x))), read by torch.fx tracing"
)


class UnsupportedModelError(ValueError):
    """The fused backend cannot run this model; ``layer`` names the module that stops it."""

    def __init__(self, layer: str, reason: str):
        self.layer = layer
        self.reason = reason
        super().__init__(
            f"the fused backend cannot run layer '{layer}': {reason} "
            f"(supported: {SUPPORTED_LAYERS})"
        )


@dataclasses.dataclass(frozen=True)
class ParameterSlot:
    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class LayerProgram:
    ints: tuple[int, ...]
    floats: tuple[float, ...]
    slots: tuple[ParameterSlot, ...]
    num_params: int

    @functools.cached_property
    def ints_list(self) -> list[int]:
        """``ints`` as the op's ``int[]`` argument (a list; built once)."""
        return list(self.ints)

    @functools.cached_property
    def floats_list(self) -> list[float]:
        return list(self.floats)

    @functools.cached_property
    def slot_names(self) -> tuple[str, ...]:
        """The parameters' names in θ's order (the order of the fused ops' parameter lists)."""
        return tuple(slot.name for slot in self.slots)

    def flatten(self, params: dict[str, torch.Tensor], task_dims: int = 0) -> torch.Tensor:
        """θ as one vector [P] (or [T, P] when the params carry ``task_dims`` leading task dims);
        differentiable, so gradients reach the original tensors."""
        pieces = []
        for slot in self.slots:
            value = params[slot.name]
            pieces.append(value.reshape(*value.shape[:task_dims], slot.numel))
        return torch.cat(pieces, dim=-1)

    @functools.cached_property
    def _split_sizes(self) -> list[int]:
        return [slot.numel for slot in self.slots]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Splits [..., P] back into named tensors [..., *shape] (views where the layout allows)."""
        lead = flat.shape[:-1]
        pieces = flat.split(self._split_sizes, dim=-1)
        return {
            slot.name: piece.reshape(*lead, *slot.shape) for slot, piece in zip(self.slots, pieces)
        }


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _same_forward(module: nn.Module, base: type) -> bool:
    # A subclass that overrides forward computes something we cannot know.
    return isinstance(module, base) and type(module).forward is base.forward


def compile_program(model: nn.Module) -> LayerProgram:
    """The layer program of ``model``; raises UnsupportedModelError naming the first layer the
    fused backend cannot run."""
    ints: list[int] = []
    floats: list[float] = []
    slots: list[ParameterSlot] = []
    offset = 0

    def add_record(kind: str, **fields) -> None:
        record = RECORDS_BY_NAME[kind]
        assert set(fields) == {*record.int_fields, *record.float_fields}, (kind, sorted(fields))
        ints.append(record.code)
        ints.extend(int(fields[name]) for name in record.int_fields)
        floats.extend(float(fields[name]) for name in record.float_fields)

    def add_param(name: str, param: torch.Tensor | None) -> int:
        nonlocal offset
        if param is None:
            return -1
        if not param.requires_grad:
            raise UnsupportedModelError(
                name, "frozen parameters (requires_grad=False) are not supported"
            )
        slots.append(ParameterSlot(name, offset, param.shape))
        start, offset = offset, offset + param.numel()
        return start

    def visit(module: nn.Module, name: str) -> None:
        prefix = f"{name}." if name else ""
        label = name or type(module).__name__
        if _same_forward(module, nn.Sequential):
            for child_name, child in module.named_children():
                visit(child, prefix + child_name)
        elif _same_forward(module, nn.Linear):
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            add_record(
                "linear",
                in_features=module.in_features,
                out_features=module.out_features,
                has_bias=b >= 0,
                weight_offset=w,
                bias_offset=max(b, 0),
            )
        elif _same_forward(module, nn.Conv2d):
            if module.groups != 1:
                raise UnsupportedModelError(label, f"groups={module.groups} (only 1)")
            if _pair(module.dilation) != (1, 1):
                raise UnsupportedModelError(label, f"dilation={module.dilation} (only 1)")
            if module.padding_mode != "zeros":
                raise UnsupportedModelError(label, f"padding_mode='{module.padding_mode}'")
            padding = module.padding
            kh, kw = _pair(module.kernel_size)
            if padding == "valid":
                padding = (0, 0)
            elif padding == "same":
                if kh % 2 == 0 or kw % 2 == 0:
                    raise UnsupportedModelError(label, "padding='same' with an even kernel size")
                padding = (kh // 2, kw // 2)
            ph, pw = _pair(padding)
            sh, sw = _pair(module.stride)
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            add_record(
                "conv2d",
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel_h=kh,
                kernel_w=kw,
                stride_h=sh,
                stride_w=sw,
                padding_h=ph,
                padding_w=pw,
                has_bias=b >= 0,
                weight_offset=w,
                bias_offset=max(b, 0),
            )
        elif _same_forward(module, nn.BatchNorm1d) or _same_forward(module, nn.BatchNorm2d):
            if module.track_running_stats:
                raise UnsupportedModelError(label, running_stats_message(label))
            w = add_param(prefix + "weight", module.weight)
            b = add_param(prefix + "bias", module.bias)
            add_record(
                "batch_norm",
                channels=module.num_features,
                spatial=isinstance(module, nn.BatchNorm2d),
                affine=module.affine,
                weight_offset=max(w, 0),
                bias_offset=max(b, 0),
                eps=module.eps,
            )
        elif _same_forward(module, nn.ReLU):
            add_record("relu")
        elif _same_forward(module, nn.Tanh):
            add_record("tanh")
        elif _same_forward(module, nn.LeakyReLU):
            add_record("leaky_relu", negative_slope=module.negative_slope)
        elif _same_forward(module, nn.Identity):
            pass
        elif _same_forward(module, AppendLogStd):
            add_record(
                "append_log_std",
                features=module.features,
                log_std_offset=add_param(prefix + "log_std", module.log_std),
            )
        elif _same_forward(module, nn.MaxPool2d):
            if _pair(module.dilation) != (1, 1):
                raise UnsupportedModelError(label, f"dilation={module.dilation} (only 1)")
            if module.return_indices:
                raise UnsupportedModelError(label, "return_indices=True")
            kh, kw = _pair(module.kernel_size)
            sh, sw = _pair(module.stride if module.stride is not None else module.kernel_size)
            ph, pw = _pair(module.padding)
            add_record(
                "max_pool2d",
                kernel_h=kh,
                kernel_w=kw,
                stride_h=sh,
                stride_w=sw,
                padding_h=ph,
                padding_w=pw,
                ceil_mode=module.ceil_mode,
            )
        elif _same_forward(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise UnsupportedModelError(
                    label, f"start_dim={module.start_dim}, end_dim={module.end_dim} (only 1, -1)"
                )
            add_record("flatten")
        elif _own_module(module):
            emit(_traced_steps(module, label), module, prefix)
        else:
            raise UnsupportedModelError(label, f"{type(module).__name__} is not a supported layer")

    def emit(steps: tuple, owner: nn.Module, prefix: str) -> None:
        for _, (what, *details) in steps:
            if what == "module":
                (target,) = details
                visit(owner.get_submodule(target), prefix + target)
            elif what == "record":
                kind, fields = details
                add_record(kind, **fields)
            else:  # "residual"
                main, shortcut = details
                add_record("residual_begin")
                emit(main, owner, prefix)
                add_record("residual_shortcut")
                emit(shortcut, owner, prefix)
                add_record("residual_end")

    visit(model, "")
    if not slots:
        raise UnsupportedModelError(
            type(model).__name__, "the model has no parameters to meta-learn"
        )
    names = [name for name, _ in model.named_parameters()]
    if sorted(names) != sorted(slot.name for slot in slots):
        raise UnsupportedModelError(type(model).__name__, "parameters shared between layers")
    return LayerProgram(tuple(ints), tuple(floats), tuple(slots), offset)


def _own_module(module: nn.Module) -> bool:
    """A module class defined outside torch (the user's, or maml_ext.models'), with its own
    forward: the compiler reads that forward's graph."""
    forward_owner = type(module).forward.__module__ or ""
    return not forward_owner.startswith("torch.")


class _ChildrenAsLeaves(fx.Tracer):
    """Records every submodule call as one node; compile_program compiles the submodules itself."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


# Element-wise functions a traced forward may call on the running activation, by fx target:
# (record kind, the fields read from the call's extra arguments).
def _leaky_relu_fields(args, kwargs) -> dict:
    slope = args[0] if args else kwargs.get("negative_slope", 0.01)
    return {"negative_slope": slope}


_ACTIVATIONS = {
    F.relu: ("relu", None),
    torch.relu: ("relu", None),
    "relu": ("relu", None),
    "relu_": ("relu", None),
    F.leaky_relu: ("leaky_relu", _leaky_relu_fields),
    F.leaky_relu_: ("leaky_relu", _leaky_relu_fields),
    torch.tanh: ("tanh", None),
    F.tanh: ("tanh", None),
    "tanh": ("tanh", None),
}
_ADDITIONS = (operator.add, operator.iadd, torch.add, "add", "add_", "__add__")
_FLATTENS = (torch.flatten, "flatten")
# Arguments of the functions above that do not change the result (in-place flags).
_IGNORED_KWARGS = {"inplace"}


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"submodule '{node.target}'"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "get_attr":
        return f"the attribute '{node.target}' (parameters used directly, not through a layer)"
    target = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", None) or ""
    return f"{module + '.' if module else ''}{target}()"


def _traced_steps(module: nn.Module, label: str) -> tuple:
    """The steps of ``module``'s forward as a chain from its input: ("module", child name),
    ("record", kind, fields) or ("residual", main steps, shortcut steps), each keyed by its fx node.
    Raises UnsupportedModelError naming what the fused backend cannot run."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception as error:  # fx raises several kinds (TraceError, TypeError, ...)
        raise UnsupportedModelError(
            label,
            f"{type(module).__name__}.forward could not be traced by torch.fx "
            f"({type(error).__name__}: {error})",
        ) from None

    def unsupported(node: fx.Node, why: str = "is not supported") -> UnsupportedModelError:
        return UnsupportedModelError(
            label, f"{_describe(node)} in {type(module).__name__}.forward {why}"
        )

    steps: dict[fx.Node, tuple] = {}
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(
            label, f"{type(module).__name__}.forward takes {len(inputs)} inputs (expected one)"
        )

    def running(node: fx.Node, value) -> tuple:
        """The steps so far of ``value``, which must be the activation a step came from."""
        if not isinstance(value, fx.Node) or value not in steps:
            raise unsupported(node, "does not take the running activation as its input")
        return steps[value]

    result = None
    for node in graph.nodes:
        if node.op == "placeholder":
            steps[node] = ()
        elif node.op == "output":
            result = running(node, node.args[0])
        elif node.op == "call_module":
            if len(node.args) != 1 or node.kwargs:
                raise unsupported(node, "is called with more than the activation")
            steps[node] = running(node, node.args[0]) + ((node, ("module", node.target)),)
        elif node.op in ("call_function", "call_method") and node.target in _ADDITIONS:
            if len(node.args) != 2 or node.kwargs:
                raise unsupported(node, "adds with extra arguments (only a + b)")
            main, shortcut = (running(node, arg) for arg in node.args)
            shared = 0
            while shared < min(len(main), len(shortcut)) and main[shared][0] is shortcut[shared][0]:
                shared += 1
            block = ("residual", main[shared:], shortcut[shared:])
            steps[node] = main[:shared] + ((node, block),)
        elif node.op in ("call_function", "call_method") and node.target in _ACTIVATIONS:
            kind, fields = _ACTIVATIONS[node.target]
            extra_args = node.args[1:]
            extra_kwargs = {k: v for k, v in node.kwargs.items() if k not in _IGNORED_KWARGS}
            if fields is None and (extra_args or extra_kwargs):
                raise unsupported(node, "takes arguments the fused backend does not run")
            record_fields = fields(extra_args, extra_kwargs) if fields else {}
            steps[node] = running(node, node.args[0]) + ((node, ("record", kind, record_fields)),)
        elif node.op in ("call_function", "call_method") and node.target in _FLATTENS:
            from_one = node.args[1:] == (1,) and not node.kwargs
            if not from_one and (node.args[1:] or node.kwargs != {"start_dim": 1}):
                raise unsupported(node, "flattens other than from dimension 1 to the end")
            steps[node] = running(node, node.args[0]) + ((node, ("record", "flatten", {})),)
        else:
            raise unsupported(node)
    # A layer whose output the result does not use would leave its parameters out of θ.
    used = set()

    def mark(chain: tuple) -> None:
        for node, (what, *details) in chain:
            used.add(node)
            if what == "residual":
                mark(details[0])
                mark(details[1])

    mark(result)
    for node in graph.nodes:
        if node.op == "call_module" and node not in used:
            raise unsupported(node, "computes an output that the result does not use")
    return result


def read_records(ints) -> list[tuple[str, dict[str, int]]]:
    """The layer records of a program's int list: (kind name, {int field: value}) in order."""
    records, position = [], 0
    while position < len(ints):
        record = RECORDS_BY_CODE.get(ints[position])
        if record is None:
            raise ValueError(f"program: unknown layer kind {ints[position]} at position {position}")
        end = position + 1 + len(record.int_fields)
        if end > len(ints):
            raise ValueError(f"program: the description ends inside a '{record.name}' record")
        records.append((record.name, dict(zip(record.int_fields, ints[position + 1 : end]))))
        position = end
    return records


def output_shape(ints, sample_shape) -> tuple[int, ...]:
    """The per-sample output shape of a program for per-sample inputs of ``sample_shape``
    (the same arithmetic as the C++ layers; used by the fake kernels)."""
    shape = tuple(sample_shape)
    # Per open residual block: (its input's shape, its main branch's output shape once known).
    blocks: list[list] = []
    for kind, f in read_records(ints):
        if kind == "residual_begin":
            blocks.append([shape, None])
        elif kind == "residual_shortcut":
            blocks[-1][1], shape = shape, blocks[-1][0]
        elif kind == "residual_end":
            shape = blocks.pop()[1]
        elif kind == "linear":
            shape = (f["out_features"],)
        elif kind == "conv2d":
            shape = (
                f["out_channels"],
                (shape[1] + 2 * f["padding_h"] - f["kernel_h"]) // f["stride_h"] + 1,
                (shape[2] + 2 * f["padding_w"] - f["kernel_w"]) // f["stride_w"] + 1,
            )
        elif kind == "max_pool2d":
            shape = (
                shape[0],
                _pooled(shape[1], f["kernel_h"], f["stride_h"], f["padding_h"], f["ceil_mode"]),
                _pooled(shape[2], f["kernel_w"], f["stride_w"], f["padding_w"], f["ceil_mode"]),
            )
        elif kind == "flatten":
            shape = (math.prod(shape),)
    return shape


def _pooled(size: int, kernel: int, stride: int, padding: int, ceil_mode: int) -> int:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch's rule: with ceil_mode the last window must start inside the padded input.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def running_stats_message(layer: str) -> str:
    return (
        f"BatchNorm layer '{layer}' tracks running statistics; MAML normalises each task with its "
        "own batch statistics (transductive, as in the paper). Build it with "
        "track_running_stats=False, e.g. nn.BatchNorm2d(64, track_running_stats=False)"
    )
