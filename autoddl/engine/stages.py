"""Pipeline candidates and costs: stage meshes, the joint problem, and a pipelined plan's cost.

With K stages the device mesh is ``(pp=K, *stage mesh)``: the pipeline axis outermost (so, with
node-major ranks, stages fall across nodes first) and every stage on an identical stage mesh. The
graph is one micro-batch's; its sharding costs count once per micro-batch, except the conversions
of weight gradients accumulated over the micro-batches
(:func:`autoddl.engine.costs.accumulates_grad`), which run once per step: in the joint problem,
whose costs are per micro-batch, they count their per-micro-batch share, 1/m
(:func:`accumulated_share`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh, MeshAxis, ordered_factorizations, unique_by
from autoddl.engine.costs import (
    CostedGraph, Multiplicity, _EdgeCoster, accumulated_edges, accumulates_grad, breakdown,
    build_problem, choice_indices, edge_steps, forward_times, grad_fraction, grad_sync_share,
    keeps_converted, node_memory_bytes, steps_seconds, work_divisor,
)
from autoddl.engine.placements import local_fraction
from autoddl.engine.precision import tensor_bytes
from autoddl.engine.rules import Signature
from autoddl.formulations.pipeline import PipelineProblem
from autoddl.formulations.sharding import ShardingProblem

PIPELINE_AXIS = "pp"
STAGE_AXES = ("x", "y", "z")


def pipeline_candidates(cluster: Cluster, microbatches: int, max_axes: int = 3,
                        stages: int | None = None, distinct: bool = False
                        ) -> list[tuple[int, MeshAxis, Mesh]]:
    """(K, pipeline axis, stage mesh) for every K >= 2 dividing the devices, K <= micro-batches;
    ``distinct``: without stage meshes equivalent to an earlier one of the same K
    (:meth:`~autoddl.engine.cluster.Mesh.symmetry_key`)."""
    n = cluster.num_devices
    out = []
    for k in range(2, n + 1):
        if n % k or k > microbatches or (stages is not None and k != stages):
            continue
        rest = n // k
        shapes = [(1,)] if rest == 1 else ordered_factorizations(rest, max_axes - 1)
        for shape in shapes:
            full = cluster.mesh((k, *shape))
            pp = dataclasses.replace(full.axes[0], name=PIPELINE_AXIS)
            stage_axes = tuple(dataclasses.replace(a, name=STAGE_AXES[i])
                               for i, a in enumerate(full.axes[1:]))
            out.append((k, pp, Mesh(stage_axes)))
    if distinct:
        out = unique_by(out, lambda c: (c[0], c[1], c[2].symmetry_key()))
    return out


def bubble_seconds(costed: CostedGraph, stages: int) -> float:
    """1F1B idle time: (K−1) forward+backward passes of one micro-batch through one stage."""
    flops = sum(n.flops for n in costed.graph.ops)
    devices = stages * costed.mesh.num_devices
    return (stages - 1) * 3.0 * flops / (devices * costed.cluster.peak_flops)


def build_pipeline_problem(costed: CostedGraph, stages: int, microbatches: int, pp: MeshAxis,
                           balance_eps: float = 0.1,
                           tied: tuple[tuple[str, ...], ...] = ()) -> PipelineProblem:
    """The joint problem of a micro-batch graph costed on a stage mesh."""
    g, mesh = costed.graph, costed.mesh
    acts, pieces = [], []
    for n in g.nodes:
        sigs = costed.sigs[n.name]
        acts.append(np.array([node_memory_bytes(n, s, mesh, costed.config)
                              if n.kind == "op" else 0.0 for s in sigs]))
        nbytes = tensor_bytes(n.out, costed.config.precision)
        pieces.append(np.array([nbytes * local_fraction(s.out, mesh.shape) for s in sigs]))
    return PipelineProblem(
        sharding=accumulated_share(costed, microbatches), stages=stages,
        microbatches=microbatches,
        node_kind=tuple(n.kind for n in g.nodes),
        flops=np.array([n.flops if n.kind == "op" else 0.0 for n in g.nodes]),
        activation_bytes=tuple(acts), piece_bytes=tuple(pieces),
        carries_grad=np.array([n.requires_grad for n in g.nodes]),
        loss=costed.index[g.loss], p2p_bandwidth_gbps=pp.bandwidth_gbps,
        p2p_latency_s=pp.latency_s, bubble_s=bubble_seconds(costed, stages),
        balance_eps=balance_eps,
        tied=tuple(tuple(costed.index[n] for n in grp) for grp in tied),
    )


def accumulated_share(costed: CostedGraph, microbatches: int) -> ShardingProblem:
    """``costed.problem`` (per micro-batch) with each accumulated weight gradient's conversion at
    its per-micro-batch share: run once per step of ``microbatches``, it counts 1/m of itself."""
    g, mult, m = costed.graph, costed.mult or Multiplicity(), microbatches
    acc = set(accumulated_edges(g))
    if m == 1 or not acc:
        return costed.problem
    coster = _EdgeCoster(costed.mesh, costed.config.precision)
    edges = list(costed.problem.edges)
    for j, (src, dst, i, k) in enumerate(mult.all_edges(g)):
        if (src, dst, i) in acc:
            edges[j] = coster.choices(g, costed.sigs, costed.index, src, dst, i, k,
                                      mult.edge_memory(src, dst, i, k),
                                      1, k / m)
    return dataclasses.replace(costed.problem, edges=tuple(edges))


def step_multiplicity(costed: CostedGraph, microbatches: int) -> Multiplicity:
    """The copies per step of a micro-batch graph's nodes and edges: ``microbatches`` times
    each, the conversions of accumulated weight gradients once."""
    g, mult, m = costed.graph, costed.mult or Multiplicity(), microbatches
    assert not mult.extra_edges, "a micro-batch graph of the joint problem is not reduced"
    return dataclasses.replace(
        mult, nodes={n.name: m * mult.node(n.name) for n in g.nodes},
        edges={(src, n.name, i): m * mult.edge(src, n.name, i)
               for n in g.nodes for i, src in enumerate(n.inputs)},
        grad_copies={e: mult.edge(*e) for e in accumulated_edges(g)})


def pipeline_breakdown(costed: CostedGraph, choice: dict[str, Signature], stage: dict[str, int],
                       stages: int, microbatches: int, pp: MeshAxis) -> dict:
    """Cost and memory of a pipelined plan, per training step of ``microbatches`` micro-batches."""
    g, mesh, m = costed.graph, costed.mesh, microbatches
    step_mult = step_multiplicity(costed, m)

    def nbytes(name: str) -> int:  # a tensor's bytes in the plan's precision
        return tensor_bytes(g[name].out, costed.config.precision)

    per_step = breakdown(build_problem(g, mesh, costed.cluster, costed.config, step_mult,
                                       sigs=costed.sigs), choice)
    mem_mb = per_step.pop("memory")
    out = {"per_axis": per_step["per_axis"], "per_kind": per_step["per_kind"],
           "per_axis_kind": per_step["per_axis_kind"], "per_op": per_step["per_op"]}
    p2p = {"bytes": 0.0, "seconds": 0.0, "count": 0}
    stage_comm = np.zeros(stages)  # per micro-batch
    stage_sync = np.zeros(stages)  # once per step: accumulated weight gradients
    stage_compute = np.zeros(stages)
    converted = np.zeros(stages)
    for n in g.nodes:
        k = stage[n.name]
        if n.kind == "op":
            d = work_divisor(choice[n.name], mesh)
            stage_compute[k] += 3.0 * n.flops / d / costed.cluster.peak_flops
        for i, src in enumerate(n.inputs):
            fwd, bwd = edge_steps(nbytes(src), choice[src].out, choice[n.name].ins[i],
                                  choice[n.name].grads[i], mesh)
            stage_comm[k] += (forward_times(choice[src], src, n.name, Multiplicity())
                              * steps_seconds(fwd or [], mesh))
            once = (src, n.name, i) in step_mult.grad_copies and accumulates_grad(
                grad_fraction(choice[src], mesh.shape), choice[n.name].grads[i], mesh.shape)
            (stage_sync if once else stage_comm)[k] += steps_seconds(
                bwd, mesh, grad_sync_share(g, src, choice[n.name].grads[i], mesh.shape))
            pin = choice[n.name].ins[i]
            if keeps_converted(g, choice[src], n.name, pin):
                converted[k] += (nbytes(src) * local_fraction(pin, mesh.shape)
                                 * min(stages - k, m))
    last_reader: dict[str, int] = {}
    for n in g.nodes:
        for src in n.inputs:
            last_reader[src] = max(last_reader.get(src, 0), stage[n.name])
    for src, far in last_reader.items():  # one send per tensor per boundary it crosses
        hops = far - stage[src]
        if hops and g[src].kind != "param":
            piece = nbytes(src) * local_fraction(choice[src].out, mesh.shape)
            sends = hops * (1 + int(g[src].requires_grad))
            secs = sends * (piece / (pp.bandwidth_gbps * 1e9) + pp.latency_s)
            p2p["bytes"] += m * sends * piece
            p2p["seconds"] += m * secs
            p2p["count"] += m * sends
            for k in range(stage[src] + 1, far + 1):  # the receiving stages wait for it
                stage_comm[k] += secs / hops
    out["per_axis"][PIPELINE_AXIS] = p2p
    out["per_kind"]["p2p"] = p2p
    out["per_axis_kind"][PIPELINE_AXIS] = {"p2p": dict(p2p)}
    bubble = bubble_seconds(costed, stages)
    bandwidth = per_step["bandwidth_s"] + p2p["seconds"]
    slowest = float((stage_compute + stage_comm).max())
    # activations per stage: micro-batches in flight under 1F1B
    mem_stage = defaultdict(lambda: {"weights_bytes": 0.0, "activations_bytes": 0.0})
    for n in g.nodes:
        k = stage[n.name]
        b = node_memory_bytes(n, choice[n.name], mesh, costed.config)
        key = "weights_bytes" if n.kind == "param" else "activations_bytes"
        mem_stage[k][key] += b * (min(stages - k, m) if n.kind == "op" else 1)
    per_stage = [sum(mem_stage[k].values()) + converted[k] for k in range(stages)]
    worst = int(np.argmax(per_stage))
    out.update({
        # what the joint model minimizes: m times the per-micro-batch problem (accumulated
        # gradients at their share), the transfers and the bubble
        "total_s": m * accumulated_share(costed, m).evaluate(choice_indices(costed, choice))[0]
        + p2p["seconds"] + bubble,
        "bandwidth_s": bandwidth,
        "redundant_compute_s": per_step["redundant_compute_s"],
        "bubble_s": bubble,
        "compute_s": per_step["compute_s"],
        # the accumulated gradients are converted after the last micro-batch's backward
        "step_time_s": (m + stages - 1) * slowest + float(stage_sync.max()),
        "stage_time_s": slowest,  # the slowest stage's compute and transfers per micro-batch
        "bytes_per_device": per_step["bytes_per_device"] + p2p["bytes"],
    })
    memory = {
        "weights_bytes": mem_stage[worst]["weights_bytes"],
        "activations_bytes": mem_stage[worst]["activations_bytes"],
        "converted_inputs_bytes": float(converted[worst]),
        "per_device_bytes": per_stage[worst],
        "per_stage_bytes": per_stage,
        "capacity_bytes": mem_mb["capacity_bytes"],
    }
    out["memory"] = memory
    return out
