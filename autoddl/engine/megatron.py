"""Megatron-LM's tensor-parallel layout, found from a captured graph's structure.

A transformer layer is the scope of an attention operator (``scaled_dot_product_attention``),
whatever the layer's order of normalization and residual (pre-LN: GPT-2, LLaMA, ViT, the built-in
GPT; post-LN: BERT, whose residual add is followed by its LayerNorm). Inside the layers, a linear
(``aten.linear`` with weight (out, in), or ``aten.addmm`` with weight (in, out) as in GPT-2's
Conv1D) is **row-parallel** when its output, carried on by operators that only pass it along
(views, dropout, dtype casts, a layer scale: same size, no other activation read), reaches an
add whose other operand does not depend on it — the residual add; every other linear of the
layers is **column-parallel** (weight and bias split on the output features). Embedding tables
with the most rows are the vocabulary, split by rows; a linear outside the layers whose output
size is the vocabulary (an LM head) is column-parallel. Megatron pads the vocabulary to a
multiple of t; autoddl's placements split evenly, so a vocabulary that t does not divide stays
replicated (``Split.padded``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from autoddl.engine.graph import OpGraph, OpNode

SDPA = "aten.scaled_dot_product_attention.default"
LINEAR = "aten.linear.default"
ADDMM = "aten.addmm.default"
EMBEDDING = "aten.embedding.default"
RESIDUAL_ADD = "aten.add.Tensor"


class NotApplicable(Exception):
    """A baseline that does not apply to a model or cluster; the message says why."""


@dataclass(frozen=True)
class Split:
    """How Megatron splits one parameter over the tensor-parallel axis."""

    role: str  #: ``col`` (column-parallel weight or bias), ``row`` (row-parallel), ``vocab``
    dim: int  #: the parameter's dim split
    padded: bool = False  #: a vocabulary dim (Megatron pads it): kept whole when t divides not


def matmul_params(g: OpGraph, n: OpNode) -> tuple[str, str | None, int] | None:
    """(weight, bias or None, the weight's output-feature dim) of a linear or addmm whose weight
    is a 2-D parameter; None for any other operator."""
    if n.target == LINEAR and len(n.inputs) > 1:
        w, bias, out_dim = n.inputs[1], (n.inputs[2] if len(n.inputs) > 2 else None), 0
    elif n.target == ADDMM and len(n.inputs) == 3:
        w, bias, out_dim = n.inputs[2], n.inputs[0], 1
    else:
        return None
    if g[w].kind != "param" or g[w].out.ndim != 2:
        return None
    return w, (bias if bias is not None and g[bias].kind == "param" else None), out_dim


def _is_constant(g: OpGraph, name: str) -> bool:
    return g[name].kind == "param" or g[name].target == "const"


def _descendants(consumers: dict[str, list[OpNode]], name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for c in consumers[todo.pop()]:
            if c.name not in seen:
                seen.add(c.name)
                todo.append(c.name)
    return seen


def feeds_residual(g: OpGraph, consumers: dict[str, list[OpNode]], node: OpNode) -> bool:
    """Whether ``node``'s output, carried on by pass-along operators (same size, every other
    input a parameter or constant), reaches an add whose other operand does not depend on it."""
    after = _descendants(consumers, node.name)
    todo, seen = [node], {node.name}
    while todo:
        cur = todo.pop()
        for c in consumers[cur.name]:
            others = [i for i in c.inputs if i != cur.name]
            if c.target == RESIDUAL_ADD and len(others) == 1 and not _is_constant(g, others[0]):
                if others[0] not in after:
                    return True
            elif (c.name not in seen and c.out.numel == cur.out.numel
                  and matmul_params(g, c) is None and all(_is_constant(g, i) for i in others)):
                seen.add(c.name)
                todo.append(c)
    return False


def megatron_layout(g: OpGraph) -> dict[str, Split]:
    """Parameter -> its Megatron split (see the module); parameters not listed stay replicated.
    Raises :class:`NotApplicable` without attention or without a row-parallel linear."""
    layers = {n.scope for n in g.ops if n.target == SDPA}
    if not layers:
        raise NotApplicable("no attention layers: Megatron splits transformer layers")
    consumers: dict[str, list[OpNode]] = defaultdict(list)
    for n in g.ops:
        for i in dict.fromkeys(n.inputs):
            consumers[i].append(n)
    tables = [n.inputs[0] for n in g.ops
              if n.target == EMBEDDING and g[n.inputs[0]].kind == "param"]
    vocab = max((g[t].out.shape[0] for t in tables), default=None)
    out = {t: Split("vocab", 0, True) for t in tables if g[t].out.shape[0] == vocab}
    for n in g.ops:
        mm = matmul_params(g, n)
        if mm is None:
            continue
        w, bias, out_dim = mm
        if n.scope in layers:
            row = feeds_residual(g, consumers, n)
            out.setdefault(w, Split("row", 1 - out_dim) if row else Split("col", out_dim))
            if bias is not None and not row:
                out.setdefault(bias, Split("col", 0))
        elif vocab is not None and g[w].out.shape[out_dim] == vocab:  # an LM head
            out.setdefault(w, Split("col", out_dim, True))
            if bias is not None:
                out.setdefault(bias, Split("col", 0, True))
    if not any(s.role == "row" for s in out.values()):
        raise NotApplicable("no row-parallel linear (one feeding a residual add) in the layers")
    return out


def megatron_roles(g: OpGraph) -> dict[str, str]:
    """Parameter -> Megatron role (``col``, ``row``, ``vocab``) of :func:`megatron_layout`."""
    return {p: s.role for p, s in megatron_layout(g).items()}
