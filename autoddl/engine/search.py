"""Heuristic searches over the same space the ILP solves exactly: the searches of other tools.

All three return ordinary plans costed by the ILP's own cost model, so each is at least the ILP
optimum (the tests check it):

* **Greedy** (per-op choice): on every candidate mesh, operators in graph order each take the
  signature of least local cost given the producers chosen so far (parameters and inputs take
  the placement cheapest for their first reader); the best plan that fits over the meshes.
* **Coordinate descent** (AutoDDL, Chen et al. 2023): on every candidate mesh, start from data
  parallelism (AutoDDL's start) and, separately, from the greedy plan, and sweep the nodes,
  moving each to the signature that minimizes the objective with all others fixed — its node
  cost plus every incident edge's cost — among those that keep the memory per device within
  capacity (while over capacity, the one that lowers it most),
  until a sweep changes nothing; keep the better end. A local optimum: no single node's change
  helps.
* **Alpa-style two-level search** (Zheng et al., OSDI'22): the outer level picks the pipeline
  degree K and the stage mesh (Alpa's submesh choice) and slices the layers into K contiguous
  stages — a dynamic program minimizing the largest stage's FLOPs (for identical repeated
  layers: equal runs); the inner level solves the sharding ILP of the stages *without* the
  cost of the tensors that cross stage boundaries (each stage's intra-op pass sees only its own
  operators), and the plan is then costed whole. K = 1 is the intra-op ILP alone, which is
  autoddl's unpipelined ILP.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from autoddl.engine.baselines import (
    NotApplicable, Outcome, best_of, batch_inputs, divides, fit_note, greedy_assign, leaf,
)
from autoddl.engine.costs import CostedGraph, plain_indices
from autoddl.engine.rules import Signature
from autoddl.engine.stages import build_pipeline_problem
from autoddl.engine.workload import Workload, plan_from_choice
from autoddl.formulations.sharding import MEMORY_RTOL, ShardingProblem


def greedy(work: Workload) -> Outcome:
    """Greedy per-op choice on every candidate mesh; the cheapest fitting plan."""
    tries = []
    for mesh in work.cluster.meshes():
        t0 = time.perf_counter()
        costed = work.costed(mesh)
        choice = greedy_assign(costed, {})
        plan = plan_from_choice(work, costed, choice, "greedy", time.perf_counter() - t0)
        tries.append(Outcome("greedy", str(mesh), plan, time.perf_counter() - t0,
                             fit_note(plan)))
    return best_of("greedy", tries)


def _incident(problem: ShardingProblem) -> list[list[int]]:
    """Edge indices incident to each node."""
    out: list[list[int]] = [[] for _ in problem.nodes]
    for k, e in enumerate(problem.edges):
        out[e.src].append(k)
        if e.dst != e.src:
            out[e.dst].append(k)
    return out


def _local(problem: ShardingProblem, v: int, pick: np.ndarray, incident: list[int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(cost, memory) of every signature of node ``v`` with all other nodes as picked: its node
    terms plus each incident edge's."""
    nd = problem.nodes[v]
    cost = nd.cost_s.astype(float).copy()
    mem = nd.memory_bytes.astype(float).copy()
    for k in incident:
        e = problem.edges[k]
        if e.src == e.dst:  # a node's edge to itself (repeated layers)
            rows, cols = e.src_key, e.dst_key
        elif e.src == v:
            rows, cols = e.src_key, np.full(len(e.src_key), e.dst_key[pick[e.dst]])
        else:
            rows, cols = np.full(len(e.dst_key), e.src_key[pick[e.src]]), e.dst_key
        cost += e.cost_s[rows, cols]
        mem += e.memory_bytes[rows, cols]
    return cost, mem


def descend(problem: ShardingProblem, start: np.ndarray, max_sweeps: int = 50) -> np.ndarray:
    """Coordinate descent on one node's signature at a time from ``start`` (see the module)."""
    pick = start.copy()
    incident = _incident(problem)
    cap = problem.memory_capacity_bytes * (1 + MEMORY_RTOL)
    _, total_mem = problem.evaluate(pick)
    for _ in range(max_sweeps):
        changed = False
        for v in range(len(problem.nodes)):
            cost, mem = _local(problem, v, pick, incident[v])
            new_mem = total_mem - mem[pick[v]] + mem
            if total_mem > cap:  # get within memory first
                key = np.lexsort((cost, np.maximum(new_mem - cap, 0.0)))
                k = int(key[0])
                better = new_mem[k] < total_mem - 1e-6 or (
                    new_mem[k] <= total_mem and cost[k] < cost[pick[v]] - 1e-15)
            else:
                cur = cost[pick[v]]
                cost = np.where(new_mem <= cap, cost, np.inf)
                k = int(np.argmin(cost))
                better = cost[k] < cur and (not np.isfinite(cur)
                                            or cost[k] < cur - 1e-12 * max(1.0, abs(cur)))
            if better and k != pick[v]:
                total_mem = float(new_mem[k])
                pick[v] = k
                changed = True
        if not changed:
            break
    return pick


def _starts(costed: CostedGraph) -> list[np.ndarray]:
    """Where the descent starts: data parallelism over the mesh's first axis (AutoDDL's
    start; replicated on the others) when the batch divides, and the greedy plan."""
    out = [plain_indices(costed, greedy_assign(costed, {}))]
    try:
        fixed = batch_inputs(costed, 0)
        for p in costed.graph.params:
            fixed[p.name] = leaf(costed, p.name, ("B",) * costed.mesh.ndim)
        out.insert(0, plain_indices(costed, greedy_assign(costed, fixed, None, divides(0))))
    except NotApplicable:
        pass
    return out


def _rank(problem: ShardingProblem, pick: np.ndarray) -> tuple[float, float]:
    """(memory over capacity, cost): fitting plans first, then the cheapest."""
    cost, mem = problem.evaluate(pick)
    return max(0.0, mem - problem.memory_capacity_bytes * (1 + MEMORY_RTOL)), cost


def coordinate_descent(work: Workload) -> Outcome:
    """AutoDDL's coordinate descent on every candidate mesh; the cheapest fitting plan."""
    tries = []
    for mesh in work.cluster.meshes():
        t0 = time.perf_counter()
        costed = work.costed(mesh)
        picks = [descend(costed.problem, start) for start in _starts(costed)]
        pick = min(picks, key=lambda x: _rank(costed.problem, x))
        choice = {n.name: costed.sigs[n.name][int(k)] for n, k in zip(costed.graph.nodes, pick)}
        plan = plan_from_choice(work, costed, choice, "coordinate descent",
                                time.perf_counter() - t0)
        tries.append(Outcome("coordinate descent", str(mesh), plan, time.perf_counter() - t0,
                             fit_note(plan)))
    return best_of("coordinate descent (AutoDDL)", tries)


# --------------------------------------------------------------------------- Alpa-style
def balanced_cuts(flops: list[float], stages: int, forbidden: set[int]) -> list[int] | None:
    """Cut positions 0 < c_1 < … < c_{K−1} < n (item c starts a stage) minimizing the largest
    stage's FLOPs (dynamic program over prefixes), never at a ``forbidden`` position."""
    n = len(flops)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    inf = float("inf")
    best = np.full((stages + 1, n + 1), inf)
    arg = np.zeros((stages + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            if j < n and j in forbidden:
                continue
            for i in range(k - 1, j):
                if best[k - 1, i] == inf or (i and i in forbidden):
                    continue
                v = max(best[k - 1, i], prefix[j] - prefix[i])
                if v < best[k, j]:
                    best[k, j], arg[k, j] = v, i
    if best[stages, n] == inf:
        return None
    cuts, j = [], n
    for k in range(stages, 0, -1):
        j = int(arg[k, j])
        cuts.append(j)
    return sorted(cuts)[1:]


def _solve(costed: CostedGraph, problem: ShardingProblem) -> dict[str, Signature] | None:
    """The inner ILP's plan of ``problem`` on ``costed``'s signatures (None: nothing fits)."""
    from autoddl.engine.planner import solve_sharding

    c = solve_sharding(dataclasses.replace(costed, problem=problem))
    return c.choice


def _alpa_program(work: Workload, k: int, pp, smesh, t0: float) -> Outcome:
    built = work.program(k, smesh, pp)
    label = f"pp{k} × {smesh}"
    if built is None:
        raise NotApplicable(f"{k} stages do not divide the repeated layers")
    prog, costed, problem, bubble = built
    # each stage's intra-op pass does not see the tensors crossing its boundaries
    _, _, local, _ = work.program(k, smesh, pp, crossings=False)
    choice = _solve(costed, local)
    if choice is None:
        raise NotApplicable("no stage plan fits memory")
    plan = plan_from_choice(work, costed, choice, "Alpa-style", time.perf_counter() - t0,
                            stages=k, pp=pp, program=prog, problem=problem, bubble_s=bubble)
    return Outcome("Alpa-style", label, plan, time.perf_counter() - t0, fit_note(plan))


def _alpa_joint(work: Workload, k: int, pp, smesh, t0: float) -> Outcome:
    """Stages sliced by the FLOPs dynamic program on the micro-batch graph; sharding by the ILP
    of the whole stage mesh problem (no boundary costs); costed as a pipeline."""
    from autoddl.engine.costs import build_problem

    g = work.microbatch_graph
    assert g is not None
    label = f"pp{k} × {smesh}"
    ops = g.ops
    pos = {n.name: i for i, n in enumerate(ops)}
    forbidden: set[int] = set()
    for p in g.params:  # a parameter's readers share a stage
        readers = [pos[n.name] for n in ops if p.name in n.inputs]
        if readers:
            forbidden.update(range(min(readers) + 1, max(readers) + 1))
    cuts = balanced_cuts([n.flops for n in ops], k, forbidden)
    if cuts is None:
        raise NotApplicable(f"no contiguous split into {k} stages")
    stage = {n.name: sum(1 for c in cuts if i >= c) for i, n in enumerate(ops)}
    for n in g.nodes:
        if n.kind == "input":
            stage[n.name] = 0
        elif n.kind == "param":
            stage[n.name] = min((stage[c.name] for c in ops if n.name in c.inputs), default=0)
    costed = build_problem(g, smesh, work.cluster, work.config)
    pipe = build_pipeline_problem(costed, k, work.microbatches, pp, work.balance_eps)
    st = np.array([stage[n.name] for n in g.nodes])
    if not pipe.legal_stages(st):
        raise NotApplicable(f"the FLOPs-balanced stages break the stage rules "
                            f"(balance within {work.balance_eps:g})")
    free = dataclasses.replace(costed.problem, memory_capacity_bytes=float("inf"))
    choice = _solve(costed, free)
    assert choice is not None
    plan = plan_from_choice(work, costed, choice, "Alpa-style", time.perf_counter() - t0,
                            stage=stage, stages=k, pp=pp)
    return Outcome("Alpa-style", label, plan, time.perf_counter() - t0, fit_note(plan))


def alpa(work: Workload, unpipelined: Outcome | None = None) -> Outcome:
    """Alpa-style two-level search over every pipeline degree and stage mesh; ``unpipelined``
    (K = 1) is the intra-op ILP's plan when the caller has it already."""
    tries = [] if unpipelined is None or unpipelined.plan is None else [unpipelined]
    if work.microbatch_graph is not None:
        n = work.cluster.num_devices
        for k in range(2, min(n, work.microbatches) + 1):
            if n % k:
                continue
            for _, pp, smesh in work.stage_candidates(k):
                t0 = time.perf_counter()
                try:
                    if work.reduced is not None:
                        tries.append(_alpa_program(work, k, pp, smesh, t0))
                    else:
                        tries.append(_alpa_joint(work, k, pp, smesh, t0))
                except NotApplicable as exc:
                    tries.append(Outcome("Alpa-style", f"pp{k} × {smesh}", None,
                                         time.perf_counter() - t0, f"not applicable: {exc}"))
    return best_of("Alpa-style (DP + ILP)", tries)
