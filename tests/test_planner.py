"""The planner rediscovers the classic parallelisms when the numbers call for them."""

from __future__ import annotations

import pytest

from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.placements import B, P, S
from autoddl.engine.planner import plan_graph
from autoddl.errors import InfeasibleError
from autoddl.formulations.backends import available_backends
from tests.helpers import cluster


def plan_for(spec: str, c, **kw):
    s = parse_model_spec(spec)
    graph = capture(*build_model(s, "meta"))
    return graph, plan_graph(graph, c, model_spec=s.text, **kw)


def linears(graph):
    return [n for n in graph.ops if n.target == "aten.linear.default"]


def test_data_parallel_for_small_weights_and_large_batch():
    graph, plan = plan_for("mlp:batch=2048,dim_in=32,hidden=64,layers=2,dim_out=32",
                           cluster(devices=4, latency_s=1e-6, peak_flops=1e10))
    assert plan.mesh_shape == (4,)  # all devices on one axis: DP needs no nested split
    (axis,) = plan.axis_names
    for n in linears(graph):
        op = plan.op(n.name)
        assert op.out[axis] == S(0), n.name  # batch split
        assert op.ins[1][axis] == B, n.name  # every device reads the whole weight
    assert plan.op(graph.loss).out[axis] == P  # each device holds its share of the mean
    assert plan.cost["per_kind"].keys() <= {"all_reduce", "all_gather", "reduce_scatter"}


def test_megatron_column_then_row_for_large_weights_and_small_batch():
    # nothing hides the gradient all-reduce of replicated weights (no overlap): Megatron's split
    graph, plan = plan_for("mlp:batch=8,dim_in=1024,hidden=4096,layers=1,dim_out=1024",
                           cluster(devices=4, latency_s=1e-6, peak_flops=1e10, overlap=False))
    first, second = linears(graph)
    tp_axes = [a for a in plan.axis_names if plan.op(first.name).ins[1][a] == S(0)]
    assert tp_axes, "first linear's weight is not split by rows (column parallel)"
    for a in tp_axes:
        assert plan.op(first.name).out[a] == S(1)  # hidden dim split
        assert plan.op(second.name).ins[0][a] == S(1)  # read split, no gather in between
        assert plan.op(second.name).ins[1][a] == S(1)  # weight split by columns (row parallel)
        assert plan.op(second.name).out[a] == P  # partial sums, reduced once
    assert "all_gather" not in plan.cost["per_kind"]  # the activations are never gathered


def test_sharded_weights_when_replicas_do_not_fit():
    spec = "mlp:batch=2048,dim_in=32,hidden=64,layers=2,dim_out=32"
    roomy = cluster(devices=4, latency_s=1e-6, peak_flops=1e10)
    graph, free = plan_for(spec, roomy)
    big = [n for n in graph.params if n.out.ndim == 2]
    for n in big:  # with room, weights are replicated: one all-reduce beats gather + scatter
        assert all(p == B for p in free.op(n.name).out.values()), n.name
    replicated_weights = sum(n.out.nbytes for n in graph.params) * 4  # w + grad + 2 Adam states
    # the data-parallel activations plus 60 % of the replicated weight states
    tight = cluster(devices=4, latency_s=1e-6, peak_flops=1e10,
                    memory_bytes=int(free.memory["activations_bytes"] + 0.6 * replicated_weights))
    _, plan = plan_for(spec, tight)
    assert plan.memory["per_device_bytes"] <= tight.memory_per_device_bytes
    assert free.memory["weights_bytes"] == pytest.approx(replicated_weights)
    # weight states are divided now: the weights split, or kept whole with their gradients and
    # optimizer states split ZeRO-style (same bytes on the wire, one more start-up)
    assert plan.memory["weights_bytes"] < replicated_weights
    assert plan.cost["total_s"] >= free.cost["total_s"] - 1e-12


def test_best_mesh_is_the_cheapest_candidate():
    _, plan = plan_for("gpt:layers=1,hidden=64,heads=4,seq=16,batch=8,vocab=128",
                       cluster(devices=4, latency_s=1e-6, peak_flops=1e10))
    # each candidate's best plan: the ILP's, or the screening's where its bound proved it
    objectives = [c["objective"] if c["objective"] is not None else c["heuristic"]
                  for c in plan.candidates]
    assert all(c["lower_bound"] is None or c["lower_bound"] <= v * (1 + 1e-9)
               for c, v in zip(plan.candidates, objectives))
    assert len(plan.candidates) == 2
    assert plan.solver["objective"] == pytest.approx(min(objectives))
    assert plan.cost["total_s"] == pytest.approx(plan.solver["objective"], rel=1e-6)


def test_no_plan_fits_reports_memory_needed():
    with pytest.raises(InfeasibleError, match=r"leanest plan \(.*\) needs [\d.]+ [KMG]?i?B per device"):
        plan_for("mlp:batch=64,dim_in=256,hidden=1024,layers=2,dim_out=256",
                 cluster(devices=2, memory_bytes=10_000))


@pytest.mark.parametrize("backend", available_backends())
def test_every_backend_finds_the_same_optimum(backend):
    spec = "mlp:batch=64,dim_in=16,hidden=64,layers=1,dim_out=16"
    c = cluster(devices=2, latency_s=1e-6, peak_flops=1e10, overlap=False)  # sum form: CP-SAT too
    _, ref = plan_for(spec, c)
    _, plan = plan_for(spec, c, backend=backend, lp_first=False,  # the MILP backend itself
                       screen=False)
    assert plan.solver["backend"] == backend
    assert plan.solver["status"] == "optimal"
    assert plan.solver["objective"] == pytest.approx(ref.solver["objective"], rel=1e-6)


def test_reported_minimum_memory_is_tight():
    """The memory the leanest plan needs fits exactly; 1 % less fits no plan."""
    from autoddl.engine.costs import build_problem
    from autoddl.engine.planner import min_memory_bytes

    spec = "mlp:batch=64,dim_in=32,hidden=64,layers=1,dim_out=32"
    s = parse_model_spec(spec)
    graph = capture(*build_model(s, "meta"))
    c = cluster(devices=2)
    (mesh,) = c.meshes()
    need = min_memory_bytes(build_problem(graph, mesh, c))
    plan = plan_graph(graph, cluster(devices=2, memory_bytes=int(need) + 1), model_spec=spec)
    assert plan.memory["per_device_bytes"] <= need + 1
    with pytest.raises(InfeasibleError):
        plan_graph(graph, cluster(devices=2, memory_bytes=int(0.99 * need)), model_spec=spec)


@pytest.mark.dist
def test_memory_pressure_picks_zero_and_the_plan_file_keeps_it(tmp_path):
    """Plain data parallelism does not fit; ZeRO-3 (weights stored split, gathered again in
    backward) does, and the ILP's plan fits and costs no more (here a tie: column-split weights
    cost the same). The ZeRO-3 plan's file keeps its levels, and its run matches its
    prediction."""
    from autoddl.engine import baselines
    from autoddl.engine.plan import load_plan, save_plan
    from autoddl.engine.workload import Workload
    from tests.helpers import run_checked

    spec = "mlp:batch=16,dim_in=512,hidden=512,layers=2,dim_out=512"
    c = cluster(devices=4, memory_bytes=8_000_000, peak_flops=1e12)
    graph, plan = plan_for(spec, c, meshes=[c.mesh((4,))])
    psi = sum(n.out.nbytes for n in graph.params)
    assert 4 * psi > c.memory_per_device_bytes  # weight, gradient, 2 Adam states: no DDP
    work = Workload(spec, graph, c)
    assert not baselines.data_parallel(work, "DDP").fits
    zero3 = baselines.data_parallel(work, "ZeRO-3 (FSDP)")
    assert zero3.fits and any(o.zero == 3 for o in zero3.plan.ops if o.target == "param")
    assert plan.memory["per_device_bytes"] <= c.memory_per_device_bytes
    assert plan.cost["total_s"] <= zero3.plan.cost["total_s"] * (1 + 1e-9)
    path = tmp_path / "zero.json"
    save_plan(zero3.plan, path)
    assert [o.zero for o in load_plan(path).ops] == [o.zero for o in zero3.plan.ops]
    run_checked(path, steps=2, require=("all_gather",))
