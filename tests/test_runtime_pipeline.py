"""Pipelined plans on gloo: stages scheduled by torch.distributed.pipelining equal one process.

Each launch test plans one micro-batch's graph on a stage mesh, pipelines it with
``tests.helpers.make_pipelined_plan``, runs ``autoddl run --check`` on 4 CPU processes (torchrun,
gloo), and checks rank 0's verdict: the mean micro-batch loss and every parameter's gradient
within 1e-5 of the single-process full-batch run, and the collectives and point-to-point sends
executed equal to the plan's prediction (counts and bytes) and to what torch saw (CommDebugMode
for collectives, the sends the pipelining library issued for ``p2p``).
"""

from __future__ import annotations

import pytest
import torch

from autoddl.engine.capture import microbatch_inputs
from autoddl.engine.plan import load_plan, save_plan
from autoddl.engine.planner import plan_graph
from autoddl.errors import UserError
from autoddl.runtime.pipeline import (
    boundary_tensors, check_stages, p2p_per_step, stage_of,
)
from tests.helpers import cluster, make_pipelined_plan, microbatch_graph, run_checked

GPT = "gpt:layers=2,hidden=64,heads=4,seq=16,batch=8,vocab=128"
MLP = "mlp:batch=64,dim_in=32,hidden=64,layers=2,dim_out=32"


def _pipelined(spec: str, stages: int, stage_devices: int, microbatches: int, schedule: str,
               path):
    graph = microbatch_graph(spec, microbatches)
    c = cluster(devices=stage_devices, latency_s=1e-6, peak_flops=1e10)
    plan = plan_graph(graph, c, model_spec=spec, meshes=[c.mesh((stage_devices,))])
    piped = make_pipelined_plan(plan, stages, microbatches, schedule, graph=graph)
    save_plan(piped, path)
    return graph, load_plan(path)


def _run_checked(path, steps: int = 2) -> str:
    return run_checked(path, steps, require=("p2p",))

def test_microbatch_inputs_slices_dim0():
    x, y = torch.arange(24).view(8, 3), torch.arange(8)
    a, b = microbatch_inputs((x, y), 4)
    assert torch.equal(a, x[:2]) and torch.equal(b, y[:2])
    with pytest.raises(UserError, match="micro-batches"):
        microbatch_inputs((x,), 3)


def test_pipelined_plan_keeps_stage_rules_and_relays(tmp_path):
    graph, plan = _pipelined(GPT, 4, 1, 4, "GPipe", tmp_path / "p.json")
    check_stages(graph, plan)  # raises on a broken rule
    k = stage_of(plan)
    assert sorted(set(k.values())) == [0, 1, 2, 3]
    bounds = boundary_tensors(graph, plan)
    # the int64 targets cross every boundary to reach the loss and carry no gradient
    tgt = [n.name for n in graph.nodes if n.kind == "input" and n.out.dtype == "int64"][-1]
    assert all(tgt in b for b in bounds) and not graph[tgt].requires_grad
    # what the plan predicts is what the runtime sends
    assert plan.cost["per_kind"]["p2p"]["count"] == p2p_per_step(graph, plan)["count"]


# --- launched on 4 gloo processes ---------------------------------------------------------------

@pytest.mark.dist
def test_gpt_two_stages_on_sharded_stage_mesh(tmp_path):
    path = tmp_path / "plan.json"
    graph, plan = _pipelined(GPT, 2, 2, 2, "1F1B", path)
    assert plan.device_mesh_shape == (2, 2)
    assert any(p.startswith("S(") for o in plan.ops for p in o.out.values()), \
        "stage mesh does not shard anything"
    out = _run_checked(path)
    assert "2 stages × 2 micro-batches (1F1B)" in out


@pytest.mark.dist
def test_gpt_four_stages_one_device_each(tmp_path):
    path = tmp_path / "plan.json"
    # one layer over four stages: the residual stream skips a stage (relayed with its gradient)
    graph, plan = _pipelined(GPT.replace("layers=2", "layers=1"), 4, 1, 4, "GPipe", path)
    assert plan.device_mesh_shape == (4, 1)
    # some float tensor skips a stage (relayed with its gradient)
    k = stage_of(plan)
    assert any(graph[n].requires_grad and k[n] < b
               for b, names in enumerate(boundary_tensors(graph, plan)) for n in names)
    _run_checked(path)


@pytest.mark.dist
def test_mlp_two_stages(tmp_path):
    path = tmp_path / "plan.json"
    _pipelined(MLP, 2, 2, 4, "1F1B", path)
    _run_checked(path)
