"""Removing dominated signatures keeps the optimum (brute force before and after)."""

from __future__ import annotations

import numpy as np
import pytest

from autoddl.formulations.dominance import prune_dominated, undominated
from tests.test_bounds import random_problem


def test_undominated_by_hand():
    f = np.array([[1.0, 2.0], [1.0, 3.0], [0.5, 2.5], [1.0, 2.0], [2.0, 0.0]])
    # row 1 >= row 0; row 3 equals row 0 (the first is kept); rows 2 and 4 are incomparable
    assert undominated(f).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("seed", range(40))
def test_pruned_problem_has_the_same_optimum(seed):
    rng = np.random.default_rng(500 + seed)
    p = random_problem(rng, n=5, tree=seed % 2 == 0, self_edge=seed % 3 == 0)
    opt, _ = p.brute_force()
    pruned, keep = prune_dominated(p)
    opt2, choice2 = pruned.brute_force()
    assert opt2 == pytest.approx(opt) if np.isfinite(opt) else not np.isfinite(opt2)
    if choice2 is not None:  # the choice maps back to the same cost in the original problem
        cost, _ = p.evaluate(np.array([k[c] for k, c in zip(keep, choice2)]))
        assert cost == pytest.approx(opt2)


def test_copies_of_a_signature_are_pruned_to_one():
    rng = np.random.default_rng(7)
    p = random_problem(rng, n=4, tree=True, memory=False)
    from autoddl.formulations.sharding import NodeChoices, ShardingProblem
    n0 = p.nodes[0]
    dup = NodeChoices(n0.name, np.concatenate([n0.cost_s, n0.cost_s]),
                      np.concatenate([n0.memory_bytes, n0.memory_bytes]))
    edges = tuple(e if e.src != 0 else type(e)(e.src, e.dst, np.concatenate([e.src_key,
                                                                               e.src_key]),
                                                 e.dst_key, e.cost_s, e.memory_bytes)
                  for e in p.edges)
    q = ShardingProblem((dup,) + p.nodes[1:], edges, p.memory_capacity_bytes)
    _, keep = prune_dominated(q)
    assert all(k < len(n0.cost_s) for k in keep[0])  # the second copies all go


@pytest.mark.parametrize("seed", range(25))
def test_reduced_cost_fixing_keeps_the_optimum(seed):
    """Columns fixed by the LP's reduced costs against a known plan's cost never exclude a plan
    at least as good: the MILP after fixing still finds the brute-force optimum."""
    from autoddl.engine.planner import solve_lp_first
    from autoddl.formulations.bounds import tree_bound
    from autoddl.formulations.sharding import ShardingModel

    rng = np.random.default_rng(900 + seed)
    p = random_problem(rng, n=6, tree=False, self_edge=seed % 2 == 0)
    opt, _ = p.brute_force()
    ub = tree_bound(p).upper_bound
    if not np.isfinite(ub):
        ub = opt * 1.5 if np.isfinite(opt) else np.inf
    model = ShardingModel(p, ub)
    r = solve_lp_first(model.milp(), "highs", None, 1e-9, True, ub)
    if not np.isfinite(opt):
        assert not r.has_solution
        return
    if r.has_solution:
        assert r.objective == pytest.approx(opt, rel=1e-7, abs=1e-9)
    else:  # infeasible under the cutoff row: the known plan was already optimal
        assert ub == pytest.approx(opt, rel=1e-7)


def test_edge_memory_stays_in_its_own_group_when_folded():
    """An edge whose producer side has one key is folded onto the consumer's variables; its
    memory must still count in the edge's group (here not the consumer's)."""
    from autoddl.formulations.backends import solve
    from autoddl.formulations.sharding import (
        EdgeChoices, NodeChoices, ShardingModel, ShardingProblem,
    )

    nodes = (NodeChoices("u", np.array([0.0]), np.array([0.0]), 0),
             NodeChoices("v", np.array([0.0, 1.0]), np.array([0.6, 0.0]), 1))
    e = EdgeChoices(0, 1, np.array([0]), np.array([0, 1]), np.array([[0.0, 0.0]]),
                    np.array([[0.6, 0.6]]), 0)
    p = ShardingProblem(nodes, (e,), 1.0)
    opt, _ = p.brute_force()
    r = solve(ShardingModel(p).milp(), backend="highs")
    assert r.objective == pytest.approx(opt)
