"""The sharding ILP against brute-force enumeration, for every installed solver backend."""

from __future__ import annotations

import numpy as np
import pytest

from autoddl.engine.costs import build_problem
from autoddl.errors import UserError
from autoddl.formulations.backends import available_backends, solve
from autoddl.formulations.milp import SolveStatus
from autoddl.formulations.overlap import without_overlap
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingModel, ShardingProblem
from tests.helpers import cluster, mlp_graph

BACKENDS = available_backends()


def random_problem(rng: np.random.Generator, n_nodes: int, tight: bool) -> ShardingProblem:
    """A random DAG with random signature/edge costs, keys and memory."""
    nodes, edges = [], []
    sizes = rng.integers(1, 4, n_nodes)
    for v in range(n_nodes):
        nodes.append(NodeChoices(f"n{v}", rng.uniform(0, 1, sizes[v]).round(3),
                                 rng.uniform(0, 10, sizes[v]).round(1)))
    for v in range(1, n_nodes):
        for u in rng.choice(v, size=min(v, rng.integers(1, 3)), replace=False):
            ks, kd = rng.integers(1, sizes[u] + 1), rng.integers(1, sizes[v] + 1)
            src_key = rng.integers(0, ks, sizes[u])
            dst_key = rng.integers(0, kd, sizes[v])
            ks, kd = src_key.max() + 1, dst_key.max() + 1
            cost = rng.uniform(0, 2, (ks, kd)).round(3)
            cost[rng.uniform(size=(ks, kd)) < 0.15] = np.inf  # some conversions forbidden
            mem = rng.uniform(0, 3, (ks, kd)).round(1)
            edges.append(EdgeChoices(int(u), v, src_key, dst_key, cost, mem))
    cap = 25.0 if tight else np.inf
    return ShardingProblem(tuple(nodes), tuple(edges), cap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_problems_match_brute_force(backend):
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(12):
        problem = random_problem(rng, n_nodes=int(rng.integers(3, 7)), tight=trial % 2 == 1)
        best, _ = problem.brute_force()
        model = ShardingModel(problem)
        result = solve(model.milp(), backend=backend)
        if not np.isfinite(best):
            assert result.status is SolveStatus.INFEASIBLE, (trial, result)
            continue
        assert result.status is SolveStatus.OPTIMAL, (trial, result)
        assert result.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
        cost, mem = problem.evaluate(model.choice(result.x))
        assert cost == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert mem <= problem.memory_capacity_bytes + 1e-6
        checked += 1
    assert checked >= 6  # most trials are feasible: the comparison really ran


def _loose_optimum_memory() -> float:
    graph = mlp_graph(batch=8, d_in=4, hidden=16, d_out=4)
    c = cluster(devices=2)
    (mesh,) = c.meshes()
    problem = build_problem(graph, mesh, c).problem
    _, arg = problem.brute_force()
    return problem.evaluate(arg)[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_fraction", [None, 0.9])
def test_real_signatures_match_brute_force(backend, memory_fraction):
    """Hand-built MLP with the real rules and costs on 2 devices: ILP == enumeration."""
    graph = mlp_graph(batch=8, d_in=4, hidden=16, d_out=4)
    cap = 2**40 if memory_fraction is None else int(memory_fraction * _loose_optimum_memory())
    c = cluster(devices=2, memory_bytes=cap)
    (mesh,) = c.meshes()
    costed = build_problem(graph, mesh, c)
    problem = costed.problem
    if backend == "ortools-cpsat":  # integer columns only: not the overlap's continuous X
        with pytest.raises(UserError, match="integer variables only"):
            solve(ShardingModel(problem).milp(), backend=backend)
        problem = without_overlap(problem)
    best, arg = problem.brute_force()
    assert np.isfinite(best)
    model = ShardingModel(problem)
    result = solve(model.milp(), backend=backend)
    assert result.status is SolveStatus.OPTIMAL
    assert result.objective == pytest.approx(best, rel=1e-6)


def test_tight_memory_changes_the_optimum():
    """The memory row binds: a tighter cap gives a costlier (or equal) optimum, never cheaper."""
    graph = mlp_graph(batch=8, d_in=4, hidden=16, d_out=4)
    loose = cluster(devices=2)
    (mesh,) = loose.meshes()
    p_loose = build_problem(graph, mesh, loose).problem
    b_loose, arg_loose = p_loose.brute_force()
    cap = int(0.9 * p_loose.evaluate(arg_loose)[1])
    p_tight = build_problem(graph, mesh, cluster(devices=2, memory_bytes=cap)).problem
    b_tight, arg_tight = p_tight.brute_force()
    assert np.isfinite(b_tight) and b_tight >= b_loose
    assert p_tight.evaluate(arg_tight)[1] <= cap


def test_bound_pruning_keeps_the_optimum_with_a_self_edge():
    """A repeated layer's edge to its own next copy is an edge from a node to itself: pruning
    against a cutoff above the optimum must keep the optimum (review finding, by hand)."""
    import numpy as np

    u = NodeChoices("u", np.array([0.0]), np.array([0.0]))
    v = NodeChoices("v", np.array([0.0, 10.0]), np.array([0.0, 0.0]))
    e_uv = EdgeChoices(0, 1, np.array([0]), np.array([0, 1]), np.array([[100.0, 0.0]]),
                       np.zeros((1, 2)))
    e_vv = EdgeChoices(1, 1, np.array([0, 1]), np.array([0, 1]),
                       np.array([[0.0, 50.0], [50.0, 0.0]]), np.zeros((2, 2)))
    problem = ShardingProblem((u, v), (e_uv, e_vv), float("inf"))
    best, _ = problem.brute_force()
    assert best == pytest.approx(10.0)
    result = solve(ShardingModel(problem, cutoff=15.0).milp())
    assert result.status is SolveStatus.OPTIMAL
    assert result.objective == pytest.approx(best)
