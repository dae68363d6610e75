"""Rewrite an exported program into the form the planner reads, and evaluate its constants.

The planner's graph has one tensor per operator and no mutation. Real models (Hugging Face,
torchvision, timm) export graphs that break both, so before conversion :func:`normalize` rewrites
the FX graph in place (the runtime executes the same rewritten graph):

* **Multi-output views.** ``split``, ``split_with_sizes``, ``chunk`` and ``unbind`` followed by
  ``getitem`` become one ``slice`` (or ``select``) per output read: the same values, one tensor
  each; ``broadcast_tensors`` becomes its inputs (or their ``expand``).
* **In-place operators** (``relu_``, ``add_``, ...) become their out-of-place forms when nothing
  reads the overwritten tensor afterwards (``out += identity`` in a ResNet block); writing a view
  writes its base, so then no later read of the base or any view of it may follow. Otherwise the
  capture fails naming the operator.
* **Assertions** (``_assert_tensor_metadata``) with no users are dropped.
* **Repeated constants.** A constant ATen call repeating an earlier one on the same arguments is
  merged into it (each layer's ``cos.unsqueeze(1)``), so that identical layers read the same
  leaf and are recognised as repeated (:mod:`autoddl.engine.repeat`).

**Constants.** A node is *constant* when it depends on no user input, no parameter and no random
draw: only on buffers, lifted constants and factory calls (``arange``, ``ones``). Causal masks,
rotary ``cos``/``sin`` tables and position ids are constants. The planner never sees their
insides: each constant read by a non-constant node (a buffer read directly included) becomes a
leaf (kind ``input``, target ``const``) with a placement of its own, and the runtime computes its
value once with :func:`constant_values`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from autoddl.engine.graph import SDPA_DROPOUT_ARG
from autoddl.errors import UserError

_MULTI_VIEW = {"split", "split_with_sizes", "chunk", "unbind", "broadcast_tensors"}


def _aten_name(fx: torch.fx.Node) -> str:
    """``split`` for ``aten.split.Tensor``; "" for anything that is not an ATen overload."""
    schema = getattr(fx.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def _user_sources(ep: torch.export.ExportedProgram) -> set[str]:
    """Placeholders that carry data or trained weights: user inputs and parameters."""
    sig = ep.graph_signature
    return set(sig.user_inputs) | set(sig.inputs_to_parameters)


def _random(fx: torch.fx.Node) -> bool:
    """Whether an op draws random numbers (``randn``, ``bernoulli``, ``dropout``): never a
    constant, never merged."""
    tags = getattr(fx.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _draw_rate(fx: torch.fx.Node) -> float | None:
    """The probability an op drops (dropout, attention's ``dropout_p``), 1.0 for another random
    draw (``randn``, ``bernoulli``), None for an op that draws nothing."""
    name = _aten_name(fx)
    if "dropout" in name and name != "scaled_dot_product_attention":
        p = fx.args[1] if len(fx.args) > 1 else fx.kwargs.get("p", 0.5)
        return float(p) if isinstance(p, (int, float)) else 1.0
    if "scaled_dot_product" in name:
        k = SDPA_DROPOUT_ARG
        p = fx.args[k] if len(fx.args) > k else fx.kwargs.get("dropout_p", 0.0)
        return float(p) if isinstance(p, (int, float)) else 1.0
    return 1.0 if _random(fx) else None


def random_draws_line(ep: torch.export.ExportedProgram) -> str:
    """One line saying that the model draws random numbers (dropout > 0 and the like), so a
    distributed run and its one-process reference differ (``run --check``); "" if it draws
    none."""
    rates: dict[str, float] = {}
    for fx in ep.graph.nodes:
        rate = _draw_rate(fx) if fx.op == "call_function" else None
        if rate:
            name = _aten_name(fx) or str(fx.target)
            rates[name] = max(rates.get(name, 0.0), rate)
    if not rates:
        return ""
    what = ", ".join(f"{n} (p={r:g})" if "dropout" in n or "scaled_dot" in n else n
                     for n, r in sorted(rates.items()))
    return (f"note: the model draws random numbers ({what}): the run and its one-process "
            "reference draw different ones, so --check will report differences; build the "
            "model with dropout 0 to check it")


def constant_nodes(ep: torch.export.ExportedProgram) -> set[str]:
    """Names of the FX nodes that depend on no user input, no parameter and no random draw."""
    variable = _user_sources(ep)
    const: set[str] = set()
    for fx in ep.graph.nodes:
        if fx.op == "output" or fx.name in variable or _random(fx):
            continue
        if all(a.name in const for a in fx.all_input_nodes):
            const.add(fx.name)
    return const


def constant_leaves(ep: torch.export.ExportedProgram, const: set[str] | None = None) -> list[str]:
    """Constant tensors that a non-constant node reads: the planner's ``const`` leaves
    (``const``: :func:`constant_nodes`, if already known)."""
    const = constant_nodes(ep) if const is None else const
    leaves = []
    for fx in ep.graph.nodes:
        if fx.name in const and isinstance(fx.meta.get("val"), torch.Tensor):
            if any(u.name not in const and u.op != "output" for u in fx.users):
                leaves.append(fx.name)
    return leaves


def _slice_bounds(fx: torch.fx.Node, index: int, dim: int) -> tuple[int, int]:
    sizes = [int(v.shape[dim]) for v in fx.meta["val"]]
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _split_views(ep: torch.export.ExportedProgram, const: set[str]) -> None:
    graph = ep.graph
    for fx in list(graph.nodes):
        name = _aten_name(fx)
        if fx.op != "call_function" or name not in _MULTI_VIEW or fx.name in const:
            continue
        if name == "broadcast_tensors":
            _broadcast_views(graph, fx)
            continue
        src = fx.args[0]
        ndim = src.meta["val"].ndim
        if name == "unbind":
            dim = int(fx.args[1] if len(fx.args) > 1 else fx.kwargs.get("dim", 0)) % ndim
        else:
            dim = int(fx.args[2] if len(fx.args) > 2 else fx.kwargs.get("dim", 0)) % ndim
        for user in list(fx.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise UserError(f"{fx.target} ({fx.name}) is used whole by {user.name}; only "
                                "indexing its outputs is supported")
            i = int(user.args[1])
            with graph.inserting_before(user):
                if name == "unbind":
                    new = graph.call_function(torch.ops.aten.select.int, (src, dim, i))
                else:
                    start, end = _slice_bounds(fx, i, dim)
                    new = graph.call_function(torch.ops.aten.slice.Tensor, (src, dim, start, end))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            graph.erase_node(user)
            new.name = user.name  # keep stable names: plans refer to them
        graph.erase_node(fx)


def _broadcast_views(graph: torch.fx.Graph, fx: torch.fx.Node) -> None:
    """``broadcast_tensors(a, b)[i]``: input i itself where its shape already is the common one,
    else its ``expand``."""
    for user in list(fx.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise UserError(f"{fx.target} ({fx.name}) is used whole by {user.name}; only "
                            "indexing its outputs is supported")
        src = fx.args[0][int(user.args[1])]
        shape = list(user.meta["val"].shape)
        if list(src.meta["val"].shape) == shape:
            user.replace_all_uses_with(src)
        else:
            with graph.inserting_before(user):
                new = graph.call_function(torch.ops.aten.expand.default, (src, shape))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            new.name = user.name
        graph.erase_node(user)
    graph.erase_node(fx)


def _functional(fx: torch.fx.Node) -> Any:
    """The out-of-place overload of an in-place ATen op (``add_.Tensor`` -> ``add.Tensor``)."""
    schema = fx.target._schema
    base = getattr(torch.ops.aten, schema.name.split("::")[-1][:-1], None)
    overload = fx.target._overloadname
    return getattr(base, overload, None) if base is not None else None


def _aliases(fx: torch.fx.Node) -> bool:
    """Whether an op's output is a view of its input (``view``, ``slice``, ``transpose``...)."""
    schema = getattr(fx.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None
                and not schema.returns[0].alias_info.is_write)


def _mutates(fx: torch.fx.Node) -> bool:
    """Whether an op writes one of its inputs (``add_``, ``copy_``, ``fill_``)."""
    schema = getattr(fx.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _readers(fx: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read ``fx``'s memory: its users, and the users of its views."""
    out = []
    for u in fx.users:
        out.append(u)
        if u.op == "call_function" and _aliases(u):
            out += _readers(u)
    return out


def _outplace(ep: torch.export.ExportedProgram, const: set[str]) -> None:
    order = {fx: i for i, fx in enumerate(ep.graph.nodes)}
    for fx in list(ep.graph.nodes):
        name = _aten_name(fx)
        if fx.op != "call_function" or not name.endswith("_") or name.startswith("_"):
            continue
        if fx.name in const:
            continue
        target = fx.args[0]
        base = target
        while base.op == "call_function" and _aliases(base):  # writing a view writes its base
            base = base.args[0]
        later = [u.name for u in _readers(base) if u is not fx and order[u] > order[fx]]
        functional = _functional(fx)
        if later or functional is None or target.op == "placeholder":
            raise UserError(f"in-place operator {fx.target} ({fx.name}) overwrites a tensor "
                            f"{'read again by ' + later[0] if later else 'the model owns'}; "
                            "write it out of place in the model (e.g. x = x + y)")
        fx.target = functional


def _drop_asserts(ep: torch.export.ExportedProgram) -> None:
    for fx in reversed(list(ep.graph.nodes)):
        if (fx.op == "call_function" and not fx.users and fx.meta.get("val") is None
                and _aten_name(fx).startswith("_assert")):
            ep.graph.erase_node(fx)


def _same_constants(ep: torch.export.ExportedProgram, const: set[str]) -> None:
    """Merge constant ATen calls that repeat an earlier one on the same arguments (each layer's
    ``cos.unsqueeze(1)``), so that repeated layers read one leaf."""
    seen: dict[tuple, torch.fx.Node] = {}
    for fx in list(ep.graph.nodes):
        name = _aten_name(fx)
        if (fx.op != "call_function" or fx.name not in const or not name
                or name.endswith("_") or fx.target._schema.is_mutable or _random(fx)
                or not isinstance(fx.meta.get("val"), torch.Tensor)
                or any(_mutates(u) for u in _readers(fx))):
            continue
        key = (fx.target, repr(fx.args), repr(sorted(fx.kwargs.items())))
        first = seen.setdefault(key, fx)
        if first is not fx:
            fx.replace_all_uses_with(first)
            ep.graph.erase_node(fx)


def _check_constant_writes(ep: torch.export.ExportedProgram, const: set[str]) -> None:
    """A constant written in place (``mask[:, 0] = 1``) enters the graph with its final value,
    so no operator may read it before the write."""
    order = {fx: i for i, fx in enumerate(ep.graph.nodes)}
    leaves = set(constant_leaves(ep, const))
    for base in [fx for fx in ep.graph.nodes if fx.name in leaves]:
        name = base.name
        while base.op == "call_function" and _aliases(base):
            base = base.args[0]
        readers = _readers(base)
        writes = [order[u] for u in readers if _mutates(u) and u.name in const]
        reads = [u for u in readers if u.name not in const and u.op != "output"]
        early = [u.name for u in reads if writes and order[u] < max(writes)]
        if early:
            raise UserError(f"constant {name!r} is read by {early[0]} and then written in place; "
                            "build it fully before use, or make a new tensor (c = c * 3)")


def normalize(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Rewrite ``ep``'s graph in place (see the module docstring) and return it."""
    const = constant_nodes(ep)
    _check_constant_writes(ep, const)
    _same_constants(ep, const)  # erases merged constants only: ``const`` stays right
    _split_views(ep, const)
    _outplace(ep, const)
    _drop_asserts(ep)
    ep.graph.lint()
    return ep


def constant_values(ep: torch.export.ExportedProgram,
                    buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The value of every ``const`` leaf, computed from the model's ``buffers`` (by qualified
    name; copied, never mutated) and the program's own constants."""
    sig = ep.graph_signature
    sources: dict[str, Any] = {}
    for name, fqn in sig.inputs_to_buffers.items():
        if fqn not in buffers:
            raise UserError(f"buffer {fqn!r} of the captured model is missing at run time")
        sources[name] = buffers[fqn].detach().clone()
    for name, key in sig.inputs_to_lifted_tensor_constants.items():
        sources[name] = ep.constants[key].clone()
    const = constant_nodes(ep)
    wanted = set(constant_leaves(ep, const))
    interp = torch.fx.Interpreter(ep.graph_module)
    with torch.no_grad():
        for fx in ep.graph.nodes:
            if fx.name not in const:
                continue
            if fx.op == "placeholder":
                interp.env[fx] = sources.get(fx.name)
            else:
                interp.env[fx] = interp.run_node(fx)
        # after every constant op ran: a constant written in place is read afterwards
        # (:func:`_check_constant_writes`); copies, so that nothing aliases the model's buffers
        out = {fx.name: interp.env[fx].clone() for fx in ep.graph.nodes if fx.name in wanted}
    return out
