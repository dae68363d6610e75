"""Recomputation chosen by the MILP (:mod:`autoddl.formulations.recompute`) against brute force.

Tier 1: random sharding problems with recompute groups (counts of copies, two options, memory
caps that make recomputation pay), solved exactly and compared with exhaustive enumeration of
every signature and every count.
"""

from __future__ import annotations

import numpy as np
import pytest

from autoddl.formulations.backends import available_backends, solve
from autoddl.formulations.dominance import prune_dominated
from autoddl.formulations.milp import SolveStatus
from autoddl.formulations.recompute import LinearForm, RecomputeGroup, RecomputeOption
from autoddl.formulations.sharding import ShardingModel, ShardingProblem, StepShape
from tests.test_sharding_ilp import random_problem

BACKENDS = [b for b in available_backends() if b != "ortools-cpsat"]  # continuous columns


def _form(rng: np.random.Generator, problem: ShardingProblem, nodes: list[int],
          edges: list[int], scale: float) -> LinearForm:
    """A random non-negative linear form over some nodes and edges of ``problem``."""
    return LinearForm(
        tuple((v, rng.uniform(0, scale, len(problem.nodes[v].cost_s)).round(2)) for v in nodes),
        tuple((i, rng.uniform(0, scale, problem.edges[i].cost_s.shape).round(2))
              for i in edges))


def with_groups(rng: np.random.Generator, problem: ShardingProblem, fixed: bool = False
                ) -> ShardingProblem:
    """``problem`` with two recompute groups: one layer (1 copy) and one of 3 copies."""
    n, m = len(problem.nodes), len(problem.edges)
    groups = []
    for name, copies in (("one", 1), ("three", 3)):
        nodes = sorted(set(rng.choice(n, size=min(n, 2), replace=False).tolist()))
        edges = sorted(set(rng.choice(m, size=min(m, 1), replace=False).tolist())) if m else []
        options = []
        for kind in ("full", "selective"):
            options.append(RecomputeOption(kind, _form(rng, problem, nodes, edges, 0.5),
                                           _form(rng, problem, nodes, edges, 3.0),
                                           _form(rng, problem, nodes, edges, 2.0)))
        groups.append(RecomputeGroup(name, copies, 0, tuple(options),
                                     (0, copies) if fixed and copies > 1 else None))
    return ShardingProblem(problem.nodes, problem.edges, problem.memory_capacity_bytes,
                           problem.shape, tuple(groups))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_counts_match_brute_force(backend):
    """Signatures and counts from the MILP equal the exhaustive optimum, and recomputation is
    really chosen in some of the trials (the memory cap makes it pay)."""
    rng = np.random.default_rng(11)
    checked = recomputed = 0
    for trial in range(10):
        base = random_problem(rng, n_nodes=int(rng.integers(3, 5)), tight=False)
        problem = with_groups(rng, base)
        free, _ = problem.brute_force()
        # a cap between the leanest plan with recomputation and the plain optimum's memory
        _, plain_arg = ShardingProblem(base.nodes, base.edges, np.inf).brute_force()
        if plain_arg is None:
            continue  # every plan uses a forbidden conversion
        cap = 0.85 * problem.evaluate(np.concatenate([plain_arg, [0, 0, 0, 0]]))[1]
        problem = ShardingProblem(problem.nodes, problem.edges, cap, problem.shape,
                                  problem.recompute)
        best, arg = problem.brute_force()
        model = ShardingModel(problem)
        result = solve(model.milp(), backend=backend)
        if not np.isfinite(best):
            assert result.status is SolveStatus.INFEASIBLE, (trial, result)
            continue
        assert result.status is SolveStatus.OPTIMAL, (trial, result)
        choice = model.choice(result.x)
        cost, mem = problem.evaluate(choice)
        assert cost == pytest.approx(best, rel=1e-6, abs=1e-9), (trial, choice, arg)
        assert result.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert mem <= cap * (1 + 1e-9)
        checked += 1
        recomputed += int(arg[len(problem.nodes):].sum() > 0)
        assert free <= best + 1e-12
    assert checked >= 5 and recomputed >= 2


def test_fixed_counts_and_stage_shape():
    """Forced counts are taken as given; recomputation's seconds count in their stage's time
    (the slowest stage's max term), checked against brute force."""
    rng = np.random.default_rng(5)
    base = random_problem(rng, n_nodes=4, tight=False)
    shape = StepShape(max_weight=2.0, stage_scale=(1.0,), stage_share=(0.5,))
    problem = with_groups(rng, ShardingProblem(base.nodes, base.edges, np.inf, shape),
                          fixed=True)
    best, arg = problem.brute_force()
    assert tuple(arg[-2:]) == (0, 3)  # the three-copy group's forced counts
    model = ShardingModel(problem)
    result = solve(model.milp(), backend="highs")
    assert result.status is SolveStatus.OPTIMAL
    choice = model.choice(result.x)
    assert tuple(choice[-2:]) == (0, 3)
    assert problem.evaluate(choice)[0] == pytest.approx(best, rel=1e-6)


def test_dominance_keeps_recompute_optimum():
    """Pruning dominated signatures weighs the recomputation forms: the optimum is unchanged."""
    rng = np.random.default_rng(3)
    for _ in range(6):
        base = random_problem(rng, n_nodes=4, tight=True)
        problem = with_groups(rng, base)
        best, _ = problem.brute_force()
        lean, _ = prune_dominated(problem)
        assert lean.brute_force()[0] == pytest.approx(best, rel=1e-12)


def _small_gpt():
    """A 3-layer GPT (planned whole: one recompute group per layer) on 2 devices whose attention
    keeps a score stash (so selective recomputation frees memory), overlap off."""
    import dataclasses

    from autoddl.engine.capture import capture
    from autoddl.engine.costs import build_problem
    from autoddl.engine.models import build_model, parse_model_spec
    from autoddl.engine.recompute import sharding_layers, with_recompute
    from tests.helpers import cluster

    spec = parse_model_spec("gpt:layers=3,hidden=32,heads=8,seq=64,batch=4,vocab=64")
    graph = capture(*build_model(spec, "meta"))
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10, overlap=False)
    c = dataclasses.replace(c, compute=dataclasses.replace(c.compute,
                                                           attention_score_passes=4.0))
    layers, _ = sharding_layers(graph, None, False)
    assert len(layers) == 3
    return graph, with_recompute(build_problem(graph, c.mesh((2,)), c), layers, "auto")


@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_solver_recomputation_equals_brute_force_over_layers(fraction):
    """On a 3-layer GPT with memory capped below its plain optimum's, the MILP's per-layer
    recomputation (none, selective, full: each a free choice) and sharding cost what the best of
    all 27 per-layer assignments costs, each solved with its recomputation forced."""
    import dataclasses
    import itertools

    from autoddl.engine.planner import solve_sharding

    graph, base = _small_gpt()
    plain = solve_sharding(base)
    idx = [base.sigs[n.name].index(plain.choice[n.name]) for n in graph.nodes]
    cap = fraction * base.problem.evaluate(np.array(idx + [0] * 6))[1]
    capped = dataclasses.replace(base, problem=dataclasses.replace(
        base.problem, memory_capacity_bytes=cap))
    free = solve_sharding(capped)
    assert free.result.status is SolveStatus.OPTIMAL
    best = np.inf
    for combo in itertools.product(("none", "selective", "full"), repeat=3):
        groups = tuple(dataclasses.replace(g, fixed=tuple(int(o.kind == mode) for o in g.options))
                       for g, mode in zip(capped.problem.recompute, combo))
        forced = solve_sharding(dataclasses.replace(
            capped, problem=dataclasses.replace(capped.problem, recompute=groups)))
        if forced.result.has_solution:
            best = min(best, forced.result.objective)
    assert free.result.objective == pytest.approx(best, rel=1e-6)
    assert free.result.objective > plain.result.objective  # the cap binds: recomputation pays
    assert sum(free.counts) >= 1


def test_screening_bound_holds_with_recomputation():
    """The Lagrangian tree bound of a problem with recompute groups (the count polytope's
    vertices for the largest group, per-term weights for the others) stays below the
    exhaustive optimum, and its plan, counts filled in to fit, is a real plan at least as
    costly as the optimum."""
    from autoddl.formulations.bounds import TreeBound

    rng = np.random.default_rng(21)
    bounded = 0
    for _ in range(12):
        base = random_problem(rng, n_nodes=4, tight=False)
        problem = with_groups(rng, base)
        _, plain_arg = ShardingProblem(base.nodes, base.edges, np.inf).brute_force()
        if plain_arg is None:
            continue
        cap = 0.8 * problem.evaluate(np.concatenate([plain_arg, [0, 0, 0, 0]]))[1]
        problem = ShardingProblem(problem.nodes, problem.edges, cap, problem.shape,
                                  problem.recompute)
        best, _ = problem.brute_force()
        result = TreeBound(problem).best()
        assert result.lower_bound <= best * (1 + 1e-9) + 1e-12
        if result.choice is not None:
            cost, mem = problem.evaluate(result.choice)
            assert mem <= cap * (1 + 1e-9) and cost == pytest.approx(result.upper_bound)
            assert cost >= best - 1e-12
            bounded += 1
    assert bounded >= 3


def test_hull_steps_by_hand():
    """The upgrade steps of a group's options: along the lower convex hull of (bytes freed,
    seconds added) per copy, cheapest seconds per byte first; a dominated option is skipped."""
    from autoddl.formulations.recompute import _hull_steps

    # selective frees 1 B for 0.1 s, full 4 B for 1.0 s: none -> selective -> full
    steps = _hull_steps([(4.0, 1.0, 0), (1.0, 0.1, 1)])
    assert [(a, b) for _, a, b in steps] == [(None, 1), (1, 0)]
    assert [r for r, _, _ in steps] == pytest.approx([0.1, 0.9 / 3])
    # full frees 4 B for 0.2 s: cheaper per byte than selective, which leaves the hull
    steps = _hull_steps([(4.0, 0.2, 0), (1.0, 0.1, 1)])
    assert [(a, b) for _, a, b in steps] == [(None, 0)]
    assert steps[0][0] == pytest.approx(0.05)
    # an option freeing nothing is never a step
    assert _hull_steps([(0.0, 0.5, 0)]) == []


def test_attention_stash_reads_dropout_after_a_positional_mask():
    """Hugging Face BERT calls attention with its mask positional (argument 3); dropout_p is
    argument 4. The stash counts the dropout mask and output only when dropout_p > 0, and a
    tensor in position 3 is never read as the dropout."""
    import dataclasses

    from autoddl.engine.costs import build_problem, stash_bytes
    from autoddl.engine.workload import load_workload

    w = load_workload("hf-bert:layers=1,hidden=32,heads=2,seq=16,batch=4,vocab=64",
                      "dgx-a100:nodes=1", stages=1)
    sdpa = [n for n in w.graph.ops if n.target == "aten.scaled_dot_product_attention.default"]
    assert sdpa and len(sdpa[0].args) >= 4  # the mask is positional
    costed = build_problem(w.graph, w.cluster.mesh((8,)), w.cluster, w.config)
    n = sdpa[0]
    sig = costed.sigs[n.name][0]
    args = list(n.args) + [None] * max(0, 5 - len(n.args))
    with_p = dataclasses.replace(n, args=tuple(args[:4] + [0.1] + args[5:]))
    without = dataclasses.replace(n, args=tuple(args[:4] + [0.0] + args[5:]))
    prec = w.config.precision
    kept = stash_bytes(w.graph, without, sig, costed.mesh, w.cluster, prec)
    dropped = stash_bytes(w.graph, with_p, sig, costed.mesh, w.cluster, prec)
    assert kept > 0
    # per score element: softmax output (2 B in bf16); with dropout also its mask and output
    assert dropped == pytest.approx(kept * (2 * 2 + 1) / 2)
