"""Repeated layers: the reduced problem's optimum equals the unreduced one's."""

from __future__ import annotations

import pytest

from autoddl.engine.capture import capture, microbatch_inputs
from autoddl.engine.costs import build_problem
from autoddl.engine.models import build_model, parse_model_spec, with_layers
from autoddl.engine.planner import plan_graph, solve_sharding
from autoddl.engine.programs import build_program
from autoddl.engine.repeat import expand_plan, find_blocks, reduce_graph
from tests.helpers import cluster

SPEC = "gpt:layers=6,hidden=64,heads=4,seq=16,batch=8,vocab=128"


def _graph(spec: str, microbatches: int = 1):
    s = parse_model_spec(spec)
    model, inputs = build_model(s, "meta")
    return s, capture(model, microbatch_inputs(inputs, microbatches))


def test_blocks_found_and_reduced_graph_is_capture_independent():
    s, g = _graph(SPEC)
    blocks = find_blocks(g)
    assert blocks is not None and blocks.count == 6 and blocks.container == "blocks"
    red = reduce_graph(g, blocks)
    small = capture(*build_model(with_layers(s, 3), "meta"))
    red3 = reduce_graph(small, find_blocks(small), layers=6)
    assert red.graph.digest() == red3.graph.digest()
    assert red.param_count == red3.param_count == g.param_count
    assert len(red.graph.nodes) < len(g.nodes)


@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_sharding_optimum_equals_unreduced(shape):
    _, g = _graph(SPEC)
    red = reduce_graph(g, find_blocks(g))
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    mesh = c.mesh(shape)
    full = solve_sharding(build_problem(g, mesh, c))
    reduced = solve_sharding(build_problem(red.graph, mesh, c, mult=red.mult))
    assert reduced.result.objective == pytest.approx(full.result.objective, rel=1e-7)


@pytest.mark.parametrize("layers,stages", [(4, 2), (8, 4)])
def test_pipeline_program_is_no_slower_than_the_unreduced_joint_plan(layers, stages):
    spec = f"gpt:layers={layers},hidden=32,heads=2,seq=8,batch=8,vocab=64"
    s, g = _graph(spec, 1)
    _, mb = _graph(spec, 4)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    kw = dict(model_spec=s.text, microbatch_graph=mb, microbatches=4, stages=stages,
              balance_eps=0.3)
    full = plan_graph(g, c, reduce=False, **kw)
    reduced = plan_graph(g, c, reduce=True, **kw)
    assert reduced.model["repeat"]["layers"] == layers and "repeat" not in full.model
    for plan in (full, reduced):  # the reported breakdown adds up to the solver's objective
        assert plan.cost["total_s"] == pytest.approx(plan.solver["objective"], rel=1e-6)
    # the unreduced graph is solved by the joint stage model, which still charges the sum of
    # the stages (an upper bound on its plan's step); the program of repeated layers prices
    # the slowest stage: never more than the joint model's plan's own step
    assert reduced.cost["step_time_s"] <= full.cost["step_time_s"] * (1 + 1e-9)
    assert reduced.cost["step_time_s"] <= full.solver["objective"] * (1 + 1e-9)


@pytest.mark.parametrize("v", [1, 2])
def test_expanded_plan_covers_every_node_with_its_stage(v):
    spec = "gpt:layers=8,hidden=32,heads=2,seq=8,batch=8,vocab=64"
    s, g = _graph(spec)
    _, mb = _graph(spec, 4)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(g, c, model_spec=s.text, microbatch_graph=mb, microbatches=4, stages=4,
                      balance_eps=0.3, interleave=v)
    assert plan.interleave == v and plan.num_chunks == 4 * v
    full = expand_plan(plan, mb)
    assert [o.name for o in full.ops] == [n.name for n in mb.nodes]
    blocks = find_blocks(mb)
    for i, members in enumerate(blocks.members):  # 8 / (4 v) layers per chunk, in order
        assert {full.op(n).stage for n in members if mb[n].kind == "op"} == {i // (2 // v)}
    # the loss in the last chunk, the embedding in the first
    assert full.op(mb.loss).stage == 4 * v - 1
    assert min(o.stage for o in full.ops) == 0
    prog = build_program(mb, blocks, 8, 4, 4)
    assert prog.graph.digest() == plan.model["graph_hash"]


def test_recomputation_trades_memory_for_forward_communication():
    from autoddl.engine.costs import TrainingConfig

    s, g = _graph(SPEC)
    c = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    kept = plan_graph(g, c, model_spec=s.text, meshes=[c.mesh((2, 2))])
    redo = plan_graph(g, c, model_spec=s.text, meshes=[c.mesh((2, 2))],
                      config=TrainingConfig(recompute="layers"))
    assert redo.training["recompute"] == "layers"
    assert redo.memory["activations_bytes"] < kept.memory["activations_bytes"]
    assert redo.cost["compute_s"] > kept.cost["compute_s"]  # one more forward per layer
    assert redo.solver["objective"] >= kept.solver["objective"] - 1e-12
