"""Find the optimal plan: solve the ILP of every candidate (mesh, pipeline degree), keep the best.

Candidates: every mesh of the cluster's devices without pipelining (the whole-batch graph), and,
when a micro-batch graph is given, every pipeline degree K >= 2 dividing the devices (K <= the
micro-batch count) with every stage-mesh shape, solved jointly for stages and shardings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh, MeshAxis
from autoddl.engine.costs import CostedGraph, TrainingConfig, breakdown, build_problem
from autoddl.engine.graph import OpGraph
from autoddl.engine.placements import format_placement
from autoddl.engine.plan import OpPlacement, Plan, format_bytes
from autoddl.engine.rules import Signature, check_rules
from autoddl.engine.programs import Program, build_program, cost_program, program_breakdown
from autoddl.engine.repeat import Reduced, find_blocks, reduce_graph
from autoddl.engine.stages import (
    build_pipeline_problem, pipeline_breakdown, pipeline_candidates,
)
from autoddl.errors import InfeasibleError, SolverError, UserError
from autoddl.formulations.backends import available_backends, default_backend, solve
from autoddl.formulations.milp import SolveResult, SolveStatus, relative_gap
from autoddl.formulations.pipeline import PipelineModel, PipelineProblem
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingModel, ShardingProblem

SCHEDULES = ("1F1B", "GPipe")


@dataclass(frozen=True, eq=False)
class Candidate:
    """The solver's answer for one (pipeline degree, stage mesh)."""

    costed: CostedGraph
    stages: int
    pp: MeshAxis | None
    microbatches: int
    result: SolveResult
    choice: dict[str, Signature] | None
    stage: dict[str, int] | None
    num_cols: int
    build_s: float
    program: Program | None = None
    problem: ShardingProblem | None = None
    bubble_s: float = 0.0

    @property
    def label(self) -> str:
        """e.g. "x2·y2" or "pp2 × x2"."""
        return str(self.costed.mesh) if self.stages == 1 else f"pp{self.stages} × {self.costed.mesh}"


def _decode(costed: CostedGraph, model: ShardingModel, x: np.ndarray) -> dict[str, Signature]:
    idx = model.choice(x)
    return {n.name: costed.sigs[n.name][int(k)] for n, k in zip(costed.graph.nodes, idx)}


def solve_lp_first(milp, backend: str, time_limit_s: float | None,
                   mip_rel_gap: float, lp_first: bool = True) -> SolveResult:
    """Solve the LP relaxation first: where it is infeasible, or integral, it is already the
    answer (and the proof); otherwise solve the MILP with ``backend``."""
    if not lp_first:
        return solve(milp, backend=backend, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    lp_backend = "highs" if "highs" in available_backends() else backend
    t0 = time.perf_counter()
    lp = solve(dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality)),
               backend=lp_backend, time_limit_s=time_limit_s)
    if lp.status is SolveStatus.INFEASIBLE:
        return dataclasses.replace(lp, backend=f"{lp_backend} (LP)")
    if lp.status is SolveStatus.OPTIMAL and lp.x is not None:
        xi = lp.x[milp.integrality]
        if np.all(np.abs(xi - np.round(xi)) <= 1e-7):
            x = lp.x.copy()
            x[milp.integrality] = np.round(xi)
            if milp.is_feasible(x):
                obj = milp.evaluate(x)
                return SolveResult(f"{lp_backend} (LP, integral)", SolveStatus.OPTIMAL, x, obj,
                                   lp.objective, relative_gap(obj, lp.objective),
                                   time.perf_counter() - t0)
    r = solve(milp, backend=backend, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    return dataclasses.replace(r, time_s=time.perf_counter() - t0)


def solve_sharding(costed: CostedGraph, backend: str | None = None,
                   time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                   cutoff: float = float("inf"), lp_first: bool = True) -> Candidate:
    """Solve the sharding ILP of one mesh (no pipelining); ``cutoff``: see ShardingModel."""
    t0 = time.perf_counter()
    model = ShardingModel(costed.problem, cutoff)
    milp = model.milp()
    build_s = time.perf_counter() - t0
    r = solve_lp_first(milp, backend or default_backend(), time_limit_s, mip_rel_gap, lp_first)
    choice = stage = None
    if r.has_solution:
        choice = _decode(costed, model, r.x)
        stage = {n: 0 for n in choice}
        cost, _ = costed.problem.evaluate(model.choice(r.x))
        assert abs(cost - r.objective) <= 1e-6 * max(1.0, abs(cost)) + 1e-12, \
            f"decoded plan costs {cost}, solver said {r.objective}"
    return Candidate(costed, 1, None, 1, r, choice, stage, milp.num_cols, build_s)


def solve_pipeline(costed: CostedGraph, stages: int, microbatches: int, pp: MeshAxis,
                   balance_eps: float = 0.1, backend: str | None = None,
                   time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                   tied: tuple[tuple[str, ...], ...] = ()) -> Candidate:
    """Solve the joint stage + sharding ILP of one (K, stage mesh)."""
    t0 = time.perf_counter()
    problem = build_pipeline_problem(costed, stages, microbatches, pp, balance_eps, tied)
    model = PipelineModel(problem)
    milp = model.milp()
    build_s = time.perf_counter() - t0
    r = solve(milp, backend=backend, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    choice = stage = None
    if r.has_solution:
        choice = _decode(costed, model, r.x)
        st = model.stages_of(r.x)
        stage = {n.name: int(k) for n, k in zip(costed.graph.nodes, st)}
        assert problem.legal_stages(st), "solver returned illegal stages"
        cost, _ = problem.evaluate(model.choice(r.x), st)
        assert abs(cost - r.objective) <= 1e-5 * max(1.0, abs(cost)) + 1e-12, \
            f"decoded plan costs {cost}, solver said {r.objective}"
    return Candidate(costed, stages, pp, microbatches, r, choice, stage, milp.num_cols, build_s)


def solve_program(prog: Program, smesh: Mesh, pp: MeshAxis, cluster: Cluster,
                  config: TrainingConfig, backend: str | None = None,
                  time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                  cutoff: float = float("inf"), lp_first: bool = True) -> Candidate:
    """Solve the sharding ILP of a pipelined program of repeated layers (stages fixed)."""
    t0 = time.perf_counter()
    costed, problem = cost_program(prog, smesh, pp, cluster, config)
    # 1F1B idle time: (K-1) passes of one micro-batch through one stage (as bubble_seconds)
    flops = sum(prog.cost_mult.node(n.name) * n.flops for n in prog.graph.ops) / prog.microbatches
    passes = 4.0 if prog.recompute else 3.0  # forward (again, when recomputing) + backward
    bubble = (prog.stages - 1) * passes * flops / (
        prog.stages * smesh.num_devices * cluster.peak_flops)
    model = ShardingModel(problem, cutoff - bubble)
    milp = model.milp()
    build_s = time.perf_counter() - t0
    r = solve_lp_first(milp, backend or default_backend(), time_limit_s, mip_rel_gap, lp_first)
    if r.objective is not None:
        r = dataclasses.replace(r, objective=r.objective + bubble,
                                bound=None if r.bound is None else r.bound + bubble)
    choice = stage = None
    if r.has_solution:
        choice = _decode(costed, model, r.x)
        real = (0, 1, prog.stages - 1)
        stage = {n.name: real[n.group] for n in problem.nodes}
    return Candidate(costed, prog.stages, pp, prog.microbatches, r, choice, stage,
                     milp.num_cols, build_s, prog, problem, bubble)


def min_memory_bytes(costed: CostedGraph, backend: str | None = None) -> float:
    """The least memory per device any plan of this (sharding) problem needs; with memory
    groups (pipeline stages), the largest of each group's least (a lower bound)."""
    p = costed.problem
    need = 0.0
    for g in sorted({n.group for n in p.nodes} | {e.group for e in p.edges}):
        nodes = tuple(NodeChoices(n.name, n.memory_bytes * (n.group == g), n.memory_bytes)
                      for n in p.nodes)
        edges = tuple(EdgeChoices(e.src, e.dst, e.src_key, e.dst_key,
                                  np.where(np.isfinite(e.cost_s),
                                           e.memory_bytes * (e.group == g), np.inf),
                                  e.memory_bytes) for e in p.edges)
        model = ShardingModel(ShardingProblem(nodes, edges, float("inf")))
        r = solve(model.milp(), backend=backend)
        need = max(need, float(r.objective) if r.has_solution else float("inf"))
    return need


def min_pipeline_memory_bytes(problem: PipelineProblem, backend: str | None = None) -> float:
    """The least worst-stage memory per device any plan of a pipeline problem needs."""
    model = PipelineModel(problem, minimize_memory=True)
    r = solve(model.milp(), backend=backend)
    return model.memory_of(float(r.objective)) if r.has_solution else float("inf")


def to_plan(c: Candidate, model_info: dict, cluster: Cluster, candidates: list[dict],
            total_time_s: float, schedule: str) -> Plan:
    """Turn a solved candidate into a :class:`Plan`."""
    costed, r = c.costed, c.result
    names = costed.mesh.names
    assert c.choice is not None and c.stage is not None
    ops = []
    for n in costed.graph.nodes:
        s = c.choice[n.name]
        ops.append(OpPlacement(
            n.name, n.target, format_placement(s.out, names),
            tuple(format_placement(p, names) for p in s.ins),
            tuple(None if g is None else format_placement(g, names) for g in s.grads),
            c.stage[n.name],
        ))
    if c.stages == 1:
        cost = breakdown(costed, c.choice)
        pipeline = None
    elif c.program is not None:
        assert c.pp is not None and c.problem is not None
        cost = program_breakdown(c.program, costed, c.problem, c.choice, c.pp, c.bubble_s)
        pipeline = {"stages": c.stages, "microbatches": c.microbatches, "schedule": schedule,
                    "axis": c.pp.to_dict(), "layers_per_stage": c.program.layers // c.stages}
    else:
        assert c.pp is not None
        cost = pipeline_breakdown(costed, c.choice, c.stage, c.stages, c.microbatches, c.pp)
        pipeline = {"stages": c.stages, "microbatches": c.microbatches, "schedule": schedule,
                    "axis": c.pp.to_dict(),
                    "stage_flops": [sum(n.flops for n in costed.graph.ops
                                        if c.stage[n.name] == k) for k in range(c.stages)]}
    memory = cost.pop("memory")
    solver = {"backend": r.backend, "status": r.status.value, "objective": r.objective,
              "bound": r.bound, "gap": r.gap, "time_s": total_time_s,
              "mesh_solve_time_s": r.time_s}
    return Plan(model=model_info, cluster={**cluster.to_dict(), "spec": cluster.spec},
                mesh=costed.mesh.to_dict(),
                training={"optimizer": costed.config.optimizer,
                          "recompute": costed.config.recompute},
                ops=tuple(ops), cost=cost, memory=memory, solver=solver,
                candidates=tuple(candidates), pipeline=pipeline)


def plan_graph(graph: OpGraph, cluster: Cluster, *, model_spec: str,
               backend: str | None = None, time_limit_s: float | None = None,
               config: TrainingConfig = TrainingConfig(), meshes: list[Mesh] | None = None,
               mip_rel_gap: float = 1e-6, microbatch_graph: OpGraph | None = None,
               microbatches: int = 1, stages: int | None = None, balance_eps: float = 0.1,
               schedule: str = "1F1B", log: Callable[[str], None] | None = None,
               layers: int | None = None, reduce: bool = True, lp_first: bool = True) -> Plan:
    """The minimum-cost plan of ``graph`` on ``cluster`` over all candidates.

    ``microbatch_graph`` (the graph of one of ``microbatches`` micro-batches) enables pipelined
    candidates; ``stages`` forces the pipeline degree (1: none); ``meshes`` restricts the
    unpipelined meshes. Repeated layers are solved once with a multiplicity (``reduce``);
    ``layers`` is the real layer count when the graphs were captured with fewer.
    """
    t0 = time.perf_counter()
    backend = backend or default_backend()
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= balance_eps:
        raise UserError(f"balance epsilon must be >= 0, got {balance_eps}")
    check_rules(graph)
    blocks = find_blocks(graph) if reduce else None
    if blocks is not None and (layers or blocks.count) < 4 and layers is None:
        blocks = None  # three layers or fewer: nothing to gain
    recompute = config.recompute == "layers"
    reduced: Reduced | None = reduce_graph(graph, blocks, layers, recompute) if blocks else None
    if layers is not None and reduced is None:
        raise UserError("a layer count was given but the graph has no repeated layers")
    if recompute and reduced is None:
        raise UserError("--recompute layers needs repeated layers (a ModuleList of identical "
                        "blocks, four or more)")
    jobs: list[Callable[[], Candidate]] = []
    if stages in (None, 1):
        g, mult = (reduced.graph, reduced.mult) if reduced else (graph, None)
        for mesh in (meshes if meshes is not None else cluster.meshes()):
            jobs.append(lambda cut, mesh=mesh: solve_sharding(
                build_problem(g, mesh, cluster, config, mult), backend, time_limit_s,
                mip_rel_gap, cut, lp_first))
    if microbatch_graph is not None and stages != 1:
        check_rules(microbatch_graph)
        mb_blocks = find_blocks(microbatch_graph) if reduced else None
        n_layers = reduced.layers if reduced else 0
        for k, pp, smesh in pipeline_candidates(cluster, microbatches, stages=stages):
            if mb_blocks is not None:
                if n_layers % k:
                    continue  # stages hold whole, equal runs of layers
                jobs.append(lambda cut, k=k, pp=pp, smesh=smesh: solve_program(
                    build_program(microbatch_graph, mb_blocks, n_layers, k, microbatches,
                                  recompute),
                    smesh, pp, cluster, config, backend, time_limit_s, mip_rel_gap, cut,
                    lp_first))
                continue
            jobs.append(lambda cut, k=k, pp=pp, smesh=smesh: solve_pipeline(
                build_problem(microbatch_graph, smesh, cluster, config), k, microbatches, pp,
                balance_eps, backend, time_limit_s, mip_rel_gap))
    if not jobs:
        raise UserError(f"no candidate with {stages} pipeline stages: the stage count must "
                        f"divide the {cluster.num_devices} devices and be at most the "
                        f"{microbatches} micro-batches")
    best: Candidate | None = None
    solved: list[Candidate] = []
    candidates: list[dict] = []
    for job in jobs:
        cut = best.result.objective if best is not None else float("inf")
        c = job(cut)
        solved.append(c)
        r = c.result
        status = r.status.value
        if r.status is SolveStatus.INFEASIBLE and np.isfinite(cut):
            status = "dominated"  # proven unable to beat the best plan found before it
        candidates.append({"mesh": c.label, "stages": c.stages, "shape": list(c.costed.mesh.shape),
                           "status": status, "objective": r.objective, "gap": r.gap,
                           "time_s": r.time_s, "build_s": c.build_s, "variables": c.num_cols})
        if log:
            log(f"{c.label}: {status}"
                + (f", objective {r.objective:.6g} s" if r.objective is not None else ""))
        if r.status is SolveStatus.FEASIBLE:
            print(f"warning: {c.label}: time limit reached, best plan has gap "
                  f"{100 * (r.gap or 0):.3g} %", file=sys.stderr)
        if c.choice is not None and (best is None or r.objective < best.result.objective):
            best = c
    if best is None:
        _raise_no_plan(solved, cluster, backend, balance_eps)
    g = best.costed.graph
    info = {"spec": model_spec, "graph_hash": g.digest(), "num_ops": len(g.ops),
            "num_params": reduced.param_count if reduced else g.param_count}
    if reduced is not None:
        info["repeat"] = {"layers": reduced.layers, "container": reduced.container,
                          "block_size": reduced.block_size}
    return to_plan(best, info, cluster, candidates, time.perf_counter() - t0, schedule)


def _raise_no_plan(solved: list[Candidate], cluster: Cluster, backend: str,
                   balance_eps: float) -> None:
    statuses = {c.result.status for c in solved}  # no best: no cutoff was ever applied
    if statuses <= {SolveStatus.INFEASIBLE}:
        needs = []
        for c in solved:
            if c.stages == 1 or c.program is not None:
                prob = c.problem if c.program is not None else c.costed.problem
                needs.append((min_memory_bytes(dataclasses.replace(c.costed, problem=prob),
                                               backend), c.label))
            else:
                assert c.pp is not None
                prob = build_pipeline_problem(c.costed, c.stages, c.microbatches, c.pp,
                                              balance_eps)
                needs.append((min_pipeline_memory_bytes(prob, backend), c.label))
        need, where = min(needs)
        if not np.isfinite(need):
            raise InfeasibleError(
                "no candidate admits any plan, whatever the memory: no stage split keeps every "
                "stage's FLOPs within (1 + balance epsilon) of the mean, and no unpipelined mesh "
                "was allowed; raise --balance-eps or choose another --stages"
            )
        raise InfeasibleError(
            f"no plan fits {format_bytes(cluster.memory_per_device_bytes)} per device at any "
            f"mesh or pipeline degree: the leanest plan ({where}) needs {format_bytes(need)} per "
            "device; use more devices, a smaller model or batch, or devices with more memory"
        )
    msgs = "; ".join(f"{c.label}: {c.result.status.value} {c.result.message}".strip()
                     for c in solved)
    raise SolverError(f"the solver returned no plan ({msgs}); raise --time-limit")
