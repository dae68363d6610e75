"""``--objective bytes``: the bytes each device sends per step, minimized exactly; a pipeline's
busiest stage, never the sum over stages (:mod:`autoddl.engine.objectives`)."""

from __future__ import annotations

import numpy as np
import pytest

from autoddl.engine.costs import TrainingConfig, breakdown, build_problem
from autoddl.engine.objectives import OBJECTIVES, bytes_build, check_objective, pinned
from autoddl.engine.planner import decode, plan_graph, solve_sharding
from autoddl.engine.plan_check import check_plan_data
from autoddl.engine.programs import bytes_step_shape
from autoddl.errors import UserError
from autoddl.formulations.backends import solve
from autoddl.formulations.sharding import (
    EdgeChoices, NodeChoices, ShardingModel, ShardingProblem,
)
from tests.helpers import cluster, mlp_graph


def _mlp_bytes(devices: int = 2):
    graph = mlp_graph(8, 8, 8, 8)
    c = cluster(devices=devices, peak_flops=1e6)  # compute seconds as large as bytes
    mesh = c.mesh((devices,))
    return graph, c, mesh, bytes_build(graph, mesh, c, TrainingConfig())


def test_bytes_optimum_equals_brute_force_and_the_reported_bytes():
    """The MILP's bytes optimum is the exhaustive minimum over every choice of the bytes
    problem, and the bytes it prices for a plan are the bytes the plan's report (every predicted
    collective, :func:`breakdown`) counts: for the optimum and for random plans."""
    graph, c, mesh, priced = _mlp_bytes()
    best, arg = priced.problem.brute_force()
    got = solve_sharding(priced)
    assert got.result.objective == pytest.approx(best, rel=1e-9)
    assert best > 0  # dividing the work costs bytes: the replicated plan is not offered
    real = build_problem(graph, mesh, c)
    for idx in [arg] + [np.array([np.random.default_rng(s).integers(len(n.cost_s))
                                  for n in priced.problem.nodes]) for s in range(5)]:
        choice = decode(priced, idx)
        assert priced.problem.evaluate(idx)[0] == pytest.approx(
            breakdown(real, choice)["bytes_per_device"], rel=1e-9)


def test_bytes_and_step_plans_each_win_their_own_objective():
    """The bytes plan sends no more bytes per device than the step plan, and the step plan's
    step is no slower than the bytes plan's; the plan records which objective it minimized."""
    graph = mlp_graph(16, 32, 64, 32)
    c = cluster(devices=4, gbps=1.0, peak_flops=1e9)
    plans = {o: plan_graph(graph, c, model_spec="mlp", objective=o) for o in OBJECTIVES}
    step, by_bytes = plans["step"], plans["bytes"]
    assert by_bytes.solver["objective_kind"] == "bytes"
    assert step.solver["objective_kind"] == "step"
    assert by_bytes.solver["objective"] == pytest.approx(by_bytes.cost["bytes_per_device"],
                                                         rel=1e-6)
    assert by_bytes.cost["bytes_per_device"] <= step.cost["bytes_per_device"] * (1 + 1e-9)
    assert step.cost["step_time_s"] <= by_bytes.cost["step_time_s"] * (1 + 1e-9)
    assert by_bytes.cost["step_time_s"] > 0  # the step is still reported
    data = by_bytes.to_dict()
    check_plan_data(data)  # the new field is accepted ...
    data["solver"]["objective_kind"] = "flops"
    with pytest.raises(UserError, match="objective_kind"):  # ... and checked
        check_plan_data(data)


def test_bad_objective_is_one_clear_line():
    with pytest.raises(UserError, match="unknown objective 'bites'; choose step"):
        check_objective("bites")
    graph = mlp_graph(8, 8, 8, 8)
    with pytest.raises(UserError, match="unknown objective"):
        plan_graph(graph, cluster(devices=2), model_spec="mlp", objective="time")


class _Prog:
    """What :func:`bytes_step_shape` reads of a program: its stage count."""

    stages = 3


def test_pipelined_bytes_are_the_busiest_stage_not_the_sum():
    """Three stages (groups 0, 1, 2 of a 3-stage program), each a node of two options with
    these bytes per device: first (6, 3), middle (1, 5), last (4, 3); an edge forbids the
    first stage's option 1 with the middle's option 0. By hand: the busiest stage's bytes
    are 6 for (0, 0, ·) and (0, 1, ·), and 5 for (1, 1, ·): the optimum is 5.
    The least sum, 6 + 1 + 3 = 10 at (0, 0, 1), is a plan whose busiest stage sends 6."""
    kappa, shape = bytes_step_shape(_Prog())
    per_stage = {0: [6.0, 3.0], 1: [1.0, 5.0], 2: [4.0, 3.0]}
    nodes = tuple(NodeChoices(f"s{g}", kappa * np.array(v), np.zeros(2), group=g)
                  for g, v in per_stage.items())
    link = EdgeChoices(0, 1, np.array([0, 1]), np.array([0, 1]),
                       np.array([[0.0, 0.0], [np.inf, 0.0]]), np.zeros((2, 2)), group=1)
    problem = ShardingProblem(nodes, (link,), 1.0, shape)
    best, arg = problem.brute_force()
    assert best == pytest.approx(5.0) and list(arg[:2]) == [1, 1]
    assert problem.evaluate(np.array([0, 0, 1]))[0] == pytest.approx(6.0)  # not 6 + 1 + 3
    model = ShardingModel(problem)
    r = solve(model.milp(), "highs")
    assert r.objective == pytest.approx(5.0, rel=1e-9)
    assert list(model.choice(r.x)[:2]) == [1, 1]


def test_pipelined_plan_reports_busiest_stage_bytes():
    """A pipelined GPT planned for bytes: its objective is the busiest stage's bytes per
    device, below the sum over stages, and at least their mean."""
    from autoddl.engine.capture import capture
    from autoddl.engine.models import build_model, parse_model_spec
    from tests.helpers import microbatch_graph

    spec = "gpt:layers=4,hidden=32,heads=4,seq=16,batch=8,vocab=64"
    graph = capture(*build_model(parse_model_spec(spec), "meta"))
    c = cluster(devices=4, gbps=1.0, peak_flops=1e9)
    plan = plan_graph(graph, c, model_spec=spec, microbatch_graph=microbatch_graph(spec, 4),
                      microbatches=4, stages=2, objective="bytes")
    stage, total = plan.cost["stage_bytes_per_device"], plan.cost["bytes_per_device"]
    assert plan.solver["objective"] == pytest.approx(stage, rel=1e-6)
    assert total / 2 * (1 - 1e-9) <= stage < total


def test_pinned_problem_keeps_one_choice():
    graph, c, mesh, priced = _mlp_bytes()
    idx = np.zeros(len(priced.problem.nodes), dtype=int)
    one = pinned(priced.problem, idx)
    assert all(len(n.cost_s) == 1 for n in one.nodes)
    assert one.evaluate(idx)[0] == pytest.approx(priced.problem.evaluate(idx)[0], rel=1e-12)
