"""The LP branch and bound over one-hot groups: exact against enumeration, with and without a
cutoff, on problems whose memory row binds (the LP mixes plans) and on real MLP signatures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoddl.engine.costs import build_problem
from autoddl.engine.planner import solve_lp_first
from autoddl.formulations import branching
from autoddl.formulations.branching import branch_and_bound, one_hot_groups
from autoddl.formulations.milp import SolveStatus, restrict_columns
from autoddl.formulations.sharding import NodeChoices, ShardingModel, ShardingProblem
from tests.helpers import cluster, mlp_graph
from tests.test_sharding_ilp import random_problem

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("highspy") is None, reason="needs highspy")


def _check(problem: ShardingProblem, result, best: float) -> None:
    if not np.isfinite(best):
        assert result.status is SolveStatus.INFEASIBLE
        return
    assert result.status is SolveStatus.OPTIMAL
    assert result.objective == pytest.approx(best, rel=1e-7, abs=1e-9)
    assert result.bound <= result.objective + 1e-12


def test_random_problems_match_brute_force():
    rng = np.random.default_rng(11)
    solved = 0
    for trial in range(30):
        problem = random_problem(rng, n_nodes=int(rng.integers(3, 7)), tight=trial % 3 != 0)
        best, _ = problem.brute_force()
        model = ShardingModel(problem)
        r = branch_and_bound(model.milp(), 1e-9)
        assert r is not None, trial
        _check(problem, r, best)
        if r.status is SolveStatus.OPTIMAL:
            cost, mem = problem.evaluate(model.choice(r.x))
            assert cost == pytest.approx(best, rel=1e-7, abs=1e-9)
            assert mem <= problem.memory_capacity_bytes * (1 + 1e-9)
            solved += 1
    assert solved >= 10


def _knapsack_chain(n: int) -> ShardingProblem:
    """n independent nodes, each fast-and-big or slow-and-small, and a memory cap that admits
    about half of them big: the LP takes fractions (a mix of two plans), the answer is a
    knapsack."""
    rng = np.random.default_rng(n)
    nodes = []
    for v in range(n):
        fast, slow = rng.uniform(1, 2), rng.uniform(3, 6)
        small, big = rng.uniform(1, 2), rng.uniform(4, 9)
        nodes.append(NodeChoices(f"n{v}", np.array([fast, slow, slow + 1.0]),
                                 np.array([big, small, small])))
    cap = sum(float(nd.memory_bytes[1]) for nd in nodes) + 0.45 * sum(
        float(nd.memory_bytes[0] - nd.memory_bytes[1]) for nd in nodes)
    return ShardingProblem(tuple(nodes), (), cap)


@pytest.mark.parametrize("n", [6, 8, 10])
def test_a_binding_memory_row_is_branched_to_the_knapsack_optimum(n):
    problem = _knapsack_chain(n)
    best, _ = problem.brute_force()
    milp = ShardingModel(problem).milp()
    lp = dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality))
    from autoddl.formulations.backends import solve
    assert solve(lp, backend="highs").objective < best - 1e-6  # the LP really mixes
    r = branch_and_bound(milp, 1e-9)
    assert r is not None and r.extra["lps"] > 1
    _check(problem, r, best)


@pytest.mark.parametrize("factor", [0.999, 1.0001, 1.2])
def test_a_cutoff_row_proves_domination_or_keeps_the_optimum(factor):
    """With the row objective <= cutoff, a cutoff under the optimum is infeasible (dominated)
    and one above it keeps the optimum."""
    problem = _knapsack_chain(9)
    best, _ = problem.brute_force()
    r = branch_and_bound(ShardingModel(problem, best * factor).milp(), 1e-9)
    assert r is not None
    _check(problem, r, best if factor > 1 else np.inf)


@pytest.mark.parametrize("memory_fraction", [None, 0.9, 0.75])
def test_real_mlp_signatures_match_brute_force(memory_fraction):
    graph = mlp_graph(batch=8, d_in=4, hidden=16, d_out=4)
    loose = build_problem(graph, cluster(devices=2).meshes()[0], cluster(devices=2)).problem
    _, arg = loose.brute_force()
    cap = 2**40 if memory_fraction is None else int(memory_fraction * loose.evaluate(arg)[1])
    c = cluster(devices=2, memory_bytes=cap)
    problem = build_problem(graph, c.meshes()[0], c).problem
    best, _ = problem.brute_force()
    r = branch_and_bound(ShardingModel(problem).milp(), 1e-9)
    assert r is not None
    _check(problem, r, best)


def test_solve_lp_first_with_branching_matches_the_milp_backend():
    """The planner's path (LP, reduced-cost fixing, smaller model, branch and bound) gives the
    optimum a MILP backend gives on the full model."""
    rng = np.random.default_rng(5)
    for trial in range(10):
        problem = random_problem(rng, n_nodes=6, tight=True)
        best, _ = problem.brute_force()
        if not np.isfinite(best):
            continue
        cutoff = best * 1.05
        milp = ShardingModel(problem, cutoff).milp()
        r = solve_lp_first(milp, "highs", None, 1e-9, True, cutoff, branch=True)
        assert r.status is SolveStatus.OPTIMAL
        assert r.x.shape == (milp.num_cols,)
        assert milp.is_feasible(r.x)
        assert r.objective == pytest.approx(best, rel=1e-7)


def test_no_groups_no_search_and_a_small_budget_gives_up():
    rng = np.random.default_rng(3)
    for _ in range(20):  # a problem with edge (y) columns, which no group row holds
        milp = ShardingModel(random_problem(rng, n_nodes=6, tight=False)).milp()
        flow = np.flatnonzero(~milp.integrality)
        if flow.size:
            break
    assert flow.size and one_hot_groups(milp) is not None
    ints = milp.integrality.copy()
    ints[flow[0]] = True
    odd = dataclasses.replace(milp, integrality=ints)
    assert one_hot_groups(odd) is None
    assert branch_and_bound(odd, 1e-9) is None
    knap = ShardingModel(_knapsack_chain(8)).milp()
    r = branch_and_bound(knap, 1e-9, max_lps=1)  # the root LP is fractional: it gives up
    assert r is not None and r.extra["gave_up"] and r.status is SolveStatus.NO_SOLUTION


@pytest.mark.parametrize("max_lps", [1, 3, 6, 12])
def test_a_search_that_gives_up_keeps_its_tree_bound_and_plan(max_lps):
    """Stopped after a few LPs, the search returns the least bound of its open nodes: at least
    the LP relaxation's value (solved here independently), at most the brute-force optimum; and
    any plan it found is feasible and no better than the optimum."""
    from autoddl.formulations.backends import solve

    problem = _knapsack_chain(10)
    best, _ = problem.brute_force()
    milp = ShardingModel(problem).milp()
    lp = solve(dataclasses.replace(milp, integrality=np.zeros_like(milp.integrality)),
               backend="highs")
    r = branch_and_bound(milp, 1e-9, max_lps=max_lps)
    assert r is not None and r.extra["gave_up"] and r.extra["lps"] == max_lps
    assert r.bound is not None
    assert lp.objective * (1 - 1e-9) <= r.bound <= best * (1 + 1e-9)
    if max_lps == 1:
        assert r.bound == pytest.approx(lp.objective, rel=1e-9)
    if r.has_solution:
        assert r.status is SolveStatus.FEASIBLE and milp.is_feasible(r.x)
        assert r.objective >= best * (1 - 1e-9) and r.bound <= r.objective


def test_restrict_columns_keeps_an_emptied_group_infeasible():
    problem = _knapsack_chain(4)
    milp = ShardingModel(problem).milp()
    keep = np.ones(milp.num_cols, bool)
    keep[:3] = False  # every option of the first node
    small = restrict_columns(milp, keep)
    assert small.num_cols == milp.num_cols - 3
    r = branch_and_bound(small, 1e-9)
    assert r is not None and r.status is SolveStatus.INFEASIBLE


def test_dive_interval_does_not_change_the_answer(monkeypatch):
    problem = _knapsack_chain(9)
    best, _ = problem.brute_force()
    for every in (1, 3, 10**6):
        monkeypatch.setattr(branching, "DIVE_EVERY", every)
        r = branch_and_bound(ShardingModel(problem).milp(), 1e-9, max_lps=10**5)
        _check(problem, r, best)
