"""Capture a model's training step as an :class:`OpGraph` through ``torch.export``.

The model's forward must return the loss (a scalar), so the graph is the whole step the planner
costs: forward ops plus, implicitly, their backward. Works on the ``meta`` device: no memory is
allocated for weights.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import re
import warnings
from typing import Any, Iterator

import torch

from autoddl.engine.draws import FixedDraws, drop_dead_draws, export_failure, quiet_export
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta
from autoddl.engine.normalize import (
    constant_leaves, constant_nodes, constant_values, normalize,
)
from autoddl.engine.rules_moe import einsum_flops
from autoddl.errors import UserError, first_line


def tensor_meta(value: Any) -> TensorMeta:
    """The :class:`TensorMeta` of a (fake or meta) tensor."""
    return TensorMeta(tuple(int(s) for s in value.shape), str(value.dtype).removeprefix("torch."))


#: torch's warning when a model reads ``data_ptr()`` of a fake tensor while it is traced
_FAKE_DATA_PTR = "Accessing the data pointer of FakeTensor is deprecated"


@contextlib.contextmanager
def quiet_fake_tensors() -> Iterator[None]:
    """Silence torch's fake-tensor ``data_ptr`` warning (nn.TransformerEncoder's fast-path
    check reads it while a model is built or traced on fake tensors; harmless there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FAKE_DATA_PTR)
        yield


#: what transformers (4.46 and later) logs whenever a model built from a config computes its
#: loss from ``labels``: the config names no loss type, and the default is the right one
_HF_LOSS_TYPE = "`loss_type=None` was set in the config but it is unrecognized"


class _DropNote(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet_library_notes() -> None:
    """Drop transformers' ``loss_type=None`` note (harmless: it then uses the causal LM loss the
    model asked for), which a Hugging Face model of a model file printed in every process that
    built it; nothing else it logs. Idempotent."""
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _DropNote) for f in logger.filters):
        logger.addFilter(_DropNote(_HF_LOSS_TYPE))


#: the return value of a Hugging Face model's forward, not a loss: what to write instead
_NOT_A_LOSS = ("the model's forward must return the training loss, a scalar tensor; a Hugging "
               "Face model returns an output object: wrap it in a module whose forward returns "
               "`model(**inputs).loss`")


def export(model: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` the model's forward (training IR, high-level ATen ops kept), normalized
    for the planner (:func:`autoddl.engine.normalize.normalize`). A branch on a random draw
    whose outcome is the same for every draw is fixed (:class:`~autoddl.engine.draws.FixedDraws`);
    a failure is one line."""
    try:
        with quiet_fake_tensors(), quiet_export(), FixedDraws():
            ep = torch.export.export(model, tuple(example_inputs), strict=False)
    except UserError:
        raise
    except Exception as exc:  # export failures are the user's model: say so in one line
        text = first_line(exc)
        if re.search(r"in output, which is not a known type", text):
            raise UserError(f"{_NOT_A_LOSS} (torch.export could not capture what it returned: "
                            f"{text.split('. ')[0]})") from exc
        raise UserError(f"torch.export could not capture the model: {export_failure(exc)}") \
            from exc
    drop_dead_draws(ep)
    return normalize(ep)


def _plain(value: Any, tensor_index: dict[str, int]) -> Any:
    """An FX argument as plain data, with tensor nodes replaced by TensorArg."""
    if isinstance(value, torch.fx.Node):
        return TensorArg(tensor_index[value.name])
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, tensor_index) for v in value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, torch.memory_format, torch.layout)):
        return str(value)
    return value


_ZERO_FLOP = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "expand", "unsqueeze",
    "squeeze", "flatten", "unflatten", "clone", "contiguous", "alias", "detach", "_to_copy",
    "slice", "select",
}


_NUMBERED = re.compile(r"^(.+)\.(\d+)$")


def _scope_of_module_stack(fx: torch.fx.Node) -> str:
    """The outermost numbered submodule (a ModuleList entry such as ``blocks.3``) of an op."""
    for entry in (fx.meta.get("nn_module_stack") or {}).values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        if _NUMBERED.match(path):
            return path
    return ""


def module_of(fx: torch.fx.Node) -> str:
    """The innermost module an op was called in (``blocks.3.mlp.fc1``), or "" at the top."""
    paths = [entry[0] if isinstance(entry, tuple) else str(entry)
             for entry in (fx.meta.get("nn_module_stack") or {}).values()]
    return paths[-1] if paths else ""


def _scope_of_fqn(fqn: str) -> str:
    """The outermost numbered submodule in a parameter's qualified name."""
    parts = fqn.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _flops(target: str, ins: list[TensorMeta], out: TensorMeta, args: tuple = ()) -> float:
    """Forward FLOPs of one op (matmul-like ops and einsum exactly, others one per output
    element); ``args`` are the call's arguments (an einsum's equation)."""
    if target in ("aten.linear.default",):
        return 2.0 * out.numel * ins[0].shape[-1]
    if target in ("aten.mm.default", "aten.bmm.default", "aten.matmul.default",
                  "aten.addmm.default"):
        a = ins[1] if target == "aten.addmm.default" else ins[0]
        return 2.0 * out.numel * a.shape[-1]
    if target == "aten.conv2d.default":  # out × (input channels × kernel) multiply-adds
        return 2.0 * out.numel * ins[1].numel / ins[1].shape[0]
    if target == "aten.scaled_dot_product_attention.default":
        q, k = ins[0], ins[1]
        return 4.0 * q.numel * k.shape[-2]
    if target == "aten.einsum.default":  # the dispatch and combine of mixtures of experts
        flops = einsum_flops(str(args[0]), ins)
        if flops is not None:
            return flops
    if target == "aten.embedding.default" or target.split(".")[1] in _ZERO_FLOP:
        return 0.0
    return float(out.numel)


def graph_from_export(ep: torch.export.ExportedProgram) -> OpGraph:
    """Convert a (normalized) exported program into an :class:`OpGraph`. Constants (buffers,
    masks, position tables) enter as ``const`` leaves; what computes them is left out."""
    sig = ep.graph_signature
    param_fqn = dict(sig.inputs_to_parameters)
    const = constant_nodes(ep)
    leaves = set(constant_leaves(ep, const))
    nodes: list[OpNode] = []
    requires_grad: dict[str, bool] = {}
    loss = None
    for fx in ep.graph.nodes:
        if fx.name in leaves:
            requires_grad[fx.name] = False
            nodes.append(OpNode(fx.name, "input", "const", tensor_meta(fx.meta["val"])))
        elif fx.name in const:
            continue
        elif fx.op == "placeholder":
            val = fx.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UserError(f"model input {fx.name!r} is not a tensor; pass tensors only")
            is_param = fx.name in param_fqn
            if is_param and not fx.users:
                continue  # a tied weight's other name (export reads it through one)
            kind = "param" if is_param else "input"
            fqn = param_fqn.get(fx.name, "")
            meta = tensor_meta(val)
            rg = is_param and meta.is_float
            requires_grad[fx.name] = rg
            nodes.append(OpNode(fx.name, kind, kind, meta, requires_grad=rg, fqn=fqn,
                                scope=_scope_of_fqn(fqn) if is_param else "", module=fqn))
        elif fx.op == "call_function":
            nodes.append(_op_node(fx, requires_grad))
        elif fx.op == "output":
            outs = fx.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else (outs,)
            outs = [o for o in outs if o is not None]
            if len(outs) != 1 or not isinstance(outs[0], torch.fx.Node):
                raise UserError(f"{_NOT_A_LOSS} (it returned {len(outs)} values)")
            loss = outs[0].name
        else:
            raise UserError(f"{fx.op} node {fx.name!r} ({fx.target}) depends on the model's "
                            "inputs; only ATen operators are supported there")
    assert loss is not None
    graph = OpGraph(tuple(nodes), loss)
    if graph[loss].out.numel != 1 or graph[loss].kind != "op":
        raise UserError(
            f"the model's forward returns a tensor of shape {list(graph[loss].out.shape)}; "
            "it must return the scalar training loss"
        )
    if not graph[loss].out.is_float:
        raise UserError(f"the model's forward returns a loss of dtype {graph[loss].out.dtype}; "
                        "it must return a floating-point loss that backward can differentiate")
    return graph


def _op_node(fx: torch.fx.Node, requires_grad: dict[str, bool]) -> OpNode:
    """The :class:`OpNode` of one operator call."""
    if fx.target is operator.getitem:
        raise UserError(
            f"operator {fx.args[0].target} ({fx.args[0].name}) has several outputs and feeds "
            f"{fx.name!r}; multi-output operators have no sharding rule (split, chunk and "
            "unbind are rewritten to slices)"
        )
    val = fx.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise UserError(f"operator {fx.target} ({fx.name}) returns a non-tensor; no rule")
    inputs = list(fx.all_input_nodes)
    index = {a.name: i for i, a in enumerate(inputs)}
    target = f"aten.{fx.target._schema.name.split('::')[-1]}.{fx.target._overloadname}" \
        if hasattr(fx.target, "_schema") else str(fx.target)
    in_metas = [tensor_meta(a.meta["val"]) for a in inputs]
    meta = tensor_meta(val)
    rg = meta.is_float and any(requires_grad[a.name] for a in inputs)
    requires_grad[fx.name] = rg
    return OpNode(
        fx.name, "op", target, meta,
        inputs=tuple(a.name for a in inputs),
        args=tuple(_plain(a, index) for a in fx.args),
        kwargs=tuple((k, _plain(v, index)) for k, v in fx.kwargs.items()),
        flops=_flops(target, in_metas, meta, fx.args),
        requires_grad=rg,
        scope=_scope_of_module_stack(fx),
        module=module_of(fx),
    )


def capture(model: torch.nn.Module, example_inputs: tuple) -> OpGraph:
    """Export ``model(*example_inputs)`` (which returns the loss) into an :class:`OpGraph`."""
    return graph_from_export(export(model, example_inputs))


def microbatch_inputs(inputs: tuple, microbatches: int) -> tuple:
    """The first of ``microbatches`` equal micro-batches of ``inputs`` (split along dim 0)."""
    batch = inputs[0].shape[0]
    if microbatches < 1 or batch % microbatches:
        raise UserError(f"{microbatches} micro-batches do not divide the batch of {batch}; "
                        "choose a divisor of the batch size")
    return tuple(t[: batch // microbatches] for t in inputs)


def default_microbatches(inputs: tuple, most: int = 16) -> int:
    """The largest divisor of the batch size that is at most ``most``."""
    batch = inputs[0].shape[0]
    return max(d for d in range(1, min(batch, most) + 1) if batch % d == 0)


def leaf_values(ep: torch.export.ExportedProgram, graph: OpGraph, model: torch.nn.Module,
                inputs: tuple) -> dict[str, torch.Tensor]:
    """The whole value of every ``input`` leaf of ``graph``: the user's ``inputs`` (in order) and
    the constants (buffers, masks, tables) computed from ``model``'s buffers."""
    feed = dict(zip(ep.graph_signature.user_inputs, inputs))
    consts = constant_values(ep, dict(model.named_buffers(remove_duplicate=False)))
    return {n.name: consts[n.name] if n.target == "const" else feed[n.name]
            for n in graph.nodes if n.kind == "input"}
