"""Find the optimal plan: solve the ILP of every candidate (mesh, pipeline degree), keep the best.

Candidates: every mesh of the cluster's devices without pipelining (the whole-batch graph), and,
when a micro-batch graph is given, every pipeline degree K >= 2 dividing the devices (K <= the
micro-batch count) with every stage-mesh shape, solved jointly for stages and shardings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autoddl.engine.cluster import Cluster, Mesh, MeshAxis
from autoddl.engine.costs import (
    CostedGraph, TrainingConfig, breakdown, build_problem, own_problem, plain_indices,
)
from autoddl.engine.candidates import Job, Prepared, search
from autoddl.engine.graph import OpGraph
from autoddl.engine.objectives import (
    DEFAULT_OBJECTIVE, bytes_axis, bytes_build, bytes_mesh, check_objective, reported,
    stage_bytes,
)
from autoddl.engine.placements import format_placement
from autoddl.engine.plan import OpPlacement, Plan, format_bytes, split_timings
from autoddl.engine.mesh_signatures import check_rules
from autoddl.engine.rules import Signature
from autoddl.engine.programs import (
    Program, build_program, cost_program, interleave_bound_scale, interleave_options, interleaved,
    program_breakdown, program_layer_order,
)
from autoddl.engine.recompute import (
    plan_counts, realized, recompute_record, sharding_layers, with_recompute,
)
from autoddl.engine.repeat import Reduced, find_blocks, real_modules, reduce_graph
from autoddl.engine.stages import (
    build_pipeline_problem, pipeline_breakdown, pipeline_candidates,
)
from autoddl.errors import InfeasibleError, SolverError, UserError
from autoddl.formulations.backends import (  # availability checks that import nothing
    BACKENDS, LARGE_MILP_COLS, default_backend, preload, solve_or_fall_back,
)
from autoddl.formulations.bounds import bound_fixing
from autoddl.formulations.dominance import prune_dominated, restrict
from autoddl.formulations.milp import SolveResult, SolveStatus, relative_gap
from autoddl.formulations.solving import (  # noqa: F401 - NEAR_CUTOFF, solve_lp_first: API
    NEAR_CUTOFF, solve_lp_first, solve_within_capacity,
)
from autoddl.formulations.overlap import solve_overlap
from autoddl.formulations.pipeline import PipelineModel, PipelineProblem
from autoddl.formulations.sharding import ShardingModel, ShardingProblem

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
    #: recomputation: copies per group option, after the signatures in a choice vector
    #: (:mod:`autoddl.formulations.recompute`; empty: the problem's defaults)
    counts: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """e.g. "x2·y2", "pp2 × x2" or, interleaved, "pp2·v2 × x2"."""
        if self.stages == 1:
            return str(self.costed.mesh)
        v = self.program.interleave if self.program is not None else 1
        return f"pp{self.stages}{f'·v{v}' if v > 1 else ''} × {self.costed.mesh}"


def decode(costed: CostedGraph, idx: np.ndarray) -> dict[str, Signature]:
    """The signature of each node, from its index in ``costed``'s signature lists."""
    return {n.name: costed.sigs[n.name][int(k)] for n, k in zip(costed.graph.nodes, idx)}


def _decode(costed: CostedGraph, model: ShardingModel, x: np.ndarray) -> dict[str, Signature]:
    return decode(costed, model.choice(x))


def tail(problem: ShardingProblem, idx: np.ndarray) -> tuple[int, ...]:
    """The recomputation counts a choice vector holds after its signatures."""
    return tuple(int(c) for c in idx[len(problem.nodes):])


def best_counts(costed: CostedGraph, choice: dict[str, Signature]) -> tuple[int, ...]:
    """The fastest recomputation for a fixed sharding (a baseline's), within memory: its own
    problem's MILP; the problem's defaults when nothing is free to choose or nothing fits."""
    own = own_problem(costed, choice)
    if not own.recompute or all(g.fixed is not None for g in own.recompute):
        return ()
    model = ShardingModel(own)
    r = solve_or_fall_back(model.milp(), None, named=False)
    return tail(own, model.choice(r.x)) if r.has_solution else ()


def size_backend(milp, step_rows: bool = False) -> str:
    """The default backend for a model of this size and kind (when the user named none):
    HiGHS for large models and for step-time rows (slowest stage, exposed communication),
    which CBC did not prove within minutes where HiGHS took seconds (a 7-layer MLP on 2×2)."""
    if (milp.num_cols > LARGE_MILP_COLS or step_rows) and BACKENDS["highs"].available():
        return "highs"
    return default_backend()


def _solve_capped(milp, model: ShardingModel, capacity_bytes: float,
                  memory_of: Callable[[np.ndarray], float], backend: str | None,
                  time_limit_s: float | None, mip_rel_gap: float, lp_first: bool,
                  cutoff: float) -> SolveResult:
    """Solve a candidate's MILP LP first (:func:`solve_lp_first`; the user's ``backend``, or by
    size), no plan over the memory cap (:func:`solve_within_capacity`)."""
    chosen = backend or size_backend(milp, model.has_step_rows)

    def attempt(m, tl: float | None) -> SolveResult:
        return solve_lp_first(m, chosen, tl, mip_rel_gap, lp_first, cutoff,
                              branch=backend is None, named=backend is not None)

    return solve_within_capacity(milp, model.memory_rows, capacity_bytes, memory_of, attempt,
                                 time_limit_s)


def _solve_problem(problem: ShardingProblem, backend: str | None, time_limit_s: float | None,
                   mip_rel_gap: float, lp_first: bool, cutoff: float
                   ) -> tuple[ShardingModel, SolveResult, float]:
    """(model, result, build seconds) of a sharding problem's optimum, its overlap term solved
    covered plans first, then the full model under their step
    (:func:`~autoddl.formulations.overlap.solve_overlap`)."""
    build_s = 0.0

    def solve(p: ShardingProblem, cut: float, part) -> tuple[ShardingModel, SolveResult]:
        nonlocal build_s
        t0 = time.perf_counter()
        model = ShardingModel(p, cut, part)
        milp = model.milp()
        build_s += time.perf_counter() - t0
        return model, _solve_capped(milp, model, p.memory_capacity_bytes,
                                    lambda x: p.evaluate(model.choice(x))[1], backend,
                                    time_limit_s, mip_rel_gap, lp_first, cut)

    model, r = solve_overlap(problem, solve, cutoff, mip_rel_gap)
    if r.has_solution and r.objective is not None:
        # the step columns T and X hold the step only to the solver's tolerances: report the
        # plan's own step time (its bound stays the solver's)
        true = problem.evaluate(model.choice(r.x))[0]
        bound = None if r.bound is None else min(r.bound, true)
        r = dataclasses.replace(r, objective=true, bound=bound, gap=relative_gap(true, bound))
    return model, r, build_s


def solve_sharding(costed: CostedGraph, backend: str | None = None,
                   time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                   cutoff: float = float("inf"), lp_first: bool = True) -> Candidate:
    """Solve the sharding ILP of one mesh (no pipelining); ``cutoff``: see ShardingModel."""
    model, r, build_s = _solve_problem(costed.problem, backend, time_limit_s, mip_rel_gap,
                                       lp_first, cutoff)
    choice = stage = None
    counts: tuple[int, ...] = ()
    if r.has_solution:
        choice = _decode(costed, model, r.x)
        stage = {n: 0 for n in choice}
        counts = tail(costed.problem, model.choice(r.x))
        cost, _ = costed.problem.evaluate(model.choice(r.x))
        assert abs(cost - r.objective) <= 1e-6 * max(1.0, abs(cost)) + 1e-12, \
            f"decoded plan costs {cost}, solver said {r.objective}"
    return Candidate(costed, 1, None, 1, r, choice, stage, model.num_cols, build_s,
                     counts=counts)


def solve_pipeline(costed: CostedGraph, stages: int, microbatches: int, pp: MeshAxis,
                   balance_eps: float = 0.1, backend: str | None = None,
                   time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                   tied: tuple[tuple[str, ...], ...] = ()) -> Candidate:
    """Solve the joint stage + sharding ILP of one (K, stage mesh), its LP relaxation first (so
    that a solve cut short keeps the LP's bound)."""
    t0 = time.perf_counter()
    problem = build_pipeline_problem(costed, stages, microbatches, pp, balance_eps, tied)
    model = PipelineModel(problem)
    milp = model.milp()
    build_s = time.perf_counter() - t0
    r = _solve_capped(milp, model, problem.sharding.memory_capacity_bytes,
                      lambda x: problem.evaluate(model.choice(x), model.stages_of(x))[1],
                      backend, time_limit_s, mip_rel_gap, True, float("inf"))
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


def prepare_program(prog: Program, smesh: Mesh, pp: MeshAxis, cluster: Cluster,
                    config: TrainingConfig, base: CostedGraph | None = None
                    ) -> tuple[CostedGraph, ShardingProblem, float]:
    """(costed, sharding problem, extra seconds: none, the bubble is in the problem's step
    shape) of a pipelined program on a stage mesh (``base``: see :func:`cost_program`)."""
    costed, problem = cost_program(prog, smesh, pp, cluster, config, base)
    return costed, problem, 0.0  # the 1F1B bubble is in the problem's step shape


def without_dominated(costed: CostedGraph, cutoff: float = float("inf")) -> CostedGraph:
    """``costed`` with its problem's dominated signatures removed (exact; see
    :mod:`autoddl.formulations.dominance`), its signature lists to match; with a finite
    ``cutoff``, first those that no plan costing at most ``cutoff`` uses
    (:func:`~autoddl.formulations.bounds.bound_fixing`: the solve looks for plans under it).
    Done only for the candidates whose ILP is solved: the screening's bound does not change."""
    fixed = bound_fixing(costed.problem, cutoff)
    problem, keep = prune_dominated(restrict(costed.problem, fixed))
    sigs = {n.name: [costed.sigs[n.name][int(k)] for k in f[kept]]
            for n, f, kept in zip(costed.graph.nodes, fixed, keep)}
    return dataclasses.replace(costed, problem=problem, sigs=sigs)


def program_stages(prog: Program, problem: ShardingProblem) -> dict[str, int]:
    """The real stage (model chunk when interleaved) of each node of a program's problem: the
    first, the last, and the middle ones shown as 1."""
    real = (0, 1, prog.stages * prog.interleave - 1)
    return {n.name: real[n.group] for n in problem.nodes}


def solve_program(prog: Program, smesh: Mesh, pp: MeshAxis, cluster: Cluster,
                  config: TrainingConfig, backend: str | None = None,
                  time_limit_s: float | None = None, mip_rel_gap: float = 1e-6,
                  cutoff: float = float("inf"), lp_first: bool = True,
                  prepared: tuple[CostedGraph, ShardingProblem, float] | None = None
                  ) -> Candidate:
    """Solve the sharding ILP of a pipelined program of repeated layers (stages fixed)."""
    t0 = time.perf_counter()
    costed, problem, bubble = prepared or prepare_program(prog, smesh, pp, cluster, config)
    prep_s = time.perf_counter() - t0
    model, r, build_s = _solve_problem(problem, backend, time_limit_s, mip_rel_gap, lp_first,
                                       cutoff - bubble)
    r = dataclasses.replace(r, objective=None if r.objective is None else r.objective + bubble,
                            bound=None if r.bound is None else r.bound + bubble)
    choice = stage = None
    counts: tuple[int, ...] = ()
    if r.has_solution:
        choice = _decode(costed, model, r.x)
        stage = program_stages(prog, problem)
        counts = tail(problem, model.choice(r.x))
    return Candidate(costed, prog.stages, pp, prog.microbatches, r, choice, stage,
                     model.num_cols, prep_s + build_s, prog, problem, bubble, counts)


def min_memory_bytes(costed: CostedGraph, backend: str | None = None) -> float:
    """The least memory per device any plan of this (sharding) problem needs, recomputation
    included; with memory groups (pipeline stages), the largest of each group's least (a lower
    bound)."""
    p = costed.problem
    need = 0.0
    for g in sorted({n.group for n in p.nodes} | {e.group for e in p.edges}):
        model = ShardingModel(p, lean_group=g)
        r = solve_or_fall_back(model.milp(), backend, named=backend is not None)
        need = max(need, float(r.objective) if r.has_solution else float("inf"))
    return need


def min_pipeline_memory_bytes(problem: PipelineProblem, backend: str | None = None) -> float:
    """The least worst-stage memory per device any plan of a pipeline problem needs."""
    model = PipelineModel(problem, minimize_memory=True)
    r = solve_or_fall_back(model.milp(), backend, named=backend is not None)
    return model.memory_of(float(r.objective)) if r.has_solution else float("inf")


def to_plan(c: Candidate, model_info: dict, cluster: Cluster, candidates: list[dict],
            total_time_s: float, schedule: str, proof: dict | None = None) -> Plan:
    """Turn a solved candidate into a :class:`Plan`; ``proof``: entries for the solver record
    (``proof_capacity_bytes``, ``fallback``, ``objective_kind``: what ``objective`` is, step
    seconds or bytes per device). Timings go to :attr:`Plan.timings`, not the records."""
    costed, r = c.costed, c.result
    names = costed.mesh.names
    assert c.choice is not None and c.stage is not None
    ops = []
    modules = real_modules([(n.name, n.module) for n in costed.graph.nodes],
                           model_info.get("repeat"), c.stages,
                           c.program.interleave if c.program is not None else 1)
    for n, module in zip(costed.graph.nodes, modules):
        s = c.choice[n.name]
        ops.append(OpPlacement(
            n.name, n.target, format_placement(s.out, names),
            tuple(format_placement(p, names) for p in s.ins),
            tuple(None if g is None else format_placement(g, names) for g in s.grads),
            c.stage[n.name], zero=s.zero, module=module,
        ))
    recompute = {"recompute": costed.config.recompute}
    if c.stages == 1:
        layers, order = sharding_layers(costed.graph, costed.mult,
                                        any(n.name.startswith("mid/") for n in costed.graph.ops))
        counts = plan_counts(costed, np.append(plain_indices(costed, c.choice), c.counts))
        cost = breakdown(costed, c.choice, c.counts, realized(costed, layers, counts))
        recompute = recompute_record(costed.config.recompute, counts, order)
        pipeline = None
    elif c.program is not None:
        assert c.pp is not None and c.problem is not None
        cost = program_breakdown(c.program, costed, c.problem, c.choice, c.pp, c.bubble_s,
                                 c.counts)
        cost["stage_bytes_per_device"] = stage_bytes(c.program, costed, c.problem, c.choice,
                                                     c.counts, c.pp)
        idx = np.append(plain_indices(costed, c.choice), c.counts)
        recompute = recompute_record(costed.config.recompute, plan_counts(costed, idx),
                                     program_layer_order(c.program))
        pipeline = {"stages": c.stages, "microbatches": c.microbatches, "schedule": schedule,
                    "axis": c.pp.to_dict(), "layers_per_stage": c.program.layers // c.stages,
                    "interleave": c.program.interleave}
    else:
        assert c.pp is not None
        cost = pipeline_breakdown(costed, c.choice, c.stage, c.stages, c.microbatches, c.pp)
        pipeline = {"stages": c.stages, "microbatches": c.microbatches, "schedule": schedule,
                    "axis": c.pp.to_dict(),
                    "stage_flops": [sum(n.flops for n in costed.graph.ops
                                        if c.stage[n.name] == k) for k in range(c.stages)]}
    memory = cost.pop("memory")
    solver = {"backend": r.backend, "status": r.status.value, "objective": r.objective,
              "bound": r.bound, "gap": r.gap, **(proof or {})}
    records = [split_timings(rec) for rec in candidates]
    timings = {"total_s": total_time_s, "solve_s": r.time_s,
               "candidates": [t for _, t in records]}
    return Plan(model=model_info, cluster={**cluster.to_dict(), "spec": cluster.spec},
                mesh=costed.mesh.to_dict(),
                training={"optimizer": costed.config.optimizer, **recompute,
                          "precision": costed.config.precision},
                ops=tuple(ops), cost=cost, memory=memory, solver=solver,
                candidates=tuple(rec for rec, _ in records), pipeline=pipeline, timings=timings)


def plan_graph(graph: OpGraph, cluster: Cluster, *, model_spec: str,
               backend: str | None = None, time_limit_s: float | None = None,
               config: TrainingConfig = TrainingConfig(), meshes: list[Mesh] | None = None,
               mip_rel_gap: float = 1e-6, microbatch_graph: OpGraph | None = None,
               microbatches: int = 1, stages: int | None = None, balance_eps: float = 0.1,
               schedule: str = "1F1B", log: Callable[[str], None] | None = None,
               layers: int | None = None, reduce: bool = True, lp_first: bool = True,
               screen: bool = True, workers: int | None = None,
               strict_rules: bool = False, interleave: int | None = None,
               objective: str = DEFAULT_OBJECTIVE) -> Plan:
    """The minimum-cost plan of ``graph`` on ``cluster`` over all candidates.

    ``microbatch_graph`` (the graph of one of ``microbatches`` micro-batches) enables pipelined
    candidates; ``stages`` forces the pipeline degree (1: none); ``meshes`` restricts the
    unpipelined meshes. Repeated layers are solved once with a multiplicity (``reduce``);
    ``layers`` is the real layer count when the graphs were captured with fewer.
    ``time_limit_s`` bounds the whole search (the plan then reports its gap); ``screen``: see
    :func:`autoddl.engine.candidates.search`, as is ``workers`` (screening processes).
    Operators without a sharding rule run replicated and are listed in the plan
    (``model["fallback_ops"]``); ``strict_rules`` makes them an error instead. Pipelines of
    repeated layers may run interleaved (v model chunks per device) where v is legal
    (:func:`~autoddl.engine.programs.interleave_options`); ``interleave`` forces one v.
    ``objective``: what is minimized, the step time or the bytes per device
    (:mod:`autoddl.engine.objectives`); the plan reports both.
    """
    t0 = time.perf_counter()
    check_objective(objective)
    preload()  # solver libraries imported now, before screening forks or any thread starts
    _check_options(schedule, balance_eps, stages, interleave)
    if schedule != "1F1B":  # interleaving is a 1F1B schedule
        interleave = 1
    fallback = check_rules(graph, strict_rules)
    blocks = find_blocks(graph) if reduce else None
    if blocks is not None and (layers or blocks.count) < 4 and layers is None:
        blocks = None  # three layers or fewer: nothing to gain
    if layers is not None and blocks is None:
        raise UserError("a layer count was given but the graph has no repeated layers")
    if config.recompute == "layers" and blocks is None:
        raise UserError("--recompute layers needs repeated layers (a ModuleList of identical "
                        "blocks, four or more)")
    # recomputation is chosen per layer by each candidate's MILP ("auto") or forced
    jobs = _variant_jobs(graph, cluster, config, blocks, layers, backend, meshes, mip_rel_gap,
                         microbatch_graph, microbatches, stages, balance_eps, lp_first, "",
                         interleave, objective)
    reduced = reduce_graph(graph, blocks, layers) if blocks else None
    if not jobs and interleave is not None and interleave > 1:
        raise UserError(f"no pipeline can run {interleave} model chunks per device: it needs "
                        "repeated layers (four or more), a stage count dividing the devices and "
                        f"the micro-batches ({microbatches}), and {interleave} dividing the "
                        "layers per stage; choose another --interleave, --stages or "
                        "--microbatches")
    if not jobs and objective == "bytes":
        raise UserError(f"no candidate with {stages} pipeline stages under --objective bytes: "
                        "it prices pipelines of repeated layers (four or more) only, with a "
                        "stage count dividing the devices, the micro-batches and the layers; "
                        "choose another --stages or the step objective")
    if not jobs:
        n_layers = reduced.layers if reduced else 0
        layers_too = (f" and, with repeated layers, divide the {n_layers} layers"
                      if n_layers and microbatch_graph is not None and blocks else "")
        raise UserError(f"no candidate with {stages} pipeline stages: the stage count must "
                        f"divide the {cluster.num_devices} devices and be at most the "
                        f"{microbatches} micro-batches{layers_too}")
    found = search(jobs, mip_rel_gap=mip_rel_gap, time_limit_s=time_limit_s, screen=screen,
                   workers=workers, log=log)
    best = found.best
    if best is None:
        if found.timed_out:
            raise SolverError("no plan found within the time limit; raise --time-limit")
        _raise_no_plan(found.solved, cluster, backend, balance_eps)
    proof = _proof(found, time_limit_s)
    candidates = found.records
    g = best.costed.graph
    info = {"spec": model_spec, "graph_hash": g.digest(), "num_ops": len(g.ops),
            "num_params": reduced.param_count if reduced else g.param_count}
    if fallback:
        info["fallback_ops"] = dict(sorted(fallback.items()))
    if reduced is not None:
        info["repeat"] = {"layers": reduced.layers, "container": reduced.container,
                          "block_size": reduced.block_size}
    return to_plan(best, info, cluster, candidates, time.perf_counter() - t0, schedule,
                   {**proof, "objective_kind": objective})


def _check_options(schedule: str, balance_eps: float, stages: int | None,
                   interleave: int | None) -> None:
    """Raise :class:`UserError` on a planning option out of range."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= balance_eps:
        raise UserError(f"balance epsilon must be >= 0, got {balance_eps}")
    if interleave is not None and interleave < 1:
        raise UserError(f"--interleave must be at least 1, got {interleave}")
    if interleave is not None and interleave > 1 and stages == 1:
        raise UserError("--interleave needs a pipeline; drop --stages 1")
    if interleave is not None and interleave > 1 and schedule != "1F1B":
        raise UserError(f"--interleave runs under 1F1B only, not {schedule}; drop --schedule")


def _variant_jobs(graph: OpGraph, cluster: Cluster, config: TrainingConfig, blocks,
                  layers: int | None, backend: str | None, meshes: list[Mesh] | None,
                  mip_rel_gap: float, microbatch_graph: OpGraph | None, microbatches: int,
                  stages: int | None, balance_eps: float, lp_first: bool, suffix: str,
                  interleave: int | None = None, objective: str = DEFAULT_OBJECTIVE
                  ) -> list[Job]:
    """The candidates of one recomputation variant: every unpipelined mesh, and every pipeline
    degree and stage mesh (programs of repeated layers, or the joint stage problem; not under
    the bytes objective, whose pipelines are programs: :mod:`autoddl.engine.objectives`).
    Each is solved on the costs of ``objective`` and reported on the step's."""
    reduced: Reduced | None = reduce_graph(graph, blocks, layers) if blocks else None
    by_bytes = objective == "bytes"

    def sharding_job(g: OpGraph, mesh: Mesh, mult) -> Prepared:
        t1 = time.perf_counter()
        layer_list = sharding_layers(g, mult, reduced is not None)[0]
        costed = with_recompute(build_problem(g, mesh, cluster, config, mult), layer_list,
                                config.recompute)
        priced = (with_recompute(bytes_build(g, mesh, cluster, config, mult), layer_list,
                                 config.recompute) if by_bytes else costed)
        return Prepared(
            str(mesh), 1, priced, priced.problem, 0.0, time.perf_counter() - t1,
            solve=lambda cut, tl: reported(solve_sharding(without_dominated(priced, cut), backend,
                                                          tl, mip_rel_gap, cut, lp_first),
                                           costed),
            make=lambda idx, r: reported(Candidate(
                priced, 1, None, 1, r, decode(priced, idx),
                {n.name: 0 for n in g.nodes}, 0, 0.0, counts=tail(priced.problem, idx)), costed))

    programs = _Programs()

    def program_job(k: int, pp: MeshAxis, smesh: Mesh, mb_blocks, v: int) -> Prepared:
        t1 = time.perf_counter()

        def build() -> Program:
            return build_program(microbatch_graph, mb_blocks, n_layers, k, microbatches)

        plain, base = programs.get(k, smesh, build, cluster, config)
        prog = interleaved(plain, v)
        costed, problem, bubble = prepare_program(prog, smesh, pp, cluster, config, base)
        priced, priced_problem = costed, problem
        if by_bytes:  # the bubble is time: no offset
            _, base_b = programs.get(k, smesh, build, cluster, config, objective)
            priced, priced_problem, bubble = prepare_program(
                prog, bytes_mesh(smesh), bytes_axis(pp), cluster, config, base_b)

        def solve(cut: float, tl: float | None) -> Candidate:
            lean = without_dominated(dataclasses.replace(priced, problem=priced_problem),
                                     cut - bubble)
            return reported(solve_program(prog, smesh, pp, cluster, config, backend, tl,
                                          mip_rel_gap, cut, lp_first,
                                          (lean, lean.problem, bubble)), costed, problem)

        return Prepared(
            _program_label(k, v, smesh), k, priced, priced_problem, bubble,
            time.perf_counter() - t1, solve=solve,
            make=lambda idx, r: reported(Candidate(
                priced, k, pp, microbatches, r, decode(priced, idx),
                program_stages(prog, priced_problem), 0, 0.0, prog, priced_problem, bubble,
                tail(priced_problem, idx)), costed, problem))

    def joint_job(k: int, pp: MeshAxis, smesh: Mesh) -> Prepared:
        t1 = time.perf_counter()
        costed = build_problem(microbatch_graph, smesh, cluster, config)
        return Prepared(
            f"pp{k} × {smesh}", k, costed, None, 0.0, time.perf_counter() - t1,
            solve=lambda cut, tl: solve_pipeline(costed, k, microbatches, pp, balance_eps,
                                                 backend, tl, mip_rel_gap),
            make=lambda idx, r: None, uses_cutoff=False)

    jobs: list[Job] = []
    forced = interleave is not None and interleave > 1  # pipelines of repeated layers only
    if stages in (None, 1) and not forced:
        g, mult = (reduced.graph, reduced.mult) if reduced else (graph, None)
        for mesh in (meshes if meshes is not None else cluster.distinct_meshes()):
            jobs.append(Job(f"{mesh}{suffix}", 1, mesh.shape,
                            lambda mesh=mesh: sharding_job(g, mesh, mult)))
    n_layers = reduced.layers if reduced else 0
    if microbatch_graph is not None and stages != 1:
        check_rules(microbatch_graph)
        mb_blocks = find_blocks(microbatch_graph) if reduced else None
        for k, pp, smesh in pipeline_candidates(cluster, microbatches, stages=stages,
                                                 distinct=True):
            label = f"pp{k} × {smesh}{suffix}"
            if mb_blocks is not None:
                if n_layers % k == 0:  # stages hold whole, equal runs of layers
                    jobs += _interleave_jobs(k, smesh, microbatches, n_layers, interleave, suffix,
                                             len(jobs),
                                             lambda v, k=k, pp=pp, smesh=smesh: program_job(
                                                 k, pp, smesh, mb_blocks, v))
                continue
            if not forced and not by_bytes:
                jobs.append(Job(label, k, smesh.shape,
                                lambda k=k, pp=pp, smesh=smesh: joint_job(k, pp, smesh)))
    return jobs


class _Programs:
    """The v = 1 program of each (K, stage mesh) and its base costs, shared by the candidates
    of every v (a few MB each: the newest 32 are kept)."""

    def __init__(self) -> None:
        self._built: dict[tuple, tuple[Program, CostedGraph]] = {}

    def get(self, k: int, smesh: Mesh, build: Callable[[], Program], cluster: Cluster,
            config: TrainingConfig, objective: str = DEFAULT_OBJECTIVE
            ) -> tuple[Program, CostedGraph]:
        """(program, its :func:`~autoddl.engine.costs.build_problem` on ``smesh``, or its
        :func:`~autoddl.engine.objectives.bytes_build` for the bytes objective)."""
        key = (k, smesh.shape, objective)
        if key not in self._built:
            if len(self._built) >= 32:
                del self._built[next(iter(self._built))]
            prog = next((p for (kk, shape, _), (p, _) in self._built.items()
                         if (kk, shape) == key[:2]), None) or build()
            make = bytes_build if objective == "bytes" else build_problem
            self._built[key] = (prog, make(prog.graph, smesh, cluster, config,
                                           mult=prog.cost_mult))
        return self._built[key]


def _program_label(k: int, v: int, smesh: Mesh) -> str:
    """A program candidate's label: "pp4 × x8", interleaved "pp4·v2 × x8"."""
    return f"pp{k}{f'·v{v}' if v > 1 else ''} × {smesh}"


def _interleave_jobs(k: int, smesh: Mesh, microbatches: int, layers: int,
                     interleave: int | None, suffix: str, first: int,
                     build: Callable[[int], Prepared]) -> list[Job]:
    """The jobs of one (K, stage mesh) of repeated layers, one per legal chunk count v
    (:func:`~autoddl.engine.programs.interleave_options`; ``interleave`` forces one): v = 1
    first, at index ``first`` of the job list, and the others derived from it
    (:func:`~autoddl.engine.programs.interleave_bound_scale`); v = 1 alone when forced."""
    options = interleave_options(layers, k, microbatches)
    if interleave is not None:
        options = [v for v in options if v == interleave]
    jobs = []
    for v in options:
        derive = v > 1 and interleave is None
        jobs.append(Job(_program_label(k, v, smesh) + suffix, k, smesh.shape,
                        lambda v=v: build(v), interleave=v,
                        parent=first if derive else None,
                        bound_scale=interleave_bound_scale(k, microbatches, v) if derive else 1.0))
    return jobs


def _proof(found, time_limit_s: float | None) -> dict:
    """Warn on stderr where the proof stopped short of the requested gap (naming the time limit
    only when one was given and hit) and return what limits it, for the plan's solver record:
    the memory per device a tightened solve's bound covers, the solver that stood in for a
    crashed one; how many ILPs were solved, by which solvers, and how many candidates their
    screening bound alone ruled out."""
    r = found.best.result
    if r.status is SolveStatus.FEASIBLE:
        within = f"the plan is within {100 * (r.gap if r.gap is not None else 1):.3g} % of optimal"
        if time_limit_s is not None and found.timed_out:
            print(f"warning: time limit reached: {within} (gap to the best bound)",
                  file=sys.stderr)
        else:
            why = "; ".join(sorted({c.result.message for c in found.solved
                                    if c.result.status not in (SolveStatus.OPTIMAL,
                                                               SolveStatus.INFEASIBLE)
                                    and c.result.message}))
            print(f"warning: {within} (gap to the best bound)" + (f": {why}" if why else ""),
                  file=sys.stderr)
    proof: dict = {}
    caps = [c.result.extra["proof_capacity_bytes"] for c in found.solved
            if "proof_capacity_bytes" in c.result.extra]
    if caps:
        proof["proof_capacity_bytes"] = min(caps)
    if r.extra.get("fallback"):
        proof["fallback"] = r.extra["fallback"]
    proof["ilps_solved"] = len(found.solved)
    proof["ilp_solvers"] = dict(sorted(Counter(c.result.backend for c in found.solved).items()))
    proof["candidates_bounded"] = sum(rec.get("status") == "pruned" for rec in found.records)
    return proof


def largest_consumers(costed: CostedGraph, count: int = 3) -> str:
    """The ``count`` nodes needing the most memory per device even at their leanest signature
    (weights with their gradients and optimizer states, saved activations), in words."""
    need = sorted(((float(np.min(n.memory_bytes)), n.name) for n in costed.problem.nodes
                   if len(n.memory_bytes)), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{name} {format_bytes(b)}" for b, name in need[:count])


def _raise_no_plan(solved: list[Candidate], cluster: Cluster, backend: str | None,
                   balance_eps: float) -> None:
    statuses = {c.result.status for c in solved}  # no best: no cutoff was ever applied
    if statuses <= {SolveStatus.INFEASIBLE}:
        needs = []
        for c in solved:
            if c.stages == 1 or c.program is not None:
                prob = c.problem if c.program is not None else c.costed.problem
                needs.append((min_memory_bytes(dataclasses.replace(c.costed, problem=prob),
                                               backend), c.label, c))
            else:
                assert c.pp is not None
                prob = build_pipeline_problem(c.costed, c.stages, c.microbatches, c.pp,
                                              balance_eps)
                needs.append((min_pipeline_memory_bytes(prob, backend), c.label, c))
        need, where, lean = min(needs, key=lambda t: (t[0], t[1]))
        if not np.isfinite(need):
            counts = " or ".join(sorted({str(c.stages) for c in solved}))
            raise InfeasibleError(
                f"no plan whatever the memory: no split into {counts} pipeline stages keeps "
                f"every stage's FLOPs within {1 + balance_eps:g} × the mean (--balance-eps "
                f"{balance_eps:g}), and --stages leaves no unpipelined plan; raise --balance-eps "
                "or choose another --stages"
            )
        raise InfeasibleError(
            f"no plan fits {format_bytes(cluster.memory_per_device_bytes)} per device at any "
            f"mesh or pipeline degree: the leanest plan ({where}) needs {format_bytes(need)} per "
            f"device; largest consumers: {largest_consumers(lean.costed)}; use more devices, a "
            "smaller model or batch, or devices with more memory"
        )
    msgs = "; ".join(f"{c.label}: {c.result.status.value} {c.result.message}".strip()
                     for c in solved)
    raise SolverError(f"the solver returned no plan ({msgs}); raise --time-limit")
