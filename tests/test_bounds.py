"""The Lagrangian tree relaxation: a true lower bound, a feasible plan, exact on trees; and the
candidate search it drives finds the same optimum as solving every candidate."""

from __future__ import annotations

import numpy as np
import pytest

from autoddl.engine.capture import capture, microbatch_inputs
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.planner import plan_graph
from autoddl.formulations.bounds import tree_bound
from autoddl.formulations.sharding import EdgeChoices, NodeChoices, ShardingProblem
from tests.helpers import cluster


def random_problem(rng: np.random.Generator, n: int = 5, tree: bool = False,
                   memory: bool = True, self_edge: bool = False) -> ShardingProblem:
    sizes = rng.integers(2, 4, n)
    nodes = tuple(NodeChoices(f"n{v}", rng.uniform(0, 3, k),
                              rng.uniform(0, 2, k) if memory else np.zeros(k))
                  for v, k in enumerate(sizes))
    pairs = [(v - 1 if tree else int(rng.integers(0, v)), v) for v in range(1, n)]
    if not tree:
        pairs += [(0, n - 1), (1, n - 1)]
    if self_edge:
        pairs.append((2, 2))
    edges = []
    for u, v in pairs:
        ks, kd = int(rng.integers(1, sizes[u] + 1)), int(rng.integers(1, sizes[v] + 1))
        src_key = np.concatenate([np.arange(ks), rng.integers(0, ks, sizes[u] - ks)])
        dst_key = np.concatenate([np.arange(kd), rng.integers(0, kd, sizes[v] - kd)])
        if u == v:
            dst_key = src_key.copy()
            kd = ks
        cost = rng.uniform(0, 2, (ks, kd))
        cost[rng.uniform(size=(ks, kd)) < 0.15] = np.inf
        cost[0, 0] = 0.5  # at least one legal pair
        mem = rng.uniform(0, 1, (ks, kd)) if memory else np.zeros((ks, kd))
        edges.append(EdgeChoices(u, v, src_key, dst_key, cost, mem))
    cap = float(rng.uniform(2.5, 6.0)) if memory else float("inf")
    return ShardingProblem(nodes, tuple(edges), cap)


@pytest.mark.parametrize("seed", range(40))
def test_bound_is_below_the_optimum_and_the_plan_is_feasible(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, tree=seed % 3 == 0, self_edge=seed % 2 == 0)
    opt, _ = p.brute_force()
    b = tree_bound(p)
    assert b.lower_bound <= opt + 1e-9
    if b.choice is not None:
        cost, mem = p.evaluate(b.choice)
        assert cost == pytest.approx(b.upper_bound)
        assert mem <= p.memory_capacity_bytes * (1 + 1e-9)
        assert b.upper_bound >= opt - 1e-9


@pytest.mark.parametrize("seed", range(15))
def test_bound_is_exact_on_a_tree_without_memory_limit(seed):
    rng = np.random.default_rng(100 + seed)
    p = random_problem(rng, tree=True, memory=False, self_edge=seed % 2 == 0)
    opt, _ = p.brute_force()
    b = tree_bound(p)
    assert b.lower_bound == pytest.approx(opt)
    assert b.upper_bound == pytest.approx(opt)


@pytest.mark.parametrize("spec,devices,m", [
    ("gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128", 4, 2),
    ("mlp:batch=32,dim_in=64,hidden=128,layers=3,dim_out=64", 8, 4),
    ("gpt:layers=4,hidden=32,heads=4,seq=16,batch=8,vocab=64", 4, 4),
])
def test_screened_search_finds_the_optimum_of_solving_every_candidate(spec, devices, m):
    s = parse_model_spec(spec)
    model, inputs = build_model(s, "meta")
    g, mb = capture(model, inputs), capture(model, microbatch_inputs(inputs, m))
    c = cluster(devices=devices, nodes=2, gbps=100, inter_gbps=5, latency_s=1e-6,
                peak_flops=1e11, memory_bytes=10**9)
    kw = dict(model_spec=s.text, microbatch_graph=mb, microbatches=m, backend="highs")
    fast = plan_graph(g, c, screen=True, **kw)
    full = plan_graph(g, c, screen=False, **kw)
    assert fast.solver["status"] == full.solver["status"] == "optimal"
    assert fast.solver["objective"] == pytest.approx(full.solver["objective"], rel=1e-6)
    # pruned by its bound, or solved with the incumbent as cutoff and found no better (with
    # nested sharding every multi-axis mesh can run data parallel, so bounds are closer)
    assert any(r["status"] in ("pruned", "dominated") for r in fast.candidates)


def test_screening_in_worker_processes_gives_the_same_records():
    s = parse_model_spec("mlp:batch=64,dim_in=32,hidden=64,layers=2,dim_out=32")
    model, inputs = build_model(s, "meta")
    g = capture(model, inputs)
    c = cluster(devices=32, nodes=4, gbps=100, inter_gbps=5, latency_s=1e-6, peak_flops=1e11)
    said: list[str] = []
    one = plan_graph(g, c, model_spec=s.text, workers=1)
    two = plan_graph(g, c, model_spec=s.text, workers=2, log=said.append)
    assert len(one.candidates) >= 8  # enough for the worker pool
    assert any(m.endswith("in 2 process(es)") for m in said), said  # the pool really ran
    assert two.solver["objective"] == pytest.approx(one.solver["objective"], rel=1e-9)
    key = lambda r: r["mesh"]  # noqa: E731
    for a, b in zip(sorted(one.candidates, key=key), sorted(two.candidates, key=key)):
        assert (a["mesh"], a["lower_bound"], a["heuristic"]) == \
            (b["mesh"], b["lower_bound"], b["heuristic"])


def test_axis_order_matters_with_nested_sharding():
    """Nested splits are ordered by axis position (lower axis outer), so meshes that permute
    axes of different sizes are distinct candidates: here (2, 2, 4), (2, 4, 2) and (4, 2, 2)
    do not all reach the same optimum, and the planner solves each of them."""
    from autoddl.engine.costs import build_problem
    from autoddl.engine.planner import solve_sharding

    s = parse_model_spec("gpt:layers=1,hidden=32,heads=4,seq=16,batch=8,vocab=64")
    model, inputs = build_model(s, "meta")
    g = capture(model, inputs)
    c = cluster(devices=16, nodes=16, gbps=10, latency_s=1e-6, peak_flops=1e11, overlap=False)
    assert len(c.distinct_meshes()) == len(c.meshes())
    group = [c.mesh(shape) for shape in [(2, 2, 4), (2, 4, 2), (4, 2, 2)]]
    objs = [solve_sharding(build_problem(g, m, c), "highs").result.objective for m in group]
    assert max(objs) > min(objs) * (1 + 1e-6), objs


@pytest.mark.parametrize("seed", range(20))
def test_one_tree_pass_without_memory_is_a_lower_bound(seed):
    """The screening's quick prune uses L(0), the relaxation with memory ignored: <= optimum."""
    from autoddl.formulations.bounds import TreeBound

    rng = np.random.default_rng(300 + seed)
    p = random_problem(rng, tree=seed % 4 == 0, self_edge=seed % 2 == 1)
    opt, _ = p.brute_force()
    relaxation = TreeBound(p)
    lb0, _ = relaxation.solve(np.zeros(len(relaxation.groups)))
    assert lb0 <= opt + 1e-9
    assert lb0 <= tree_bound(p).lower_bound + 1e-9  # the multiplier search only raises it


def test_candidates_pruned_after_one_tree_pass_keep_the_optimum():
    """With seeds (meshes of one or two axes) screened first, most 3-axis and pipelined
    candidates stop after one tree pass: the optimum is still that of solving every one."""
    s = parse_model_spec("mlp:batch=64,dim_in=32,hidden=64,layers=2,dim_out=32")
    model, inputs = build_model(s, "meta")
    g, mb = capture(model, inputs), capture(model, microbatch_inputs(inputs, 4))
    c = cluster(devices=32, nodes=4, gbps=100, inter_gbps=5, latency_s=1e-6, peak_flops=1e11)
    kw = dict(model_spec=s.text, microbatch_graph=mb, microbatches=4, backend="highs")
    fast = plan_graph(g, c, **kw)
    full = plan_graph(g, c, screen=False, **kw)
    assert fast.solver["objective"] == pytest.approx(full.solver["objective"], rel=1e-6)
    quick = [r for r in fast.candidates if r["heuristic"] is None and r["lower_bound"] is not None]
    assert quick, "no candidate took the one-pass prune"
    solved = {r["mesh"]: r["objective"] for r in full.candidates if r["objective"] is not None}
    for r in quick:  # its bound is below its own optimum and above the best plan's (1 - gap)
        assert r["status"] == "pruned"
        assert r["lower_bound"] >= fast.solver["objective"] * (1 - 1e-6) - 1e-12
        if r["mesh"] in solved:
            assert r["lower_bound"] <= solved[r["mesh"]] * (1 + 1e-9)


def _relaxed_marginal_brute(p: ShardingProblem, v: int, s: int) -> float:
    """The least cost of any plan giving node ``v`` signature ``s`` that fits memory."""
    import itertools
    best = float("inf")
    ranges = [range(len(n.cost_s)) if u != v else [s] for u, n in enumerate(p.nodes)]
    for combo in itertools.product(*ranges):
        cost, mem = p.evaluate(np.array(combo))
        if mem <= p.memory_capacity_bytes * (1 + 1e-12):
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_min_marginals_bound_every_plan_using_the_signature(seed):
    """Min-marginals of the tree relaxation: equal to the relaxed minimum at their least, exact
    on a tree without memory, and below every plan that gives the node that signature."""
    from autoddl.formulations.bounds import TreeBound
    rng = np.random.default_rng(300 + seed)
    tree = seed % 2 == 0
    p = random_problem(rng, tree=tree, memory=seed % 4 != 0, self_edge=seed % 3 == 0)
    relax = TreeBound(p)
    lam = relax.best().lam
    lam = np.zeros(len(relax.groups)) if lam is None else lam
    marg = relax.min_marginals(lam)
    lb = relax.solve(lam)[0]
    for v, m in enumerate(marg):
        assert m.min() == pytest.approx(lb)
        for s in range(len(m)):
            true = _relaxed_marginal_brute(p, v, s)
            assert m[s] <= true + 1e-9
            if tree and seed % 4 == 0 and np.isfinite(true):  # no memory: exact on a tree
                assert m[s] == pytest.approx(true)


@pytest.mark.parametrize("seed", range(30))
def test_bound_fixing_keeps_every_plan_under_the_cutoff(seed):
    """Signatures dropped against a known plan's cost: every plan at most that cost survives,
    so the optimum of the fixed problem is the optimum."""
    from autoddl.formulations.bounds import bound_fixing
    from autoddl.formulations.dominance import restrict
    rng = np.random.default_rng(700 + seed)
    p = random_problem(rng, n=6, tree=seed % 3 == 0, self_edge=seed % 2 == 0)
    opt, _ = p.brute_force()
    b = tree_bound(p)
    cut = b.upper_bound if np.isfinite(b.upper_bound) else (opt if np.isfinite(opt) else 1.0)
    keep = bound_fixing(p, cut)
    assert all(len(k) >= 1 for k in keep)
    fixed = restrict(p, keep)
    opt2, choice2 = fixed.brute_force()
    if np.isfinite(opt) and opt <= cut:
        assert opt2 == pytest.approx(opt)
        cost, _ = p.evaluate(np.array([k[c] for k, c in zip(keep, choice2)]))
        assert cost == pytest.approx(opt)
    assert opt2 >= opt - 1e-9 or not np.isfinite(opt)


def test_unpipelined_candidates_are_solved_first_then_best_bound():
    """The solve order: unpipelined candidates by bound, then pipelines by bound, then derived
    (interleaved) candidates; whatever the bounds."""
    from autoddl.engine.candidates import Job, _solve_order

    def job(stages: int, parent: int | None = None) -> Job:
        return Job("c", stages, (1,), lambda: None, parent=parent)

    jobs = [job(2), job(1), job(4), job(1), job(2, parent=0)]
    bounds = [1.0, 5.0, 0.5, 3.0, 0.1]
    preps = [(i, b, {}) for i, b in enumerate(bounds)]
    assert _solve_order(jobs, preps) == [3, 1, 2, 0, 4]
