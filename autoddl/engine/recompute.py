"""Activation recomputation per layer: what one recomputed copy of a layer costs, frees and needs.

The MILP decides how many copies of each layer recompute, and how
(:mod:`autoddl.formulations.recompute`); this module builds its groups from a costed graph. A
*layer* is one repeated block as the costed graph holds it: one block of a graph planned whole,
the ``first``/``mid``/``last`` representatives of a reduced graph (the mid standing for L − 2
copies), or a pipeline stage's block instances (:mod:`autoddl.engine.programs`). Options:

* **full** (Megatron-LM's full recomputation): the layer keeps only what leaves it (the outputs
  the next layer reads) and the converted copies of its inputs, and runs its forward again in
  backward. One copy adds its ops' forward seconds and the conversions between them (each
  forward once more); frees its other outputs, attention's score stash and the converted copies
  its ops saved; and needs all of them live while it is recomputed.
* **selective** (Korthikanti et al., 2022): only unfused attention's score stash (softmax output,
  dropout mask and output, :func:`~autoddl.engine.costs.stash_bytes`) is dropped and attention's
  forward runs again. Offered where attention keeps a stash (``attention_score_passes`` > 0).

Per recomputed copy the seconds count ``cost_scale`` times (stage copies × micro-batches × κ in
a program, :func:`~autoddl.engine.programs.step_shape`) and the freed bytes ``memory_scale``
times (the micro-batches a stage holds in flight). The runtime matches this: a recomputed
layer's inputs are converted once, outside the checkpoint (:mod:`autoddl.runtime.execute`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from autoddl.engine.costs import (
    CostedGraph, Multiplicity, edge_units, node_forward_s, node_memory_bytes, op_steps,
    stash_bytes, steps_seconds,
)
from autoddl.engine.graph import OpGraph
from autoddl.formulations.recompute import (
    LinearForm, RecomputeGroup, RecomputeOption, counts_of,
)

ATTENTION = "aten.scaled_dot_product_attention.default"
#: what a real layer does, as a plan file records it (``training.recompute_layers``)
LAYER_MODES = ("none", "selective", "full")
#: the forced counts of ``--recompute`` per option kind, as a share of a layer's copies
FORCED = {"none": {}, "layers": {"full": 1}, "selective": {"selective": 1}}


@dataclass(frozen=True)
class Layer:
    """One recompute group: a layer's ops (one copy), the ops whose outputs leave it, how many
    copies it stands for, its memory and stage group, and per recomputed copy how often its
    seconds count (``cost_scale``) and its freed bytes (``memory_scale``)."""

    name: str
    ops: tuple[str, ...]
    outputs: frozenset[str]
    copies: int = 1
    group: int = 0
    cost_scale: float = 1.0
    memory_scale: float = 1.0


def _outputs(graph: OpGraph, mult: Multiplicity | None, ops: set[str]) -> frozenset[str]:
    """Ops of ``ops`` read outside them (by graph edges, or by the next copy: extra edges)."""
    out = {i for n in graph.nodes if n.name not in ops for i in n.inputs if i in ops}
    if mult is not None:
        out |= {src for src, _, _, k in mult.extra_edges if k > 0 and src in ops}
    return frozenset(out | ({graph.loss} & ops))


def layers_by_prefix(graph: OpGraph, mult: Multiplicity | None, prefixes: Sequence[str]
                     ) -> list[Layer]:
    """The layers of a reduced graph (``first``, ``mid``, ``last``): ops named ``prefix/j``."""
    mult = mult or Multiplicity()
    layers = []
    for prefix in prefixes:
        ops = tuple(n.name for n in graph.ops if n.name.split("/")[0] == prefix)
        if ops:
            layers.append(Layer(prefix, ops, _outputs(graph, mult, set(ops)),
                                copies=mult.node(ops[0])))
    return layers


def layers_of_blocks(graph: OpGraph, members: Sequence[Sequence[str]]) -> list[Layer]:
    """One layer per block of a graph planned whole (each block's own ops, one copy)."""
    layers = []
    for b, names in enumerate(members):
        ops = tuple(nm for nm in names if graph[nm].kind == "op")
        layers.append(Layer(f"layer {b}", ops, _outputs(graph, None, set(ops))))
    return layers


def sharding_layers(graph: OpGraph, mult: Multiplicity | None, reduced: bool
                    ) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The recompute groups of an unpipelined graph (a reduced graph's first, mid and last; a
    graph planned whole, each of its repeated blocks) and each real layer's (group, slot) in
    model order (:func:`layer_modes`)."""
    from autoddl.engine.repeat import find_blocks

    if reduced:
        layers = layers_by_prefix(graph, mult, ("first", "mid", "last"))
        return layers, [(layer.name, layer.name) for layer in layers
                        for _ in range(layer.copies)]
    blocks = find_blocks(graph)
    if blocks is None:
        return [], []
    layers = layers_of_blocks(graph, blocks.members)
    return layers, [(layer.name, layer.name) for layer in layers]


def _node_terms(costed: CostedGraph, ops: Sequence[str]) -> dict[str, np.ndarray]:
    """Per op and signature: forward seconds (with its own collectives; those alone when the
    costs price bytes), output bytes, stash."""
    g, mesh, cl, prec = costed.graph, costed.mesh, costed.cluster, costed.config.precision
    out = {}
    seen: dict[tuple, np.ndarray] = {}  # identical ops (repeated layers') share one list
    for name in ops:
        n = g[name]
        ss = costed.sigs[name]
        key = (id(ss), n.kind, n.target, n.flops, n.args, n.kwargs, n.out, n.requires_grad,
               tuple(g[i].out for i in n.inputs))
        if key not in seen:
            seen[key] = np.array([[(node_forward_s(g, n, s, mesh, cl, prec)
                                    if costed.objective != "bytes" else 0.0)
                                   + steps_seconds(op_steps(g, n, s, mesh), mesh),
                                   node_memory_bytes(n, s, mesh, costed.config),
                                   stash_bytes(g, n, s, mesh, cl, prec)] for s in ss])
            seen[key].setflags(write=False)  # shared: never changed in place
        out[name] = seen[key]
    return out


def _internal_edges(costed: CostedGraph, ops: set[str]) -> list[tuple[int, str, str, int]]:
    """(problem edge index, src, dst, input) of the graph edges between two ops of ``ops``."""
    g = costed.graph
    out = []
    k = 0  # the graph's edges come first in the problem (then the extra edges: entries)
    for n in g.nodes:
        for i, src in enumerate(n.inputs):
            if src in ops and n.name in ops:
                out.append((k, src, n.name, i))
            k += 1
    return out


def _option(costed: CostedGraph, layer: Layer, kind: str, terms: dict[str, np.ndarray],
            units) -> RecomputeOption | None:
    """The forms of one option of ``layer`` (None where it would free nothing)."""
    idx = costed.index or {n.name: i for i, n in enumerate(costed.graph.nodes)}
    if kind == "full":
        ops = layer.ops
        freed = {nm: terms[nm][:, 2] + (0.0 if nm in layer.outputs else terms[nm][:, 1])
                 for nm in ops}
        live = {nm: terms[nm][:, 2] + terms[nm][:, 1] for nm in ops}
        edges = _internal_edges(costed, set(ops))
    else:
        ops = tuple(nm for nm in layer.ops if costed.graph[nm].target == ATTENTION)
        freed = live = {nm: terms[nm][:, 2] for nm in ops}
        edges = []
    if not ops or not any(v.any() for v in freed.values()):
        return None
    ev = [(k, *units(src, dst, i)) for k, src, dst, i in edges]
    extra = LinearForm(tuple((idx[nm], layer.cost_scale * terms[nm][:, 0]) for nm in ops),
                       tuple((k, layer.cost_scale * f) for k, f, _ in ev))
    saved = LinearForm(tuple((idx[nm], layer.memory_scale * freed[nm]) for nm in ops),
                       tuple((k, layer.memory_scale * m) for k, _, m in ev))
    need = LinearForm(tuple((idx[nm], live[nm]) for nm in ops), tuple((k, m) for k, _, m in ev))
    return RecomputeOption(kind, extra, saved, need)


def recompute_groups(costed: CostedGraph, layers: Sequence[Layer], mode: str
                     ) -> tuple[RecomputeGroup, ...]:
    """The recompute groups of ``layers`` on ``costed``: every option free (``auto``) or the
    one ``--recompute`` forces for every copy (none: no groups)."""
    if mode == "none" or not layers:
        return ()
    units = edge_units(costed)
    terms = _node_terms(costed, [nm for layer in layers for nm in layer.ops])
    groups = []
    for layer in layers:
        kinds = ("full", "selective") if mode == "auto" else tuple(FORCED[mode])
        opts = [o for o in (_option(costed, layer, k, terms, units) for k in kinds) if o]
        if not opts:
            continue
        fixed = (None if mode == "auto"
                 else tuple(layer.copies * FORCED[mode].get(o.kind, 0) for o in opts))
        groups.append(RecomputeGroup(layer.name, layer.copies, layer.group, tuple(opts), fixed))
    return tuple(groups)


def with_recompute(costed: CostedGraph, layers: Sequence[Layer], mode: str) -> CostedGraph:
    """``costed`` whose problem carries the recompute groups of ``layers`` (``mode``)."""
    groups = recompute_groups(costed, layers, mode)
    if not groups:
        return costed
    return dataclasses.replace(costed, problem=dataclasses.replace(costed.problem,
                                                                   recompute=groups))


def plan_counts(costed: CostedGraph, idx: Sequence[int]) -> dict[str, dict[str, int]]:
    """Per recompute group of ``costed``'s problem, copies recomputed per option kind, read
    from a choice vector (the problem's defaults where it holds none)."""
    groups = costed.problem.recompute
    return {g.name: {o.kind: int(c) for o, c in zip(g.options, counts) if c}
            for g, counts in zip(groups, counts_of(groups, idx, len(costed.problem.nodes)))}


def realized(costed: CostedGraph, layers: Sequence[Layer], counts: dict[str, dict[str, int]]
             ) -> Multiplicity:
    """``costed``'s multiplicities with a plan's recomputation, for its reports (bytes moved,
    compute): each recomputed op's share of copies run again."""
    mult = costed.mult or Multiplicity()
    recomputed: dict[str, tuple[str, float]] = {}
    for layer in layers:
        chosen = counts.get(layer.name, {})
        full = chosen.get("full", 0) / layer.copies
        sel = chosen.get("selective", 0) / layer.copies
        for nm in layer.ops:
            share = full + (sel if costed.graph[nm].target == ATTENTION else 0.0)
            if share:
                recomputed[nm] = (layer.name, share)
    return dataclasses.replace(mult, recomputed=recomputed)


def layer_modes(counts: dict[str, dict[str, int]], order: Sequence[tuple[str, Hashable]]
                ) -> list[str]:
    """Per real layer, in model order, its recomputation ("none", "selective", "full"):
    ``order`` gives each real layer's (group name, slot), a slot holding a group's copies on one
    device; a slot's recomputed copies are its first ones, full before selective."""
    used: dict[Hashable, list[int]] = {}
    modes: list[str] = []
    for name, slot in order:
        chosen = counts.get(name, {})
        full, sel = used.setdefault(slot, [0, 0])
        if full < chosen.get("full", 0):
            used[slot][0] += 1
            modes.append("full")
        elif sel < chosen.get("selective", 0):
            used[slot][1] += 1
            modes.append("selective")
        else:
            modes.append("none")
    return modes


def recompute_record(mode: str, counts: dict[str, dict[str, int]],
                     order: Sequence[tuple[str, Hashable]]) -> dict:
    """The plan file's recomputation entries: the mode asked for and, where layers repeat, what
    each real layer does, in model order (``recompute_layers``: "none", "selective", "full")."""
    modes = layer_modes(counts, order)
    return {"recompute": mode, **({"recompute_layers": modes} if modes else {})}
