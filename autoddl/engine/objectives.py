"""What the planner minimizes: the step time (default) or the bytes each device sends.

* ``step``: the predicted step time (:mod:`autoddl.engine.costs`, :mod:`autoddl.engine.programs`).
* ``bytes``: the seed paper's bandwidth cost (AutoDDL, Chen et al.), per device: the bytes one
  device sends in one training step over every collective the cost model prices (activation and
  gradient conversions, weight-gradient synchronisation, ZeRO gathers, the loss made whole, a
  vocabulary-parallel loss's all-reduces, pipeline point-to-point transfers, forward conversions
  run again by recomputation). No compute, no overlap credit, no latency. A pipeline's stages run
  in parallel: its objective is the bytes of one device of the busiest stage, every micro-batch
  counted (:func:`~autoddl.engine.programs.bytes_step_shape`), never a sum over stages.

**Pricing bytes with the step's machinery.** On a mesh whose links carry one byte per second
with no latency (:func:`bytes_mesh`; intra-node and inter-node alike, so a two-level axis prices
its flat ring's bytes), every conversion the cost model times takes exactly its bytes per device
in seconds. :func:`~autoddl.engine.costs.build_problem` with ``objective="bytes"`` leaves out
compute and hides nothing; the problem is then an ordinary
:class:`~autoddl.formulations.sharding.ShardingProblem` whose costs are bytes, solved by the
same models, bounds and search.

**Work must be divided** (DESIGN.md, "the degenerate plan"): replicating every operator on every
device sends no bytes at all, so under a bare bytes objective "every device computes the whole
step" is optimal whenever it fits. The bytes objective therefore offers each operator that
computes (FLOPs > 0) only its signatures that divide its work over the most devices its legal
signatures allow (:func:`divided_signatures`; over the whole mesh for every operator of the
models autoddl captures); among those plans the objective is exactly the bytes per device.

**Recomputation.** A recomputed layer sends bytes again only where its ops convert between them
(tensor parallelism inside the layer); elsewhere recomputing is free in bytes, and the bytes
optimum leaves its counts tied. :func:`settle_counts` takes, for the chosen sharding, the fastest
recomputation that fits memory when it sends no more bytes than the solver's (ties broken by the
step time), so no layer is recomputed that memory does not need.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from autoddl.engine.cluster import GB, Cluster, Mesh, MeshAxis
from autoddl.engine.costs import (
    CostedGraph, Multiplicity, TrainingConfig, _signatures, build_problem, plain_indices,
    work_divisor,
)
from autoddl.engine.graph import OpGraph
from autoddl.engine.programs import Program, cost_program
from autoddl.engine.rules import Signature
from autoddl.specs import DEFAULT_OBJECTIVE, OBJECTIVES, check_objective  # noqa: F401
from autoddl.formulations.backends import solve_or_fall_back
from autoddl.formulations.recompute import RecomputeGroup, counts_of, restrict_groups
from autoddl.formulations.sharding import ShardingModel, ShardingProblem

if TYPE_CHECKING:
    from autoddl.engine.planner import Candidate

#: the unit of each objective's value (a plan's ``solver.objective``)
OBJECTIVE_UNITS = {"step": "seconds", "bytes": "bytes per device"}


def bytes_axis(axis: MeshAxis) -> MeshAxis:
    """``axis`` with links of one byte per second and no latency: a step takes its bytes."""
    return dataclasses.replace(axis, bandwidth_gbps=1.0 / GB, intra_bandwidth_gbps=1.0 / GB,
                               latency_s=0.0, intra_latency_s=0.0)


def bytes_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis a :func:`bytes_axis`."""
    return Mesh(tuple(bytes_axis(a) for a in mesh.axes))


def divided_signatures(graph: OpGraph, sigs: dict[str, list[Signature]], mesh: Mesh
                       ) -> dict[str, list[Signature]]:
    """Per node, its signatures that divide its work over the most devices (module docstring);
    every signature of a node that computes nothing (weights, inputs, views)."""
    out: dict[str, list[Signature]] = {}
    memo: dict[int, list[Signature]] = {}  # identical nodes share one list: keep sharing
    for n in graph.nodes:
        ss = sigs[n.name]
        if n.kind != "op" or not n.flops:
            out[n.name] = ss
            continue
        if id(ss) not in memo:
            divisors = [work_divisor(s, mesh) for s in ss]
            memo[id(ss)] = [s for s, d in zip(ss, divisors) if d == max(divisors)]
        out[n.name] = memo[id(ss)]
    return out


def bytes_build(graph: OpGraph, mesh: Mesh, cluster: Cluster, config: TrainingConfig,
                mult: Multiplicity | None = None, divided: bool = True,
                sigs: dict[str, list[Signature]] | None = None) -> CostedGraph:
    """:func:`~autoddl.engine.costs.build_problem` pricing bytes per device on ``mesh``
    (``divided``: only the signatures of :func:`divided_signatures`; ``sigs``: these lists
    instead). The result's mesh is the :func:`bytes_mesh`: for solving, not for reports."""
    priced = bytes_mesh(mesh)
    if sigs is None and divided:
        sigs = divided_signatures(graph, {n.name: _signatures(n, graph, mesh.shape)
                                          for n in graph.nodes}, mesh)
    return build_problem(graph, priced, cluster, config, mult, sigs=sigs, objective="bytes")


def pinned(problem: ShardingProblem, choice: Sequence[int]) -> ShardingProblem:
    """``problem`` with each node held to its signature in ``choice`` (each edge to its one
    pair), the recompute groups restricted to match: only the counts are left to choose."""
    sig = [int(c) for c in choice[:len(problem.nodes)]]

    def one(a: np.ndarray | None, c: int) -> np.ndarray | None:
        return None if a is None else a[[c]]

    nodes = tuple(dataclasses.replace(n, cost_s=n.cost_s[[c]], memory_bytes=n.memory_bytes[[c]],
                                      hidden_s=one(n.hidden_s, c), window_s=one(n.window_s, c))
                  for n, c in zip(problem.nodes, sig))
    edges = []
    for e in problem.edges:
        a, b = int(e.src_key[sig[e.src]]), int(e.dst_key[sig[e.dst]])
        edges.append(dataclasses.replace(
            e, src_key=np.zeros(1, dtype=np.int64), dst_key=np.zeros(1, dtype=np.int64),
            cost_s=e.cost_s[[a]][:, [b]], memory_bytes=e.memory_bytes[[a]][:, [b]],
            hidden_s=None if e.hidden_s is None else e.hidden_s[[a]][:, [b]]))
    return dataclasses.replace(problem, nodes=nodes, edges=tuple(edges),
                               recompute=restrict_groups(problem, choice))


def translate_counts(src: Sequence[RecomputeGroup], dst: Sequence[RecomputeGroup],
                     counts: Sequence[int]) -> tuple[int, ...]:
    """Recomputation counts of groups ``src`` (flattened) as counts of groups ``dst``: by group
    name and option kind (the same layers, priced differently); 0 where ``src`` has none."""
    got = {(g.name, o.kind): c for g, cs in zip(src, counts_of(src, counts, 0))
           for o, c in zip(g.options, cs)}
    return tuple(got.get((g.name, o.kind), 0) for g in dst for o in g.options)


def settle_counts(priced: ShardingProblem, priced_idx: np.ndarray, real: ShardingProblem,
                  real_idx: np.ndarray) -> tuple[int, ...]:
    """The recomputation counts of a plan solved on ``priced`` (signatures and counts
    ``priced_idx``) for its report on ``real`` (signatures ``real_idx``): the fastest counts on
    ``real`` that fit memory, where they send no more bytes than the solver's; else the solver's
    (module docstring)."""
    n_priced, n_real = len(priced.nodes), len(real.nodes)
    solved = tuple(int(c) for c in priced_idx[n_priced:])
    mine = translate_counts(priced.recompute, real.recompute, solved)
    if not real.recompute or all(g.fixed is not None for g in real.recompute):
        return mine
    fixed_real = pinned(real, np.append(real_idx[:n_real], mine).astype(int))
    model = ShardingModel(fixed_real)
    r = solve_or_fall_back(model.milp(), None, named=False)
    if not r.has_solution:
        return mine
    fast = tuple(int(c) for c in model.choice(r.x)[n_real:])
    fixed_priced = pinned(priced, priced_idx)
    zeros = np.zeros(n_priced, dtype=int)

    def sent(counts: Sequence[int]) -> float:
        return fixed_priced.evaluate(np.append(zeros, counts).astype(int))[0]

    back = translate_counts(real.recompute, priced.recompute, fast)
    return fast if sent(back) <= sent(solved) * (1 + 1e-9) else mine


def stage_bytes(prog: Program, costed: CostedGraph, problem: ShardingProblem,
                choice: dict[str, Signature], counts: Sequence[int], pp: MeshAxis) -> float:
    """The bytes one device of a pipelined program's busiest stage sends per step, every
    micro-batch counted (what ``--objective bytes`` minimizes), of a plan on ``costed`` and
    ``problem`` (signatures ``choice``, recomputation ``counts``)."""
    base = bytes_build(prog.graph, costed.mesh, costed.cluster, costed.config, prog.cost_mult,
                       sigs=costed.sigs)
    _, priced = cost_program(prog, bytes_mesh(costed.mesh), bytes_axis(pp), costed.cluster,
                             costed.config, base)
    tail = translate_counts(problem.recompute, priced.recompute, counts)
    return priced.evaluate(np.append(plain_indices(costed, choice), tail).astype(int))[0]


def reported(c: "Candidate", costed: CostedGraph, problem: ShardingProblem | None = None
             ) -> "Candidate":
    """A candidate solved on costs of another objective (``c.costed``, bytes) restated on the
    step's ``costed`` (and, pipelined, its ``problem``) for its report: the same signatures,
    its recomputation settled (:func:`settle_counts`)."""
    if c.costed is costed or c.choice is None:
        return c
    priced = c.problem if c.problem is not None else c.costed.problem
    real = problem if problem is not None else costed.problem
    counts = settle_counts(priced, np.append(plain_indices(c.costed, c.choice), c.counts),
                           real, plain_indices(costed, c.choice))
    return dataclasses.replace(c, costed=costed, problem=problem, counts=counts)
