"""Find the optimal plan: build the sharding ILP for every candidate mesh, solve, keep the best."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh
from autoddl.engine.costs import CostedGraph, TrainingConfig, breakdown, build_problem
from autoddl.engine.graph import OpGraph
from autoddl.engine.placements import format_placement
from autoddl.engine.plan import OpPlacement, Plan, format_bytes
from autoddl.engine.rules import Signature, check_rules
from autoddl.errors import InfeasibleError, SolverError
from autoddl.formulations.backends import default_backend, solve
from autoddl.formulations.milp import SolveResult, SolveStatus
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingModel, ShardingProblem


@dataclass(frozen=True, eq=False)
class MeshSolution:
    """The solver's answer on one mesh."""

    costed: CostedGraph
    result: SolveResult
    choice: dict[str, Signature] | None
    build_s: float


def solve_mesh(costed: CostedGraph, backend: str | None = None,
               time_limit_s: float | None = None, mip_rel_gap: float = 1e-6) -> MeshSolution:
    """Solve the sharding ILP of one mesh."""
    t0 = time.perf_counter()
    model = ShardingModel(costed.problem)
    milp = model.milp()
    build_s = time.perf_counter() - t0
    result = solve(milp, backend=backend, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    choice = None
    if result.has_solution:
        idx = model.choice(result.x)
        choice = {n.name: costed.sigs[n.name][int(k)] for n, k in zip(costed.graph.nodes, idx)}
        cost, _ = costed.problem.evaluate(idx)
        assert abs(cost - result.objective) <= 1e-6 * max(1.0, abs(cost)) + 1e-12, \
            f"decoded plan costs {cost}, solver said {result.objective}"
    return MeshSolution(costed, result, choice, build_s)


def min_memory_bytes(costed: CostedGraph, backend: str | None = None) -> float:
    """The least memory per device any plan on this mesh needs (ignoring communication)."""
    p = costed.problem
    nodes = tuple(NodeChoices(n.name, n.memory_bytes, n.memory_bytes) for n in p.nodes)
    edges = tuple(EdgeChoices(e.src, e.dst, e.src_key, e.dst_key,
                              np.where(np.isfinite(e.cost_s), e.memory_bytes, np.inf),
                              e.memory_bytes) for e in p.edges)
    model = ShardingModel(ShardingProblem(nodes, edges, float("inf")))
    r = solve(model.milp(), backend=backend)
    return float(r.objective) if r.has_solution else float("inf")




def to_plan(sol: MeshSolution, model_info: dict, cluster: Cluster,
            candidates: list[dict], total_time_s: float) -> Plan:
    """Turn a mesh solution into a :class:`Plan`."""
    costed, r = sol.costed, sol.result
    names = costed.mesh.names
    assert sol.choice is not None
    ops = []
    for n in costed.graph.nodes:
        s = sol.choice[n.name]
        ops.append(OpPlacement(
            n.name, n.target, format_placement(s.out, names),
            tuple(format_placement(p, names) for p in s.ins),
            tuple(None if g is None else format_placement(g, names) for g in s.grads),
        ))
    cost = breakdown(costed, sol.choice)
    memory = cost.pop("memory")
    solver = {
        "backend": r.backend, "status": r.status.value, "objective": r.objective,
        "bound": r.bound, "gap": r.gap, "time_s": total_time_s,
        "mesh_solve_time_s": r.time_s,
    }
    return Plan(model=model_info, cluster={**cluster.to_dict(), "spec": cluster.spec},
                mesh=costed.mesh.to_dict(), training={"optimizer": costed.config.optimizer},
                ops=tuple(ops), cost=cost, memory=memory, solver=solver,
                candidates=tuple(candidates))


def plan_graph(graph: OpGraph, cluster: Cluster, *, model_spec: str,
               backend: str | None = None, time_limit_s: float | None = None,
               config: TrainingConfig = TrainingConfig(), meshes: list[Mesh] | None = None,
               mip_rel_gap: float = 1e-6,
               log: Callable[[str], None] | None = None) -> Plan:
    """The minimum-cost plan of ``graph`` on ``cluster`` over all candidate meshes."""
    t0 = time.perf_counter()
    backend = backend or default_backend()
    check_rules(graph)
    meshes = meshes if meshes is not None else cluster.meshes()
    best: MeshSolution | None = None
    candidates: list[dict] = []
    solutions = []
    for mesh in meshes:
        costed = build_problem(graph, mesh, cluster, config)
        sol = solve_mesh(costed, backend, time_limit_s, mip_rel_gap)
        solutions.append(sol)
        r = sol.result
        candidates.append({"mesh": str(mesh), "shape": list(mesh.shape), "status": r.status.value,
                           "objective": r.objective, "gap": r.gap, "time_s": r.time_s,
                           "variables": None, "build_s": sol.build_s})
        if log:
            log(f"mesh {mesh}: {r.status.value}"
                + (f", objective {r.objective:.6g} s" if r.objective is not None else ""))
        if r.status is SolveStatus.FEASIBLE:
            print(f"warning: mesh {mesh}: time limit reached, best plan has gap "
                  f"{100 * (r.gap or 0):.3g} %", file=sys.stderr)
        if sol.choice is not None and (best is None or r.objective < best.result.objective):
            best = sol
    if best is None:
        statuses = {s.result.status for s in solutions}
        if statuses <= {SolveStatus.INFEASIBLE}:
            need = min(min_memory_bytes(s.costed, backend) for s in solutions)
            raise InfeasibleError(
                f"no plan fits {format_bytes(cluster.memory_per_device_bytes)} per device: "
                f"the leanest plan needs {format_bytes(need)} per device; use more devices, a smaller "
                "model or batch, or devices with more memory"
            )
        msgs = "; ".join(f"{s.costed.mesh}: {s.result.status.value} {s.result.message}".strip()
                         for s in solutions)
        raise SolverError(f"the solver returned no plan ({msgs}); raise --time-limit")
    info = {"spec": model_spec, "graph_hash": graph.digest(), "num_ops": len(graph.ops),
            "num_params": graph.param_count}
    return to_plan(best, info, cluster, candidates, time.perf_counter() - t0)
