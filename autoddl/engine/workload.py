"""A model and a cluster made ready for planning, shared by the ILP and the baselines.

:class:`Workload` holds what ``autoddl plan`` derives from a model spec before it solves: the
captured graph (a repeated-layer model is captured with three layers and reduced to first, middle
and last layer with multiplicities), the micro-batch graph for pipelined candidates, the cluster
and the training configuration. Baselines and the ILP cost their plans with the same
:func:`~autoddl.engine.costs.build_problem` (cached here per mesh) and turn them into ordinary
:class:`~autoddl.engine.plan.Plan` objects with :func:`plan_from_choice`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoddl.engine.capture_cache import Captured
from autoddl.engine.cluster import Cluster, Mesh, MeshAxis
from autoddl.engine.costs import CostedGraph, TrainingConfig, build_problem, plain_indices
from autoddl.engine.graph import OpGraph
from autoddl.engine.plan import Plan
from autoddl.engine.precision import resolve_precision
from autoddl.engine.programs import interleaved, Program, build_program
from autoddl.engine.recompute import sharding_layers, with_recompute
from autoddl.engine.repeat import Blocks, Reduced, find_blocks, reduce_graph
from autoddl.engine.mesh_signatures import check_rules
from autoddl.engine.rules import Signature
from autoddl.engine.stages import pipeline_candidates
from autoddl.formulations.milp import SolveResult, SolveStatus
from autoddl.errors import UserError
from autoddl.model_specs import ModelSpec
from autoddl.formulations.sharding import ShardingProblem


@dataclass(eq=False)
class Workload:
    """Everything the planner and the baselines need besides a plan."""

    spec_text: str
    graph: OpGraph  # the whole batch (captured with 3 layers when ``layers`` is set)
    cluster: Cluster
    config: TrainingConfig = TrainingConfig()
    microbatch_graph: OpGraph | None = None
    microbatches: int = 1
    layers: int | None = None  # the real layer count when the graphs have fewer
    balance_eps: float = 0.1
    reduced: Reduced | None = None
    from_cache: bool = False  # the graphs were read from the capture cache
    _costed: dict[tuple[int, ...], CostedGraph] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rules(self.graph)
        blocks = find_blocks(self.graph)
        if blocks is not None and self.layers is None and blocks.count < 4:
            blocks = None  # three layers or fewer: planned whole, as plan_graph does
        if blocks is not None:
            self.reduced = reduce_graph(self.graph, blocks, self.layers)

    @property
    def sharding_graph(self) -> OpGraph:
        """The graph unpipelined plans are made on (reduced when layers repeat)."""
        return self.reduced.graph if self.reduced else self.graph

    @property
    def num_layers(self) -> int:
        """Repeated layers of the real model (0: none found)."""
        return self.reduced.layers if self.reduced else 0

    def costed(self, mesh: Mesh) -> CostedGraph:
        """The costed sharding problem on ``mesh`` (cached by shape)."""
        key = mesh.shape
        if key not in self._costed:
            mult = self.reduced.mult if self.reduced else None
            costed = build_problem(self.sharding_graph, mesh, self.cluster, self.config, mult)
            layers, _ = sharding_layers(self.sharding_graph, mult, self.reduced is not None)
            self._costed[key] = with_recompute(costed, layers, self.config.recompute)
        return self._costed[key]

    def mesh(self, shape: tuple[int, ...]) -> Mesh:
        """The cluster's mesh of ``shape`` (axes of size 1 dropped; one axis of 1 if none)."""
        kept = tuple(s for s in shape if s > 1) or (1,)
        return self.cluster.mesh(kept)

    def microbatch_blocks(self) -> Blocks | None:
        """The repeated layers of the micro-batch graph (pipelined programs need them)."""
        if self.microbatch_graph is None or self.reduced is None:
            return None
        return find_blocks(self.microbatch_graph)

    def stage_candidates(self, stages: int) -> list[tuple[int, MeshAxis, Mesh]]:
        """(K, pipeline axis, stage mesh) of ``stages`` pipeline stages."""
        return pipeline_candidates(self.cluster, self.microbatches, stages=stages)

    def program(self, stages: int, smesh: Mesh, pp: MeshAxis, crossings: bool = True,
                interleave: int = 1
                ) -> tuple[Program, CostedGraph, ShardingProblem, float] | None:
        """The pipelined program of repeated layers on ``stages`` stages (``interleave`` model
        chunks per device), costed as the planner costs it: (program, costed, problem, extra
        seconds); None when the model has no repeated layers or ``stages`` does not divide them.
        ``crossings=False`` leaves out the transfers between stages."""
        from autoddl.engine.planner import prepare_program

        blocks = self.microbatch_blocks()
        if blocks is None or self.num_layers % stages:
            return None
        prog = build_program(self.microbatch_graph, blocks, self.num_layers, stages,
                             self.microbatches)
        prog = interleaved(prog, interleave)
        if not crossings:
            prog = dataclasses.replace(prog, crossing={})
        return (prog, *prepare_program(prog, smesh, pp, self.cluster, self.config))

    def model_info(self, g: OpGraph) -> dict[str, Any]:
        """The plan file's ``model`` entry for a plan made on ``g``."""
        info: dict[str, Any] = {"spec": self.spec_text, "graph_hash": g.digest(),
                                "num_ops": len(g.ops),
                                "num_params": (self.reduced.param_count if self.reduced
                                               else g.param_count)}
        if self.reduced is not None:
            info["repeat"] = {"layers": self.reduced.layers,
                              "container": self.reduced.container,
                              "block_size": self.reduced.block_size}
        return info


def plan_from_choice(work: Workload, costed: CostedGraph, choice: dict[str, Signature],
                     method: str, search_s: float, *, stage: dict[str, int] | None = None,
                     stages: int = 1, pp: MeshAxis | None = None,
                     program: Program | None = None, problem: ShardingProblem | None = None,
                     bubble_s: float = 0.0, schedule: str = "1F1B") -> Plan:
    """An ordinary plan of a baseline's choice, costed by the planner's own functions (a
    program's stages are its memory groups')."""
    from autoddl.engine.planner import Candidate, best_counts, program_stages, to_plan

    if program is not None and problem is not None:
        stage = program_stages(program, problem)

    result = SolveResult(method, SolveStatus.FEASIBLE, None, None, None, None, search_s)
    if program is not None and problem is not None:
        costed = dataclasses.replace(costed, problem=problem)
    cand = Candidate(costed, stages, pp, work.microbatches if stages > 1 else 1, result, choice,
                     stage or {n: 0 for n in choice}, 0, 0.0, program, problem, bubble_s,
                     best_counts(costed, choice))
    plan = to_plan(cand, work.model_info(costed.graph), work.cluster, [], search_s, schedule)
    solver = {**plan.solver, "objective": plan.cost["total_s"], "status": "heuristic"}
    ops = tuple(dataclasses.replace(o, zero=choice[o.name].zero) for o in plan.ops)
    return dataclasses.replace(plan, ops=ops, solver=solver)


def load_workload(model: str, cluster: str | Cluster, *, optimizer: str = "adam",
                  recompute: str = "none", microbatches: int | None = None,
                  stages: int | None = None, balance_eps: float = 0.1,
                  precision: str | None = None) -> Workload:
    """The workload of a ``--model`` spec on a ``--cluster`` spec (or cluster), as ``autoddl
    plan`` captures it: a model with a ``layers`` key of more than three whose layers repeat is
    captured with three and planned for all; a micro-batch graph is captured unless ``stages``
    is 1 or there is one device or one micro-batch (default: the largest divisor of the batch
    up to 16). Built-in and library models are captured once per machine
    (:mod:`~autoddl.engine.capture_cache`). ``precision``: fp32 or bf16 (None: the cluster's
    default, :func:`~autoddl.engine.precision.resolve_precision`)."""
    from autoddl.engine import capture_cache
    from autoddl.engine.cluster import parse_cluster
    from autoddl.model_specs import parse_model_spec

    spec = parse_model_spec(model)
    if isinstance(cluster, str):
        cluster = parse_cluster(cluster)
    config = TrainingConfig(optimizer, recompute,
                            resolve_precision(precision, cluster.device_type))
    if stages is not None and stages < 1:
        raise UserError(f"--stages must be at least 1, got {stages}")
    with_microbatch = stages != 1 and cluster.num_devices > 1
    key = (capture_cache.capture_key(spec, microbatches, with_microbatch)
           if capture_cache.cacheable(spec) else None)
    got = capture_cache.load(key) if key else None
    hit = got is not None
    if got is None:
        got = capture_graphs(spec, microbatches, with_microbatch)
        if key:
            capture_cache.store(key, got)
    return Workload(spec.text, got.graph, cluster, config, got.microbatch_graph,
                    got.microbatches, got.layers, balance_eps, from_cache=hit)


def capture_graphs(spec: ModelSpec, microbatches: int | None, with_microbatch: bool
                   ) -> Captured:
    """Capture the graphs of ``spec`` on the ``meta`` device: with three layers when it has
    more and they repeat; the first micro-batch's too when ``with_microbatch`` and there is
    more than one (``microbatches``, default: the largest divisor of the batch up to 16)."""
    from autoddl.engine.capture import capture, default_microbatches, microbatch_inputs
    from autoddl.engine.guard import user_code
    from autoddl.engine.models import FILE_MODEL, build_model, with_layers

    with user_code(f"--model {spec.text}", foreign=spec.name == FILE_MODEL or spec.is_hf):
        layers = dict(spec.params).get("layers")
        fast = layers is not None and layers > 3  # repeated layers: capture 3, plan for all
        module, inputs = build_model(with_layers(spec, 3) if fast else spec, "meta")
        graph = capture(module, inputs)
        if fast and find_blocks(graph) is None:  # its layers do not repeat (an MLP's first)
            fast = False
            module, inputs = build_model(spec, "meta")
            graph = capture(module, inputs)
        m = microbatches or default_microbatches(inputs)
        mb_graph = None
        if with_microbatch and m > 1:
            mb_graph = capture(module, microbatch_inputs(inputs, m))
    return Captured(graph, mb_graph, m, layers if fast else None)
