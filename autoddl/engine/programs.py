"""Pipelined plans of repeated layers: the stage programs, solved once with multiplicities.

With L identical blocks on K stages, each stage runs n = L/K consecutive blocks; stage 0 also
runs the prefix (embedding), stage K−1 the suffix (head, loss). Stages 1..K−2 run the same
program, so one representative of them stands for K−2 (its costs count K−2 times; its memory is
checked once, with the most micro-batches any of them holds in flight, K−1). Within a stage the
n blocks reduce as in :mod:`autoddl.engine.repeat`: first, mid (n−2 copies), last. Edges that
cross a stage boundary pay the point-to-point transfer of the producer's local piece (forward,
and backward for tensors with gradients) over the pipeline axis, per micro-batch. Costs count
per micro-batch too (× m in the copies), except the conversion of a weight's gradient accumulated
over the micro-batches (:func:`autoddl.engine.costs.accumulates_grad`): once per step per weight
copy (``Multiplicity.grad_copies``).

The result is an ordinary sharding problem with memory groups (one per represented stage):
:class:`~autoddl.formulations.sharding.ShardingModel` solves it exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from autoddl.engine.cluster import Mesh, MeshAxis
from autoddl.engine.costs import (
    CostedGraph, Multiplicity, TrainingConfig, accumulated_edges, build_problem,
)
from autoddl.engine.graph import OpGraph
from autoddl.engine.placements import local_fraction
from autoddl.engine.precision import tensor_bytes
from autoddl.engine.recompute import Layer, layers_by_prefix, plan_counts, realized, \
    with_recompute
from autoddl.engine.repeat import Blocks, _canonical, block_outputs
from autoddl.formulations.recompute import recompute_terms
from autoddl.formulations.sharding import ShardingProblem, StepShape


@dataclass(frozen=True)
class Instance:
    """One represented block: which stage group, its tag, how many real blocks it stands for."""

    stage: str  # "s0", "sm" (middle stages), "sl" (last stage)
    tag: str  # "b0", "b1" (explicit), or "first", "mid", "last"
    copies: int  # real blocks per represented stage


@dataclass(frozen=True, eq=False)
class Program:
    """A reduced pipelined graph with everything needed to cost it."""

    graph: OpGraph
    cost_mult: Multiplicity  # copies for costs (stage copies x block copies x micro-batches)
    node_group: dict[str, int]
    node_mem_copies: dict[str, int]
    inflight: tuple[int, ...]  # per group
    crossing: dict[tuple[str, str, int], int]  # boundary edges: copies (x micro-batches)
    stages: int
    microbatches: int
    layers: int
    outputs: frozenset[int] = frozenset()  # block positions whose outputs leave the block
    interleave: int = 1  # model chunks per device (Megatron's interleaved 1F1B: v)


def _stage_blocks(n: int) -> list[tuple[str, int]]:
    return [("first", 1), ("mid", n - 2), ("last", 1)] if n >= 3 else [(f"b{i}", 1)
                                                                        for i in range(n)]


def build_program(graph: OpGraph, blocks: Blocks, layers: int, stages: int,
                  microbatches: int) -> Program:
    """The reduced graph of ``layers`` blocks over ``stages`` stages (``stages`` divides it)."""
    K, m = stages, microbatches
    assert layers % K == 0 and K >= 2
    n = layers // K
    template = blocks.members[1]
    pos = {name: (b, j) for b, mem in enumerate(blocks.members) for j, name in enumerate(mem)}
    stage_list = [("s0", 1, 0)] + ([("sm", K - 2, 1)] if K >= 3 else []) + [("sl", 1, 2)]
    groups = {"s0": 0, "sm": 1, "sl": 2}
    inflight = (min(K, m), min(K - 1, m), 1)
    # the represented block sequence, in execution order
    seq: list[tuple[str, str, int, int]] = []  # (stage, tag, block copies, stage copies)
    for st, st_copies, _ in stage_list:
        for tag, copies in _stage_blocks(n):
            seq.append((st, tag, copies, st_copies))
    node_mult, node_group, node_mem = {}, {}, {}
    edge_mult: dict[tuple[str, str, int], int] = {}
    crossing: dict[tuple[str, str, int], int] = {}
    extra: list[tuple[str, str, int, int]] = []
    last_block = set(blocks.members[-1])
    block_nodes = {nm for mem in blocks.members for nm in mem}
    rename = {}

    def name(inst: int, j: int) -> str:
        st, tag, _, _ = seq[inst]
        return f"{st}.{tag}/{j}"

    # prefix (stage 0) and suffix (last stage): named as in the unpipelined reduction
    canon = _canonical(graph, blocks)
    for nd in graph.nodes:
        if nd.name not in block_nodes:
            rename[nd.name] = canon[nd.name]
    suffix = [nd for nd in graph.nodes if rename.get(nd.name, "").startswith("post/")]
    # params first (graph order keeps placeholders first), then ops
    out_nodes: list = []
    for nd in graph.nodes:
        if nd.name in rename and rename[nd.name].startswith("pre/") and nd.kind != "op":
            out_nodes.append(dataclasses.replace(nd, name=rename[nd.name], inputs=()))
            node_group[rename[nd.name]] = 0
    for inst, (st, tag, copies, st_copies) in enumerate(seq):
        for j, nm in enumerate(template):
            nd = graph[nm]
            if nd.kind == "param":
                new = name(inst, j)
                out_nodes.append(dataclasses.replace(nd, name=new, inputs=()))
                node_mult[new] = copies * st_copies
                node_mem[new] = copies
                node_group[new] = groups[st]
    for nd in graph.nodes:
        if nd.name in rename and rename[nd.name].startswith("pre/") and nd.kind == "op":
            out_nodes.append(dataclasses.replace(
                nd, name=rename[nd.name], inputs=tuple(rename[i] for i in nd.inputs)))
            node_group[rename[nd.name]] = 0
            node_mult[rename[nd.name]] = m
    real0 = blocks.members[0]
    for inst, (st, tag, copies, st_copies) in enumerate(seq):
        for j, nm in enumerate(template):
            nd = graph[nm]
            if nd.kind == "param":
                continue
            ins = []
            for k, src in enumerate(nd.inputs):
                b, jj = pos.get(src, (None, None))
                if b == 1:  # same block
                    ins.append(name(inst, jj))
                    continue
                if b == 0:  # previous block
                    if inst == 0:
                        real_src = graph[real0[j]].inputs[k]
                        ins.append(rename[real_src] if real_src in rename else name(0, jj))
                        continue
                    ins.append(name(inst - 1, jj))
                    continue
                ins.append(rename[src])  # shared outside tensor (prefix)
            new = name(inst, j)
            out_nodes.append(dataclasses.replace(nd, name=new, inputs=tuple(ins)))
            node_mult[new] = copies * st_copies * m
            node_mem[new] = copies
            node_group[new] = groups[st]
    for i, nd in enumerate(suffix):
        ins = []
        for src in nd.inputs:
            if src in last_block:
                ins.append(name(len(seq) - 1, pos[src][1]))
            else:
                ins.append(rename[src])
        out_nodes.append(dataclasses.replace(nd, name=rename[nd.name], inputs=tuple(ins)))
        node_group[rename[nd.name]] = 2
        node_mult[rename[nd.name]] = m
    reduced = OpGraph(tuple(_params_first(out_nodes)), rename[graph.loss])
    for nd in reduced.nodes:  # a parameter lives with its consumers (the head's, in the last)
        if nd.kind == "param" and nd.name.startswith("pre/"):
            consumers = [c.name for c in reduced.nodes if nd.name in c.inputs]
            if consumers:
                node_group[nd.name] = node_group[consumers[0]]
    # edge copies: an edge counts as often as its consumer (per micro-batch) except where the
    # producer stands for fewer copies (the entry into a repeated block or stage)
    inst_of = {f"{st}.{tag}": (st, tag, c, sc) for st, tag, c, sc in seq}
    for nd in reduced.nodes:
        for k, src in enumerate(nd.inputs):
            key = (src, nd.name, k)
            dst_inst, src_inst = nd.name.split("/")[0], src.split("/")[0]
            if dst_inst in inst_of:
                st, tag, c, sc = inst_of[dst_inst]
                same = src_inst == dst_inst
                prod = inst_of.get(src_inst)
                if same or prod is None or (prod[0] == st and prod[1] == tag):
                    edge_mult[key] = c * sc * m
                elif prod[0] == st:
                    edge_mult[key] = sc * m  # entry into this block: once per stage copy
                else:
                    edge_mult[key] = m  # from the previous stage: once
                    crossing[key] = m
            else:
                edge_mult[key] = m
                if (node_group.get(src, 0) != node_group[nd.name] and reduced[src].kind != "param"
                        and not src.startswith("pre/")):
                    crossing[key] = m  # the last block's output into the suffix
    # repeated-block self edges: block i -> i+1 inside a stage's mid, and stage -> stage in sm
    for st, tag, c, sc in seq:
        inst = f"{st}.{tag}"
        for j, nm in enumerate(template):
            nd = graph[nm]
            for k, src in enumerate(nd.inputs):
                if pos.get(src, (None,))[0] != 0:
                    continue
                jj = pos[src][1]
                if tag == "mid" and c >= 2:
                    extra.append((f"{inst}/{jj}", f"{inst}/{j}", k, (c - 1) * sc * m))
                if st == "sm" and tag in ("first", "b0") and sc >= 2:
                    last_tag = _stage_blocks(n)[-1][0]
                    key = (f"sm.{last_tag}/{jj}", f"{inst}/{j}", k)
                    extra.append((*key, (sc - 1) * m))
                    crossing[key] = (sc - 1) * m
    # a prefix tensor read in later stages is relayed: one send per boundary up to its last
    # reader (stage 1..K-2 readers are represented by "sm": the farthest is K-2)
    far_stage = {0: 0, 1: K - 2, 2: K - 1}
    for nd in reduced.nodes:
        for k, src in enumerate(nd.inputs):
            key = (src, nd.name, k)
            if (node_group.get(src, 0) == 0 and src.startswith("pre/")
                    and reduced[src].kind != "param" and node_group[nd.name] != 0):
                crossing[key] = far_stage[node_group[nd.name]] * m
    seen: set[str] = set()  # one relay chain per prefix tensor: keep its farthest edge only
    for key in sorted(crossing, key=lambda kk: -crossing[kk]):
        if key[0].startswith("pre/"):
            if key[0] in seen:
                del crossing[key]
            else:
                seen.add(key[0])
    seen2: set[tuple[str, int]] = set()  # one send per tensor per boundary: charge one edge
    for key in sorted(crossing):
        if key[0].startswith("pre/"):
            continue
        if (key[0], node_group[key[1]]) in seen2:
            del crossing[key]
        else:
            seen2.add((key[0], node_group[key[1]]))
    # a weight's accumulated gradient is converted once per step: per copy, not per micro-batch
    grads = {key: edge_mult[key] // m for key in accumulated_edges(reduced)}
    mult = Multiplicity(node_mult, edge_mult, tuple(extra), grad_copies=grads)
    return Program(reduced, mult, node_group, node_mem, inflight, crossing, K, m, layers,
                   frozenset(block_outputs(graph, blocks)))


#: the most model chunks per device the planner offers (Megatron's published rows use 2 and 3)
MAX_INTERLEAVE = 4


def interleave_options(layers: int, stages: int, microbatches: int,
                       cap: int = MAX_INTERLEAVE) -> list[int]:
    """The legal chunk counts ``v`` per device of ``layers`` on ``stages`` stages, 1 first:
    ``v`` divides the layers per stage, at most ``cap``, and ``v >= 2`` needs the micro-batches
    divisible by the stages (Megatron's interleaved schedule)."""
    if stages < 2 or layers % stages:
        return [1]
    per = layers // stages
    more = [v for v in range(2, min(cap, per) + 1) if per % v == 0] \
        if microbatches % stages == 0 else []
    return [1] + more


def interleave_bound_scale(stages: int, microbatches: int, v: int) -> float:
    r"""r with :math:`z_v \ge r\,z_1` for the optimum :math:`z_v` of a program run with ``v``
    chunks per device and any lower bound :math:`z_1` of the same program's plans at v = 1
    (memory relaxed or not): :math:`r = (m + (K-1)/v) / (m + K - 1)`.

    Why: for one plan with stage times :math:`t_k` (sum S, max M, S ≤ K·M), exposed traffic E,
    the v-step :math:`S/v + (m - 1/v) M + E` is at least r times the 1-step
    :math:`S + (m-1) M + E` (linear in S; equal at S = K·M, larger at S = M, and r ≤ 1); with
    v its transfers only grow and more micro-batches are in flight (its plans are a subset)."""
    k, m = stages, microbatches
    return (m + (k - 1) / v) / (m + k - 1)


def interleaved(prog: Program, v: int) -> Program:
    """``prog`` run with ``v`` model chunks per device (Megatron's interleaved 1F1B: device k
    holds chunks k, k+K, ...): bubble / v, more micro-batches in flight (Megatron's warm-up,
    2(K−r−1) + (v−1)K chunks on rank r, plus the one running) and the transfers of v·K chunks:
    v·K − 1 boundaries instead of K − 1. The boundaries of the layer chain count v times, plus
    v − 1 wrap-arounds from the last device to the first (charged to the edge leaving stage 0,
    which carries the same tensors); a prefix tensor relayed over f boundaries to its farthest
    reader is relayed over (v − 1)·K + f (its readers in the last round of chunks)."""
    if v == 1:
        return prog
    k, m = prog.stages, prog.microbatches
    if v < 1 or (prog.layers // k) % v or m % k:
        raise ValueError(f"{v} chunks need layers/stages divisible by {v} and micro-batches "
                         f"divisible by the {k} stages")

    def flight(rank: int) -> int:
        return min(m, -(-(2 * (k - rank - 1) + (v - 1) * k + 1) // v))

    crossing = {}
    for key, copies in prog.crossing.items():
        src = key[0]
        if src.startswith("pre/"):  # a relay over copies / m boundaries
            crossing[key] = ((v - 1) * k + copies // m) * m
        else:
            wrap = (v - 1) * m if prog.node_group[src] == 0 else 0
            crossing[key] = copies * v + wrap
    return dataclasses.replace(prog, interleave=v, crossing=crossing,
                               inflight=(flight(0), flight(1), flight(k - 1)))


def _mem_factor(prog: Program, nd) -> float:
    """Memory copies of a node: weights once per represented layer; activations per layer and
    micro-batch in flight (recomputation frees some: :mod:`autoddl.engine.recompute`)."""
    copies = prog.node_mem_copies.get(nd.name, 1)
    if nd.kind != "op":
        return copies
    return copies * prog.inflight[prog.node_group[nd.name]]


def _edge_mem_factor(prog: Program, dst) -> float:
    """Memory copies of a consumer's saved converted input."""
    return prog.node_mem_copies.get(dst.name, 1) * prog.inflight[prog.node_group[dst.name]]


def program_layers(prog: Program, kappa: float) -> list[Layer]:
    """The recompute groups of a program: each stage group's block instances (a middle block
    standing for its copies), its seconds counted per stage copy and micro-batch (× κ), its
    freed bytes per micro-batch in flight."""
    prefixes = list(dict.fromkeys(n.name.split("/")[0] for n in prog.graph.ops
                                  if "." in n.name.split("/")[0]))
    out = []
    for layer in layers_by_prefix(prog.graph, prog.cost_mult, prefixes):
        op = layer.ops[0]
        copies = prog.node_mem_copies.get(op, 1)
        group = prog.node_group[op]
        out.append(dataclasses.replace(layer, copies=copies, group=group,
                                       cost_scale=kappa * prog.cost_mult.node(op) / copies,
                                       memory_scale=float(prog.inflight[group])))
    return out


def program_layer_order(prog: Program) -> list[tuple[str, tuple[int, str]]]:
    """Per real layer in model order, (recompute group, slot): the group is its block instance
    (:func:`stage_of_real_block`), the slot that instance on its device (middle stages share a
    group, each has its own copies)."""
    order = []
    for i in range(prog.layers):
        chunk, prefix = stage_of_real_block(i, prog.layers, prog.stages, prog.interleave)
        order.append((prefix, (chunk % prog.stages, prefix)))
    return order


def _params_first(nodes: list) -> list:
    leaves = [n for n in nodes if n.kind != "op"]
    return leaves + [n for n in nodes if n.kind == "op"]


def step_shape(prog: Program) -> tuple[float, StepShape]:
    r"""(κ, shape): how a program's groups make the step (Narayanan et al., SC'21; Alpa).

    With per-micro-batch stage times :math:`t_k`, ``m`` micro-batches and ``v`` model chunks
    per device, a 1F1B step takes :math:`\sum_k t_k / v + (m - 1/v) \max_k t_k`: the bubble
    is :math:`(K-1)/v` slowest-stage passes, :math:`(m + (K-1)/v)\,t` for equal stages. A
    group ``g`` of ``c_g`` stages sums ``m·c_g·t_g`` of cost; the costs are scaled by
    :math:`\kappa = (m + (K-1)/v)/(mK)` so that their sum is the step of balanced stages (a lower
    bound of every plan's step, :class:`~autoddl.formulations.sharding.StepShape`). Weight
    traffic of one stage (its copies' sum / c_g) hides behind one micro-batch's backward of it
    (the window's sum / (m·c_g)): the last micro-batch's, after which it is exposed."""
    k, m, v = prog.stages, prog.microbatches, prog.interleave
    copies = (1, max(k - 2, 0), 1)
    kappa = (m + (k - 1) / v) / (m * k)
    sigma = tuple(1.0 / (kappa * m * c) if c else 0.0 for c in copies)
    shape = StepShape(max_weight=m - 1.0 / v, stage_scale=sigma,
                      stage_share=tuple(1.0 - 1.0 / (kappa * m * v) if c else 0.0
                                        for c in copies),
                      hidden_scale=tuple(1.0 / max(c, 1) for c in copies),
                      window_scale=tuple(1.0 / (m * max(c, 1)) for c in copies))
    return kappa, shape


def cost_program(prog: Program, mesh: Mesh, pp: MeshAxis, cluster,
                 config: TrainingConfig, base: CostedGraph | None = None
                 ) -> tuple[CostedGraph, ShardingProblem]:
    """The sharding problem of a program on a stage mesh: costs x copies, memory per stage
    group (activations x micro-batches in flight), boundary transfers over the pipeline axis
    (those of all ``v·K`` chunks, :func:`interleaved`), the step's shape (:func:`step_shape`).
    ``base``: the program's :func:`~autoddl.engine.costs.build_problem` on ``mesh``, if built
    already (it does not depend on the chunks per device)."""
    costed = base or build_problem(prog.graph, mesh, cluster, config, mult=prog.cost_mult)
    kappa, shape = step_shape(prog)
    g = prog.graph
    beta = pp.bandwidth_gbps * 1e9
    nodes = []
    for nd, nc in zip(g.nodes, costed.problem.nodes):
        copies = prog.cost_mult.node_memory(nd.name)
        raw_mem = nc.memory_bytes / max(copies, 1)
        grp = prog.node_group[nd.name]
        nodes.append(dataclasses.replace(nc, cost_s=kappa * nc.cost_s,
                                         memory_bytes=raw_mem * _mem_factor(prog, nd), group=grp))
    edges = []
    all_edges = prog.cost_mult.all_edges(g)
    for (src, dst, k, copies), ec in zip(all_edges, costed.problem.edges):
        grp = prog.node_group[dst]
        mem_copies = prog.cost_mult.edge_memory(src, dst, k, copies)
        mem = ec.memory_bytes / max(mem_copies, 1) * _edge_mem_factor(prog, g[dst])
        cost = ec.cost_s
        cross = prog.crossing.get((src, dst, k), 0)
        if cross:
            sends = 1 + int(g[src].requires_grad)
            sigs = costed.sigs[src]
            piece = np.zeros(cost.shape[0])
            for s_idx, s in enumerate(sigs):
                piece[ec.src_key[s_idx]] = (tensor_bytes(g[src].out, config.precision)
                                            * local_fraction(s.out, mesh.shape))
            p2p = cross * sends * (piece / beta + pp.latency_s)
            cost = cost + p2p[:, None]
        edges.append(dataclasses.replace(ec, cost_s=kappa * cost, memory_bytes=mem, group=grp))
    problem = ShardingProblem(tuple(nodes), tuple(edges), costed.problem.memory_capacity_bytes,
                              shape)
    costed = with_recompute(dataclasses.replace(costed, problem=problem),
                            program_layers(prog, kappa), config.recompute)
    return costed, costed.problem


def program_breakdown(prog: Program, costed: CostedGraph, problem: ShardingProblem,
                      choice: dict, pp: MeshAxis, bubble_s: float, counts: tuple = ()) -> dict:
    """Cost and memory of a pipelined program plan (recomputation ``counts``), per step."""
    from autoddl.engine.costs import breakdown  # the per-axis/kind totals, copies included

    layers = program_layers(prog, step_shape(prog)[0])
    idx_full = np.append([costed.sigs[n.name].index(choice[n.name]) for n in prog.graph.nodes],
                         np.asarray(counts, int))
    mult = realized(costed, layers, plan_counts(costed, idx_full))
    out = breakdown(costed, choice, counts, mult)
    extra_crit, extra_mem = (recompute_terms(problem, idx_full) if problem.recompute
                             else ({}, {}))
    mem_parts = out.pop("memory")
    g, mesh = prog.graph, costed.mesh
    p2p = {"bytes": 0.0, "seconds": 0.0, "count": 0}
    for (src, dst, k), copies in prog.crossing.items():
        sends = 1 + int(g[src].requires_grad)
        piece = (tensor_bytes(g[src].out, costed.config.precision)
                 * local_fraction(choice[src].out, mesh.shape))
        p2p["bytes"] += copies * sends * piece
        p2p["seconds"] += copies * sends * (piece / (pp.bandwidth_gbps * 1e9) + pp.latency_s)
        p2p["count"] += copies * sends
    out["per_axis"][pp.name] = p2p
    out["per_kind"]["p2p"] = p2p
    out["per_axis_kind"][pp.name] = {"p2p": dict(p2p)}
    idx = {n.name: i for i, n in enumerate(g.nodes)}
    per_group: dict[int, float] = {}
    sig_index = {n: costed.sigs[n].index(s) for n, s in choice.items()}
    for nd, nc in zip(g.nodes, problem.nodes):
        per_group[nc.group] = per_group.get(nc.group, 0.0) + float(nc.memory_bytes[sig_index[nd.name]])
    for e in problem.edges:
        src, dst = g.nodes[e.src].name, g.nodes[e.dst].name
        a, b = e.src_key[sig_index[src]], e.dst_key[sig_index[dst]]
        per_group[e.group] = per_group.get(e.group, 0.0) + float(e.memory_bytes[a, b])
    del idx
    for grp, v in extra_mem.items():
        per_group[grp] = per_group.get(grp, 0.0) + v
    # the step (what the solver minimized) holds the transfers and the bubble: (K-1)/v passes
    # of the slowest stage, T = max_g σ_g C_g of the shape
    crit: dict[int, float] = {}
    for nd, nc in zip(g.nodes, problem.nodes):
        crit[nc.group] = crit.get(nc.group, 0.0) + float(nc.cost_s[sig_index[nd.name]])
    for e in problem.edges:
        a = e.src_key[sig_index[g.nodes[e.src].name]]
        b = e.dst_key[sig_index[g.nodes[e.dst].name]]
        crit[e.group] = crit.get(e.group, 0.0) + float(e.cost_s[a, b])
    for grp, v in extra_crit.items():
        crit[grp] = crit.get(grp, 0.0) + v
    slowest = max(problem.shape.sigma(grp) * c for grp, c in crit.items())
    out.pop("exposed_comm_s", None)
    out.update({
        "bandwidth_s": out["bandwidth_s"] + p2p["seconds"],
        "bubble_s": bubble_s + (prog.stages - 1) / prog.interleave * slowest,
        "stage_time_s": slowest, "interleave": prog.interleave,
        "bytes_per_device": out["bytes_per_device"] + p2p["bytes"],
    })
    stage_names = ["stage 0", "stages 1..K-2", f"stage {prog.stages - 1}"]
    worst = max(per_group, key=per_group.get)
    weights: dict[int, float] = {}
    for nd, nc in zip(g.nodes, problem.nodes):
        if nd.kind == "param":
            weights[nc.group] = weights.get(nc.group, 0.0) + float(
                nc.memory_bytes[sig_index[nd.name]])
    out["memory"] = {
        "weights_bytes": weights.get(worst, 0.0),
        "activations_bytes": per_group[worst] - weights.get(worst, 0.0),
        "converted_inputs_bytes": 0.0, "per_device_bytes": per_group[worst],
        "per_stage_bytes": {stage_names[k]: v for k, v in sorted(per_group.items())},
        "capacity_bytes": mem_parts["capacity_bytes"],
    }
    return out


def stage_of_real_block(i: int, layers: int, stages: int, interleave: int = 1
                        ) -> tuple[int, str]:
    """(stage, canonical instance prefix) of real block ``i``; interleaved, (model chunk, the
    prefix of its place among its device's layers in execution order: chunk k's, then k+K's,
    ...). Block ``i`` runs in chunk i // (layers / (v·K)), on device chunk mod K."""
    n = layers // stages
    if interleave > 1:
        per_chunk = n // interleave
        chunk, within = divmod(i, per_chunk)
        k, rnd = chunk % stages, chunk // stages
        _, prefix = stage_of_real_block(k * n + rnd * per_chunk + within, layers, stages)
        return chunk, prefix
    k, r = divmod(i, n)
    st = "s0" if k == 0 else ("sl" if k == stages - 1 else "sm")
    tags = [t for t, _ in _stage_blocks(n)]
    if n >= 3:
        tag = "first" if r == 0 else ("last" if r == n - 1 else "mid")
    else:
        tag = tags[r]
    return k, f"{st}.{tag}"
