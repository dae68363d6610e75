"""Error catalogue cases that the command line cannot provoke deterministically, in-process.

A solver time-out returns the best plan found with its proven gap and a warning; a time-out with
no solution at all is an error, never an empty plan; an operator without a sharding rule runs
replicated and is listed (an error, naming it, under ``--strict-rules``);
a model that fits no plan names the memory its leanest plan needs and the largest consumers.
(The command-line cases are in ``tests/test_cli.py``.)
"""

from __future__ import annotations

import dataclasses

import pytest

import autoddl.engine.planner as planner
from autoddl.engine.graph import OpGraph, OpNode, TensorArg, TensorMeta
from autoddl.errors import InfeasibleError, NoRuleError, SolverError
from autoddl.formulations.milp import SolveStatus, relative_gap
from tests.helpers import cluster, mlp_graph

GRAPH = mlp_graph(batch=8, d_in=4, hidden=16, d_out=4)


def _timed_out_with_gap(real):
    """``solve_lp_first`` as if the time limit stopped each MILP at its optimum, with its bound
    only 80 % of it proven."""
    def fake(*args, **kwargs):
        r = real(*args, **kwargs)
        if r.status is not SolveStatus.OPTIMAL:
            return r
        bound = 0.8 * r.objective
        return dataclasses.replace(r, status=SolveStatus.FEASIBLE, bound=bound,
                                   gap=relative_gap(r.objective, bound))
    return fake


def test_time_out_returns_the_best_plan_with_its_gap_and_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(planner, "solve_lp_first", _timed_out_with_gap(planner.solve_lp_first))
    plan = planner.plan_graph(GRAPH, cluster(devices=4), model_spec="mlp", screen=False,
                              time_limit_s=60, workers=1)
    assert plan.solver["status"] == "feasible"
    assert plan.solver["gap"] == pytest.approx(0.2, rel=1e-6)
    err = capsys.readouterr().err
    assert "warning: time limit reached" in err and "20 %" in err, err


def test_time_out_without_any_plan_is_an_error(monkeypatch):
    def nothing(*args, **kwargs):
        r = real(*args, **kwargs)
        return dataclasses.replace(r, status=SolveStatus.NO_SOLUTION, x=None, objective=None,
                                   gap=None, message="time limit")
    real = planner.solve_lp_first
    monkeypatch.setattr(planner, "solve_lp_first", nothing)
    with pytest.raises(SolverError, match="no plan found within the time limit"):
        planner.plan_graph(GRAPH, cluster(devices=2), model_spec="mlp", screen=False,
                           time_limit_s=60, workers=1)


def test_unknown_operator_is_named_with_its_count():
    f = "float32"
    nodes = GRAPH.nodes[:-1] + (
        OpNode("odd", "op", "aten.frobnicate.default", TensorMeta((8, 4), f), ("o",),
               (TensorArg(0),), flops=32.0, requires_grad=True),
        OpNode("loss", "op", "aten.mse_loss.default", TensorMeta((), f), ("odd", "y"),
               (TensorArg(0), TensorArg(1)), flops=32.0, requires_grad=True),
    )
    with pytest.raises(NoRuleError, match=r"aten\.frobnicate\.default \(x1\)"):
        planner.plan_graph(OpGraph(nodes, "loss"), cluster(devices=2), model_spec="mlp",
                           strict_rules=True)
    # by default it runs replicated, and the plan says so
    plan = planner.plan_graph(OpGraph(nodes, "loss"), cluster(devices=2), model_spec="mlp")
    assert plan.model["fallback_ops"] == {"aten.frobnicate.default": 1}
    assert plan.op("odd").ins[0] == {plan.axis_names[0]: "B"} and \
        plan.op("odd").out == {plan.axis_names[0]: "B"}


def test_no_plan_fits_names_the_memory_needed_and_the_largest_consumers():
    with pytest.raises(InfeasibleError) as info:
        planner.plan_graph(GRAPH, cluster(devices=2, memory_bytes=64), model_spec="mlp",
                           workers=1)
    msg = str(info.value)
    assert "no plan fits 64 B per device" in msg and "needs" in msg, msg
    # weights: 4x16 floats x (weight, gradient, two Adam states) / 2 devices at their leanest
    assert "largest consumers: w1 512 B, w2 512 B, a 256 B;" in msg, msg
    assert "\n" not in msg


def test_microbatches_not_dividing_the_batch():
    from autoddl.engine.capture import microbatch_inputs
    from autoddl.errors import UserError

    import torch

    with pytest.raises(UserError, match="5 micro-batches do not divide the batch of 16"):
        microbatch_inputs((torch.zeros(16, 3),), 5)
