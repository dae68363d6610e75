"""Pipeline stages in the ILP: brute force over (stage, signature), memory, the PTD-P rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoddl.engine.capture import capture, microbatch_inputs
from autoddl.engine.compute import ComputeFigures
from autoddl.engine.costs import build_problem
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.planner import plan_graph
from autoddl.engine.stages import build_pipeline_problem, pipeline_breakdown, pipeline_candidates
from autoddl.errors import InfeasibleError
from autoddl.formulations.backends import available_backends, solve
from autoddl.formulations.milp import SolveStatus
from autoddl.formulations.pipeline import PipelineModel, PipelineProblem
from tests.helpers import cluster, mlp_graph
from tests.test_sharding_ilp import random_problem


def random_pipeline(rng: np.random.Generator, n: int, stages: int, tight: bool) -> PipelineProblem:
    sp = random_problem(rng, n, tight)
    return PipelineProblem(
        sp, stages=stages, microbatches=int(rng.integers(1, 4)),
        node_kind=("input",) + ("op",) * (n - 1),
        flops=np.array([0.0] + list(rng.uniform(1, 2, n - 1))),
        activation_bytes=tuple(np.round(nd.memory_bytes * rng.uniform(0, 1), 1)
                               for nd in sp.nodes),
        piece_bytes=tuple(rng.uniform(0, 5e9, len(nd.cost_s)).round(-6) for nd in sp.nodes),
        carries_grad=rng.uniform(size=n) < 0.5, loss=n - 1, p2p_bandwidth_gbps=10.0,
        p2p_latency_s=0.01, bubble_s=0.05, balance_eps=0.6 if stages == 2 else 1.2)


def _check(problem: PipelineProblem, backend: str | None) -> bool:
    best, _ = problem.brute_force()
    model = PipelineModel(problem)
    r = solve(model.milp(), backend=backend)
    if not np.isfinite(best):
        assert r.status is SolveStatus.INFEASIBLE
        return False
    assert r.status is SolveStatus.OPTIMAL
    assert r.objective == pytest.approx(best, rel=1e-6)
    stages = model.stages_of(r.x)
    cost, mem = problem.evaluate(model.choice(r.x), stages)
    assert problem.legal_stages(stages)
    assert cost == pytest.approx(best, rel=1e-6)
    assert mem <= problem.sharding.memory_capacity_bytes * (1 + 1e-6)
    return True


PIPELINE_BACKENDS = [b for b in available_backends() if b != "ortools-cpsat"]


def test_cpsat_refuses_continuous_pipeline_variables():
    from autoddl.errors import UserError

    rng = np.random.default_rng(5)
    milp = PipelineModel(random_pipeline(rng, 4, 2, False)).milp()
    if "ortools-cpsat" in available_backends():
        with pytest.raises(UserError, match="integer variables only"):
            solve(milp, backend="ortools-cpsat")


@pytest.mark.parametrize("backend", PIPELINE_BACKENDS)
def test_two_stage_random_problems_match_brute_force(backend):
    rng = np.random.default_rng(3)
    solved = sum(_check(random_pipeline(rng, int(rng.integers(3, 6)), 2, t % 2 == 1), backend)
                 for t in range(8))
    assert solved >= 4


def test_three_stage_random_problems_match_brute_force():
    rng = np.random.default_rng(11)
    solved = sum(_check(random_pipeline(rng, 5, 3, t % 2 == 1), None) for t in range(4))
    assert solved >= 2


def test_real_costs_two_stages_match_brute_force():
    """Hand-built MLP, real rules and costs, 2 stages of 2 devices: joint ILP == enumeration."""
    graph = mlp_graph(batch=4, d_in=4, hidden=8, d_out=4)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e9)
    (k, pp, smesh), *_ = pipeline_candidates(c, microbatches=2, stages=2)
    costed = build_problem(graph, smesh, c)
    problem = build_pipeline_problem(costed, 2, 2, pp, balance_eps=0.6)
    assert _check(problem, None)


def _plan(spec: str, c, m: int, **kw):
    s = parse_model_spec(spec)
    model, inputs = build_model(s, "meta")
    graph, mb = capture(model, inputs), capture(model, microbatch_inputs(inputs, m))
    return graph, plan_graph(graph, c, model_spec=s.text, microbatch_graph=mb,
                             microbatches=m, **kw)


def test_pipelines_when_no_unpipelined_plan_fits():
    spec = "mlp:batch=2,dim_in=509,hidden=509,layers=3,dim_out=509"  # 509 is prime: no splits
    graph, _ = _plan(spec, cluster(devices=2), 2, stages=1)
    replicated = sum(n.out.nbytes for n in graph.params) * 4
    # ZeRO-2 keeps 1 + 3/2 of the 4 copies (0.625): below that only stages help (about 0.5)
    tight = cluster(devices=2, latency_s=1e-6, peak_flops=1e10, memory_bytes=int(0.58 * replicated))
    with pytest.raises(InfeasibleError):
        _plan(spec, tight, 2, stages=1)
    _, plan = _plan(spec, tight, 2)
    assert plan.num_stages == 2
    assert max(plan.memory["per_stage_bytes"]) <= tight.memory_per_device_bytes
    assert {o.stage for o in plan.ops} == {0, 1}


def test_slow_inter_node_link_keeps_weight_traffic_off_it():
    """Slow inter-node link, fast intra-node: the plan keeps the slow link out of the critical
    path (its traffic hidden behind compute), and every other candidate, pipelined ones
    included, costs at least as much (solved, or pruned by a lower bound)."""
    c = cluster(devices=4, nodes=2, gbps=100, inter_gbps=0.2, latency_s=1e-6, peak_flops=1e11)
    _, plan = _plan("mlp:batch=256,dim_in=1024,hidden=1024,layers=8,dim_out=1024", c, 8)
    assert plan.cost["exposed_comm_s"] <= 1e-9 * plan.cost["step_time_s"]
    assert any(a["spans_nodes"] for a in plan.mesh["axes"])
    assert any(c["stages"] > 1 for c in plan.candidates)
    for cand in plan.candidates:  # solved, pruned by a lower bound, or refused by the cutoff
        value = cand["objective"] if cand["objective"] is not None else cand["lower_bound"]
        assert value is not None or cand["status"] == "infeasible", cand
        assert value is None or value >= plan.solver["objective"] * (1 - 1e-6), cand


def test_no_plan_at_any_degree_reports_memory():
    with pytest.raises(InfeasibleError, match=r"at any mesh or pipeline degree.*needs"):
        _plan("mlp:batch=4,dim_in=64,hidden=64,layers=2,dim_out=64",
              cluster(devices=2, memory_bytes=1000), 2)


def test_replicated_weight_gradient_is_all_reduced_once_per_step():
    """Data parallel on a 2-device stage mesh, 2 stages, m = 4: each weight's gradient (a P
    partial sum of a B weight) is accumulated over the micro-batches and all-reduced once per
    step; the loss is made whole once per micro-batch. Numbers by hand."""
    m, gbps, alpha = 4, 10.0, 1e-5
    graph = mlp_graph(batch=8, d_in=16, hidden=32, d_out=16)  # w1, w2: 512 floats = 2048 B
    c = dataclasses.replace(cluster(devices=4, gbps=gbps, latency_s=alpha),
                            compute=ComputeFigures(overlap=False))  # every second critical
    (k, pp, smesh), *_ = pipeline_candidates(c, microbatches=m, stages=2)
    costed = build_problem(graph, smesh, c)
    want = {"w1": ("B",), "w2": ("B",), "x": ("S(0)",), "y": ("S(0)",), "h": ("S(0)",),
            "a": ("S(0)",), "o": ("S(0)",), "loss": ("P",)}
    idx = np.array([next(j for j, s in enumerate(costed.sigs[n.name])
                         if s.out == want[n.name] and s.zero == 0
                         and all(p in (("S(0)",), ("B",)) for p in s.ins))
                    for n in graph.nodes])
    choice = {n.name: costed.sigs[n.name][j] for n, j in zip(graph.nodes, idx)}
    stage = {"w1": 0, "x": 0, "y": 0, "h": 0, "a": 1, "o": 1, "w2": 1, "loss": 1}
    # all-reduce on 2 devices: 2(p-1)/p · T bytes sent, 2(p-1)+1 = 3 latency steps; a weight's
    # gradient (2048 B) pays its share of a 25 MiB bucket's latency (BUCKET_BYTES)
    grad_s = 2048 / (gbps * 1e9) + 3 * alpha * 2048 / (25 * 2**20)
    loss_s = 4 / (gbps * 1e9) + 3 * alpha
    cost = pipeline_breakdown(costed, choice, stage, 2, m, pp)
    ar = cost["per_kind"]["all_reduce"]
    assert ar["count"] == 2 + m  # not 2·m + m
    assert ar["bytes"] == 2 * 2048 + m * 4
    assert ar["seconds"] == pytest.approx(2 * grad_s + m * loss_s, rel=1e-12)
    # p2p per micro-batch: h's piece (8·32·4/2 B) forward and back, y's (8·16·4/2 B) forward
    p2p_s = m * (2 * (512 / (gbps * 1e9) + alpha) + 256 / (gbps * 1e9) + alpha)
    assert cost["per_kind"]["p2p"]["bytes"] == m * (2 * 512 + 256)
    bubble = 3.0 * sum(n.flops for n in graph.ops) / (4 * c.peak_flops)  # (K-1) passes
    # compute: the two linears' forward and backward (3 passes) at the peak, batch halved;
    # element-wise ops are free at this cluster's unbounded memory bandwidth
    compute_s = m * 3 * sum(n.flops for n in graph.ops if n.target == "aten.linear.default") / (
        2 * c.peak_flops)
    assert cost["total_s"] == pytest.approx(2 * grad_s + m * loss_s + p2p_s + bubble + compute_s,
                                            rel=1e-9)
    # the joint ILP's problem prices the same plan the same: its per-micro-batch sharding costs
    # hold each gradient's all-reduce at its 1/m share
    problem = build_pipeline_problem(costed, 2, m, pp, balance_eps=0.6)
    st = np.array([stage[n.name] for n in graph.nodes])
    assert problem.legal_stages(st)
    assert problem.evaluate(idx, st)[0] == pytest.approx(cost["total_s"], rel=1e-9)
    saved = m * (costed.problem.evaluate(idx)[0] - problem.sharding.evaluate(idx)[0])
    assert saved == pytest.approx((m - 1) * 2 * grad_s, rel=1e-9)


def test_gradient_accumulates_only_where_the_weight_gradient_holds_the_sum():
    """The sum over micro-batches lives in the placement the reader returns: kept only where
    that piece fits the weight's own gradient memory (so memory is unchanged)."""
    from autoddl.engine.costs import accumulates_grad, grad_fraction
    from autoddl.engine.rules import ZERO_GRADS, Signature

    shape = (2, 4)

    def weight(out, zero=0):
        return grad_fraction(Signature((), out, (), (), zero), shape)

    assert accumulates_grad(weight(("B", "B")), ("P", "P"), shape)  # data parallel all-reduce
    assert accumulates_grad(weight(("B", "S(0)")), ("P", "S(0)"), shape)  # DP × tensor parallel
    assert accumulates_grad(weight(("S(0)", "B")), ("S(1)", "B"), shape)  # all-to-all
    assert accumulates_grad(weight(("B", "B")), ("S(0)", "B"), shape)  # all-gather
    assert not accumulates_grad(weight(("S(0)", "B")), ("P", "B"), shape)  # reduce-scatter
    assert not accumulates_grad(weight(("B", "B"), ZERO_GRADS), ("P", "P"), shape)  # ZeRO-2
    assert not accumulates_grad(weight(("B", "B")), None, shape)
